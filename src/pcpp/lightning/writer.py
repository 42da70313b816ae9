"""Saving each image once: on rank 0 of its image group, as a PNG with its record in the metadata, resumably."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

from ..batch import ImageFolder, check_writable_everywhere
from .module import DiffusionModule, GeneratedImage

__all__ = ["ImageWriter", "save_images"]

logger = logging.getLogger(__name__)


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
