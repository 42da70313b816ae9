"""The shared step state of one converted UNet: configuration, image and step counters, strip geometry."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .comm.base import Handle, Message, PatchCommunicator
from .comm.outbox import Outbox
from .config import PCPPConfig, Phase
from .errors import PCPPError
from .functional import partition_rows
from .kernels import NormOps, fusion_available
from .stats import CommStats

__all__ = ["Geometry", "PatchContext", "StatefulLayer"]

logger = logging.getLogger(__name__)


class StatefulLayer(Protocol):
    """A layer that keeps previous-step activations and must drop them when a new image starts."""

    def reset_state(self) -> None:
        """Wait for anything in flight and forget previous-step activations."""

    def join(self) -> None:
        """Make the current stream wait for this layer's exchange in flight."""

    def stamp(self, image: int, step: int) -> None:
        """Record that a CUDA-graph replay produced this layer's activations of ``(image, step)``."""

    def release_state(self) -> None:
        """Wait for anything in flight and free the layer's buffers."""


@dataclass(frozen=True)
class Geometry:
    """How one latent of ``height x width`` is cut into strips, at every downsampling level.

    Attributes:
        height: latent height at the UNet input.
        width: latent width at the UNet input.
        rows: rows of each strip at the input level, top to bottom.
        levels: number of stride-2 stages; strip heights halve at each.

    Geometry is immutable once built and holds no caches: compiled code reads it, and Dynamo guards on what it
    reads, so state filled in during the first call would make the second call recompile (under CUDA-graph
    capture, where Inductor cannot autotune).
    """

    height: int
    width: int
    rows: tuple[int, ...]
    levels: int

    def level_of(self, rank: int, local_height: int) -> int:
        """The level at which ``rank``'s strip is ``local_height`` rows high.

        Raises:
            PCPPError: no level matches (the activation is not one of the UNet's resolutions).
        """
        base = self.rows[rank]
        for level in range(self.levels + 1):
            if base >> level == local_height and (base >> level) << level == base:
                return level
        raise PCPPError(
            f"an activation of height {local_height} on rank {rank} matches no level of the strip ({base} rows at "
            f"the input, halving {self.levels} times); a module changed the height in a way pcpp does not model."
        )

    def strip_rows(self, level: int) -> tuple[int, ...]:
        """Rows of every strip at ``level``."""
        return tuple(r >> level for r in self.rows)

    def strip_start(self, rank: int, level: int) -> int:
        """First row of ``rank``'s strip at ``level``."""
        return sum(self.rows[:rank]) >> level

    def level_height(self, level: int) -> int:
        """Global height at ``level``."""
        return self.height >> level

    def level_of_tokens(self, rank: int, tokens: int) -> tuple[int, int]:
        """The ``(level, width)`` at which ``rank``'s strip has ``tokens`` row-major tokens.

        Strips span the whole width, and every stride-2 stage halves the width rounding down or up, so the width
        at ``level`` lies between ``floor`` and ``ceil`` of ``width / 2**level``: pure arithmetic on the token
        count, with nothing remembered from earlier layers (see the class docstring).

        Raises:
            PCPPError: no level's strip area matches.
        """
        for level in range(self.levels + 1):
            rows = self.rows[rank] >> level
            width, rest = divmod(tokens, rows)
            if not rest and self.width >> level <= width <= -(-self.width >> level):
                return level, width
        raise PCPPError(
            f"self-attention over {tokens} tokens on rank {rank} matches no level of its strip ({self.rows[rank]} "
            f"rows x {self.width} columns at the input, both halving {self.levels} times); a module changed the "
            "resolution in a way pcpp does not model. Pass (B, C, H, W) maps to the attention instead."
        )


