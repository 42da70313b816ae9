"""The orchestration: single-device references, one spawn per rank count, and merging the ranks' shares."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

import pcpp.testing

from .job import Study, config_sizes, record_path, reference_path
from .metrics import summarize
from .plan import Config
from .ranks import reference_worker, study_worker

logger = logging.getLogger("pcpp.fidelity")


def spawn(study: Study, fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` fresh processes (gloo, or NCCL for a CUDA study), within the study's
    timeout; returns the ranks' results in rank order (see :func:`pcpp.testing.run_distributed`)."""
    backend = "nccl" if study.job.device == "cuda" else "gloo"
    # pcpp.testing.run_distributed is looked up at each call, so that a test can stand in for it.
    return pcpp.testing.run_distributed(
        fn, world, *args, timeout=study.timeout_s, group_timeout=study.timeout_s, backend=backend
    )


def compute_references(study: Study) -> None:
    """Compute the single-device images of every size not cached in ``reference_dir`` (prompts split over
    ``reference_procs`` spawned processes; in this process if 1) and save them there."""
    job = study.job
    missing = tuple(s for s in config_sizes(job.configs) if not reference_path(job, s).is_file())
    if not missing:
        return
    procs = max(1, min(study.reference_procs, len(job.prompts)))
    start = time.perf_counter()
    if procs == 1:  # in this process: no spawn
        parts = [reference_worker(0, 1, job, missing)]
    else:
        parts = spawn(study, reference_worker, procs, job, missing)
    for size in missing:
        first = parts[0][size]
        full = torch.empty((len(job.prompts), *first.shape[1:]), dtype=first.dtype)
        for rank, part in enumerate(parts):
            if size in part:
                full[rank::procs] = part[size]
        torch.save(full, reference_path(job, size))
    logger.info("single-device references at %s px: %.1f s", list(missing), time.perf_counter() - start)


def run_study(study: Study) -> tuple[list[dict[str, Any]], dict[tuple[int, str], Tensor]]:
    """Run every configuration not cached in the work folder: one spawn of ``ranks`` processes per rank count.

    Each configuration's merged record is saved in the work folder as soon as its rank count finishes, so a run
    that stops can be resumed with the same ``--work-dir``.

    Returns:
        The merged records (one per configuration, JSON-ready except for ``config``) and the grid images
        ``{(size, mode label): images}`` of ``grid_ranks``.
    """
    job = study.job
    compute_references(study)
    for ranks in sorted({c.ranks for c in job.configs}):
        todo = tuple(c for c in job.configs if c.ranks == ranks and not record_path(job, c).is_file())
        if not todo:
            continue
        grid_ids = job.grid_ids if ranks == study.grid_ranks else ()
        sub = dataclasses.replace(job, configs=todo, grid_ids=grid_ids)
        start = time.perf_counter()
        per_rank = spawn(study, study_worker, ranks, sub)
        logger.info("%d ranks: %d configurations in %.1f s", ranks, len(todo), time.perf_counter() - start)
        for k, config in enumerate(todo):
            parts = [rank_records[k] for rank_records in per_rank]
            cached = {"record": merge_records(config, parts, len(job.prompts), job.steps), "grid": parts[0].get("grid")}
            torch.save(cached, record_path(job, config))
    records: list[dict[str, Any]] = []
    grids: dict[tuple[int, str], Tensor] = {}
    for config in job.configs:
        cached = torch.load(record_path(job, config), weights_only=False)
        records.append(cached["record"])
        if cached["grid"] is not None and config.ranks == study.grid_ranks:
            grids[(config.resolution, config.mode.label)] = cached["grid"]
    return records, grids


def merge_records(config: Config, parts: Sequence[dict[str, Any]], n_prompts: int, steps: int) -> dict[str, Any]:
    """Join the ranks' shares of one configuration and summarise them.

    Args:
        config: the configuration.
        parts: each rank's record from :func:`study_worker`.
        n_prompts: number of prompts.
        steps: denoising steps.

    Returns:
        A JSON-ready record: ``ranks``, ``resolution``, ``mode``, ``seconds``, summaries of ``psnr``, ``ssim``,
        ``lpips`` (or None) and ``eps`` (per image and step, with ``per_step_mean``/``per_step_max``), and the
        per-image values.
    """
    metrics = ["psnr", "ssim"] + (["lpips"] if "lpips" in parts[0] else [])
    per_image: dict[str, list[float]] = {m: [math.nan] * n_prompts for m in metrics}
    eps: dict[int, dict[int, float]] = {}
    for part in parts:
        for m in metrics:
            for i, v in zip(part["ids"], part[m], strict=True):
                per_image[m][i] = v
        eps.update(part["eps"])
    by_step: dict[int, list[float]] = {}
    for errors in eps.values():
        for step, err in errors.items():
            by_step.setdefault(step, []).append(err)
    all_errors = [e for errors in eps.values() for e in errors.values()]
    return {
        "ranks": config.ranks,
        "resolution": config.resolution,
        "mode": config.mode.to_json(),
        "seconds": max(float(p["seconds"]) for p in parts),
        "psnr": summarize(per_image["psnr"]),
        "ssim": summarize(per_image["ssim"]),
        "lpips": summarize(per_image["lpips"]) if "lpips" in per_image else None,
        "eps": summarize(all_errors)
        | {
            "images": sorted(eps),
            "per_step_mean": [sum(by_step[s]) / len(by_step[s]) if s in by_step else None for s in range(steps)],
            "per_step_max": [max(by_step[s]) if s in by_step else None for s in range(steps)],
        },
        "per_image": per_image,
    }
