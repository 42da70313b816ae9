"""Mode ``floor``: what each rank computes when communication is free.

Every rank at once runs the plain UNet on its own strip (batch 1 with the CFG split, else 2), its
self-attention keys and values widened to the token count the measured pcpp mode reads at each step
(synchronous steps: every strip; asynchronous ``partial:p`` steps: ``ceil(p * rows)`` rows of each adjacent
strip; ``full``/``exact``: every strip), without communication. The report gives the slowest rank.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .arguments import ModeSpec
from .common import Inputs, all_gather_floats, time_summary
from .denoisers import Denoiser
from .floor_attention import FloorState, install_floor_processors, restore_processors
from .layout import all_gather_objects
from .loop import step_summary, time_images
from .session import Session

__all__ = ["floor_schedule", "level_widths", "run_floor", "widening_table"]

LOG = logging.getLogger(__name__)


def level_widths(width: int, levels: int) -> list[int]:
    """Activation width at each level (stride-2 convs with padding 1 give ceil(w / 2))."""
    widths = [width]
    for _ in range(levels):
        widths.append(-(-widths[-1] // 2))
    return widths


def widening_table(rows: Sequence[int], index: int, width: int, levels: int, spec: str) -> dict[int, int]:
    """``{own tokens: extra tokens}`` per level for strip ``index``.

    ``spec`` is ``"all"`` (every other strip: synchronous steps, ``full`` and ``exact``), ``"none"`` or
    ``"partial:P"`` (``ceil(P * rows)`` of each existing neighbour, as :func:`pcpp.functional.partial_rows`).
    """
    from pcpp.functional import partial_rows

    table: dict[int, int] = {}
    for level, w in enumerate(level_widths(width, levels)):
        level_rows = [r >> level for r in rows]
        own = level_rows[index]
        if spec == "all":
            extra_rows = sum(level_rows) - own
        elif spec == "none":
            extra_rows = 0
        else:
            p = float(spec.partition(":")[2])
            neighbours = [j for j in (index - 1, index + 1) if 0 <= j < len(rows)]
            extra_rows = sum(partial_rows(p, level_rows[j]) for j in neighbours)
        table[own * w] = extra_rows * w
    return table


def floor_schedule(mode: ModeSpec, steps: int, sync_steps: int) -> list[str]:
    """The widening of each step of a floor image for ``mode``: synchronous steps read every strip."""
    if mode.exact or mode.full:
        return ["all"] * steps
    return ["all" if i < sync_steps else f"partial:{mode.partial:g}" for i in range(steps)]


def run_floor(session: Session, inputs: Inputs, rows: Sequence[int], label: str) -> dict[str, Any]:
    """Every rank at once: the plain UNet on its strip, self-attention widened per step as each mode reads.

    Args:
        session: the run.
        inputs: the image's conditioning and initial latent (whole latent).
        rows: latent rows of each strip.
        label: the resolution, for the log.

    Returns:
        One entry per ``--floor-modes`` mode; modes that read the same keys at every step share one measurement
        (``same_as``).
    """
    args, lay = session.args, session.layout
    index = lay.patch_index
    width = inputs.latents.shape[3]
    start = sum(rows[:index])
    strip = inputs.latents[:, :, start : start + rows[index]].contiguous()
    half = slice(lay.cfg_index, lay.cfg_index + 1) if lay.cfg_split else slice(None)
    batch = 1 if lay.cfg_split else 2
    cond = inputs.cond(half)
    state = FloorState()
    saved = install_floor_processors(session.model.unet, state)
    results: dict[str, Any] = {}
    denoisers: dict[str, Denoiser] = {}
    measured: dict[tuple[str, ...], dict[str, Any]] = {}
    try:
        for mode in args.floor_modes:
            schedule = floor_schedule(mode, args.steps, args.floor_warmup_steps)
            for spec in set(schedule):
                state.tables[spec] = widening_table(rows, index, width, session.model.levels, spec)
                if spec not in denoisers:
                    denoisers[spec], _ = session.denoisers.make(
                        session.model.unet,
                        graph=args.cuda_graph,
                        compile_=args.compile_floor,
                        reset_dynamo=not denoisers,
                    )
            key = tuple(schedule)
            if key in measured:  # e.g. exact and full read the same keys at every step
                results[mode.name] = dict(measured[key], mode=mode.name, same_as=measured[key]["mode"])
                continue

            def step(i: int, latents: Tensor, t: Tensor, schedule: list[str] = schedule) -> Tensor:
                state.spec = schedule[i]
                sample = latents if batch == 1 else torch.cat([latents] * 2)
                return denoisers[schedule[i]](sample, t, **cond)

            def reset() -> None:
                for den in denoisers.values():
                    den.reset()

            timing = time_images(step, reset, strip, args, session.device, True, f"{label} floor {mode.name}")
            medians = [m[0] for m in all_gather_floats([statistics.median(timing.times_ms)], session.device)]
            peaks = [int(m[0]) for m in all_gather_floats([float(timing.peak_mem_bytes)], session.device)]
            own = rows[index]
            key_rows = {spec: own + state.tables[spec][own * width] // width for spec in sorted(set(schedule))}
            sync_steps = sum(s == "all" for s in schedule)
            result = {
                "mode": mode.name,
                "median_ms": max(medians),
                "per_rank_median_ms": medians,
                "rank0": time_summary(timing.times_ms),
                "batch": batch,
                "strip_rows_per_rank": list(rows),
                "key_rows_level0_per_rank": all_gather_objects(key_rows),
                "sync_steps": sync_steps,
                "peak_mem_bytes_per_rank": peaks,
                "steps_per_rank": all_gather_objects(step_summary(timing.step_ms, sync_steps)),
            }
            if timing.profile is not None:
                result["profile_per_rank"] = all_gather_objects(timing.profile)
            LOG.info(
                "%s floor %s: slowest rank median %.1f ms (per rank %s)",
                label,
                mode.name,
                max(medians),
                ", ".join(f"{m:.1f}" for m in medians),
            )
            measured[key] = result
            results[mode.name] = result
    finally:
        for den in denoisers.values():
            session.denoisers.release(den)
        restore_processors(saved)
    return results
