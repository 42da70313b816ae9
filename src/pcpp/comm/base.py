"""The communicator protocol that pcpp's layers talk to."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Handle", "PatchCommunicator"]


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

    def exchange(
        self,
        *,
        send_up: Tensor | None,
        send_down: Tensor | None,
        recv_up: Tensor | None,
        recv_down: Tensor | None,
        tag: int,
        what: str,
    ) -> Handle:
        """Point-to-point exchange with the neighbours ``rank - 1`` ("up") and ``rank + 1`` ("down").

        Args:
            send_up: contiguous tensor for ``rank - 1``, or ``None`` to send nothing up.
            send_down: contiguous tensor for ``rank + 1``, or ``None``.
            recv_up: buffer filled from ``rank - 1``, or ``None``.
            recv_down: buffer filled from ``rank + 1``, or ``None``.
            tag: identifies the calling layer; matching sends and receives use the same tag.
            what: a short description for error messages (layer name and purpose).

        Returns:
            A handle; the receive buffers are valid after ``wait()``.
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
