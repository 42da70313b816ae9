"""1 GPU: the plain UNet against pcpp converted on one rank, images interleaved so that drift cancels.

`pcpp bench` times its variants one after another. On one H100 the same CUDA graph ran 1.9% slower after three
minutes of load than at the start (docs/benchmarks.md, table 9), which is as large as the difference a
one-rank pcpp could make. Here both UNets live on the GPU at once (the plain one and a deep copy converted by
pcpp on a one-rank group), each wrapped the same way (CUDA graphs, optionally ``torch.compile`` too), and the
timed images alternate A B B A A B ..., so that a slow drift of the clock weighs on both alike.

Run on one GPU, from the repository root (pcpp and diffusers importable)::

    python benchmarks/one_gpu_interleaved.py --resolution 1024 --variants graph compile+graph \
        --pairs 3 --out one_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import time
from pathlib import Path

import torch

import pcpp
from pcpp.bench.arguments import DEFAULT_CONFIG, parse_args
from pcpp.bench.common import denoise, load_unet_config, make_inputs
from pcpp.bench.denoisers import Denoiser, Denoisers, cfg_step
from pcpp.bench.layout import init_layout
from pcpp.bench.model import build_unet, make_scheduler

LOG = logging.getLogger("one_gpu_interleaved")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--resolution", type=int, default=1024, help="square image size in pixels")
    parser.add_argument("--variants", nargs="+", default=["graph", "compile+graph"], choices=["graph", "compile+graph"])
    parser.add_argument("--pairs", type=int, default=3, help="timed images per UNet and variant")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    bargs = parse_args(["--device", "cuda", "--resolutions", str(args.resolution), "--steps", str(args.steps)])
    layout = init_layout(bargs)  # a one-process NCCL group: what pcpp.convert(comm=None) uses
    if layout.world != 1:
        raise SystemExit(f"run this on one process, not {layout.world}")
    device = layout.device
    config = load_unet_config(args.config)
    plain = build_unet(config, bargs.seed, device, torch.float16, True)
    converted = pcpp.convert(copy.deepcopy(plain), detect_new_image=False)
    denoisers = Denoisers(device)
    inputs = make_inputs(config, args.resolution, args.resolution, bargs.seed, device, torch.float16)

    def image(den: Denoiser) -> float:
        """One image from a fresh start; its loop time in milliseconds."""
        den.reset()
        ms, _ = denoise(cfg_step(den, inputs), make_scheduler(), inputs.latents, args.steps, bargs.guidance)
        return ms

    variants: dict[str, dict[str, object]] = {}
    report: dict[str, object] = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "resolution": args.resolution,
        "steps": args.steps,
        "order": "A B B A A B ... (A = plain UNet, B = pcpp on one rank)",
        "variants": variants,
    }
    for variant in args.variants:
        compile_ = variant.startswith("compile")
        dens = {}
        for name, unet in (("plain", plain), ("pcpp", converted)):
            # One Dynamo cache for both UNets (reset_dynamo=False after the first): both stay compiled.
            dens[name], _ = denoisers.make(unet, graph=True, compile_=compile_, reset_dynamo=name == "plain")
        times: dict[str, list[float]] = {"plain": [], "pcpp": []}
        warm: dict[str, float] = {}
        for name, den in dens.items():
            warm[name] = image(den)
            LOG.info("%s %s: warm-up image %.1f ms (captures/compilation)", variant, name, warm[name])
        order = []
        for i in range(args.pairs):
            order += ["plain", "pcpp"] if i % 2 == 0 else ["pcpp", "plain"]
        for name in order:
            ms = image(dens[name])
            times[name].append(ms)
            LOG.info("%s %s: %.1f ms", variant, name, ms)
        for den in dens.values():
            denoisers.release(den)
        torch._dynamo.reset()
        med = {k: statistics.median(v) for k, v in times.items()}
        variants[variant] = {
            "times_ms": times,
            "median_ms": med,
            "warmup_ms": warm,
            "pcpp_over_plain": med["pcpp"] / med["plain"],
        }
        LOG.info(
            "%s: plain %.1f ms, pcpp %.1f ms, ratio %.4f",
            variant,
            med["plain"],
            med["pcpp"],
            med["pcpp"] / med["plain"],
        )
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
