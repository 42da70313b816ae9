"""Batches of asynchronous messages: several layers' exchanges posted as one operation."""

from __future__ import annotations

import logging

from ..errors import PCPPError
from .base import DONE, Handle, Message, PatchCommunicator

__all__ = ["Outbox"]

logger = logging.getLogger(__name__)


class _Batch:
    """The messages of consecutive layers, and the handle of their transfer once posted."""

    __slots__ = ("error", "handle", "layers", "messages", "what")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.what: list[str] = []
        self.layers = 0
        self.handle: Handle | None = None
        self.error: str | None = None


class _Pending:
    """One layer's share of a batch: waiting posts the batch first if it still waits for more layers."""

    __slots__ = ("_batch", "_outbox")

    def __init__(self, outbox: Outbox, batch: _Batch) -> None:
        self._outbox, self._batch = outbox, batch

    def wait(self) -> None:
        batch = self._batch
        if batch.handle is None and batch is self._outbox.open_batch:
            self._outbox.flush()
        if batch.handle is None:
            # Posting it raised: never post other layers' messages in its place (peers match by order).
            raise PCPPError(
                f"an exchange batch was never posted ({batch.error}); the image cannot continue. Call "
                "pcpp.reset(unet) on every rank and start the image again."
            )
        batch.handle.wait()


class Outbox:
    """Collects the asynchronous exchanges of consecutive layers and posts them together.

    An asynchronous exchange is read only in the next step, so it need not leave at once. Posting every layer's
    exchange on its own costs one communication kernel per layer (156 per step for SDXL, each occupying SMs and
    adding a cross-stream dependency); grouping ``limit`` layers makes one ``batch_isend_irecv`` of them. With
    ``limit=1`` (``PCPPConfig.exchange_batch``'s default; docs/benchmarks.md, table 7 says why) every layer's
    messages leave at once.

    Batches close after the same number of layers on every rank (never after a number of bytes, which differs
    between edge and middle ranks), so all ranks post the same messages in the same batches and order. A layer
    that must wait on its exchange before its batch closed posts the batch first (the same layer on every rank).

    Args:
        comm: the communicator that posts each batch.

    Example:
        >>> import pcpp
        >>> box = Outbox(pcpp.comm.LocalCommunicator())
        >>> box.post([], "layer", limit=4).wait()
    """

    def __init__(self, comm: PatchCommunicator) -> None:
        self.comm = comm
        self._open = _Batch()

    def post(self, messages: list[Message], what: str, *, limit: int) -> Handle:
        """Add one layer's messages; the batch is posted once it holds ``limit`` layers.

        Args:
            messages: the layer's sends and receives (may be empty: the layer still counts, on every rank).
            what: the layer and purpose, for error messages.
            limit: layers per batch (``PCPPConfig.exchange_batch``).

        Returns:
            The layer's handle: after ``wait()`` its receive buffers hold the data and its send buffers are free.
        """
        batch = self._open
        batch.messages.extend(messages)
        if messages:
            batch.what.append(what)
        batch.layers += 1
        handle = _Pending(self, batch)
        if batch.layers >= limit:
            self.flush()
        return handle

    @property
    def open_batch(self) -> _Batch:
        """The batch that collects the next layer's messages."""
        return self._open

    @property
    def open_layers(self) -> int:
        """Layers in the open batch (0 between steps: every step ends with :meth:`flush`)."""
        return self._open.layers

    def flush(self) -> None:
        """Post the open batch now (at the end of a step, or when a layer must wait on it).

        Raises:
            Whatever the communicator raises; the batch then stays unposted, and waiting on it raises
            :class:`pcpp.PCPPError`.
        """
        batch, self._open = self._open, _Batch()
        if batch.layers == 0:
            batch.handle = DONE
            return
        what = f"{len(batch.what)} layers' exchanges ({batch.what[0]} .. {batch.what[-1]})" if batch.what else ""
        try:
            batch.handle = self.comm.send_recv(batch.messages, what=what) if batch.messages else DONE
        except BaseException as err:
            batch.error = f"{type(err).__name__}: {err}"
            raise

    def discard(self) -> int:
        """Drop the open batch unposted; its layers' handles then wait on nothing.

        For a step that stopped midway (an exception): its peers never reach the same batch, so posting it would
        pair messages that do not belong together.

        Returns:
            The number of layers dropped.
        """
        batch, self._open = self._open, _Batch()
        batch.handle = DONE
        return batch.layers
