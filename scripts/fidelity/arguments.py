"""The command line: its parser, and the study (job, rank counts, plan) that parsed arguments describe."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any

import torch

from .job import Job, Study, cache_key
from .metrics import lpips_available
from .plan import PLANS, parse_runs, read_captions, study_captions

logger = logging.getLogger("pcpp.fidelity")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; ``--plan`` sets the defaults that the other options override."""
    parser = argparse.ArgumentParser(
        description="PCPP fidelity study: PSNR/SSIM of patch-parallel images and per-step noise-prediction error "
        "against the single-device UNet, swept over partial ratio, full conditioning, warmup, ranks and size.",
    )
    parser.add_argument("--plan", choices=sorted(PLANS), default="small", help="preset of the options below")
    parser.add_argument("--model", default="tiny", help="'tiny' (pcpp's own model) or a diffusers pipeline id/folder")
    parser.add_argument("--captions", default=None, help="text file, one prompt per line (default: tiny captions)")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompt/seed pairs")
    parser.add_argument("--caption-seed", type=int, default=0, help="seed of the generated tiny-model captions")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of prompt 0 (prompt i uses seed + i)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps of modes named without @wN")
    parser.add_argument(
        "--run",
        action="append",
        default=None,
        metavar="RANKSxSIZES:MODES",
        help="configurations to run, e.g. '2,4x32,48:exact,p0,p0.3,p1,full,p0.3@w2,full@w1' (repeatable; "
        "replaces the plan's runs)",
    )
    parser.add_argument("--eps-prompts", type=int, default=None, help="prompts whose eps error is measured")
    parser.add_argument("--grid-prompts", type=int, default=3, help="prompts shown in the image grids")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per pipeline call (pipelines only)")
    parser.add_argument(
        "--lpips", choices=("auto", "on", "off"), default="auto", help="auto: pipelines only, if weights are cached"
    )
    parser.add_argument("--reference-procs", type=int, default=None, help="processes for the references")
    parser.add_argument(
        "--work-dir", default=None, help="cache of references and finished configurations, to resume (default: temp)"
    )
    parser.add_argument("--json", default="fidelity_results.json", help="where to write every number")
    parser.add_argument("--table", default=None, help="markdown file for the tables (markers block or whole file)")
    parser.add_argument("--img-dir", default=None, help="folder for the PNG plots and grids (fidelity_*.png)")
    parser.add_argument(
        "--figures-only", action="store_true", help="redraw table and figures from --work-dir; keep the JSON"
    )
    parser.add_argument("--timeout-s", type=float, default=6 * 3600.0, help="longest time per rank count")
    return parser


def resolve_plan(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--plan`` preset with the options given on the command line in place of its values."""
    plan = dict(PLANS[args.plan])
    for key in ("prompts", "steps", "warmup", "eps_prompts"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.run:
        plan["runs"] = tuple(args.run)
    return plan


def make_study(args: argparse.Namespace, work_dir: str) -> tuple[Study, dict[str, Any]]:
    """Build the study from parsed arguments.

    Returns:
        The study and the resolved plan.

    Raises:
        SystemExit: an option is out of range (a message says which).
    """
    plan = resolve_plan(args)
    if args.captions:
        prompts = read_captions(args.captions, plan["prompts"])
    else:
        if args.model != "tiny":
            raise SystemExit("--captions is needed with --model other than 'tiny'")
        prompts = study_captions(plan["prompts"], args.caption_seed)
    n = len(prompts)
    try:
        configs = parse_runs(plan["runs"], plan["warmup"])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for c in configs:
        if c.resolution % 4 or (args.model != "tiny" and c.resolution % 8):
            raise SystemExit(f"size {c.resolution} px: a multiple of 4 (tiny) or 8 (latent pipelines) is needed")
    ranks = sorted({c.ranks for c in configs})
    plan["ranks"] = ranks
    plan["resolutions"] = sorted({c.resolution for c in configs})
    use_lpips = args.lpips == "on"
    if args.lpips == "auto" and args.model != "tiny":
        use_lpips, reason = lpips_available()
        logger.info("LPIPS %s: %s", "on" if use_lpips else "skipped", reason)
    elif args.lpips == "auto":
        logger.info("LPIPS skipped: not meaningful for the tiny model's small images (use --lpips on to force)")
    eps_n = min(plan["eps_prompts"], n)
    job = Job(
        model=args.model,
        prompts=tuple(prompts),
        seeds=tuple(args.seed + i for i in range(n)),
        steps=plan["steps"],
        guidance=args.guidance,
        configs=tuple(configs),
        eps_ids=tuple(range(eps_n)),
        grid_ids=tuple(range(min(args.grid_prompts, n))),
        reference_dir=work_dir,
        device=args.device,
        batch_size=args.batch_size,
        lpips=use_lpips,
    )
    job = dataclasses.replace(job, cache_key=cache_key(job))
    if args.device == "cuda":
        procs = args.reference_procs or max(1, torch.cuda.device_count())
    else:
        procs = args.reference_procs or max(1, min(os.cpu_count() or 1, max(ranks)))
    return Study(job, grid_ranks=max(ranks), reference_procs=procs, timeout_s=args.timeout_s), plan