class PatchContext:
    """State shared by every converted layer of one UNet.

    One context per converted UNet; layers read ``phase``, ``step`` and ``geometry`` from it and never keep
    counters of their own. The UNet-level hook calls :meth:`begin_step` before and :meth:`end_step` after each
    forward.

    Args:
        config: the validated settings.
        patch: communicator of the strips of one image.
        unit: every strip's height is a multiple of this (``2 ** levels``).
        levels: number of stride-2 stages of the UNet.
    """

    def __init__(self, config: PCPPConfig, patch: PatchCommunicator, *, unit: int, levels: int) -> None:
        self.config = config
        self.patch = patch
        self.unit = unit
        self.levels = levels
        self.image = -1
        self.step = 0
        self.geometry: Geometry | None = None
        self.stats = CommStats()
        self._outbox = Outbox(patch)
        self._layers: list[StatefulLayer] = []
        self._last_timestep: float | None = None
        self._pending_reset = True
        self._scratch: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        self._tokens: dict[torch.device, Tensor] = {}
        self.generation = 0
        """Counts :meth:`drain` calls: buffers made before a drain are gone, so graphs that use them are stale."""
        self._plain_norm = NormOps.plain()
        self._fused_norm: NormOps | None = None
        self.join_at_step_end = False
        """Join every exchange in flight at the end of each step (required for CUDA-graph capture, where a graph
        must not leave work pending; communication then overlaps with the rest of its own step only)."""

    @property
    def phase(self) -> Phase:
        """The phase of the current step."""
        return self.config.phase_of(self.step)

    def scratch(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """A buffer of ``shape`` shared by every layer, for data that no layer keeps beyond its own call.

        One buffer per dtype and device grows to the largest request and is never freed before :meth:`drain`:
        captured CUDA graphs hold its address, so an outgrown one is kept too (growth happens in the first step
        of an image size, normally at its first request).

        Args:
            shape: the shape wanted.
            like: a tensor whose dtype and device the buffer takes.

        Returns:
            A view of the shared buffer; its contents are undefined.
        """
        numel = math.prod(shape)
        buffers = self._scratch.setdefault((like.dtype, like.device), [])
        if not buffers or buffers[-1].numel() < numel:
            buffers.append(torch.empty(numel, dtype=like.dtype, device=like.device))
        return buffers[-1][:numel].view(shape)

    def defer(self, messages: list[Message], what: str) -> Handle:
        """Post one layer's asynchronous messages with those of the next layers (``config.exchange_batch`` of them
        per batch; the end of the step posts what is left).

        Args:
            messages: the layer's sends and receives (possibly none; the layer counts all the same).
            what: the layer and purpose, for error messages.

        Returns:
            The layer's handle; waiting on it posts its batch first if that is still open.
        """
        return self._outbox.post(messages, what, limit=self.config.exchange_batch)

    def order_token(self, device: torch.device) -> Tensor:
        """The one-element tensor that pcpp's torch.compile operators all declare they mutate, on ``device``.

        Sharing it keeps the operators in program order and alive under Inductor (see :mod:`pcpp.layers._ops`).

        Args:
            device: where the activations live.

        Returns:
            The token (its value is never read).
        """
        token = self._tokens.get(device)
        if token is None:
            token = self._tokens[device] = torch.zeros(1, device=device)
        return token

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

    def register(self, layer: StatefulLayer) -> int:
        """Make ``layer`` forget its state whenever a new image starts.

        Returns:
            The layer's index, unique within this context, used as its message tag.
        """
        self._layers.append(layer)
        return len(self._layers)

    def request_reset(self) -> None:
        """Make the next call start a new image (all synchronous warmup again, no state from before)."""
        self._pending_reset = True

    def _start_image(self) -> None:
        self._discard_unfinished_step()
        for layer in self._layers:
            layer.reset_state()
        self.image += 1
        self.step = 0
        self._pending_reset = False
        logger.debug("pcpp: image %d starts", self.image)

    def geometry_for(self, height: int, width: int) -> Geometry:
        """Return the geometry of a ``height x width`` latent, building it (and starting a new image) if new.

        Raises:
            SplitError: the height cannot be split into one strip per rank.
        """
        geo = self.geometry
        if geo is not None and geo.height == height and geo.width == width:
            return geo
        rows = partition_rows(height, self.patch.world_size, self.unit)
        self.geometry = Geometry(height=height, width=width, rows=rows, levels=self.levels)
        self._pending_reset = True
        logger.debug("pcpp: latent %dx%d split into strips of %s rows", height, width, rows)
        return self.geometry

    def begin_step(self, height: int, width: int, timestep: float | None) -> None:
        """Prepare the state for one UNet call on a ``height x width`` latent at ``timestep``.

        Raises:
            SplitError: the latent cannot be split.
        """
        self.geometry_for(height, width)
        if self._timestep_went_up(timestep):
            self._pending_reset = True
        self._last_timestep = timestep
        if self._pending_reset:
            self._start_image()
        elif self._outbox.open_layers:
            raise PCPPError(
                f"the previous call of this UNet stopped midway (an exception?) and left "
                f"{self._outbox.open_layers} layers' exchanges unsent, so this rank is out of step with its peers; "
                "call pcpp.reset(unet) on every rank and start the image again."
            )
        self.stats.begin_step(image=self.image, step=self.step, phase=self.phase.value)

    def _discard_unfinished_step(self) -> None:
        dropped = self._outbox.discard()
        if dropped:
            logger.warning("pcpp: dropped the unsent exchanges of %d layers of a step that stopped midway", dropped)

    def _timestep_went_up(self, timestep: float | None) -> bool:
        return (
            self.config.detect_new_image
            and timestep is not None
            and self._last_timestep is not None
            and timestep > self._last_timestep
        )

    def upcoming_phase(self, height: int, width: int, timestep: float | None) -> Phase:
        """The phase that :meth:`begin_step` with these arguments would open, without changing any state.

        Args:
            height: latent height of the coming call.
            width: latent width of the coming call.
            timestep: its timestep, or ``None`` if it cannot be read without a host synchronisation.

        Returns:
            The phase of the coming step (a new image, size or timestep rise means step 0).
        """
        geo = self.geometry
        new_image = (
            self._pending_reset
            or geo is None
            or (geo.height, geo.width) != (height, width)
            or self._timestep_went_up(timestep)
        )
        return self.config.phase_of(0 if new_image else self.step)

    def end_step(self) -> None:
        """Advance to the next step of the current image (joining exchanges if ``join_at_step_end``)."""
        self._outbox.flush()
        if self.join_at_step_end:
            for layer in self._layers:
                layer.join()
        self.step += 1

    def end_replayed_step(self) -> None:
        """Close a step that a CUDA graph replayed: the host did not run the layers, so stamp their state."""
        for layer in self._layers:
            layer.stamp(self.image, self.step)
        self.step += 1

    def drain(self) -> None:
        """Wait for every operation in flight, free all buffers, and start a new image at the next call."""
        self._discard_unfinished_step()
        for layer in self._layers:
            layer.release_state()
        self._scratch.clear()
        self.generation += 1
        self._pending_reset = True
