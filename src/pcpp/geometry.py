"""How one latent is cut into horizontal strips, at every resolution level of the model that runs on it."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import PCPPError

__all__ = ["Geometry", "scale_rows"]


def scale_rows(rows: int, level: int) -> int:
    """``rows`` at the input resolution, seen at ``level``: ``rows / 2**level`` (a negative level doubles).

    Example:
        >>> scale_rows(12, 2), scale_rows(3, -3)
        (3, 24)
    """
    return rows >> level if level >= 0 else rows << -level


@dataclass(frozen=True)
class Geometry:
    """How one input of ``height x width`` is cut into strips, at every resolution level of the model.

    Level 0 is the input. One rule holds in both directions: at level ``l`` every size is the input's times
    ``2**-l`` (:func:`scale_rows`). A UNet or a VAE encoder halves ``levels > 0`` times (levels ``0..levels``);
    a VAE decoder doubles ``-levels`` times (levels ``0, -1, ..., levels``), so its latent strips of ``r`` rows
    become ``2r, 4r, 8r`` rows on the way up.

    Attributes:
        height: height at the input.
        width: width at the input.
        rows: rows of each strip at the input level, top to bottom.
        levels: signed number of 2x stages: positive halve the strips at each stage, negative double them.

    Geometry is immutable once built and holds no caches: compiled code reads it, and Dynamo guards on what it
    reads, so state filled in during the first call would make the second call recompile (under CUDA-graph
    capture, where Inductor cannot autotune). The strips' rows at every level are worked out once, when it is
    built, because the layers ask for them several times per call.
    """

    height: int
    width: int
    rows: tuple[int, ...]
    levels: int
    # _strips[i]: every strip's rows at the i-th level of level_range(); filled by __post_init__.
    _strips: tuple[tuple[int, ...], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        strips = tuple(tuple(scale_rows(r, level) for r in self.rows) for level in self.level_range())
        object.__setattr__(self, "_strips", strips)

    def level_range(self) -> range:
        """Every level, from the input's (0) to the last stage's (``levels``)."""
        return range(0, self.levels + 1) if self.levels >= 0 else range(0, self.levels - 1, -1)

    def level_of(self, rank: int, local_height: int) -> int:
        """The level at which ``rank``'s strip is ``local_height`` rows high.

        Raises:
            PCPPError: no level matches (the activation is not one of the model's resolutions).
        """
        base = self.rows[rank]
        step = 1 if self.levels >= 0 else -1
        for index, strips in enumerate(self._strips):
            level = index * step
            # The second test refuses heights that round: 5 rows halve to 2, but 2 rows are not a 5-row strip.
            if strips[rank] == local_height and (local_height << level if step > 0 else local_height >> index) == base:
                return level
        raise PCPPError(
            f"an activation of height {local_height} on rank {rank} matches no level of the strip ({base} rows at "
            f"the input, {self._stages()}); a module changed the height in a way pcpp does not model."
        )

    def strip_rows(self, level: int) -> tuple[int, ...]:
        """Rows of every strip at ``level``."""
        index = level if self.levels >= 0 else -level
        if 0 <= index < len(self._strips):
            return self._strips[index]
        return tuple(scale_rows(r, level) for r in self.rows)

    def strip_start(self, rank: int, level: int) -> int:
        """First row of ``rank``'s strip at ``level``."""
        return scale_rows(sum(self.rows[:rank]), level)

    def level_height(self, level: int) -> int:
        """Global height at ``level``."""
        return scale_rows(self.height, level)

    def level_of_tokens(self, rank: int, tokens: int) -> tuple[int, int]:
        """The ``(level, width)`` at which ``rank``'s strip has ``tokens`` row-major tokens.

        Strips span the whole width, and every stride-2 stage halves the width rounding down or up (every 2x
        upsampling doubles it), so the width at ``level`` lies between ``floor`` and ``ceil`` of
        ``width / 2**level``: pure arithmetic on the token count, with nothing remembered from earlier layers
        (see the class docstring).

        Raises:
            PCPPError: no level's strip area matches.
        """
        step = 1 if self.levels >= 0 else -1
        for index, strips in enumerate(self._strips):
            level, rows = index * step, strips[rank]
            width, rest = divmod(tokens, rows)
            low, high = (self.width >> level, -(-self.width >> level)) if level >= 0 else (self.width << -level,) * 2
            if not rest and low <= width <= high:
                return level, width
        raise PCPPError(
            f"self-attention over {tokens} tokens on rank {rank} matches no level of its strip ({self.rows[rank]} "
            f"rows x {self.width} columns at the input, both {self._stages()}); a module changed the "
            "resolution in a way pcpp does not model. Pass (B, C, H, W) maps to the attention instead."
        )

    def _stages(self) -> str:
        return f"halving {self.levels} times" if self.levels >= 0 else f"doubling {-self.levels} times"
