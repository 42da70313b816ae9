"""The LightningModule that turns batches of prompt records into images on data-parallel groups of patch ranks."""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from pcpp import ConversionError, PCPPConfig

from ..batch import (
    TENSOR_PARALLEL,
    BackendFactory,
    DiffusionBackend,
    GroupLayout,
    ImageFolder,
    PromptRecord,
    agree_written,
    group_rank,
    patch_mesh,
    tiny_backend,
)

__all__ = ["DiffusionModule", "GeneratedImage", "parallelize_fn"]

logger = logging.getLogger(__name__)


class GeneratedImage:
    """One finished image and the record it was made from; ``image`` is ``(3, H, W)`` in [0, 1] on the CPU.

    A plain read-only class, not a dataclass: Lightning moves predictions with ``apply_to_collection``, which
    refuses frozen dataclasses and would copy a mutable one; it leaves other objects as they are.
    """

    __slots__ = ("_image", "_record")

    def __init__(self, record: PromptRecord, image: Tensor) -> None:
        self._record = record
        self._image = image

    @property
    def record(self) -> PromptRecord:
        """The record."""
        return self._record

    @property
    def image(self) -> Tensor:
        """The image."""
        return self._image

    def __repr__(self) -> str:
        return f"GeneratedImage({self._record!r}, image of shape {tuple(self._image.shape)})"


def _mesh_device(device_mesh: DeviceMesh) -> torch.device:
    # Lightning's accelerators have already called torch.cuda.set_device(root_device) on every rank.
    if device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device_mesh.device_type)


