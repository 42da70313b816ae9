"""The study's outputs: the JSON document (with the environment it ran in) and the figures."""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import platform
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .grids import grid_columns, save_grid
from .job import Job, config_sizes, study_guidance, tiny_unet_sha256
from .plots import (
    BENCHMARK_LATENCY_MS,
    SINGLE_GPU_LATENCY_MS,
    has_matplotlib,
    plot_eps_per_step,
    plot_pareto,
    plot_psnr_vs_partial,
)

logger = logging.getLogger("pcpp.fidelity")

COMMAND: str = "python scripts/fidelity_study.py"
"""How the study is run (docs/fidelity.md); the JSON document records it with the arguments."""

METRICS: str = (
    "PSNR and SSIM per image on float images in [0, 1] (torchmetrics, data_range=1.0); eps: "
    "relative L2 of the guided eps (v converted with alpha_bar) vs the single-device UNet on the same x_t, "
    "at every step from the first asynchronous one"
)


def json_safe(value: Any) -> Any:
    """``value`` for strict JSON: infinities and NaN become the strings ``"inf"``, ``"-inf"``, ``"nan"``, keys
    strings, tuples lists (recursively)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def environment(job: Job) -> dict[str, Any]:
    """Where and with what the study ran: date, host, CPU count, library versions, model weights' hash."""
    import diffusers
    import torchmetrics

    import pcpp

    env: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": job.device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torchmetrics": torchmetrics.__version__,
        "pcpp": pcpp.__version__,
        "model": job.model,
    }
    if job.model == "tiny":
        env["tiny_unet_sha256"] = tiny_unet_sha256()
    return env


def document(
    argv: Sequence[str],
    wall_seconds: float,
    env: dict[str, Any],
    plan: dict[str, Any],
    job: Job,
    seed: int,
    records: list[dict[str, Any]],
) -> dict[str, Any]:
    """The JSON document of a study (before :func:`json_safe`).

    Args:
        argv: the command-line arguments, recorded with :data:`COMMAND`.
        wall_seconds: the whole run's wall time.
        env: :func:`environment` at the start.
        plan: the resolved plan (:func:`fidelity.arguments.make_study`).
        job: the study's job.
        seed: noise seed of prompt 0.
        records: the merged records (:func:`fidelity.study.run_study`).

    Returns:
        The document: command, wall time, environment, plan, the benchmark latencies, prompts and results.
    """
    return {
        "command": f"{COMMAND} {shlex.join(list(argv))}".strip(),
        "wall_seconds": wall_seconds,
        "environment": env,
        "plan": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
            "guidance": study_guidance(job),
            "scheduler": "DDIM (eta 0)",
            "noise_seeds": f"prompt i uses seed {seed} + i",
            "eps_images": list(job.eps_ids),
            "metrics": METRICS,
        },
        "benchmark_latency_ms": {
            "source": "docs/benchmarks.md: SDXL, 2048 px, 50 DDIM steps, cfg 2 x patch 2 on 4x H200",
            "single_gpu": SINGLE_GPU_LATENCY_MS,
            **BENCHMARK_LATENCY_MS,
        },
        "prompts": list(job.prompts),
        "results": records,
    }


def write_figures(
    img_dir: Path,
    records: Sequence[dict[str, Any]],
    grids: dict[tuple[int, str], Tensor],
    references: dict[int, Tensor],
    job: Job,
    grid_ranks: int | None,
    warmup: int,
) -> None:
    """Write the plots (matplotlib, skipped without it) and the image grids into ``img_dir``."""
    img_dir.mkdir(parents=True, exist_ok=True)
    if has_matplotlib() and grid_ranks is not None:
        plot_pareto(records, grid_ranks, img_dir / "fidelity_pareto.png")
        plot_psnr_vs_partial(records, warmup, img_dir / "fidelity_psnr_vs_partial.png")
        plot_eps_per_step(records, grid_ranks, min(config_sizes(job.configs)), img_dir / "fidelity_eps_per_step.png")
    else:
        logger.warning("matplotlib is not installed: plots skipped (pip install matplotlib); grids are untitled")
    ids = list(job.grid_ids)
    for size in config_sizes(job.configs):
        images = {label: grid for (s, label), grid in grids.items() if s == size}
        columns = grid_columns(list(images), warmup)
        if ids and columns:
            save_grid(
                references[size][ids],
                images,
                columns,
                img_dir / f"fidelity_grid_{size}px.png",
                captions=[job.prompts[i] for i in ids],
            )
