"""The timing loop: warm-up images, timed images, per-step times and peak memory of one variant on this rank."""

from __future__ import annotations

import argparse
import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .common import StepFn, denoise, sync_device, sync_point
from .model import make_scheduler
from .profile import profile_image

__all__ = ["Timing", "step_summary", "time_images"]

LOG = logging.getLogger(__name__)


@dataclass
class Timing:
    """Times of one variant on this rank (milliseconds)."""

    warmup_ms: list[float]
    times_ms: list[float]
    peak_mem_bytes: int
    warmup_final: Tensor | None
    last_final: Tensor | None
    profile: dict[str, Any] | None = None
    step_ms: list[float] = field(default_factory=list)  # each step's median over the timed images


def time_images(
    step_fn: StepFn,
    reset: Callable[[], None],
    latents0: Tensor,
    args: argparse.Namespace,
    device: torch.device,
    collective: bool,
    label: str,
    after_warmup: Callable[[], None] | None = None,
) -> Timing:
    """Warm-up images, then ``--repeats`` timed images; resets the peak-memory counter first."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scheduler = make_scheduler()
    line_up: Callable[[torch.device], None] = sync_point if collective else sync_device
    warm, times = [], []
    warm_final = last_final = None
    for i in range(args.warmup_images):
        reset()
        line_up(device)
        elapsed, warm_final = denoise(step_fn, scheduler, latents0, args.steps, args.guidance)
        warm.append(elapsed)
        LOG.info("%s: warm-up image %d: %.1f ms (includes captures/compilation)", label, i + 1, elapsed)
    if after_warmup is not None:
        after_warmup()
    per_image: list[list[float]] = []
    for i in range(args.repeats):
        reset()
        line_up(device)
        per_image.append([])
        elapsed, last_final = denoise(step_fn, scheduler, latents0, args.steps, args.guidance, step_ms=per_image[-1])
        times.append(elapsed)
        LOG.info("%s: image %d/%d: %.1f ms", label, i + 1, args.repeats, elapsed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    profiled = None
    if args.profile is not None:
        reset()
        line_up(device)
        profiled = profile_image(step_fn, latents0, args, device, label)
    step_ms = [statistics.median(s) for s in zip(*per_image, strict=True)] if per_image else []
    return Timing(warm, times, int(peak), warm_final, last_final, profiled, step_ms)


def step_summary(step_ms: Sequence[float], first_async: int | None) -> dict[str, Any]:
    """Per-step times (median over the timed images) and their means by phase.

    Args:
        step_ms: milliseconds of each step of the image.
        first_async: index of the first asynchronous step (``None`` for a run without phases).

    Returns:
        ``{"per_step_ms", "median_ms"}``, plus ``"sync_mean_ms"``, ``"first_async_ms"`` and ``"async_median_ms"``
        when ``first_async`` is given (``None`` where a phase has no step).
    """
    out: dict[str, Any] = {
        "per_step_ms": [round(x, 4) for x in step_ms],
        "median_ms": statistics.median(step_ms) if step_ms else None,
    }
    if first_async is not None:
        sync, rest = step_ms[:first_async], step_ms[first_async:]
        out["sync_mean_ms"] = statistics.fmean(sync) if sync else None
        out["first_async_ms"] = rest[0] if rest else None
        out["async_median_ms"] = statistics.median(rest[1:]) if len(rest) > 1 else None
    return out
