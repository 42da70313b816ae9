"""Replay a (converted or plain) UNet from CUDA graphs: one graph per phase and input shape."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .api import get_context, is_converted, reset
from .errors import PCPPError
from .hooks import map_tensors

__all__ = ["CUDAGraphUNet"]

logger = logging.getLogger(__name__)


def _tensors(value: Any) -> list[Tensor]:
    """Every tensor inside ``value``, in :func:`~pcpp.hooks.map_tensors` order."""
    found: list[Tensor] = []
    map_tensors(value, found.append)
    return found


def _replaced(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with its tensors replaced, in :func:`~pcpp.hooks.map_tensors` order, by ``tensors``."""
    fresh = iter(tensors)
    return map_tensors(value, lambda _old: next(fresh))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Tensor]
    output: Tensor


class CUDAGraphUNet:
    """Run a diffusers UNet (converted by :func:`pcpp.convert` or not) from captured CUDA graphs.

    The first call of each phase (synchronous, asynchronous) and input signature runs eagerly where it must warm
    up communicators and allocate pcpp's persistent buffers, then a graph is captured; later calls copy their
    inputs into the graph's static buffers and replay it, with no Python per layer and no host synchronisation.
    All exchanges of a step are joined at its end (a graph cannot leave work in flight), so communication overlaps
    with the rest of its own step.

    Args:
        unet: the UNet, on a CUDA device.

    Raises:
        PCPPError: CUDA is not available.

    Example:
        >>> graphed = CUDAGraphUNet(pcpp.convert(unet, detect_new_image=False))  # doctest: +SKIP
        >>> for t in scheduler.timesteps:  # doctest: +SKIP
        ...     eps = graphed(torch.cat([x, x]), t, encoder_hidden_states=emb)
        >>> graphed.reset()  # before the next image  # doctest: +SKIP
    """

    def __init__(self, unet: nn.Module) -> None:
        if not torch.cuda.is_available():
            raise PCPPError("CUDAGraphUNet needs CUDA; on the CPU call the UNet directly.")
        self.unet = unet
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._converted = is_converted(unet)
        self._generation = 0
        if self._converted:
            context = get_context(unet)
            context.join_at_step_end()
            self._generation = context.buffer_generation

    def reset(self) -> None:
        """Start a new image at the next call."""
        if self._converted:
            reset(self.unet)

    def release(self) -> None:
        """Drop every captured graph (do this before destroying the process group)."""
        self._graphs.clear()
        torch.cuda.synchronize()

    @staticmethod
    def _host_timestep(timestep: Tensor) -> float | None:
        """The timestep's value if reading it costs no host synchronisation (a CPU tensor), else ``None``."""
        return None if timestep.is_cuda else float(timestep.reshape(-1)[0])

    def __call__(self, sample: Tensor, timestep: Any, **kwargs: Any) -> Tensor:
        """Run one UNet call; returns the noise prediction (``.sample``) as a new tensor.

        Args:
            sample: the latent batch ``(B, C, H, W)``.
            timestep: the timestep (number, or tensor; a CUDA tensor is copied into the graph).
            **kwargs: the UNet's other arguments (``encoder_hidden_states``, ``added_cond_kwargs``, ...).

        Returns:
            The UNet's output sample.
        """
        if not isinstance(timestep, Tensor):
            timestep = torch.tensor(timestep)
        host_t = self._host_timestep(timestep)
        timestep = timestep.to(sample.device)
        ctx = get_context(self.unet) if self._converted else None
        if ctx is not None and ctx.buffer_generation != self._generation:
            # pcpp.configure (or another drain) freed the buffers the graphs write to: capture them again.
            self._graphs.clear()
            self._generation = ctx.buffer_generation
        height, width = sample.shape[2], sample.shape[3]
        phase = ctx.upcoming_phase(height, width, host_t).value if ctx is not None else "plain"
        arguments = {"sample": sample, "timestep": timestep, **kwargs}
        tensors = _tensors(arguments)
        structure = repr(map_tensors(arguments, lambda _t: "<tensor>"))
        key = (phase, structure, tuple((tuple(t.shape), t.dtype) for t in tensors))
        entry = self._graphs.get(key)
        if entry is None:
            # Eager first: warms up communicators (and torch.compile), allocates the buffers the graphs share.
            out: Tensor = self.unet(**_replaced(arguments, tensors)).sample.clone()
            self._capture(key, arguments, tensors)
            return out
        for static, fresh in zip(entry.inputs, tensors, strict=True):
            static.copy_(fresh)
        if ctx is not None:
            ctx.begin_step(height, width, host_t)
            entry.graph.replay()
            ctx.end_replayed_step()
        else:
            entry.graph.replay()
        return entry.output.clone()

    def _capture(self, key: tuple[Any, ...], arguments: dict[str, Any], tensors: list[Tensor]) -> _Graph:
        static = [t.clone() for t in tensors]
        if self._converted:
            get_context(self.unet).repeat_step()  # record the step that just ran eagerly (nothing executes)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self.unet(**_replaced(arguments, static)).sample
        logger.debug("pcpp: captured a CUDA graph for %s", key[0])
        entry = _Graph(graph, static, output)
        self._graphs[key] = entry
        return entry
