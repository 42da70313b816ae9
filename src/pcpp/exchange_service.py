"""The exchange service: what the ports of one converted model share.

One :class:`ExchangeService` per :class:`~pcpp.context.PatchContext` holds the patch communicator, the outbox of
deferred messages, a scratch buffer, the order token of the compiled operators and the traffic statistics, and
hands each parallel layer its :class:`~pcpp.exchange.ExchangePort`. Bytes are counted here, in
:meth:`ExchangeService.post`, and nowhere else.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .clock import StepClock
from .comm.base import Handle, PatchCommunicator
from .comm.outbox import Outbox
from .errors import PCPPError
from .exchange import ExchangePort, Transfer
from .stats import CommStats, LayerKind

__all__ = ["ExchangeService"]

logger = logging.getLogger(__name__)


class ExchangeService:
    """The exchanges of one converted UNet: communicator, outbox, scratch, order tokens, statistics, ports.

    Args:
        comm: the patch communicator.
        clock: the UNet's step clock (phase, image, step and geometry for the ports).
    """

    def __init__(self, comm: PatchCommunicator, clock: StepClock) -> None:
        self.comm = comm
        self.clock = clock
        self.stats = CommStats()
        self._outbox = Outbox(comm)
        self._ports: list[ExchangePort] = []
        self._scratch: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        self._tokens: dict[torch.device, Tensor] = {}
        self._generation = 0
        self._join_at_step_end = False

    def port(self, name: str, kind: LayerKind) -> ExchangePort:
        """A new layer's end of the protocol; its message tag is its index (the same on every rank, since every
        rank converts the same UNet in the same order).

        Args:
            name: the layer's qualified name, for error messages.
            kind: what its bytes count as.
        """
        port = ExchangePort(self, name, kind, tag=len(self._ports) + 1)
        self._ports.append(port)
        return port

    @property
    def generation(self) -> int:
        """How many times :meth:`drain` freed the buffers; CUDA graphs that used older buffers are stale."""
        return self._generation

    def join_at_step_end(self) -> None:
        """From now on, wait (on the current stream) for every exchange at the end of its own step, as a CUDA
        graph needs: a graph must not leave work in flight."""
        self._join_at_step_end = True

    def scratch(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` shared by every layer, for data that no layer keeps beyond its own call.

        One buffer per dtype and device grows to the largest request and is never freed before :meth:`drain`:
        captured CUDA graphs hold its address, so an outgrown one is kept too.

        Returns:
            A view of the shared buffer; its contents are undefined.
        """
        numel = math.prod(shape)
        buffers = self._scratch.setdefault((like.dtype, like.device), [])
        if not buffers or buffers[-1].numel() < numel:
            buffers.append(torch.empty(numel, dtype=like.dtype, device=like.device))
        return buffers[-1][:numel].view(shape)

    def scratch_held(self) -> dict[tuple[torch.dtype, torch.device], tuple[int, ...]]:
        """Elements of every scratch buffer held, per dtype and device, oldest first (for memory accounting)."""
        return {key: tuple(b.numel() for b in buffers) for key, buffers in self._scratch.items()}

    def order_token(self, device: torch.device) -> Tensor:
        """The one-element tensor that pcpp's torch.compile operators all declare they mutate, on ``device``
        (keeps them in program order and alive under Inductor; see :mod:`pcpp.layers._ops`)."""
        token = self._tokens.get(device)
        if token is None:
            token = self._tokens[device] = torch.zeros(1, device=device)
        return token

    def post(
        self,
        kind: LayerKind,
        transfer: Transfer,
        what: str,
        *,
        defer: bool = False,
        comm: PatchCommunicator | None = None,
    ) -> Handle:
        """Count ``transfer``'s bytes as ``kind`` and post it: at once, or (``defer``) with the next layers'.

        This is the one place where bytes are counted: a message of ``n`` bytes counts ``n`` sent or received, an
        all-gather of ``n`` bytes ``n * (world - 1)`` each way.

        Args:
            kind: what the bytes count as.
            transfer: the messages or the all-gather.
            what: the layer and purpose, for error messages.
            defer: join the outbox (``PCPPConfig.exchange_batch`` layers per batch); point to point only.
            comm: the communicator, ``None`` for the patch group's.

        Returns:
            The handle; after ``wait()`` the receive buffers hold the data and the send buffers are free.
        """
        comm = self.comm if comm is None else comm
        if transfer.gather is not None:
            if defer:
                raise PCPPError(f"{what}: an all-gather cannot join a batch of point-to-point messages.")
            output, tensor = transfer.gather
            nbytes = tensor.numel() * tensor.element_size() * (comm.world_size - 1)
            self.stats.record(kind, sent=nbytes, received=nbytes)
            return comm.all_gather(output, tensor, what=what)
        sent = received = 0
        for m in transfer.messages:  # a plain loop: this runs for every layer at every step
            if m.send:
                sent += m.tensor.numel() * m.tensor.element_size()
            else:
                received += m.tensor.numel() * m.tensor.element_size()
        self.stats.record(kind, sent=sent, received=received)
        if defer:
            # Every layer joins the batch, with or without messages: batches close after the same layers on every
            # rank.
            return self._outbox.post(list(transfer.messages), what, limit=self.clock.config.exchange_batch)
        return comm.send_recv(transfer.messages, what=what)

    def begin_step(self, new_image: bool) -> None:
        """Open a step's exchanges; ``new_image``: forget the previous image's (unsent ones are dropped).

        Raises:
            PCPPError: the previous step stopped midway and left exchanges unsent (and no new image starts).
        """
        if new_image:
            self._discard_unfinished_step()
            for port in self._ports:
                port.reset()
        elif self._outbox.open_layers:
            raise PCPPError(
                f"the previous call of this UNet stopped midway (an exception?) and left "
                f"{self._outbox.open_layers} layers' exchanges unsent, so this rank is out of step with its peers; "
                "call pcpp.reset(unet) on every rank and start the image again."
            )

    def end_step(self) -> None:
        """Post what is left of the step's deferred messages (and join everything in graph mode)."""
        self._outbox.flush()
        if self._join_at_step_end:
            for port in self._ports:
                port.wait()

    def stamp(self, image: int, step: int) -> None:
        """Record that a CUDA-graph replay produced every layer's stored data of ``(image, step)``."""
        for port in self._ports:
            port.stamp(image, step)

    def drain(self) -> None:
        """Wait for every operation in flight and free every buffer (a later step starts a new image)."""
        self._discard_unfinished_step()
        for port in self._ports:
            port.release()
        self._scratch.clear()
        self._generation += 1

    def _discard_unfinished_step(self) -> None:
        dropped = self._outbox.discard()
        if dropped:
            logger.warning("pcpp: dropped the unsent exchanges of %d layers of a step that stopped midway", dropped)
