"""The Fabric loop: Fabric's ``ModelParallelStrategy(parallelize_fn=...)`` plus a loop that saves each image once."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..batch import ImageFolder, PromptRecord, check_writable_everywhere
from .module import DiffusionModule, _mesh_device
from .writer import save_images

__all__ = ["predict_to_folder"]


def predict_to_folder(
    module: Any, batches: Iterable[list[PromptRecord]], folder: str | Path | ImageFolder
) -> list[Path]:
    """Make and save every record's image with a module set up by Fabric, skipping those already in ``folder``.

    Every rank calls this with its loader (``fabric.setup_dataloaders`` shards it over the data-parallel
    dimension only). The folder is checked before any image is made; rank 0 of each image group saves.

    Args:
        module: ``fabric.setup(DiffusionModule(...))`` under ``ModelParallelStrategy(parallelize_fn=parallelize_fn)``.
        batches: this rank's batches of records: ``fabric.setup_dataloaders(loader, move_to_device=False)``
            (Lightning's device transfer refuses the frozen records).
        folder: the output folder.

    Returns:
        The files this rank wrote (empty on ranks that do not save).

    Raises:
        OutputError: the folder cannot be written (on every rank, before any image is made).
        TypeError: ``module`` is not a set-up :class:`DiffusionModule`.

    Example:
        >>> fabric = Fabric(devices=4, strategy=ModelParallelStrategy(parallelize_fn=parallelize_fn,
        ...                 **layout.strategy_kwargs(4)))  # doctest: +SKIP
        >>> module = fabric.setup(DiffusionModule(layout))  # doctest: +SKIP
        >>> batches = fabric.setup_dataloaders(loader, move_to_device=False)  # doctest: +SKIP
        >>> predict_to_folder(module, batches, "out")  # doctest: +SKIP
    """
    inner = getattr(module, "module", module)  # Fabric wraps the module; its attributes live on the original
    if not isinstance(inner, DiffusionModule):
        raise TypeError(f"predict_to_folder needs fabric.setup(DiffusionModule(...)), got {type(inner).__name__}")
    target = folder if isinstance(folder, ImageFolder) else ImageFolder(Path(folder))
    check_writable_everywhere(target, inner.writes, _mesh_device(inner.mesh))
    written: list[Path] = []
    for batch in batches:
        results = module(batch, target)
        if inner.writes:
            written.extend(save_images(results, target))
    return written
