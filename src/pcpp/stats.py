"""Communication accounting: bytes sent and received per rank, per step, by layer kind."""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

__all__ = ["CommStats", "LayerKind", "StepTraffic", "Traffic"]


class LayerKind(enum.Enum):
    """Which part of the UNet moved the bytes."""

    CONV = "conv"
    ATTENTION = "attention"
    GROUPNORM = "groupnorm"
    OUTPUT = "output"
    FREEU = "freeu"


@dataclass
class Traffic:
    """Payload bytes one rank sent and received.

    Counts are logical: a tensor of ``n`` bytes delivered to ``k`` peers counts ``n * k`` sent, whatever
    algorithm the backend uses on the wire. Padding added to gather uneven strips is counted too.
    """

    sent: int = 0
    received: int = 0

    def add(self, sent: int, received: int) -> None:
        """Accumulate bytes."""
        self.sent += sent
        self.received += received


@dataclass
class StepTraffic:
    """The traffic of one denoising step of one image.

    Attributes:
        image: index of the image since conversion (0-based).
        step: index of the step within the image (0-based).
        phase: ``"sync"`` or ``"async"``.
        by_kind: traffic per :class:`LayerKind`.
    """

    image: int
    step: int
    phase: str
    by_kind: dict[LayerKind, Traffic] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        """Bytes sent in this step, all kinds together."""
        return sum(t.sent for t in self.by_kind.values())

    @property
    def received(self) -> int:
        """Bytes received in this step, all kinds together."""
        return sum(t.received for t in self.by_kind.values())


class CommStats:
    """Per-step traffic of one rank, newest last; keeps the last ``max_steps`` steps.

    Recording happens in Python as layers run; steps replayed from a captured CUDA graph are not recorded.

    Args:
        max_steps: how many steps to keep.

    Example:
        >>> stats = CommStats()
        >>> stats.begin_step(image=0, step=0, phase="sync")
        >>> stats.record(LayerKind.CONV, sent=8, received=8)
        >>> stats.steps[-1].sent
        8
    """

    def __init__(self, max_steps: int = 256) -> None:
        self._steps: deque[StepTraffic] = deque(maxlen=max_steps)

    @property
    def steps(self) -> list[StepTraffic]:
        """The recorded steps, oldest first."""
        return list(self._steps)

    def begin_step(self, *, image: int, step: int, phase: str) -> None:
        """Open the record of a new step."""
        self._steps.append(StepTraffic(image=image, step=step, phase=phase))

    def record(self, kind: LayerKind, *, sent: int, received: int) -> None:
        """Add bytes to the current step (opens an anonymous step if none is open)."""
        if not self._steps:
            self.begin_step(image=-1, step=-1, phase="unknown")
        current = self._steps[-1].by_kind
        current.setdefault(kind, Traffic()).add(sent, received)

    def clear(self) -> None:
        """Forget every recorded step."""
        self._steps.clear()
