"""Many prompts over data-parallel groups of patch-parallel ranks, without Lightning.

The pieces shared by ``pcpp generate --prompts`` and :mod:`pcpp.lightning` (which re-exports them): prompt records
and prompt files (:mod:`~pcpp.batch.records`, :mod:`~pcpp.batch.promptfile`), the models that make a record's
image (:mod:`~pcpp.batch.backends`), the output folder (:mod:`~pcpp.batch.images`, PNGs written through
:mod:`pcpp.models.imageio`), what the ranks agree on before making images (:mod:`~pcpp.batch.agree`) and how a
``("data_parallel", "tensor_parallel")`` device mesh is cut into pcpp's CFG and patch groups
(:mod:`~pcpp.batch.layout`). Nothing here imports Lightning.
"""

from .agree import agree_written, check_writable_everywhere
from .backends import (
    BackendFactory,
    DiffusionBackend,
    PipelineBackend,
    TinyBackend,
    parallelize_pipeline,
    pipeline_backend,
    tiny_backend,
)
from .images import ImageFolder, OutputError, quantize, read_metadata
from .layout import DATA_PARALLEL, TENSOR_PARALLEL, GroupLayout, group_rank, patch_mesh
from .promptfile import PromptFile, RecordDefaults, SkippedLine, read_prompt_file
from .records import PromptDataset, PromptRecord, collate_records

__all__ = [
    "DATA_PARALLEL",
    "TENSOR_PARALLEL",
    "BackendFactory",
    "DiffusionBackend",
    "GroupLayout",
    "ImageFolder",
    "OutputError",
    "PipelineBackend",
    "PromptDataset",
    "PromptFile",
    "PromptRecord",
    "RecordDefaults",
    "SkippedLine",
    "TinyBackend",
    "agree_written",
    "check_writable_everywhere",
    "collate_records",
    "group_rank",
    "parallelize_pipeline",
    "patch_mesh",
    "pipeline_backend",
    "quantize",
    "read_metadata",
    "read_prompt_file",
    "tiny_backend",
]
