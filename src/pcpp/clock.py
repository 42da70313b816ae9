"""The step clock of one converted UNet: which image and step it is at, the step's phase, the strip geometry."""

from __future__ import annotations

import logging

from .config import PCPPConfig, Phase
from .errors import PCPPError
from .functional import partition_rows
from .geometry import Geometry

__all__ = ["StepClock"]

logger = logging.getLogger(__name__)


class StepClock:
    """Counters, phase and geometry shared by every layer of one converted UNet; it communicates nothing.

    A step begins in two moves, so that a failure in between leaves the clock where it was:
    :meth:`prepare` reads the latent's size and timestep and says whether a new image starts; the caller then
    resets what belongs to the old image and calls :meth:`start_image`. :meth:`advance` closes the step.

    Args:
        config: the validated settings (the phase of each step, new-image detection).
        world: number of strips (ranks of the patch group).
        unit: every strip's height is a multiple of this (``2 ** levels`` for a model that halves).
        levels: signed number of 2x stages of the model (see :class:`~pcpp.geometry.Geometry`).

    Example:
        >>> import pcpp
        >>> clock = StepClock(pcpp.PCPPConfig(warmup_steps=1), world=2, unit=1, levels=0)
        >>> clock.prepare(8, 4, None)
        True
        >>> clock.start_image(); clock.phase.value
        'sync'
        >>> clock.advance(); clock.prepare(8, 4, None), clock.phase.value
        (False, 'async')
    """

    def __init__(self, config: PCPPConfig, *, world: int, unit: int, levels: int) -> None:
        # Read on every layer call, so plain attributes (no property call); only the clock's methods change them.
        self.config = config
        """The current settings (change them with :meth:`reconfigure`)."""
        self.geometry: Geometry | None = None
        """How the current latent is cut into strips, or ``None`` before the first step."""
        self.now: tuple[int, int] = (-1, 0)
        """``(image, step)`` of the current step (image ``-1`` before the first call)."""
        self.phase: Phase = config.phase_of(0)
        """The phase of the current step."""
        self._world = world
        self.unit = unit
        self.levels = levels
        self._last_timestep: float | None = None
        self._new_image_due = True

    @property
    def image(self) -> int:
        """Index of the current image since conversion (``-1`` before the first call)."""
        return self.now[0]

    @property
    def step(self) -> int:
        """Index of the current step within its image."""
        return self.now[1]

    def _set(self, image: int, step: int) -> None:
        self.now = (image, step)
        self.phase = self.config.phase_of(step)

    @property
    def new_image_due(self) -> bool:
        """Whether the next step starts a new image whatever its size and timestep (after a reset or a change of
        settings)."""
        return self._new_image_due

    def require_geometry(self, what: str) -> Geometry:
        """The current geometry.

        Args:
            what: the caller, for the error message.

        Raises:
            PCPPError: no step was begun yet (a layer was called outside its converted UNet).
        """
        if self.geometry is None:
            raise PCPPError(
                f"{what} ran before its context knew the latent's size: call it inside the converted UNet, or call "
                "context.begin_step(height, width, timestep) first when using the layer on its own."
            )
        return self.geometry

    def reconfigure(self, config: PCPPConfig) -> None:
        """Use ``config`` from the next step on, which starts a new image."""
        self.config = config
        self._set(*self.now)
        self._new_image_due = True

    def request_new_image(self) -> None:
        """Make the next step start a new image (all synchronous warmup again)."""
        self._new_image_due = True

    def geometry_for(self, height: int, width: int) -> Geometry:
        """The geometry of a ``height x width`` latent, built (and a new image requested) if the size is new.

        Raises:
            SplitError: the height cannot be split into one strip per rank.
        """
        geo = self.geometry
        if geo is not None and geo.height == height and geo.width == width:
            return geo
        rows = partition_rows(height, self._world, self.unit)
        geo = self.geometry = Geometry(height=height, width=width, rows=rows, levels=self.levels)
        self._new_image_due = True
        logger.debug("pcpp: latent %dx%d split into strips of %s rows", height, width, rows)
        return geo

    def prepare(self, height: int, width: int, timestep: float | None) -> bool:
        """Read the size and timestep of the coming step; whether it starts a new image.

        A new image starts after :meth:`request_new_image` or :meth:`reconfigure`, when the latent's size
        changes, or when the timestep goes up (``detect_new_image``). Call :meth:`start_image` when this returns
        ``True``.

        Raises:
            SplitError: the latent cannot be split.
        """
        self.geometry_for(height, width)
        if self._timestep_went_up(timestep):
            self._new_image_due = True
        self._last_timestep = timestep
        return self._new_image_due

    def start_image(self) -> None:
        """Count a new image and go to its step 0."""
        self._set(self.now[0] + 1, 0)
        self._new_image_due = False
        logger.debug("pcpp: image %d starts", self.now[0])

    def advance(self) -> None:
        """Close the current step: the next one is the following step of the same image."""
        self._set(self.now[0], self.now[1] + 1)

    def repeat_step(self) -> None:
        """Step back by one, so that the next step repeats the one that just ended (same image, step and phase).

        For recording a CUDA graph of a step that just ran eagerly: the graph's layers then expect the state the
        eager step expected.

        Raises:
            PCPPError: no step of the current image has ended yet.
        """
        if self.now[1] == 0:
            raise PCPPError("repeat_step: no step of the current image has ended yet, so there is none to repeat.")
        self._set(self.now[0], self.now[1] - 1)

    def upcoming_phase(self, height: int, width: int, timestep: float | None) -> Phase:
        """The phase that a step with these arguments would have, without changing any state.

        Args:
            height: latent height of the coming call.
            width: latent width of the coming call.
            timestep: its timestep, or ``None`` if it cannot be read without a host synchronisation.

        Returns:
            The phase of the coming step (a new image, size or timestep rise means step 0).
        """
        geo = self.geometry
        new_image = (
            self._new_image_due
            or geo is None
            or (geo.height, geo.width) != (height, width)
            or self._timestep_went_up(timestep)
        )
        return self.config.phase_of(0 if new_image else self.now[1])

    def _timestep_went_up(self, timestep: float | None) -> bool:
        return (
            self.config.detect_new_image
            and timestep is not None
            and self._last_timestep is not None
            and timestep > self._last_timestep
        )
