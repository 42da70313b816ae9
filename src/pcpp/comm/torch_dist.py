"""A communicator over a ``torch.distributed`` process group (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist
from torch import Tensor

from ..errors import ConversionError, PCPPError, PeerFailedError, PeerTimeoutError
from .base import Handle, Message

__all__ = ["TorchCommunicator"]

logger = logging.getLogger(__name__)

# ``all_gather_into_tensor`` was renamed; take whichever this torch has (same signature).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Works:
    """Handle over the ``torch.distributed`` works of one operation."""

    __slots__ = ("_blocking_timeout", "_peers", "_what", "_works")

    def __init__(
        self, works: Sequence[dist.Work], what: str, blocking_timeout: timedelta | None, peers: Sequence[int]
    ) -> None:
        self._works = works
        self._what = what
        self._blocking_timeout = blocking_timeout
        self._peers = tuple(peers)

    def wait(self) -> None:
        for work in self._works:
            if self._blocking_timeout is None:
                # NCCL: enqueue the wait on the current stream (no host block); the group's watchdog bounds it.
                work.wait()
                continue
            started = time.monotonic()
            try:
                work.wait(self._blocking_timeout)
            except RuntimeError as err:
                raise self.failure(err, time.monotonic() - started) from err
        self._works = ()

    def post(self, works: Sequence[dist.Work]) -> None:
        """Track ``works``, the operations just posted."""
        self._works = works

    def failure(self, err: RuntimeError, waited: float) -> PCPPError:
        """The pcpp error for a wait that raised after ``waited`` seconds: a timeout only if the limit passed."""
        limit = self._blocking_timeout.total_seconds() if self._blocking_timeout is not None else math.inf
        peers = f"peer rank {self._peers[0]}" if len(self._peers) == 1 else f"one of peer ranks {list(self._peers)}"
        if waited >= 0.95 * limit:  # gloo's own clock may stop a little before ours
            return PeerTimeoutError(
                f"{self._what}: {peers} did not answer within {limit:g} s ({err}). Another rank probably crashed, "
                "hangs, or made a different sequence of UNet calls (every rank must call the converted UNet the "
                "same number of times with the same shapes). Raise the limit with pcpp.configure(unet, timeout=...) "
                "if the peers are just slow."
            )
        return PeerFailedError(
            f"{self._what}: the exchange with {peers} failed after {waited:.1f} s ({err}). That peer probably "
            "died or left the group, or sent data of another size because it made a different sequence of UNet "
            "calls; look at its own error first."
        )


class TorchCommunicator:
    """Patch communicator over a ``torch.distributed`` process group.

    Neighbour exchanges are point-to-point (``batch_isend_irecv``); gathers use ``all_gather_into_tensor``. All
    operations are posted asynchronously; on NCCL they run on NCCL's own stream and a wait only makes the current
    stream wait, so communication overlaps with compute.

    Args:
        group: the process group of the ranks that split one image, ordered top strip first. ``None`` means the
            default (world) group, which must already be initialised.
        timeout: the longest a host-side wait (gloo and other CPU backends) may take. NCCL waits are bounded by
            the timeout given to ``init_process_group``.

    Raises:
        ConversionError: ``torch.distributed`` is not initialised, or this process is not in ``group``.

    Example:
        >>> import torch.distributed as dist  # doctest: +SKIP
        >>> dist.init_process_group("gloo")  # doctest: +SKIP
        >>> comm = TorchCommunicator()  # doctest: +SKIP
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, timeout: timedelta = timedelta(minutes=5)) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConversionError(
                "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
                "(e.g. under torchrun), or pass comm=pcpp.comm.LocalCommunicator() for a single process."
            )
        world = dist.group.WORLD
        assert world is not None  # initialised, checked above
        self._group: dist.ProcessGroup = group if group is not None else world
        rank = dist.get_rank(self._group)
        if rank < 0:
            raise ConversionError(
                f"this process (global rank {dist.get_rank()}) is not a member of the process group it was given; "
                "pass the group that contains it (e.g. mesh['patch'] of this rank's mesh)."
            )
        self._rank = rank
        self._world_size = dist.get_world_size(self._group)
        self._global = [dist.get_global_rank(self._group, r) for r in range(self._world_size)]
        self._host_waits = "nccl" not in str(dist.get_backend(self._group)).lower()
        self._timeout = timeout

    @property
    def group(self) -> dist.ProcessGroup:
        """The underlying process group."""
        return self._group

    @property
    def rank(self) -> int:
        """This process's rank within the group (0 is the top strip)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks in the group."""
        return self._world_size

    @property
    def timeout(self) -> timedelta:
        """The longest a host-side wait may take (CPU backends; NCCL waits are bounded by the process group's own
        timeout). :class:`pcpp.comm.ParallelGroups` sets it from ``PCPPConfig.timeout``."""
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: timedelta) -> None:
        self._timeout = timeout

    def _blocking_timeout(self) -> timedelta | None:
        """The limit of each host-side wait, or ``None`` where waits are enqueued on the GPU (NCCL)."""
        return self._timeout if self._host_waits else None

    def send_recv(self, messages: Sequence[Message], *, what: str) -> Handle:
        """Post every message as one ``batch_isend_irecv``; see :class:`PatchCommunicator`."""
        if not messages:
            return _Works((), what, self._blocking_timeout(), ())
        ops = [
            dist.P2POp(dist.isend if m.send else dist.irecv, m.tensor, self._global[m.peer], self._group, m.tag)
            for m in messages
        ]
        handle = _Works((), what, self._blocking_timeout(), sorted({m.peer for m in messages}))
        try:
            handle.post(dist.batch_isend_irecv(ops))
        except RuntimeError as err:  # gloo reports a peer gone while posting too
            raise handle.failure(err, 0.0) from err
        return handle

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> Handle:
        """Post an all-gather into ``output``; see :class:`PatchCommunicator`."""
        others = [r for r in range(self._world_size) if r != self._rank]
        handle = _Works((), what, self._blocking_timeout(), others)
        try:
            work = _all_gather_single(output, tensor.contiguous(), group=self._group, async_op=True)
        except RuntimeError as err:
            raise handle.failure(err, 0.0) from err
        handle.post((work,) if work is not None else ())
        return handle

    def __repr__(self) -> str:
        return f"TorchCommunicator(rank={self._rank}, world_size={self._world_size}, ranks={self._global})"
