"""``pcpp generate``: one image, split over every process of a torchrun job, compared with one device."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .api import convert, revert
from .config import Conditioning

__all__ = ["build_parser", "generate_main"]

logger = logging.getLogger("pcpp.generate")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``pcpp generate``."""
    parser = argparse.ArgumentParser(
        prog="pcpp generate",
        description="Generate one image with patch parallelism over every process of a torchrun job (one process "
        "without torchrun), save it, and compare it with the single-device image. Default model: pcpp's own "
        "tiny text-to-image model (coloured shapes), shipped with the package: no download.",
    )
    parser.add_argument("--prompt", default="a red circle on a blue background", help="what to draw")
    parser.add_argument("--model", default="tiny", help="'tiny' (default) or a diffusers pipeline id or folder")
    parser.add_argument("--height", type=int, default=128, help="image height in pixels")
    parser.add_argument("--width", type=int, default=128, help="image width in pixels")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (same on every rank)")
    parser.add_argument("--partial", type=float, default=0.3, help="share of neighbour rows attention reads")
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps at the start")
    parser.add_argument("--full-conditioning", action="store_true", help="DistriFusion's every-strip attention")
    parser.add_argument("--exact", action="store_true", help="every step synchronous (reproduces one device)")
    parser.add_argument("--cfg-split", action="store_true", help="split the CFG batch over 2 groups (even worlds)")
    parser.add_argument("--no-reference", action="store_true", help="skip the single-device comparison")
    parser.add_argument("--out", default="pcpp.png", help="where rank 0 saves the image (PNG)")
    parser.add_argument("--report", default=None, help="rank 0 also writes the timings and comparison as JSON here")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait on a peer")
    return parser


def _psnr(image: Tensor, reference: Tensor) -> float:
    mse = float(torch.mean((image.float() - reference.float()) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _init_distributed(timeout: timedelta) -> tuple[int, int, torch.device, bool]:
    """Join the torchrun job if there is one. Returns (rank, world, device, whether we created the group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device, False
    if world == 1:
        return 0, 1, device, False
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device, True


def _comm(world: int, cfg_split: bool, device: torch.device) -> Any:
    if world == 1:
        from .comm import LocalCommunicator

        return LocalCommunicator()
    if not cfg_split:
        return None  # the default (world) group
    if world % 2:
        raise SystemExit(f"--cfg-split needs an even number of processes, got {world}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("cfg", "patch"))


def _tiny_runner(args: argparse.Namespace, device: torch.device) -> tuple[Any, Callable[[], Tensor]]:
    from .models import DEFAULT_GUIDANCE, load_tiny, sample

    model = load_tiny(device=device)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance

    def run() -> Tensor:
        gen = torch.Generator().manual_seed(args.seed)
        images = sample(
            model,
            [args.prompt],
            height=args.height,
            width=args.width,
            steps=args.steps,
            guidance=guidance,
            generator=gen,
        )
        return images[0].cpu()

    return model.unet, run


def _pipeline_runner(args: argparse.Namespace, device: torch.device) -> tuple[Any, Callable[[], Tensor]]:
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe: Any = DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {"height": args.height, "width": args.width, "num_inference_steps": args.steps}
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance

    def run() -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed(args.seed)
        out = pipe(args.prompt, generator=gen, output_type="pt", **kwargs).images[0]
        return out.float().cpu()

    return pipe.unet, run


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pcpp generate``; see :func:`build_parser`.

    Returns:
        The exit status (0 on success).
    """
    args = build_parser().parse_args(argv)
    rank, world, device, own_group = _init_distributed(timedelta(seconds=args.timeout_s))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s", force=True
    )
    try:
        unet, run = _tiny_runner(args, device) if args.model == "tiny" else _pipeline_runner(args, device)
        reference = None
        # Only rank 0 reports the comparison, so only it computes the reference; the others wait at the first
        # exchange of the parallel run (bounded by --timeout-s).
        if not args.no_reference and rank == 0:
            start = time.perf_counter()
            reference = run()
            logger.info("single device: %.2f s", time.perf_counter() - start)
        conditioning = Conditioning.FULL if args.full_conditioning else Conditioning.PARTIAL
        convert(
            unet,
            comm=_comm(world, args.cfg_split, device),
            partial=args.partial,
            warmup_steps=args.warmup_steps,
            conditioning=conditioning,
            exact=args.exact,
            timeout=timedelta(seconds=args.timeout_s),
        )
        start = time.perf_counter()
        image = run()
        elapsed = time.perf_counter() - start
        revert(unet)
        mode = "exact" if args.exact else ("full conditioning" if args.full_conditioning else f"partial {args.partial}")
        logger.info(
            "%d process(es), %s, %dx%d, %d steps: %.2f s", world, mode, args.height, args.width, args.steps, elapsed
        )
        if rank == 0:
            from .models.imageio import save_png

            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            save_png(image, args.out)
            logger.info("saved %s", args.out)
            report: dict[str, Any] = {"world": world, "mode": mode, "seconds": elapsed, "image": str(args.out)}
            if reference is not None:
                report["psnr_db"] = _psnr(image, reference)
                report["max_abs_diff"] = float((image - reference).abs().max())
                logger.info(
                    "against the single-device image: PSNR %.2f dB, max abs difference %.3g (pixels in [0, 1])",
                    report["psnr_db"],
                    report["max_abs_diff"],
                )
            if args.report:
                Path(args.report).write_text(json.dumps(report, indent=2))
    finally:
        if own_group:
            dist.destroy_process_group()
    return 0
