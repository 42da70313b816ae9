"""How one latent is cut into horizontal strips, at every downsampling level of the UNet."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PCPPError

__all__ = ["Geometry"]


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
