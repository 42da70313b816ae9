"""The per-rank work of the spawned processes: single-device references, and the patch-parallel configurations."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import Tensor

from .job import Job, rank_device, reference_path
from .metrics import finite_mean, image_metrics, lpips_metric
from .recorder import Recorder
from .samplers import make_sampler

logger = logging.getLogger("pcpp.fidelity")


def worker_logging(rank: int) -> None:
    """Rank 0 of a spawned group logs at INFO to stderr (the others only warnings)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING,
            format=f"%(asctime)s [rank {rank}] %(message)s",
            datefmt="%H:%M:%S",
        )


def reference_worker(rank: int, world: int, job: Job, sizes: tuple[int, ...]) -> dict[int, Tensor]:
    """Single-device images (unconverted UNet) of prompts ``rank::world`` at every size. Runs in a spawned rank.

    Returns:
        ``{size: images}`` of this rank's prompts.
    """
    worker_logging(rank)
    sampler = make_sampler(job, rank_device(job, rank))
    ids = list(range(rank, len(job.prompts), world))
    return {size: sampler.generate(ids, size) for size in sizes} if ids else {}


def study_worker(rank: int, world: int, job: Job) -> list[dict[str, Any]]:
    """Run every configuration of ``job`` on this rank (patch-parallel, all prompts in one batch) and measure it.

    Each rank measures its own share of the prompts (``rank::world``) against the cached reference images and
    its own share of ``eps_ids``; the parent merges the shares. Runs in a spawned rank.

    Returns:
        One record per configuration: ids, per-image PSNR/SSIM(/LPIPS), eps errors, seconds, grid images.
    """
    import pcpp

    worker_logging(rank)
    device = rank_device(job, rank)
    sampler = make_sampler(job, device)
    ids = list(range(len(job.prompts)))
    mine = ids[rank::world]
    eps_mine = tuple(job.eps_ids[rank::world])
    lpips = lpips_metric(device) if job.lpips else None
    references: dict[int, Tensor] = {}
    records = []
    for config in job.configs:
        size = config.resolution
        if size not in references:
            references[size] = torch.load(reference_path(job, size), weights_only=True)
        mode = config.mode
        pcpp.convert(sampler.unet, **mode.convert_kwargs())
        # Steps 0 .. warmup-1 are synchronous (step 0 always is); exact mode is measured from step 1 on.
        recorder = Recorder(sampler.unet, sampler.guidance, first_step=1 if mode.exact else max(mode.warmup, 1))
        recorder.wanted = frozenset(eps_mine)
        start = time.perf_counter()
        try:
            images = sampler.generate(ids, size, recorder)
        finally:
            recorder.remove()
            pcpp.revert(sampler.unet)
        seconds = time.perf_counter() - start
        errors = recorder.errors(sampler.unet, sampler.alphas_cumprod, sampler.prediction_type)
        recorder.calls.clear()
        record: dict[str, Any] = {
            "config": config,
            "ids": mine,
            "seconds": seconds,
            "eps": {i: errors.get(i, {}) for i in eps_mine},
            **image_metrics(images[mine], references[size][mine]),
        }
        if lpips is not None:
            record["lpips"] = lpips(images[mine], references[size][mine])
        if rank == 0 and job.grid_ids:
            record["grid"] = images[list(job.grid_ids)].clone()
        records.append(record)
        logger.info(
            "rank %d/%d, %d px, %s: %.1f s, mean PSNR of my %d images %.2f dB",
            rank,
            world,
            size,
            mode.label,
            seconds,
            len(mine),
            finite_mean(record["psnr"]),
        )
    return records
