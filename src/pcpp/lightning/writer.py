"""Saving each image once: on rank 0 of its image group, as a PNG with its record in the metadata, resumably."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from .images import ImageFolder, OutputError
from .module import DiffusionModule, GeneratedImage

__all__ = ["ImageWriter", "check_writable_everywhere", "save_images"]

logger = logging.getLogger(__name__)


def check_writable_everywhere(folder: ImageFolder, writes: bool, device: torch.device) -> None:
    """Every saving rank checks ``folder``; if one cannot write, every rank raises (none is left waiting).

    A collective over the default group: every rank must call it.

    Args:
        folder: the output folder.
        writes: whether this rank saves images.
        device: a device the default group's backend can reduce on (CPU for gloo, this rank's GPU for NCCL).

    Raises:
        OutputError: this rank, or another saving rank, cannot write the folder.
    """
    error: OutputError | None = None
    if writes:
        try:
            folder.check_writable()
        except OutputError as exc:
            error = exc
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        ok = torch.tensor([0 if error else 1], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if error is None and not ok.item():
            raise OutputError(f"another rank cannot write images to {str(folder.path)!r} (see its error)")
    if error is not None:
        raise error


def save_images(results: Sequence[GeneratedImage], folder: ImageFolder) -> list[Path]:
    """Write each image not already in ``folder``; call on the saving rank only.

    Returns:
        The files written now.
    """
    written = []
    for item in results:
        if not folder.is_written(item.record):
            written.append(folder.write(item.record, item.image))
    return written


class ImageWriter(BasePredictionWriter):
    """A Lightning prediction writer for :class:`~pcpp.lightning.DiffusionModule`: one PNG per record.

    At ``setup`` (before any image is made) every saving rank proves it can write the folder, and the module is
    told to skip records whose PNG is already there, so a second run with the same folder makes and writes only
    what is missing. After each batch, rank 0 of each image group writes its group's images.

    Args:
        folder: the output folder, or an :class:`~pcpp.lightning.ImageFolder`.

    Raises:
        OutputError: (at setup) the folder cannot be written.

    Example:
        >>> trainer = Trainer(..., callbacks=[ImageWriter("out")])  # doctest: +SKIP
    """

    def __init__(self, folder: str | Path | ImageFolder) -> None:
        super().__init__(write_interval="batch")
        self.folder = folder if isinstance(folder, ImageFolder) else ImageFolder(Path(folder))
        self.written: list[Path] = []

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Check the folder on every saving rank and make the module skip the images already written."""
        if not isinstance(pl_module, DiffusionModule):
            raise TypeError(f"ImageWriter writes the images of a pcpp.lightning.DiffusionModule, not {pl_module!r}")
        check_writable_everywhere(self.folder, self._writes(trainer), trainer.strategy.root_device)
        pl_module.skip_written(self.folder)

    @staticmethod
    def _writes(trainer: Any) -> bool:
        mesh = getattr(trainer.strategy, "device_mesh", None)
        return mesh is None or int(mesh.get_local_rank("tensor_parallel")) == 0

    def write_on_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Save the batch's images on rank 0 of the image group."""
        if self._writes(trainer):
            files = save_images(prediction, self.folder)
            self.written.extend(files)
            for path in files:
                logger.info("saved %s", path)
