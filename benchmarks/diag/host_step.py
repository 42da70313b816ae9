"""Diagnostic: host time of one converted UNet step on 2 gloo ranks (CPU, eager), per phase.

The tiny SDXL-layout UNet (``pcpp.testing.tiny_unet_config("sdxl")``: 3 levels, 1/2/10 transformer layers) does
so little arithmetic that a step's time is mostly pcpp's and diffusers' host bookkeeping, so this is how a change
of pcpp's core shows whether the per-step bookkeeping grew. Each rank runs a few images of ``--sync`` synchronous
then ``--async`` asynchronous steps; every call is timed between two barriers (so a rank does not time its peer's
lateness). Prints the median and quartiles per phase of each rank, as JSON, and the number of Python function
calls of one step per phase (``calls``, from ``cProfile``: unlike times, it does not depend on the machine's
load).

Compare two versions of the code by running them interleaved, e.g.::

    PYTHONPATH=/tmp/pcpp-base/src python benchmarks/diag/host_step.py
    PYTHONPATH=$PWD/src python benchmarks/diag/host_step.py
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist


def worker(rank: int, world: int, images: int, n_sync: int, n_async: int) -> dict[str, list[float]]:
    """Time every call of ``images`` images on this rank; returns seconds per call, by phase."""
    from diffusers import UNet2DConditionModel

    import pcpp
    from pcpp.testing import tiny_unet_config

    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(**tiny_unet_config("sdxl")).eval()
    pcpp.convert(unet, warmup_steps=n_sync, partial=0.3)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 12, generator=gen)
    kwargs = {
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=gen),
        "added_cond_kwargs": {"text_embeds": torch.randn(2, 8, generator=gen), "time_ids": torch.randn(2, 6)},
    }
    times: dict[str, list[float]] = {"sync": [], "async": [], "sync_calls": [], "async_calls": []}
    with torch.no_grad():
        for image in range(images):
            pcpp.reset(unet)
            for step in range(n_sync + n_async):
                dist.barrier()
                start = time.perf_counter()
                unet(x, 999 - step, **kwargs)
                elapsed = time.perf_counter() - start
                if image:  # the first image warms up allocations and caches
                    times["sync" if step < n_sync else "async"].append(elapsed)
        pcpp.reset(unet)
        for step in range(n_sync + 1):
            profile = cProfile.Profile()
            profile.enable()
            unet(x, 999 - step, **kwargs)
            profile.disable()
            if step in (n_sync - 1, n_sync):
                calls = pstats.Stats(profile).total_calls  # type: ignore[attr-defined]
                times["sync_calls" if step < n_sync else "async_calls"].append(float(calls))
    return times


def main() -> None:
    import pcpp
    from pcpp.testing import run_distributed

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="images per run; the first is not timed")
    parser.add_argument("--sync", type=int, default=15, help="synchronous steps per image")
    parser.add_argument("--async", dest="n_async", type=int, default=15, help="asynchronous steps per image")
    args = parser.parse_args()
    results = run_distributed(worker, 2, args.images, args.sync, args.n_async, timeout=1800)
    report: dict[str, Any] = {"pcpp": pcpp.__file__}
    for rank, times in enumerate(results):
        for phase, values in times.items():
            if phase.endswith("calls"):
                report[f"rank{rank}_{phase}"] = int(values[0])
                continue
            q1, median, q3 = statistics.quantiles(values, n=4)
            report[f"rank{rank}_{phase}_ms"] = {
                "median": round(median * 1e3, 3),
                "q1": round(q1 * 1e3, 3),
                "q3": round(q3 * 1e3, 3),
                "n": len(values),
            }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
