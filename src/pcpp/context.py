"""The context of one converted UNet: its step clock and its exchange service, opened and closed step by step."""

from __future__ import annotations

import torch

from .clock import StepClock
from .comm.base import PatchCommunicator
from .config import PCPPConfig, Phase
from .exchange_service import ExchangeService
from .geometry import Geometry
from .kernels import NormOps, fusion_available
from .stats import CommStats

__all__ = ["PatchContext"]


class PatchContext:
    """What every converted layer of one UNet shares: a :class:`~pcpp.clock.StepClock` (``clock``: image and
    step counters, phase, geometry) and an :class:`~pcpp.exchange_service.ExchangeService` (``exchange``: communicator,
    outbox, scratch, order tokens, statistics, one port per layer).

    The UNet-level hook calls :meth:`begin_step` before and :meth:`end_step` after each forward; layers never
    keep counters of their own.

    Args:
        config: the validated settings.
        patch: communicator of the strips of one image.
        unit: every strip's height is a multiple of this (``2 ** levels`` for a model that halves).
        levels: signed number of 2x stages of the model (see :class:`~pcpp.geometry.Geometry`).

    Example:
        >>> import pcpp
        >>> ctx = pcpp.PatchContext(pcpp.PCPPConfig(), pcpp.comm.LocalCommunicator(), unit=1, levels=0)
        >>> ctx.begin_step(8, 8, timestep=999.0)
        >>> ctx.image, ctx.step, ctx.phase.value
        (0, 0, 'sync')
        >>> ctx.end_step(); ctx.step
        1
    """

    def __init__(self, config: PCPPConfig, patch: PatchCommunicator, *, unit: int, levels: int) -> None:
        self.clock = StepClock(config, world=patch.world_size, unit=unit, levels=levels)
        self.exchange = ExchangeService(patch, self.clock)
        self._plain_norm = NormOps.plain()
        self._fused_norm: NormOps | None = None

    # Read-only views of the clock and the service, the public face of get_context(unet). ------------------------

    @property
    def config(self) -> PCPPConfig:
        """The current settings."""
        return self.clock.config

    @property
    def patch(self) -> PatchCommunicator:
        """The communicator of the strips."""
        return self.exchange.comm

    @property
    def image(self) -> int:
        """Index of the current image since conversion."""
        return self.clock.image

    @property
    def step(self) -> int:
        """Index of the current step within its image."""
        return self.clock.step

    @property
    def phase(self) -> Phase:
        """The phase of the current step."""
        return self.clock.phase

    @property
    def geometry(self) -> Geometry | None:
        """How the current latent is cut into strips (``None`` before the first step)."""
        return self.clock.geometry

    @property
    def stats(self) -> CommStats:
        """Bytes sent and received, per step and layer kind."""
        return self.exchange.stats

    @property
    def buffer_generation(self) -> int:
        """Counts the times every buffer was freed (:meth:`drain`): CUDA graphs recorded before are stale."""
        return self.exchange.generation

    def norm_ops(self, device: torch.device) -> NormOps:
        """The GroupNorm arithmetic for activations on ``device``.

        Args:
            device: where the activations live.

        Returns:
            The fused functions on CUDA when ``fused_norm`` is on and Triton works there; the plain functions
            otherwise, and always under ``torch.compile`` (the enclosing compilation fuses them itself).
        """
        if torch.compiler.is_compiling() or not (self.config.fused_norm and device.type == "cuda"):
            return self._plain_norm
        if self._fused_norm is None:
            self._fused_norm = NormOps.fused() if fusion_available(device) else self._plain_norm
        return self._fused_norm

    # Steps. -------------------------------------------------------------------------------------------------

    def begin_step(self, height: int, width: int, timestep: float | None) -> None:
        """Open one UNet call on a ``height x width`` latent at ``timestep`` (a new image if one is due).

        Raises:
            SplitError: the latent cannot be split.
            PCPPError: the previous call stopped midway and no new image was requested.
        """
        new_image = self.clock.prepare(height, width, timestep)
        self.exchange.begin_step(new_image)
        if new_image:
            self.clock.start_image()
        self.stats.begin_step(image=self.clock.image, step=self.clock.step, phase=self.clock.phase.value)

    def upcoming_phase(self, height: int, width: int, timestep: float | None) -> Phase:
        """The phase that :meth:`begin_step` with these arguments would open, without changing any state."""
        return self.clock.upcoming_phase(height, width, timestep)

    def end_step(self) -> None:
        """Post the step's remaining exchanges and advance to the next step of the current image."""
        self.exchange.end_step()
        self.clock.advance()

    def end_replayed_step(self) -> None:
        """Close a step that a CUDA graph replayed: the host did not run the layers, so stamp their state."""
        self.exchange.stamp(self.clock.image, self.clock.step)
        self.clock.advance()

    def repeat_step(self) -> None:
        """Make the next call repeat the step that just ended (to record a CUDA graph of it; see
        :meth:`pcpp.clock.StepClock.repeat_step`)."""
        self.clock.repeat_step()

    def join_at_step_end(self) -> None:
        """Join every exchange at the end of its own step from now on (CUDA graphs must not leave work pending;
        communication then overlaps with the rest of its own step only)."""
        self.exchange.join_at_step_end()

    def request_reset(self) -> None:
        """Make the next call start a new image (all synchronous warmup again, no state from before)."""
        self.clock.request_new_image()

    def reconfigure(self, config: PCPPConfig) -> None:
        """Wait for everything in flight, free the buffers, and use ``config`` from the next call (a new image)."""
        self.drain()
        self.clock.reconfigure(config)

    def drain(self) -> None:
        """Wait for every operation in flight, free all buffers, and start a new image at the next call."""
        self.exchange.drain()
        self.clock.request_new_image()
