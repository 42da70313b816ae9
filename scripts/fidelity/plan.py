"""The study's plan: preset plans, the modes and configurations it sweeps, and its captions."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch

PLANS: Final[dict[str, dict[str, Any]]] = {
    # What fits about 25 minutes on a 2-core CPU (measured: one configuration of 64 prompts x 20 steps at 32 px
    # costs ~80 CPU-seconds, at 48 px ~2.2x that). Runs: "CELLS:MODES", see parse_runs.
    "small": {
        "prompts": 64,
        "steps": 20,
        "warmup": 4,
        "eps_prompts": 8,
        "runs": (
            "4x32:exact,p0,p0.1,p0.3,p0.5,p1,full,p0.3@w1,p0.3@w2,full@w1,full@w2",
            "3x32:exact,p0,p0.3,p1,full",
            "2x32:exact,p0,p0.3,full",
            "4x48:p0.3,full",
        ),
    },
    # The plan of the issue: every mode at every rank count and at 64 and 96 px (many CPU hours; fine on a GPU).
    "full": {
        "prompts": 64,
        "steps": 20,
        "warmup": 4,
        "eps_prompts": 16,
        "runs": ("2,3,4x64,96:exact,p0,p0.1,p0.3,p0.5,p1,full,p0.3@w1,p0.3@w2,full@w1,full@w2",),
    },
}


@dataclass(frozen=True)
class Mode:
    """One PCPP setting.

    Attributes:
        partial: share of each adjacent strip's rows that attention reads after warmup (PARTIAL conditioning).
        warmup: synchronous steps at the start of each image.
        full: ``Conditioning.FULL`` (DistriFusion's attention) instead of PARTIAL.
        exact: every step synchronous (the sanity row: should equal one device up to float rounding).
    """

    partial: float = 0.3
    warmup: int = 4
    full: bool = False
    exact: bool = False

    @property
    def label(self) -> str:
        """A short unique name, e.g. ``"partial 0.3 / w4"``, ``"full / w2"`` or ``"exact"``."""
        if self.exact:
            return "exact"
        if self.full:
            return f"full / w{self.warmup}"
        return f"partial {self.partial:g} / w{self.warmup}"

    def convert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pcpp.convert` for this mode."""
        from pcpp import Conditioning

        return {
            "partial": self.partial,
            "warmup_steps": self.warmup,
            "conditioning": Conditioning.FULL if self.full else Conditioning.PARTIAL,
            "exact": self.exact,
        }

    def to_json(self) -> dict[str, Any]:
        """The mode as a JSON object."""
        return {"label": self.label, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Config:
    """One cell of the study: a mode at a rank count and image size."""

    ranks: int
    resolution: int
    mode: Mode


def parse_mode(token: str, warmup: int) -> Mode:
    """A mode from its short name: ``exact``, ``full``, ``full@w2``, ``p0.3`` or ``p0.3@w1``.

    Args:
        token: the short name.
        warmup: warmup steps when the name gives none.

    Raises:
        ValueError: the name is not of that form.
    """
    match = re.fullmatch(r"(exact|full|p(\d*\.?\d+))(?:@w(\d+))?", token.strip())
    if match is None:
        raise ValueError(f"mode {token!r} is not one of exact, full, full@wN, pX, pX@wN (e.g. p0.3@w2)")
    w = int(match.group(3)) if match.group(3) else warmup
    if match.group(1) == "exact":
        return Mode(exact=True)
    if match.group(1) == "full":
        return Mode(full=True, warmup=w)
    return Mode(partial=float(match.group(2)), warmup=w)


def parse_runs(runs: Sequence[str], warmup: int) -> list[Config]:
    """Configurations from run specifications ``"RANKSxSIZES:MODES"``.

    ``RANKS`` and ``SIZES`` are comma-separated lists, ``MODES`` a comma-separated list of :func:`parse_mode`
    names; e.g. ``"2,3,4x32,48:exact,p0.3,full@w2"``. Duplicates are dropped; the result is grouped by rank
    count, then size, modes in the order given.

    Raises:
        ValueError: a specification is malformed.
    """
    configs: dict[tuple[int, int, str], Config] = {}
    for spec in runs:
        cells, sep, modes = spec.partition(":")
        ranks_text, x, sizes_text = cells.partition("x")
        if not sep or not x:
            raise ValueError(f"run {spec!r} is not of the form RANKSxSIZES:MODES, e.g. 4x32:exact,p0.3,full")
        ranks = [int(v) for v in ranks_text.split(",")]
        sizes = [int(v) for v in sizes_text.split(",")]
        parsed = [parse_mode(m, warmup) for m in modes.split(",") if m.strip()]
        for n in ranks:
            for size in sizes:
                for mode in parsed:
                    configs.setdefault((n, size, mode.label), Config(n, size, mode))
    order = {key: k for k, key in enumerate(configs)}
    return sorted(configs.values(), key=lambda c: (c.ranks, c.resolution, order[(c.ranks, c.resolution, c.mode.label)]))


def study_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic captions in the tiny model's vocabulary (random scenes of :mod:`pcpp.models.shapes`).

    Args:
        n: number of captions.
        seed: seed of the scene generator.

    Returns:
        The captions.
    """
    from pcpp.models import sample_scenes, scene_captions

    return scene_captions(sample_scenes(n, torch.Generator().manual_seed(seed)))


def read_captions(path: str | Path, n: int | None = None) -> list[str]:
    """Non-empty lines of a text file, the first ``n`` of them if ``n`` is given.

    Raises:
        ValueError: the file has no caption.
    """
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no caption (one per line expected)")
    return lines[:n] if n else lines