class DiffusionModule(LightningModule):
    """Diffusion inference with pcpp under Lightning's ``ModelParallelStrategy`` (Trainer or Fabric).

    Lightning's mesh has dimensions ``("data_parallel", "tensor_parallel")``: each row of ``tensor_parallel``
    ranks (an *image group*, ``layout.patch x layout.cfg`` ranks) makes one image at a time, and the strategy's
    sampler gives every rank of a row the same records while the rows share the records out. ``configure_model``
    builds the model on each rank and converts it on the row's mesh (see :func:`pcpp.lightning.patch_mesh`);
    ``predict_step`` makes one image per record, with the record's seed on every rank of the group.

    Args:
        layout: the image group; its ``group_size`` must be the strategy's ``tensor_parallel_size``.
        backend: ``(device) -> backend`` (:func:`~pcpp.lightning.tiny_backend`, the default, or
            :func:`~pcpp.lightning.pipeline_backend`).
        config: pcpp's settings, as for :func:`pcpp.convert`.

    Raises:
        ConversionError: (in ``configure_model``) the mesh does not match ``layout``, or the model cannot be
            converted.

    Example:
        >>> layout = GroupLayout(patch=2)  # doctest: +SKIP
        >>> trainer = Trainer(devices=4, strategy=ModelParallelStrategy(**layout.strategy_kwargs(4)),
        ...                   callbacks=[ImageWriter("out")])  # doctest: +SKIP
        >>> trainer.predict(DiffusionModule(layout), loader, return_predictions=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        layout: GroupLayout,
        backend: BackendFactory = tiny_backend,
        config: PCPPConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(layout, GroupLayout):
            raise ConversionError(f"layout={layout!r} must be a pcpp.lightning.GroupLayout")
        self.layout = layout
        self.pcpp_config = config if config is not None else PCPPConfig()
        self._factory = backend
        self._backend: DiffusionBackend | None = None
        self._mesh: DeviceMesh | None = None
        self._skip: ImageFolder | None = None

    @property
    def backend(self) -> DiffusionBackend:
        """The converted model.

        Raises:
            RuntimeError: before ``configure_model`` (Trainer) or ``fabric.setup`` (Fabric).
        """
        if self._backend is None:
            raise RuntimeError("the model is built in configure_model (Trainer) or fabric.setup (Fabric); not yet")
        return self._backend

    def parallelize(self, device_mesh: DeviceMesh) -> None:
        """Build the model on this rank's device and convert it on this rank's image group (once).

        Every rank must call this together. Called by ``configure_model`` and by :func:`parallelize_fn`.

        Args:
            device_mesh: Lightning's 2-D mesh.

        Raises:
            ConversionError: the mesh does not match the layout, or the model cannot be converted.
        """
        if self._backend is not None:  # Lightning may call configure_model again (e.g. a second predict)
            return
        comm = patch_mesh(device_mesh, self.layout)
        backend = self._factory(_mesh_device(device_mesh))
        backend.parallelize(comm, self.pcpp_config)
        self._mesh, self._backend = device_mesh, backend
        logger.info("pcpp.lightning: %s on image groups of %s", backend.describe(), self.layout)

    @property
    def mesh(self) -> DeviceMesh:
        """Lightning's mesh this module was parallelised on.

        Raises:
            RuntimeError: before :meth:`parallelize`.
        """
        if self._mesh is None:
            raise RuntimeError("the module is parallelised in configure_model (Trainer) or fabric.setup (Fabric)")
        return self._mesh

    def configure_model(self) -> None:
        """Lightning's hook: :meth:`parallelize` on ``self.device_mesh``.

        Raises:
            ConversionError: not under Lightning's ``ModelParallelStrategy`` (no device mesh).
        """
        if self.device_mesh is None:
            raise ConversionError(
                "DiffusionModule needs Lightning's ModelParallelStrategy (it has no device mesh otherwise): "
                "Trainer(strategy=ModelParallelStrategy(**layout.strategy_kwargs(devices, num_nodes)))"
            )
        self.parallelize(self.device_mesh)

    def skip_written(self, folder: ImageFolder | None) -> None:
        """Skip records whose image is already in ``folder`` (the writer calls this; ``None`` to make all)."""
        self._skip = folder

    def _pending(self, records: list[PromptRecord], skip: ImageFolder | None) -> list[bool]:
        """Which records to make. Rank 0 of the image group (the one that saves) decides for the whole group, so
        the group agrees even where its ranks do not share a file system."""
        if skip is None:
            return [True] * len(records)
        mesh = self.mesh
        group = mesh.get_group(TENSOR_PARALLEL) if mesh.size(1) > 1 else None
        if group is None:  # one rank per image: nothing to agree on (and no collective over the world)
            return [not skip.is_written(r) for r in records]
        written = agree_written(skip, records, self.writes, _mesh_device(mesh), group=group)
        return [not flag for flag in written]

    def forward(self, records: list[PromptRecord], skip: ImageFolder | None = None) -> list[GeneratedImage]:
        """Make one image per record, one after the other, leaving out those already in ``skip``.

        Every rank of the image group must call this with the same records.

        Args:
            records: the batch.
            skip: a folder whose images count as done.

        Returns:
            The images made, in order, on every rank of the group.
        """
        backend = self.backend
        todo = self._pending(records, skip)
        return [GeneratedImage(r, backend.generate(r)) for r, make in zip(records, todo, strict=True) if make]

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's hook: records are host data (the backend moves what it makes), so nothing is moved."""
        return batch

    def predict_step(self, batch: list[PromptRecord], batch_idx: int) -> list[GeneratedImage]:
        """Lightning's hook: :meth:`forward` on the batch, skipping what the writer's folder already holds."""
        return self(batch, self._skip)

    @property
    def writes(self) -> bool:
        """Whether this rank saves its group's images (rank 0 of the image group)."""
        return self._mesh is None or group_rank(self._mesh) == 0

    def describe(self) -> str:
        """The model and layout, for the images' metadata."""
        return f"{self.backend.describe()}; patch {self.layout.patch} x cfg {self.layout.cfg}"


def parallelize_fn(module: Any, device_mesh: DeviceMesh) -> Any:
    """Fabric's ``ModelParallelStrategy(parallelize_fn=...)`` for a :class:`DiffusionModule`.

    Example:
        >>> layout = GroupLayout(patch=2)  # doctest: +SKIP
        >>> strategy = ModelParallelStrategy(parallelize_fn, **layout.strategy_kwargs(4))  # doctest: +SKIP
    """
    if not isinstance(module, DiffusionModule):
        raise ConversionError(f"pcpp.lightning.parallelize_fn expects a DiffusionModule, got {type(module).__name__}")
    module.parallelize(device_mesh)
    return module
