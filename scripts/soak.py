"""Soak: many consecutive images from one converted UNet, watching host memory and output stability.

Run under torchrun (one process per strip), e.g. the figures in docs/reliability.md::

    torchrun --nproc-per-node 2 scripts/soak.py --images 1000 --report soak.json

Every image uses pcpp's shipped tiny model, one seed of a small cycle, and the same converted UNet (pcpp starts
a new image when the timestep goes up). It records each rank's resident set size (and GPU memory on CUDA) after
every image, and checks that every image equals, bit for bit, the first image made with the same seed. Rank 0
writes a JSON report; the exit status is 1 if images drifted or host memory grew more than ``--max-growth``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import pcpp
from pcpp.models import DEFAULT_GUIDANCE, load_tiny, sample

logger = logging.getLogger("pcpp.soak")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--images", type=int, default=1000, help="consecutive images (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=4, help="seeds cycled through (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="image height and width (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="DDIM steps per image (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="synchronous steps (default: %(default)s)")
    parser.add_argument("--partial", type=float, default=0.3, help="pcpp's partial ratio (default: %(default)s)")
    parser.add_argument(
        "--baseline-after", type=int, default=10, help="images before the RSS baseline (default: %(default)s)"
    )
    parser.add_argument(
        "--max-growth", type=float, default=0.01, help="allowed RSS growth after the baseline (default: %(default)s)"
    )
    parser.add_argument("--report", default=None, help="rank 0 writes the JSON report here")
    return parser


def _rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gather(value: float, world: int) -> list[float]:
    if world == 1:
        return [value]
    out = [torch.zeros(1, dtype=torch.float64) for _ in range(world)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64))
    return [float(t) for t in out]


def soak(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    """Make ``args.images`` images and return the report (every rank gets the same)."""
    model = load_tiny(device=device)
    pcpp.convert(model.unet, partial=args.partial, warmup_steps=args.warmup_steps, timeout=timedelta(minutes=2))
    firsts: dict[int, torch.Tensor] = {}
    drifted: list[int] = []
    rss: list[list[float]] = []
    gpu: list[int] = []
    seconds: list[float] = []
    for i in range(args.images):
        seed = i % args.seeds
        start = time.perf_counter()
        image = sample(
            model,
            ["a red circle on a blue background"],
            height=args.size,
            width=args.size,
            steps=args.steps,
            guidance=DEFAULT_GUIDANCE,
            generator=torch.Generator().manual_seed(seed),
        ).cpu()
        seconds.append(time.perf_counter() - start)
        if seed not in firsts:
            firsts[seed] = image
        elif not torch.equal(image, firsts[seed]):
            drifted.append(i)
        rss.append(_gather(float(_rss_bytes()), world))
        if device.type == "cuda":
            gpu.append(torch.cuda.memory_allocated(device))
        if rank == 0 and (i + 1) % max(1, args.images // 20) == 0:
            logger.info("%d/%d images, rank RSS %s MiB", i + 1, args.images, [round(r / 2**20, 1) for r in rss[-1]])
    base = rss[min(args.baseline_after, len(rss)) - 1]
    growth = [last / first - 1 for first, last in zip(base, rss[-1], strict=True)]
    return {
        "world": world,
        "images": args.images,
        "seeds": args.seeds,
        "size": args.size,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "partial": args.partial,
        "torch": torch.__version__,
        "device": str(device),
        "seconds_per_image_median": sorted(seconds)[len(seconds) // 2],
        "rss_mib_first": [r / 2**20 for r in rss[0]],
        "rss_mib_baseline": [r / 2**20 for r in base],
        "rss_mib_last": [r / 2**20 for r in rss[-1]],
        "rss_mib_max": [max(r[k] for r in rss) / 2**20 for k in range(world)],
        "rss_growth_after_baseline": growth,
        "gpu_allocated_bytes_first_last": [gpu[0], gpu[-1]] if gpu else None,
        "drifted_images": drifted,
        "identical_for_identical_seeds": not drifted,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the soak; see the module docstring."""
    args = _parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=2))
    rank = dist.get_rank() if world > 1 else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        report = soak(args, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()
    ok = report["identical_for_identical_seeds"] and max(report["rss_growth_after_baseline"]) < args.max_growth
    if rank == 0:
        text = json.dumps(report, indent=2, allow_nan=False)
        logger.info("%s", text)
        if args.report:
            with open(args.report, "w") as f:
                f.write(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
