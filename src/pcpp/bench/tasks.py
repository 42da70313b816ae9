"""What ``pcpp bench`` measures besides the UNet's loop: ``--whole-image`` and ``--vae-floor``, and their options."""

from __future__ import annotations

import argparse
import enum
import os
from pathlib import Path

from pcpp.pipeline import VAEPlacement

from .common import DTYPES

__all__ = [
    "DEFAULT_VAE_CONFIG",
    "IMAGE_MODES",
    "UNET_MODES",
    "Task",
    "add_task_arguments",
    "check_task",
    "parse_placement",
]

DEFAULT_VAE_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl-vae.json"
"""SDXL's ``vae/config.json`` (``force_upcast``: the pipeline decodes in fp32), shipped with the package."""

UNET_MODES = ("single", "floor", "exact", "full", "partial:0.3")
"""Default ``--modes``."""
IMAGE_MODES = ("partial:0.3",)
"""Default ``--modes`` with ``--whole-image``."""


class Task(enum.Enum):
    """What one run of ``pcpp bench`` measures."""

    UNET = "unet"  # the denoising loop alone, per --modes (the default)
    WHOLE_IMAGE = "whole-image"  # a diffusers pipeline end to end: text encoding, denoising loop, VAE decode
    VAE_FLOOR = "vae-floor"  # one process: the whole VAE decode against rank 0's strip, the parallel decode's floor


def parse_placement(text: str) -> VAEPlacement:
    """``parallel`` or ``whole``: a :class:`pcpp.VAEPlacement`.

    Raises:
        argparse.ArgumentTypeError: another word.
    """
    try:
        return VAEPlacement(text.strip().lower())
    except ValueError:
        names = ", ".join(p.value for p in VAEPlacement)
        raise argparse.ArgumentTypeError(f"unknown VAE placement {text!r}; use {names}") from None


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """``--whole-image`` and ``--vae-floor``, and their options."""
    task = parser.add_mutually_exclusive_group()
    task.add_argument(
        "--whole-image",
        dest="task",
        action="store_const",
        const=Task.WHOLE_IMAGE,
        help="time whole images through a diffusers pipeline (random text encoders, UNet and VAE; the UNet's "
        "config gives SD or SDXL): text encoding, denoising loop and VAE decode apart, per rank, with peak memory; "
        "single runs the plain pipeline on rank 0, pcpp modes pcpp.parallelize(pipe) (default: off, the UNet's "
        "loop alone)",
    )
    task.add_argument(
        "--vae-floor",
        dest="task",
        action="store_const",
        const=Task.VAE_FLOOR,
        help="one process: time the whole VAE decode against rank 0's strip of N with its halo rows (what rank 0 "
        "of the parallel decode computes, without its exchanges) per --resolutions, --strips and --vae-dtypes "
        "(default: off)",
    )
    parser.set_defaults(task=Task.UNET)
    parser.add_argument(
        "--vae-config",
        type=Path,
        default=DEFAULT_VAE_CONFIG,
        help="AutoencoderKL config JSON (diffusers format) for --whole-image and --vae-floor (default: SDXL's VAE)",
    )
    parser.add_argument(
        "--vae-placements",
        type=parse_placement,
        nargs="+",
        default=[VAEPlacement.PARALLEL],
        metavar="PLACEMENT",
        help="--whole-image: pcpp.VAEPlacement of each pcpp run, parallel or whole (default: parallel)",
    )
    parser.add_argument(
        "--prompt",
        default="a photograph of a red fox in the snow",
        help="--whole-image: the prompt (default: %(default)s)",
    )
    parser.add_argument(
        "--strips",
        type=int,
        nargs="+",
        default=[1, 2, 4],
        metavar="N",
        help="--vae-floor: strip counts (default: 1 2 4)",
    )
    parser.add_argument(
        "--vae-dtypes",
        choices=sorted(DTYPES),
        nargs="+",
        default=None,
        help="--vae-floor: decode dtypes (default: float16 float32 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--max-gib",
        type=float,
        default=70.0,
        help="--vae-floor: skip a decode whose activations are estimated above this many GiB (default: 70)",
    )
    parser.add_argument(
        "--vae-converted",
        action="store_true",
        help="--vae-floor: also time the VAE converted by pcpp.convert on this one rank against the plain one, "
        "whole decodes interleaved A B B A (default: off)",
    )
    parser.add_argument(
        "--compile-backend",
        choices=["inductor", "aot_eager", "eager"],
        default="inductor",
        help="--vae-floor with --compile or --compile-only: torch.compile's backend (default: inductor)",
    )


def check_task(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on ``--whole-image`` / ``--vae-floor`` and refuse what does not apply
    (``args.modes`` already parsed); a refusal is a usage error (exit status 2)."""
    if args.vae_dtypes is None:
        args.vae_dtypes = ["float16", "float32"] if args.device == "cuda" else ["float32"]
    if args.task is Task.UNET:
        return
    flag = f"--{args.task.value}"
    unet_only = ("profile", "single_from", "compile_floor") + (
        ("compile", "compile_only") if args.task is Task.WHOLE_IMAGE else ()
    )
    for name in unet_only:
        if getattr(args, name):
            parser.error(f"--{name.replace('_', '-')} applies to the UNet's loop alone, not to {flag}")
    if args.task is Task.WHOLE_IMAGE and any(m.name == "floor" for m in args.modes):
        parser.error("--whole-image runs single and pcpp modes (exact, full, partial:P); the floor is the UNet's")
    if args.task is Task.VAE_FLOOR:
        if int(os.environ.get("WORLD_SIZE", "1")) != 1:
            parser.error(f"--vae-floor runs on one process, not WORLD_SIZE={os.environ['WORLD_SIZE']}")
        if any(n < 1 for n in args.strips):
            parser.error(f"--strips must be at least 1, got {args.strips}")
