"""What the timing loop calls: the UNet eagerly or under CUDA graphs, optionally compiled, with one interface."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .common import Inputs, StepFn, free_memory

__all__ = ["Denoiser", "Denoisers", "EagerUNet", "cfg_step", "compiled", "sm_carveout"]

LOG = logging.getLogger(__name__)


class Denoiser(Protocol):
    """What the loop calls: :class:`pcpp.cuda_graph.CUDAGraphUNet` or :class:`EagerUNet`."""

    def __call__(self, sample: Tensor, timestep: Any, **kwargs: Any) -> Tensor:
        """The UNet's output sample."""
        ...

    def reset(self) -> None:
        """Make the next call start a new image."""
        ...

    def release(self) -> None:
        """Drop captured state."""
        ...


class EagerUNet:
    """The :class:`Denoiser` interface over a UNet (or a compiled one) called eagerly.

    Args:
        module: what to call (the UNet, or ``torch.compile`` of it).
        unet: the UNet itself, for :func:`pcpp.reset` when it is converted.
    """

    def __init__(self, module: Callable[..., Any], unet: nn.Module) -> None:
        self.module = module
        self.unet = unet

    def __call__(self, sample: Tensor, timestep: Any, **kwargs: Any) -> Tensor:
        """The UNet's output sample."""
        out: Tensor = self.module(sample, timestep, return_dict=False, **kwargs)[0]
        return out

    def reset(self) -> None:
        """Start a new image on a converted UNet."""
        import pcpp

        if pcpp.is_converted(self.unet):
            pcpp.reset(self.unet)

    def release(self) -> None:
        """Nothing is captured."""


class Denoisers:
    """Makes denoisers on one device and keeps those not yet released, so that their CUDA graphs can be released
    before the process group goes, on any exit.

    Args:
        device: where the UNets run.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._live: list[Denoiser] = []

    def make(
        self, unet: nn.Module, *, graph: bool, compile_: bool, reset_dynamo: bool = True
    ) -> tuple[Denoiser, float]:
        """Wrap ``unet`` (optionally ``torch.compile`` of it) in a CUDA-graph or eager denoiser.

        Args:
            unet: the (converted or plain) UNet.
            graph: replay from CUDA graphs (:class:`pcpp.cuda_graph.CUDAGraphUNet`) rather than call eagerly.
            compile_: wrap ``torch.compile(unet, dynamic=False)``.
            reset_dynamo: start from an empty Dynamo cache (off when several denoisers share one compilation).

        Returns:
            The denoiser and the seconds spent building it (compilation itself happens at the first calls).
        """
        tick = time.perf_counter()
        target: Any = compiled(unet, reset_dynamo=reset_dynamo) if compile_ else unet
        den: Denoiser
        if graph:
            from pcpp.cuda_graph import CUDAGraphUNet

            den = CUDAGraphUNet(target)
        else:
            den = EagerUNet(target, unet)
        self._live.append(den)
        return den, time.perf_counter() - tick

    def release(self, den: Denoiser) -> None:
        """Release one denoiser's graphs and give their memory back."""
        try:
            den.release()
        finally:
            if den in self._live:
                self._live.remove(den)
            free_memory(self.device)

    def release_all(self) -> None:
        """Release every live denoiser (before the process group goes); errors are logged."""
        for den in list(self._live):
            try:
                self.release(den)
            except Exception:
                LOG.exception("releasing a denoiser failed (ignored)")


def compiled(target: Any, *, reset_dynamo: bool = True, backend: str = "inductor") -> Any:
    """``torch.compile(target, dynamic=False)`` with room for many recompilations.

    Args:
        target: a module or function.
        reset_dynamo: start from an empty Dynamo cache (off when several callables share one compilation).
        backend: ``torch.compile``'s backend (``inductor``; ``aot_eager`` or ``eager`` for quick checks).

    Returns:
        The compiled callable (compilation itself happens at the first calls).
    """
    import torch._dynamo

    if reset_dynamo:
        torch._dynamo.reset()  # a fresh cache per variant: shapes and phases change between runs
    # Headroom for pcpp's hooks' resume functions across phases and shapes; the default limit (8 per code object)
    # silently leaves code uncompiled once reached.
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 8192)
    return torch.compile(target, dynamic=False, backend=backend)


def cfg_step(den: Denoiser, inputs: Inputs) -> StepFn:
    """The step of the whole latent: batch 2 ``[uncond, cond]`` through ``den``."""
    cond = inputs.cond()

    def step(i: int, latents: Tensor, t: Tensor) -> Tensor:
        return den(torch.cat([latents] * 2), t, **cond)

    return step


@contextlib.contextmanager
def sm_carveout(sms: int | None) -> Iterator[None]:
    """Keep cuBLASLt matmuls off ``sms`` SMs inside the block (``None``: leave the setting alone).

    Matmuls captured into CUDA graphs keep the SM count they were captured with, so the block must cover the
    capture as well as the replays.
    """
    if sms is None:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)
