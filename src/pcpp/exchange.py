"""The exchange protocol: how every parallel layer trades activations with the other strips, written once.

A layer states *what* it sends and *what* it reads; :class:`ExchangePort` does the rest, the same way for every
layer:

* **synchronous steps**: post this step's transfer, wait for it, then read (the result equals one device's);
* **asynchronous steps**: check that the stored data is exactly one step old, read it, then post this step's
  transfer for the next step (with the next layers' when ``exchange_batch > 1``), waited on where it is read;
* tag the stored data with ``(image, step)``, count the bytes (by :class:`~pcpp.stats.LayerKind`, in
  :meth:`~pcpp.exchange_service.ExchangeService.post` only), and stay safe under CUDA-graph capture and inside
  ``torch.compile`` operators (sends that outlive the call are copies the layer owns).

:class:`~pcpp.exchange_service.ExchangeService` (its own module) is what the ports of one converted model share:
the patch communicator, the outbox of deferred messages, a scratch buffer, the order token of the compiled operators
and the traffic statistics.

docs/design.md shows how a new parallel layer is written on it (the smallest complete example is
``ShiftDown`` in tests/dist_workers.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch
from torch import Tensor

from .comm.base import Handle, Message, gather_messages, neighbour_messages
from .config import PCPPConfig, Phase
from .errors import PCPPError
from .geometry import Geometry
from .stats import LayerKind

if TYPE_CHECKING:  # the service makes the ports, so it imports this module, not the other way round
    from .exchange_service import ExchangeService

__all__ = ["ExchangePort", "Transfer", "is_capturing"]

T = TypeVar("T")


def is_capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class Transfer(NamedTuple):
    """What one layer sends and receives in one step: point-to-point messages, or one all-gather.

    Attributes:
        purpose: a few words for error messages (``"conv halo"``, ``"K/V all-gather"``).
        messages: the sends and receives (possibly none), as :meth:`PatchCommunicator.send_recv` takes them.
        gather: ``(output, tensor)`` of an all-gather instead (synchronous steps only).
    """

    purpose: str
    messages: Sequence[Message] = ()
    gather: tuple[Tensor, Tensor] | None = None


class ExchangePort:
    """One layer's end of the exchange protocol: its stored data, its exchange in flight, its tag.

    Made by `ExchangeService.port`. Buffers are allocated once per shape and reused, so steady-state steps
    allocate nothing for communication.
    """

    def __init__(self, service: ExchangeService, name: str, kind: LayerKind, *, tag: int) -> None:
        self._service = service
        self._clock = service.clock
        self.name = name
        self.kind = kind
        self.tag = tag
        # Read on every call, so plain attributes: a communicator's rank and size never change.
        self.rank: int = service.comm.rank
        """This rank's strip index (0 at the top)."""
        self.world_size: int = service.comm.world_size
        """Number of strips."""
        self._buffers: dict[str, Tensor] = {}
        self._pending: Handle | None = None
        self._stamp: tuple[int, int] | None = None
        self._owned_sends = False

    # What a layer reads. ------------------------------------------------------------------------------------

    @property
    def config(self) -> PCPPConfig:
        """The current settings (read at every call: :func:`pcpp.configure` changes them between images)."""
        return self._clock.config

    @property
    def synchronous(self) -> bool:
        """Whether the current step exchanges fresh data (``Phase.SYNC``)."""
        return self._clock.phase is Phase.SYNC

    def geometry(self) -> Geometry:
        """The current strip geometry.

        Raises:
            PCPPError: no step is open (the layer was called outside its converted UNet).
        """
        geo = self._clock.geometry
        return self._clock.require_geometry(self.name) if geo is None else geo

    def buffer(self, name: str, shape: tuple[int, ...], like: Tensor, *, zeros: bool = False) -> Tensor:
        """The layer's persistent buffer ``name`` of ``shape`` with ``like``'s dtype and device (zero-filled when
        first allocated if ``zeros``)."""
        buf = self._buffers.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
            make = torch.zeros if zeros else torch.empty
            buf = make(shape, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf

    def buffer_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every buffer the layer keeps (for memory accounting)."""
        return {name: tuple(t.shape) for name, t in self._buffers.items()}

    def scratch(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """The shared scratch buffer (`ExchangeService.scratch`)."""
        return self._service.scratch(shape, like)

    def order_token(self, device: torch.device) -> Tensor:
        """The compiled operators' order token (`ExchangeService.order_token`)."""
        return self._service.order_token(device)

    # What a layer states: its messages. -----------------------------------------------------------------------

    def neighbours(
        self,
        *,
        send_up: Tensor | None = None,
        send_down: Tensor | None = None,
        recv_up: Tensor | None = None,
        recv_down: Tensor | None = None,
    ) -> list[Message]:
        """Messages with the strips above and below (:func:`pcpp.comm.base.neighbour_messages`); the sends are
        passed through :meth:`send_pair` first."""
        send_up, send_down = self.send_pair(send_up, send_down)
        return neighbour_messages(
            self.rank, send_up=send_up, send_down=send_down, recv_up=recv_up, recv_down=recv_down, tag=self.tag
        )

    def gather(self, mine: Tensor, gathered: Tensor, *, own_slot: bool = True) -> list[Message]:
        """An all-gather as point-to-point messages (:func:`pcpp.comm.base.gather_messages`)."""
        return gather_messages(self.rank, self.world_size, mine, gathered, self.tag, own_slot=own_slot)

    def send_copy(self, tensor: Tensor) -> Tensor:
        """``tensor`` as an exchange may read it after the layer returns.

        Eagerly a contiguous view is enough (the caching allocator and NCCL keep a live tensor's memory). Inside
        a torch.compile operator (:meth:`owning_sends`) it must be a copy: Inductor may reuse the operator's
        inputs' memory as soon as the operator returns, while the send still reads it.
        """
        if self._owned_sends:
            return tensor.clone(memory_format=torch.contiguous_format)
        return tensor.contiguous()

    def send_pair(self, first: Tensor | None, second: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Both of a layer's outgoing tensors (either may be ``None``) as :meth:`send_copy` returns them, copied
        by one kernel where copies are needed (row slices of a batch are rarely contiguous; each half of the
        stack is)."""
        if (
            not self._owned_sends
            and (first is None or first.is_contiguous())
            and (second is None or second.is_contiguous())
        ):
            return first, second
        if first is not None and second is not None and first.shape == second.shape:
            # Into a contiguous buffer: stack alone would keep a channels-last input's layout.
            pair = first.new_empty((2, *first.shape))
            torch.stack([first.detach(), second.detach()], out=pair)  # out= refuses autograd; sends carry none
            return pair[0], pair[1]
        return (
            None if first is None else self.send_copy(first),
            None if second is None else self.send_copy(second),
        )

    @contextmanager
    def owning_sends(self) -> Iterator[None]:
        """While inside, :meth:`send_copy` and :meth:`send_pair` copy (a torch.compile operator is running)."""
        self._owned_sends = True
        try:
            yield
        finally:
            self._owned_sends = False

    # The protocol. --------------------------------------------------------------------------------------------

    def run(self, transfer: Callable[[], Transfer], read: Callable[[], T]) -> T:
        """One step's exchange: post ``transfer()`` and ``read()`` what arrives, in the order the phase needs.

        Synchronous steps post the transfer, wait, then read (this step's data). Asynchronous steps check that the
        stored data is one step old, read it, then post the transfer for the next step (``read`` runs first, so
        the receive buffers are read before they are overwritten: in stream order on a GPU, program order on a
        CPU). Either way the exchange still in flight from the step before is waited on first.

        Args:
            transfer: builds this step's messages (called once; its sends are this step's data).
            read: computes the layer's result from what its receive buffers hold (called once).

        Returns:
            What ``read`` returned.

        Raises:
            PCPPError: in an asynchronous step, the stored data is not from the previous step of this image.
        """
        self.wait()
        clock = self._clock
        now = clock.now
        if clock.phase is Phase.SYNC:
            sync = transfer()
            self._service.post(self.kind, sync, f"{self.name} ({sync.purpose}, step {now[1]})").wait()
            out = read()
        else:
            if self._stamp != (now[0], now[1] - 1):
                self._require_previous_step()
            out = read()
            later = transfer()
            what = f"{self.name} ({later.purpose}, step {now[1]})"
            self._pending = self._service.post(self.kind, later, what, defer=True)
        self._stamp = now
        return out

    def _require_previous_step(self) -> None:
        expected = (self._clock.image, self._clock.step - 1)
        if self._stamp != expected and not is_capturing():
            # Under CUDA-graph capture the host never sees replayed steps, so stamps are not kept; the graph
            # runner guarantees one replay per step instead.
            raise PCPPError(
                f"{self.name}: previous-step activations are from (image, step)={self._stamp}, expected {expected}. "
                "Every rank must call the converted UNet the same number of times; call pcpp.reset(unet) between "
                "images."
            )

    # What the service calls. ----------------------------------------------------------------------------------

    def wait(self) -> None:
        """Wait (on the current stream) for the exchange in flight, if any."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.wait()

    def reset(self) -> None:
        """Wait for anything in flight and mark the stored data as belonging to no step.

        The buffers themselves are kept (the next image overwrites them before reading): captured CUDA graphs
        hold their addresses, so freeing them here would let the allocator hand that memory to someone else.
        """
        self.wait()
        self._stamp = None

    def release(self) -> None:
        """Wait for anything in flight and free every buffer."""
        self.wait()
        self._buffers.clear()
        self._stamp = None

    def stamp(self, image: int, step: int) -> None:
        """Record that a CUDA-graph replay produced the stored data of ``(image, step)``."""
        self._stamp = (image, step)
