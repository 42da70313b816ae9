"""Turn what the user passes as ``comm`` into the patch communicator and the optional CFG communicator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ..errors import ConversionError
from .base import PatchCommunicator, TimedCommunicator
from .torch_dist import TorchCommunicator

__all__ = ["CommLike", "ParallelGroups", "resolve_groups"]

PATCH_DIM = "patch"
CFG_DIM = "cfg"

CommLike = Any
"""What ``pcpp.convert(comm=...)`` accepts: ``None``, a ProcessGroup, a DeviceMesh, a communicator, or
:class:`ParallelGroups`."""


@dataclass(frozen=True)
class ParallelGroups:
    """The communicators of one converted UNet.

    Args:
        patch: the ranks that split one image into horizontal strips.
        cfg: the two ranks (one per patch position) that split a classifier-free-guidance batch in halves, or
            ``None`` for no CFG split. Rank 0 of ``cfg`` takes the first half of the batch (the unconditional
            one, as diffusers orders it).

    Raises:
        ConversionError: ``cfg`` does not have exactly 2 ranks, or a member is not a communicator.
    """

    patch: PatchCommunicator
    cfg: PatchCommunicator | None = None

    def __post_init__(self) -> None:
        for name in ("patch", "cfg"):
            value = getattr(self, name)
            if value is None and name == "cfg":
                continue
            if not isinstance(value, PatchCommunicator):
                raise ConversionError(
                    f"ParallelGroups.{name}={value!r} is not a pcpp communicator ({_missing(value)}); wrap a "
                    "process group as pcpp.comm.TorchCommunicator(group)."
                )
        if self.cfg is not None and self.cfg.world_size not in (1, 2):
            raise ConversionError(
                f"the CFG group has {self.cfg.world_size} ranks but a classifier-free-guidance batch splits into "
                "exactly 2 halves; build the mesh with a 'cfg' dimension of size 2 (or 1 for no split)."
            )
        if dist.is_available() and dist.is_initialized() and isinstance(self.patch, TorchCommunicator):
            cfg_size = self.cfg.world_size if self.cfg is not None else 1
            if self.patch.world_size * cfg_size > dist.get_world_size():
                raise ConversionError(
                    f"the communicators need patch {self.patch.world_size} x cfg {cfg_size} = "
                    f"{self.patch.world_size * cfg_size} ranks but the world has only {dist.get_world_size()}."
                )

    def apply_timeout(self, timeout: timedelta) -> None:
        """Bound every wait of the communicators that take a limit (:class:`~pcpp.comm.base.TimedCommunicator`).

        The one place where a communicator learns ``PCPPConfig.timeout``: :func:`pcpp.convert` and
        :func:`pcpp.configure` call it.

        Args:
            timeout: the longest a wait on a peer may take.
        """
        for comm in (self.patch, self.cfg):
            if isinstance(comm, TimedCommunicator):
                comm.timeout = timeout

    @property
    def cfg_split(self) -> bool:
        """Whether the batch is split in CFG halves across two groups."""
        return self.cfg is not None and self.cfg.world_size == 2


def _from_mesh(mesh: Any) -> ParallelGroups:
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim == 1:
        return ParallelGroups(patch=TorchCommunicator(mesh.get_group()))
    if mesh.ndim != 2 or set(names) != {CFG_DIM, PATCH_DIM}:
        raise ConversionError(
            f"a {mesh.ndim}-D DeviceMesh with dimension names {names or None} cannot be used: pass a 1-D mesh of "
            "the patch ranks, or a 2-D mesh with dimensions named ('cfg', 'patch'), e.g. "
            "init_device_mesh('cuda', (2, n), mesh_dim_names=('cfg', 'patch'))."
        )
    cfg_size = mesh.size(names.index(CFG_DIM))
    if cfg_size not in (1, 2):
        raise ConversionError(
            f"the mesh's 'cfg' dimension has size {cfg_size}, but a classifier-free-guidance batch splits into "
            "exactly 2 halves; use size 2 (or 1 for no CFG split)."
        )
    patch = TorchCommunicator(mesh.get_group(PATCH_DIM))
    cfg = TorchCommunicator(mesh.get_group(CFG_DIM)) if cfg_size == 2 else None
    return ParallelGroups(patch=patch, cfg=cfg)


def resolve_groups(comm: CommLike) -> ParallelGroups:
    """Build :class:`ParallelGroups` from anything :func:`pcpp.convert` accepts as ``comm``.

    Args:
        comm: ``None`` (the default process group), a ``ProcessGroup``, a ``DeviceMesh`` (1-D patch mesh, or 2-D
            with dimensions ``("cfg", "patch")``), a :class:`PatchCommunicator`, or :class:`ParallelGroups`.

    Returns:
        The groups; nothing is created beyond wrapping existing process groups. Their wait limit is set by
        :meth:`ParallelGroups.apply_timeout`.

    Raises:
        ConversionError: ``comm`` is of an unknown type, or does not describe a usable layout.
    """
    if isinstance(comm, ParallelGroups):
        return comm
    if comm is None:
        return ParallelGroups(patch=TorchCommunicator(None))
    if isinstance(comm, dist.ProcessGroup):
        return ParallelGroups(patch=TorchCommunicator(comm))
    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(comm, mesh_type):
        return _from_mesh(comm)
    if isinstance(comm, PatchCommunicator):
        return ParallelGroups(patch=comm)
    if any(hasattr(comm, member) for member in _PROTOCOL):
        raise ConversionError(
            f"comm={comm!r} ({type(comm).__name__}) looks like a pcpp communicator but {_missing(comm)}; see "
            "pcpp.comm.PatchCommunicator (pcpp.comm.TorchCommunicator implements it over a process group)."
        )
    raise ConversionError(
        f"comm={comm!r} ({type(comm).__name__}) is not a process group, a DeviceMesh, a pcpp communicator or "
        "pcpp.comm.ParallelGroups; pass one of those, or None for the default process group."
    )


_PROTOCOL = ("rank", "world_size", "send_recv", "all_gather")


def _missing(comm: object) -> str:
    """Which members of :class:`PatchCommunicator` ``comm`` lacks, in words."""
    missing = [member for member in _PROTOCOL if not hasattr(comm, member)]
    return f"it lacks {', '.join(missing)}" if missing else "its members do not match"
