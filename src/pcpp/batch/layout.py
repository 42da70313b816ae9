"""How a Lightning device mesh ``("data_parallel", "tensor_parallel")`` is cut into pcpp's CFG and patch groups.

Lightning's ``ModelParallelStrategy`` arranges the ranks as ``arange(world).reshape(data_parallel,
tensor_parallel)``: each row is one *image group* that makes one image at a time, and the rows are the
data-parallel groups that share out the prompts. pcpp uses a row as it is (``cfg=1``: every rank of the row holds
one strip of the image), or reshapes it to ``(cfg=2, patch)`` (the first ``patch`` ranks of the row compute the
unconditional half of the classifier-free-guidance batch, the next ``patch`` the conditional half), the same order
as ``pcpp generate --cfg-split``. pcpp never picks devices or creates the world group; it only builds the
sub-groups of the mesh it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from ..errors import ConversionError

__all__ = ["DATA_PARALLEL", "TENSOR_PARALLEL", "GroupLayout", "group_rank", "patch_mesh"]

DATA_PARALLEL = "data_parallel"
TENSOR_PARALLEL = "tensor_parallel"


@dataclass(frozen=True)
class GroupLayout:
    """The ranks that make one image together: ``cfg x patch`` of them (Lightning's ``tensor_parallel_size``).

    Args:
        patch: ranks that split the image into horizontal strips.
        cfg: 2 to also split the classifier-free-guidance batch over two patch groups, 1 not to.

    Raises:
        ConversionError: ``patch < 1`` or ``cfg`` not 1 or 2.

    Example:
        >>> GroupLayout(patch=2, cfg=2).data_parallel_size(8)
        2
    """

    patch: int
    cfg: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or self.patch < 1:
            raise ConversionError(f"GroupLayout(patch={self.patch!r}) must be an int >= 1 (ranks per image strip set)")
        if self.cfg not in (1, 2) or isinstance(self.cfg, bool):
            raise ConversionError(
                f"GroupLayout(cfg={self.cfg!r}) must be 1 (no CFG split) or 2 (the guidance batch split in halves)"
            )

    @property
    def group_size(self) -> int:
        """Ranks per image group: Lightning's ``tensor_parallel_size``."""
        return self.patch * self.cfg

    def data_parallel_size(self, world_size: int) -> int:
        """How many image groups ``world_size`` processes form: Lightning's ``data_parallel_size``.

        Args:
            world_size: processes in the job (``devices * num_nodes``).

        Returns:
            ``world_size // group_size``.

        Raises:
            ConversionError: ``group_size`` does not divide ``world_size``.
        """
        if world_size < 1 or world_size % self.group_size:
            raise ConversionError(
                f"the group layout patch {self.patch} x cfg {self.cfg} = {self.group_size} ranks per image does not "
                f"divide the world of {world_size} processes; pick a group size that divides it (e.g. "
                f"{_divisors(world_size)})"
            )
        return world_size // self.group_size

    def strategy_kwargs(self, devices: int, num_nodes: int = 1) -> dict[str, int]:
        """``data_parallel_size`` and ``tensor_parallel_size`` for Lightning's ``ModelParallelStrategy``.

        Args:
            devices: processes per node (``Trainer(devices=...)``).
            num_nodes: nodes (``Trainer(num_nodes=...)``).

        Returns:
            The two keyword arguments, checked to fit ``devices * num_nodes`` processes.

        Raises:
            ConversionError: the layout does not divide the world.

        Example:
            >>> GroupLayout(patch=2).strategy_kwargs(devices=4)
            {'data_parallel_size': 2, 'tensor_parallel_size': 2}
        """
        return {
            "data_parallel_size": self.data_parallel_size(devices * num_nodes),
            "tensor_parallel_size": self.group_size,
        }


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) if n >= 1 else "none"


def _check_mesh(device_mesh: Any, layout: GroupLayout) -> None:
    names = tuple(getattr(device_mesh, "mesh_dim_names", None) or ())
    if not isinstance(device_mesh, DeviceMesh) or names != (DATA_PARALLEL, TENSOR_PARALLEL):
        raise ConversionError(
            f"expected Lightning's 2-D DeviceMesh with dimensions {(DATA_PARALLEL, TENSOR_PARALLEL)}, got "
            f"{device_mesh!r}; use lightning's ModelParallelStrategy (Trainer or Fabric)"
        )
    tensor_parallel = device_mesh.size(1)
    if tensor_parallel != layout.group_size:
        raise ConversionError(
            f"the mesh's tensor_parallel dimension has {tensor_parallel} ranks but the group layout patch "
            f"{layout.patch} x cfg {layout.cfg} needs {layout.group_size}; build the strategy with "
            f"ModelParallelStrategy(**layout.strategy_kwargs(devices, num_nodes))"
        )


def patch_mesh(device_mesh: DeviceMesh, layout: GroupLayout) -> DeviceMesh:
    """This rank's patch mesh, for ``pcpp.convert(comm=...)``: 1-D ``("patch",)`` or 2-D ``("cfg", "patch")``.

    Every rank of the job must call this together (``cfg=2`` builds process groups, a collective call).

    Args:
        device_mesh: Lightning's mesh (``self.device_mesh`` in ``configure_model``, or Fabric's
            ``parallelize_fn`` argument).
        layout: the image group's layout; its size must equal the mesh's ``tensor_parallel`` dimension.

    Returns:
        The mesh of this rank's image group.

    Raises:
        ConversionError: the mesh is not Lightning's 2-D mesh, or its ``tensor_parallel`` size is not
            ``layout.group_size``.
    """
    _check_mesh(device_mesh, layout)
    if layout.cfg == 1:
        return device_mesh[TENSOR_PARALLEL]
    ranks = torch.as_tensor(device_mesh.mesh).reshape(device_mesh.size(0), layout.cfg, layout.patch)
    full = DeviceMesh(device_mesh.device_type, ranks, mesh_dim_names=(DATA_PARALLEL, "cfg", "patch"))
    return full["cfg", "patch"]


def group_rank(device_mesh: DeviceMesh) -> int:
    """This rank's position in its image group (0 is the rank that saves the group's images)."""
    return int(device_mesh.get_local_rank(TENSOR_PARALLEL))
