"""Diagnostic: how long one UNet call takes, step by step, for the plain UNet and for pcpp on one rank.

Runs, one after another on one GPU, all under :class:`pcpp.cuda_graph.CUDAGraphUNet` at 1024x1024: the plain
UNet, pcpp converted on one rank (``LocalCommunicator``), the same with ``exact=True`` (one graph for every
step), and the plain UNet again. Each gets one warm-up image and three timed ones; every UNet call is timed
between two device synchronisations. It showed that the same graph slows down as the run goes on
(docs/benchmarks.md, table 9): what runs later looks slower, whichever UNet it is.

Run on one GPU, from the repository root::

    OUT=results python benchmarks/diag/step_times.py    # writes results/step_times.json
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from pathlib import Path

import torch

import pcpp
from pcpp.bench.arguments import DEFAULT_CONFIG
from pcpp.bench.common import denoise, load_unet_config, make_inputs
from pcpp.bench.denoisers import cfg_step
from pcpp.bench.model import build_unet, make_scheduler
from pcpp.comm.local import LocalCommunicator
from pcpp.cuda_graph import CUDAGraphUNet

LOG = logging.getLogger("step_times")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dev = torch.device("cuda")
    cfg = load_unet_config(DEFAULT_CONFIG)
    unet = build_unet(cfg, 0, dev, torch.float16, True)
    inputs = make_inputs(cfg, 1024, 1024, 0, dev, torch.float16)
    out: dict[str, dict[str, list[float]]] = {}

    def run(name: str, den: CUDAGraphUNet, images: int = 3) -> None:
        step = cfg_step(den, inputs)
        per_image: list[list[float]] = []

        def timed(i: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            torch.cuda.synchronize()
            start = time.perf_counter()
            result = step(i, latents, t)
            torch.cuda.synchronize()
            per_image[-1].append((time.perf_counter() - start) * 1e3)
            return result

        totals = []
        for _ in range(images + 1):  # the first image captures the graphs
            den.reset()
            per_image.append([])
            ms, _ = denoise(timed, make_scheduler(), inputs.latents, 50, 5.0)
            totals.append(ms)
        steps = [statistics.median(x) for x in zip(*per_image[1:], strict=True)]
        out[name] = {"images_ms": totals[1:], "unet_step_ms": steps}
        LOG.info(
            "%s images %s, UNet calls sum %.1f ms, median call %.3f ms",
            name,
            [round(x, 1) for x in totals[1:]],
            sum(steps),
            statistics.median(steps),
        )
        den.release()

    run("single", CUDAGraphUNet(unet))
    pcpp.convert(unet, comm=LocalCommunicator(), detect_new_image=False)
    run("pcpp1", CUDAGraphUNet(unet))
    pcpp.configure(unet, exact=True)
    run("pcpp1_exact", CUDAGraphUNet(unet))
    pcpp.revert(unet)
    run("single_again", CUDAGraphUNet(unet))
    Path(os.environ.get("OUT", "."), "step_times.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
