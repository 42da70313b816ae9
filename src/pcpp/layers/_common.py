"""What every parallel layer shares: parameter-sharing construction and its attachment to a context."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

from ..context import PatchContext
from ..exchange import ExchangePort
from ..stats import LayerKind
from . import _ops

__all__ = ["PatchLayer", "share_module"]

M = TypeVar("M", bound=nn.Module)


def share_module(module: nn.Module, cls: type[M]) -> M:
    """A new ``cls`` instance that shares ``module``'s parameters, buffers, submodules and hooks.

    The new object has its own copies of the registries (so replacing one of its children does not touch the
    original), but every ``Parameter``, buffer and child module is the same object: state-dict keys, weight
    sharing and in-place weight updates carry over, and ``module`` stays intact for :func:`pcpp.revert`.

    Args:
        module: the module to replace.
        cls: a subclass of ``type(module)``'s base that adds parallel behaviour.

    Returns:
        The new module.
    """
    new = cls.__new__(cls)
    state = dict(module.__dict__)
    for registry in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if registry in state:
            state[registry] = type(state[registry])(state[registry])
    new.__dict__.update(state)
    return new


class PatchLayer:
    """Mixed into every parallel layer (before the torch module it subclasses): its context, its name, its
    :class:`~pcpp.exchange.ExchangePort` and its handle for the torch.compile operators.

    Each layer's constructor and ``from_*`` factory calls :meth:`attach` once.
    """

    context: PatchContext
    pcpp_name: str
    port: ExchangePort
    handle: int

    def attach(self, context: PatchContext, name: str, kind: LayerKind) -> None:
        """Join ``context``: one port of kind ``kind`` (message tag, stored data), one operator handle.

        Args:
            context: the UNet's shared context.
            name: qualified name, for error messages (the class name if empty).
            kind: what the layer's bytes count as.
        """
        self.pcpp_name = name or type(self).__name__
        self.context = context
        self.port = context.exchange.port(self.pcpp_name, kind)
        self.handle = _ops.register(self)  # how the torch.compile operators find this layer
