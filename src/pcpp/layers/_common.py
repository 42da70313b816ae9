"""Helpers shared by the parallel layers: parameter-sharing construction and previous-step buffers."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import Tensor, nn

from ..comm.base import Handle
from ..context import PatchContext
from ..errors import PCPPError
from . import _ops

__all__ = ["PatchLayerState", "StepBuffers", "is_capturing", "require_geometry", "share_module"]


def is_capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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


def require_geometry(context: PatchContext, what: str) -> None:
    """Raise unless a UNet-level step is open (the geometry of the current latent is known).

    Raises:
        PCPPError: the layer was called outside a converted UNet's forward and no step was begun.
    """
    if context.geometry is None:
        raise PCPPError(
            f"{what} ran before its context knew the latent's size: call it inside the converted UNet, or call "
            "context.begin_step(height, width, timestep) first when using the layer on its own."
        )


class StepBuffers:
    """Previous-step activations of one layer, the step they belong to, and the exchange in flight.

    Buffers are allocated once per shape and reused, so steady-state steps allocate nothing for communication.
    """

    __slots__ = ("_tensors", "pending", "tag")

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] = {}
        self.pending: Handle | None = None
        self.tag: tuple[int, int] | None = None

    def get(self, name: str, shape: tuple[int, ...], like: Tensor, *, zeros: bool = False) -> Tensor:
        """A persistent buffer named ``name`` of ``shape`` with ``like``'s dtype and device (zero-filled when
        first allocated if ``zeros``, for image-edge padding)."""
        buf = self._tensors.get(name)
        if buf is None or tuple(buf.shape) != shape or buf.dtype != like.dtype or buf.device != like.device:
            make = torch.zeros if zeros else torch.empty
            buf = make(shape, dtype=like.dtype, device=like.device)
            self._tensors[name] = buf
        return buf

    def wait(self) -> None:
        """Wait for the exchange in flight, if any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.wait()

    def require_previous_step(self, context: PatchContext, what: str) -> None:
        """Check that the stored activations are exactly one step old (same image, previous step).

        Raises:
            PCPPError: they are older, newer, or from another image; this is a bug, never a silent staleness.
        """
        expected = (context.image, context.step - 1)
        if self.tag != expected and not is_capturing():
            # Under CUDA-graph capture the host never sees replayed steps, so tags are not kept; the graph
            # runner guarantees one replay per step instead.
            raise PCPPError(
                f"{what}: previous-step activations are from (image, step)={self.tag}, expected {expected}. Every "
                "rank must call the converted UNet the same number of times; call pcpp.reset(unet) between images."
            )

    def reset(self) -> None:
        """Wait for anything in flight and mark the stored activations as belonging to no step.

        The buffers themselves are kept (the next image overwrites them before reading): captured CUDA graphs
        hold their addresses, so freeing them here would let the allocator hand that memory to someone else.
        """
        self.wait()
        self.tag = None

    def release(self) -> None:
        """Wait for anything in flight and free every buffer."""
        self.wait()
        self._tensors.clear()
        self.tag = None


class PatchLayerState:
    """What every parallel layer shares: its context, its name, its previous-step buffers and its message tag.

    Mixed into the layers (before the torch module they subclass); :meth:`_attach` is called once by each layer's
    constructor and ``from_*`` factory. The methods below are what :class:`~pcpp.context.PatchContext` calls.
    """

    context: PatchContext
    pcpp_name: str
    _state: StepBuffers
    _tag: int
    _handle: int
    _owned_sends: bool = False
    """Set while a torch.compile operator runs the layer: its inputs' memory may be reused once it returns."""

    def _attach(self, context: PatchContext, name: str) -> None:
        self.pcpp_name = name or type(self).__name__
        self.context = context
        self._state = StepBuffers()
        self._tag = context.register(self)
        self._handle = _ops.register(self)  # how the torch.compile operators find this layer

    def _send_copy(self, tensor: Tensor) -> Tensor:
        """``tensor`` as an exchange may read it after this layer returns.

        Eagerly a contiguous view is enough (the caching allocator and NCCL keep a live tensor's memory). Inside
        a torch.compile operator it must be a copy: Inductor may reuse the operator's inputs' memory as soon as
        the operator returns, while the send still reads it.
        """
        if self._owned_sends:
            return tensor.clone(memory_format=torch.contiguous_format)
        return tensor.contiguous()

    def _send_pair(self, first: Tensor | None, second: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """Both of a layer's outgoing tensors (either may be ``None``) as :meth:`_send_copy` returns them, copied
        by one kernel where copies are needed.

        Row slices of a batch are rarely contiguous, so the two sends usually need copies anyway; stacking them
        makes one kernel of the two (each half of the stack is contiguous, as NCCL needs).
        """
        present = [t for t in (first, second) if t is not None]
        if not self._owned_sends and all(t.is_contiguous() for t in present):
            return first, second
        if first is not None and second is not None and first.shape == second.shape:
            # Into a contiguous buffer: stack alone would keep a channels-last input's layout.
            pair = first.new_empty((2, *first.shape))
            torch.stack([first.detach(), second.detach()], out=pair)  # out= refuses autograd; sends carry none
            return pair[0], pair[1]
        return (
            None if first is None else self._send_copy(first),
            None if second is None else self._send_copy(second),
        )

    def reset_state(self) -> None:
        """Wait for the exchange in flight and mark the previous-step activations as belonging to no step."""
        self._state.reset()

    def release_state(self) -> None:
        """Wait for the exchange in flight and free the buffers."""
        self._state.release()

    def join(self) -> None:
        """Wait (on the current stream) for the exchange in flight, if any."""
        self._state.wait()

    def stamp(self, image: int, step: int) -> None:
        """Record that a graph replay produced this layer's previous-step activations at ``(image, step)``."""
        self._state.tag = (image, step)
