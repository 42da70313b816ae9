"""pcpp under Lightning: many prompts over data-parallel groups of patch-parallel ranks.

Install with ``pip install pcpp[lightning]``.

Lightning's ``ModelParallelStrategy`` (Trainer or Fabric) builds the 2-D mesh ``("data_parallel",
"tensor_parallel")``; :class:`DiffusionModule` converts the model on each ``tensor_parallel`` row (one image group,
see :class:`GroupLayout`) and :class:`ImageWriter` saves each image once. See ``docs/lightning.md``.

Records, backends, the image folder and the group layout live in :mod:`pcpp.batch` (no Lightning needed; ``pcpp
generate --prompts`` uses them too) and are re-exported here.
"""

try:
    import lightning  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("pcpp.lightning needs Lightning: pip install 'pcpp[lightning]'") from exc

from ..batch import (
    BackendFactory,
    DiffusionBackend,
    GroupLayout,
    ImageFolder,
    OutputError,
    PipelineBackend,
    PromptDataset,
    PromptRecord,
    TinyBackend,
    check_writable_everywhere,
    collate_records,
    group_rank,
    parallelize_pipeline,
    patch_mesh,
    pipeline_backend,
    quantize,
    read_metadata,
    tiny_backend,
)
from .fabric import predict_to_folder
from .module import DiffusionModule, GeneratedImage, parallelize_fn
from .writer import ImageWriter, save_images

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
