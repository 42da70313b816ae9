"""The communicator protocol that pcpp's layers talk to."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = [
    "DONE",
    "Handle",
    "Message",
    "PatchCommunicator",
    "TimedCommunicator",
    "gather_messages",
    "neighbour_messages",
    "other_slot",
]


@dataclass(frozen=True)
class Message:
    """One point-to-point transfer of a batch (:meth:`PatchCommunicator.send_recv`).

    Attributes:
        peer: the other rank, as an index in the communicator's group.
        tensor: contiguous data to send, or the buffer to receive into.
        send: ``True`` to send ``tensor`` to ``peer``, ``False`` to receive into it from ``peer``.
        tag: identifies the message between the two ranks; a send and the receive it feeds carry the same tag.
    """

    peer: int
    tensor: Tensor
    send: bool
    tag: int


@runtime_checkable
class Handle(Protocol):
    """An operation in flight. ``wait`` returns once its receive buffers may be read."""

    def wait(self) -> None:
        """Block (or, on CUDA, make the current stream wait) until the operation has finished.

        Raises:
            PeerTimeoutError: a peer did not take part within the communicator's timeout.
        """


@runtime_checkable
class PatchCommunicator(Protocol):
    """What a parallel layer needs from a group of ranks that each own one horizontal strip.

    Ranks are numbered top to bottom: rank ``r`` owns the strip above rank ``r + 1``'s. A communicator is passed
    in by the user (or built by :func:`pcpp.convert` from a process group or device mesh); pcpp never creates
    process groups or picks devices itself.
    """

    @property
    def rank(self) -> int:
        """This process's index in the group, from the top strip (0) down."""

    @property
    def world_size(self) -> int:
        """Number of ranks (strips) in the group."""

    def send_recv(self, messages: Sequence[Message], *, what: str) -> Handle:
        """Post many point-to-point transfers, with any peers, as one batch (one NCCL launch on GPUs).

        Every rank must post its messages in the same order as the peers that it exchanges with post theirs:
        the ``k``-th send from ``a`` to ``b`` feeds the ``k``-th receive on ``b`` from ``a``.

        Args:
            messages: the transfers; an empty sequence posts nothing.
            what: a short description for error messages.

        Returns:
            A handle; every receive buffer is valid, and every send buffer free, after ``wait()``.
        """

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> Handle:
        """Gather ``tensor`` from every rank into ``output`` (shape ``(world_size * n, ...)``), in rank order.

        Args:
            output: buffer whose first dimension is ``world_size`` times ``tensor``'s.
            tensor: this rank's contribution, the same shape on every rank.
            what: a short description for error messages.

        Returns:
            A handle; ``output`` is valid after ``wait()``.
        """


@runtime_checkable
class TimedCommunicator(PatchCommunicator, Protocol):
    """A communicator whose waits on peers are bounded by a settable limit (the optional part of the protocol).

    :meth:`pcpp.comm.ParallelGroups.apply_timeout` sets it from ``PCPPConfig.timeout``, at conversion and at every
    :func:`pcpp.configure`; communicators without it bound their waits themselves.
    """

    timeout: timedelta
    """The longest a wait on a peer may take before :class:`pcpp.PeerTimeoutError`."""


class _Done:
    """A handle whose operation has already completed (or never needed to run)."""

    def wait(self) -> None:
        return None

    def __repr__(self) -> str:
        return "DONE"


DONE: Handle = _Done()
"""The handle of an operation with nothing left to wait for."""


# Tags of one layer's messages: its tag times this, plus the direction. Gloo matches a receive by (peer, tag).
_TAG_STRIDE = 2


def neighbour_messages(
    rank: int,
    *,
    send_up: Tensor | None,
    send_down: Tensor | None,
    recv_up: Tensor | None,
    recv_down: Tensor | None,
    tag: int,
) -> list[Message]:
    """The messages of ``rank``'s exchange with its neighbours ``rank - 1`` ("up") and ``rank + 1`` ("down").

    Args:
        rank: this rank; its neighbours are ``rank - 1`` ("up") and ``rank + 1`` ("down").
        send_up: contiguous data for ``rank - 1``, or ``None``.
        send_down: contiguous data for ``rank + 1``, or ``None``.
        recv_up: buffer filled from ``rank - 1``, or ``None``.
        recv_down: buffer filled from ``rank + 1``, or ``None``.
        tag: the calling layer's tag; a message travelling down carries ``2 * tag``, one travelling up
            ``2 * tag + 1``.

    Returns:
        Receives first, then sends, as :meth:`PatchCommunicator.send_recv` takes them.

    Example:
        >>> import torch
        >>> [(m.peer, m.send, m.tag) for m in neighbour_messages(
        ...     1, send_up=torch.zeros(2), send_down=None, recv_up=torch.zeros(2), recv_down=None, tag=3)]
        [(0, False, 6), (0, True, 7)]
    """
    t_down, t_up = tag * _TAG_STRIDE, tag * _TAG_STRIDE + 1
    messages: list[Message] = []
    if recv_up is not None:
        messages.append(Message(rank - 1, recv_up, False, t_down))
    if recv_down is not None:
        messages.append(Message(rank + 1, recv_down, False, t_up))
    if send_up is not None:
        messages.append(Message(rank - 1, send_up, True, t_up))
    if send_down is not None:
        messages.append(Message(rank + 1, send_down, True, t_down))
    return messages


def other_slot(rank: int, peer: int) -> int:
    """The slot of ``peer``'s contribution in a gathered buffer that has none for ``rank`` itself (rank order with
    the own slot left out, as :func:`gather_messages` fills it with ``own_slot=False``).

    Example:
        >>> [other_slot(1, peer) for peer in (0, 2, 3)]
        [0, 1, 2]
    """
    return peer if peer < rank else peer - 1


def gather_messages(
    rank: int, world: int, mine: Tensor, gathered: Tensor, tag: int, *, own_slot: bool = True
) -> list[Message]:
    """The messages of an all-gather done point to point: ``mine`` to every other rank, and each other rank's
    contribution into its slot of ``gathered``.

    Args:
        rank: this rank.
        world: number of ranks.
        mine: this rank's contiguous contribution.
        gathered: the receive buffer: slots of ``mine``'s shape stacked on dimension 0 in rank order, ``world`` of
            them (``rank``'s own slot is not written), or ``world - 1`` with ``own_slot=False`` (the own one left
            out, for callers that keep their own contribution elsewhere).
        tag: the calling layer's tag (every message carries ``2 * tag``).
        own_slot: whether ``gathered`` has a slot for ``rank`` itself.

    Returns:
        Receives first, then sends.

    Example:
        >>> import torch
        >>> [(m.peer, m.send, m.tensor.tolist()) for m in gather_messages(
        ...     1, 3, torch.ones(1), torch.arange(2.0), tag=0, own_slot=False)]
        [(0, False, [0.0]), (2, False, [1.0]), (0, True, [1.0]), (2, True, [1.0])]
    """
    n = mine.shape[0]
    others = [peer for peer in range(world) if peer != rank]
    slots = {peer: peer if own_slot else other_slot(rank, peer) for peer in others}
    return [
        Message(peer, gathered[slots[peer] * n : (slots[peer] + 1) * n], False, tag * _TAG_STRIDE) for peer in others
    ] + [Message(peer, mine, True, tag * _TAG_STRIDE) for peer in others]
