"""What the ranks of a many-prompt run must agree on before any image is made: that the output folder can be
written, and which images are already there.

Each function is a collective over ``group`` (the default group when None) when a process group exists, and a plain
local check when it does not (one process). Every rank of ``group`` must call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from .images import ImageFolder, OutputError
from .records import PromptRecord

__all__ = ["agree_written", "check_writable_everywhere"]


def _collective(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def check_writable_everywhere(folder: ImageFolder, writes: bool, device: torch.device, group: Any = None) -> None:
    """Every saving rank checks ``folder``; if one cannot write, every rank raises (none is left waiting).

    Args:
        folder: the output folder.
        writes: whether this rank saves images (only these check, and only these remove half-written files).
        device: a device ``group``'s backend can reduce on (CPU for gloo, this rank's GPU for NCCL).
        group: the process group (default: the world).

    Raises:
        OutputError: this rank, or another saving rank, cannot write the folder.
    """
    error: OutputError | None = None
    if writes:
        try:
            folder.check_writable()
        except OutputError as exc:
            error = exc
    if _collective(group):
        ok = torch.tensor([0 if error else 1], device=device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
        if error is None and not ok.item():
            raise OutputError(f"another rank cannot write images to {str(folder.path)!r} (see its error)")
    if error is not None:
        raise error


def agree_written(
    folder: ImageFolder, records: Sequence[PromptRecord], writes: bool, device: torch.device, group: Any = None
) -> list[bool]:
    """Which records' images are already in ``folder``, as seen by the saving ranks, agreed over ``group``.

    A record counts as written when any saving rank of ``group`` sees its PNG, so ranks that do not save (and may
    not share the savers' file system) never decide. With one saver in ``group`` this is that rank's view.

    Args:
        folder: the output folder.
        records: the records, the same list on every rank of ``group``.
        writes: whether this rank saves images.
        device: a device ``group``'s backend can reduce on.
        group: the process group (default: the world).

    Returns:
        One flag per record, the same on every rank of ``group``.
    """
    if not records:
        return []
    flags = torch.tensor([writes and folder.is_written(r) for r in records], dtype=torch.uint8, device=device)
    if _collective(group):
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    return [bool(flag) for flag in flags.tolist()]
