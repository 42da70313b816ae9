"""The exchange points of the parallel layers as PyTorch custom operators, for ``torch.compile``.

Eagerly, each layer calls its exchange method directly. Under ``torch.compile`` the same method is reached
through a custom operator instead: Dynamo records the operator as one opaque node (no graph break, no guard on
the step counter or phase), Inductor fuses everything around it, and at run time the operator calls back into
the layer. The outputs' shapes never depend on the phase (the attention operator returns the attention output,
not the phase-dependent key set), so one compiled graph serves synchronous and asynchronous steps.

Operators identify their layer by an integer handle: operator arguments must be tensors or plain values, so
the layer itself cannot be passed. The handle table is the one piece of module-level state in pcpp, and holds
weak references only; a layer that is garbage collected disappears from it.

Every operator also takes its context's *order token* (a one-element tensor) and declares that it mutates it.
The operators have side effects (they post and wait on exchanges, which must happen in the same order on
every rank), so they must run in program order and never be dropped; sharing one mutated input makes Inductor
keep them in order and alive. They are tagged ``cudagraph_unsafe`` so that ``torch.compile``'s own CUDA graphs
(``mode="reduce-overhead"``) leave them out: replaying a captured exchange would replay its phase decision too.
Use :class:`pcpp.cuda_graph.CUDAGraphUNet`, which captures one graph per phase, for CUDA graphs.

The operators call the layers only through the methods declared by the protocols below. While an operator
runs, the layer's port copies everything an exchange reads after the call returns
(:meth:`pcpp.exchange.ExchangePort.owning_sends`): Inductor may reuse an operator input's memory as soon as the
operator is done.
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, cast

import torch
from torch import Tensor

from ..errors import PCPPError
from ..exchange import ExchangePort

__all__ = ["GroupStatsLayer", "HaloRowsLayer", "OperatorLayer", "StripAttentionLayer", "register"]


class OperatorLayer(Protocol):
    """A layer that a compiled operator calls back into."""

    @property
    def port(self) -> ExchangePort:
        """The layer's end of the exchange protocol."""


class HaloRowsLayer(OperatorLayer, Protocol):
    """What ``pcpp::conv_halo_rows`` calls (``PartialPatchConv2d``)."""

    def swap_halo_rows(self, sent: Tensor, shape: list[int]) -> Tensor:
        """Post the flattened boundary rows ``sent``; return the halo rows this step reads, flattened."""

    def halo_numel(self, shape: Sequence[int]) -> int:
        """Elements of the halo rows that a strip of ``shape`` receives."""


class GroupStatsLayer(OperatorLayer, Protocol):
    """What ``pcpp::image_group_stats`` calls (``AsyncGroupNorm``)."""

    def image_stats(self, fresh: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-image mean and variance from this strip's fresh statistics."""


class StripAttentionLayer(OperatorLayer, Protocol):
    """What ``pcpp::strip_attention`` calls (``PartialPatchAttention``)."""

    def attend(self, query: Tensor, kv: Tensor, level: int, width: int) -> Tensor:
        """Attention of the strip's queries over the keys and values this step reads."""


_LAYERS: weakref.WeakValueDictionary[int, OperatorLayer] = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


def register(layer: OperatorLayer) -> int:
    """Give ``layer`` a handle by which the operators below find it.

    Args:
        layer: a parallel layer (weakly referenced).

    Returns:
        The handle, unique in this process.
    """
    handle = next(_HANDLES)
    _LAYERS[handle] = layer
    return handle


_TAGS = (torch.Tag.cudagraph_unsafe,)


def _layer(handle: int) -> OperatorLayer:
    """The layer of ``handle``."""
    layer = _LAYERS.get(handle)
    if layer is None:
        raise PCPPError(
            f"pcpp layer handle {handle} refers to a layer that no longer exists; a compiled graph outlived the "
            "UNet it was compiled from. Compile the converted UNet again."
        )
    return layer


@contextmanager
def _running(handle: int) -> Iterator[OperatorLayer]:
    """The layer of ``handle``, its port copying what its exchanges read after the operator returns."""
    layer = _layer(handle)
    with layer.port.owning_sends():
        yield layer


@torch.library.custom_op("pcpp::conv_halo_rows", mutates_args=("token",), tags=_TAGS)
def conv_halo_rows(sent: Tensor, token: Tensor, handle: int, shape: Sequence[int]) -> Tensor:
    """Swap a conv's boundary rows with the neighbours (``HaloRowsLayer.swap_halo_rows``).

    Args:
        sent: this rank's rows for the neighbours, flattened: the rows sent up, then the rows sent down.
        token: the order token.
        handle: the layer's handle.
        shape: ``(B, C, h, W)`` of the strip.

    Returns:
        The halo rows this step reads, flattened: rows from above, then rows from below.
    """
    with _running(handle) as layer:
        return cast(HaloRowsLayer, layer).swap_halo_rows(sent, list(shape))


@conv_halo_rows.register_fake
def _conv_halo_rows_fake(sent: Tensor, token: Tensor, handle: int, shape: Sequence[int]) -> Tensor:
    return sent.new_empty((cast(HaloRowsLayer, _layer(handle)).halo_numel(list(shape)),))


@torch.library.custom_op("pcpp::image_group_stats", mutates_args=("token",), tags=_TAGS)
def image_group_stats(fresh: Tensor, token: Tensor, handle: int) -> tuple[Tensor, Tensor]:
    """Whole-image GroupNorm mean and variance from this strip's statistics (``GroupStatsLayer.image_stats``)."""
    with _running(handle) as layer:
        mean, var = cast(GroupStatsLayer, layer).image_stats(fresh)
    # An operator's outputs may alias neither its inputs nor each other. The statistics are computed afresh, so
    # this costs nothing unless a kernel ever returns views of one buffer (checked on the host, no sync).
    if _shares_storage(mean, fresh):
        mean = mean.clone()
    if _shares_storage(var, fresh, mean):
        var = var.clone()
    return mean, var


def _shares_storage(tensor: Tensor, *others: Tensor) -> bool:
    ptr = tensor.untyped_storage().data_ptr()
    return any(ptr == other.untyped_storage().data_ptr() for other in others)


@image_group_stats.register_fake
def _image_group_stats_fake(fresh: Tensor, token: Tensor, handle: int) -> tuple[Tensor, Tensor]:
    shape = fresh.shape[:-1]
    return fresh.new_empty(shape, dtype=torch.float32), fresh.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("pcpp::strip_attention", mutates_args=("token",), tags=_TAGS)
def strip_attention(query: Tensor, kv: Tensor, token: Tensor, handle: int, level: int, width: int) -> Tensor:
    """Attention of the strip's queries over the keys and values this phase reads
    (``StripAttentionLayer.attend``)."""
    with _running(handle) as layer:
        return cast(StripAttentionLayer, layer).attend(query, kv, level, width)


@strip_attention.register_fake
def _strip_attention_fake(query: Tensor, kv: Tensor, token: Tensor, handle: int, level: int, width: int) -> Tensor:
    value_dim = kv.shape[-1] - query.shape[-1]
    return query.new_empty((query.shape[0], query.shape[1], value_dim))
