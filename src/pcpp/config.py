"""Configuration of a converted UNet: a frozen, validated dataclass and the enums it uses."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from datetime import timedelta

from .errors import ConversionError

__all__ = ["Conditioning", "PCPPConfig", "Phase"]


class Conditioning(enum.Enum):
    """Which neighbour keys and values self-attention reads after warmup.

    Attributes:
        PARTIAL: PCPP. The own strip (fresh) plus ``ceil(partial * rows)`` rows of each adjacent strip, the rows
            nearest the shared boundary, from the previous step. Only those rows are sent.
        FULL: DistriFusion. The own strip (fresh) plus every other strip from the previous step (all-gather).
    """

    PARTIAL = "partial"
    FULL = "full"


class Phase(enum.Enum):
    """How the layers of a converted UNet communicate during one denoising step.

    Attributes:
        SYNC: blocking exchange of fresh activations; the result equals the single-device UNet up to float rounding.
        ASYNC: layers read the neighbours' activations of the previous step and post this step's asynchronously.
    """

    SYNC = "sync"
    ASYNC = "async"


@dataclass(frozen=True)
class PCPPConfig:
    """Settings of a converted UNet. Validated on construction; change them with :func:`pcpp.configure`.

    Args:
        partial: share of the rows of each adjacent strip that self-attention reads after warmup, in ``[0, 1]``.
            ``0`` makes attention local (convolutions and GroupNorm still couple the strips); ``1`` reads both
            whole neighbour strips. Ignored with ``Conditioning.FULL``.
        warmup_steps: number of synchronous steps at the start of each image. Step indices ``0 .. warmup_steps-1``
            are synchronous, step ``warmup_steps`` is the first asynchronous one. The first step of an image is
            always synchronous, because an asynchronous step needs the previous step's activations, so ``0`` and
            ``1`` behave the same. (DistriFusion's ``warmup_steps=w`` means ``w + 1`` synchronous steps; ours does
            not.)
        conditioning: which neighbour keys and values attention reads after warmup; see :class:`Conditioning`.
        exact: every step synchronous, so the output equals the single-device UNet up to float rounding.
        timeout: the longest any wait on a peer may take before :class:`pcpp.PeerTimeoutError` is raised. On
            NCCL, waits are enqueued on the GPU and the process group's own timeout (``init_process_group``)
            applies instead.
        detect_new_image: start a new image automatically when the timestep goes up between two calls. Reading
            the timestep costs one host synchronisation per step when it lives on the GPU; turn this off and call
            :func:`pcpp.reset` yourself in latency-critical loops.

    Raises:
        ConversionError: a field is out of range or of the wrong type.

    Example:
        >>> from pcpp import PCPPConfig
        >>> PCPPConfig(partial=0.5, warmup_steps=2).partial
        0.5
    """

    partial: float = 0.3
    warmup_steps: int = 4
    conditioning: Conditioning = Conditioning.PARTIAL
    exact: bool = False
    timeout: timedelta = field(default=timedelta(minutes=5))
    detect_new_image: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.partial, bool) or not isinstance(self.partial, (int, float)):
            raise ConversionError(f"partial={self.partial!r} must be a number in [0, 1]; e.g. partial=0.3.")
        if not math.isfinite(self.partial) or not 0.0 <= self.partial <= 1.0:
            raise ConversionError(
                f"partial={self.partial!r} is outside [0, 1]: it is the share of each adjacent strip's rows that "
                "self-attention reads. Use 0.3 (the PCPP paper's value), 0 for local attention, or 1 for whole "
                "neighbour strips; for DistriFusion's every-strip attention pass conditioning=Conditioning.FULL."
            )
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int):
            raise ConversionError(f"warmup_steps={self.warmup_steps!r} must be an int >= 0; e.g. warmup_steps=4.")
        if self.warmup_steps < 0:
            raise ConversionError(
                f"warmup_steps={self.warmup_steps} is negative; it counts the synchronous steps at the start of "
                "each image and must be >= 0 (4 is a good default)."
            )
        if not isinstance(self.conditioning, Conditioning):
            raise ConversionError(
                f"conditioning={self.conditioning!r} must be a pcpp.Conditioning member "
                f"({', '.join(m.name for m in Conditioning)}), not a string."
            )
        if not isinstance(self.timeout, timedelta) or self.timeout <= timedelta(0):
            raise ConversionError(
                f"timeout={self.timeout!r} must be a positive datetime.timedelta; e.g. timedelta(minutes=5)."
            )

    def phase_of(self, step: int) -> Phase:
        """The phase of step ``step`` (0-based) of an image.

        Args:
            step: index of the denoising step within the current image.

        Returns:
            ``Phase.SYNC`` during warmup (and always in exact mode), ``Phase.ASYNC`` after.
        """
        if self.exact or step == 0 or step < self.warmup_steps:
            return Phase.SYNC
        return Phase.ASYNC
