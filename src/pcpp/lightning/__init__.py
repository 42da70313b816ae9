"""pcpp under Lightning: many prompts over data-parallel groups of patch-parallel ranks.

Install with ``pip install pcpp[lightning]``.

Lightning's ``ModelParallelStrategy`` (Trainer or Fabric) builds the 2-D mesh ``("data_parallel",
"tensor_parallel")``; :class:`DiffusionModule` converts the model on each ``tensor_parallel`` row (one image group,
see :class:`GroupLayout`) and :class:`ImageWriter` saves each image once. See ``docs/lightning.md``.
"""

try:
    import lightning  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pcpp.lightning needs Lightning: pip install 'pcpp[lightning]'") from exc

from .backends import (
    BackendFactory,
    DiffusionBackend,
    PipelineBackend,
    TinyBackend,
    parallelize_pipeline,
    pipeline_backend,
    tiny_backend,
)
from .fabric import predict_to_folder
from .images import ImageFolder, OutputError, quantize, read_metadata
from .layout import GroupLayout, group_rank, patch_mesh
from .module import DiffusionModule, GeneratedImage, parallelize_fn
from .records import PromptDataset, PromptRecord, collate_records
from .writer import ImageWriter, check_writable_everywhere, save_images

__all__ = [
    "BackendFactory",
    "DiffusionBackend",
    "DiffusionModule",
    "GeneratedImage",
    "GroupLayout",
    "ImageFolder",
    "ImageWriter",
    "OutputError",
    "PipelineBackend",
    "PromptDataset",
    "PromptRecord",
    "TinyBackend",
    "check_writable_everywhere",
    "collate_records",
    "group_rank",
    "parallelize_fn",
    "parallelize_pipeline",
    "patch_mesh",
    "pipeline_backend",
    "predict_to_folder",
    "quantize",
    "read_metadata",
    "save_images",
    "tiny_backend",
]
