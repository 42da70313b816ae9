"""``pcpp generate``: one image, split over every process of a torchrun job, compared with one device.

Order of work, and why:

1. Every argument is checked (:func:`~pcpp.cli.options.parse_options`) before a process group or a model exists,
   so a usage error costs no model load and every rank refuses it alike (rank 0 prints it).
2. The ranks join the job, load the model, make it patch-parallel as ``--prompts`` does (the tiny model's UNet
   with :func:`pcpp.convert`; a pipeline with :func:`pcpp.parallelize`, its VAE on strips unless ``--vae whole``)
   and make the parallel image together, then undo the conversion (:func:`pcpp.revert`).
3. The process group is closed; rank 0 alone saves the image (prompt, seed and settings in its PNG text chunks),
   then computes the single-device reference and compares. Computing the reference after the parallel image means
   no peer is ever waiting on it, so ``--timeout-s`` bounds only the waits on peers during the parallel image,
   however long the reference takes; the other ranks are done and exit.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pcpp import PCPPConfig, revert
from pcpp.batch import TinyBackend, parallelize_pipeline

from .failures import report_failure
from .job import init_distributed, load_pipeline, pcpp_config, position, settings_text
from .options import GenerateOptions, UsageError, parse_options

__all__ = ["generate_main"]

logger = logging.getLogger("pcpp.generate")


@dataclass(frozen=True)
class _Runner:
    """A loaded model and what the command does with it.

    Attributes:
        parallelize: ``(comm, config)``: makes the model patch-parallel, as ``--prompts`` does (the tiny model's
            UNet by :func:`pcpp.convert`; a pipeline by :func:`pcpp.parallelize`, the VAE placed by ``--vae``).
        converted: What ``parallelize`` converted, for :func:`pcpp.revert`: the tiny UNet, or the pipeline.
        run: ``run(progress) -> (3, H, W)``: makes the image.
        guidance: The CFG scale used (None if unknown).
    """

    parallelize: Callable[[Any, PCPPConfig], None]
    converted: Any
    run: Callable[[bool], Tensor]
    guidance: float | None


def _comm(options: GenerateOptions, device: torch.device) -> Any:
    if options.world == 1:
        from pcpp.comm import LocalCommunicator

        return LocalCommunicator()
    if not options.cfg_split:
        return None  # the default (world) group
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (2, options.world // 2), mesh_dim_names=("cfg", "patch"))


def _tiny_runner(options: GenerateOptions, device: torch.device) -> _Runner:
    from pcpp.models import DEFAULT_GUIDANCE, load_tiny, sample

    model = load_tiny(device=device)
    guidance = DEFAULT_GUIDANCE if options.guidance is None else options.guidance

    def run(progress: bool) -> Tensor:
        gen = torch.Generator().manual_seed(options.seed)
        size = {"height": options.height, "width": options.width, "steps": options.steps}
        return sample(model, [options.prompt], **size, guidance=guidance, generator=gen, progress=progress)[0].cpu()

    return _Runner(TinyBackend(model).parallelize, model.unet, run, guidance)


def _pipeline_runner(options: GenerateOptions, device: torch.device) -> _Runner:
    pipe = load_pipeline(options.model, device)
    kwargs: dict[str, Any] = {"height": options.height, "width": options.width, "num_inference_steps": options.steps}
    default = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    guidance = options.guidance if options.guidance is not None else getattr(default, "default", None)
    if options.guidance is not None:
        kwargs["guidance_scale"] = options.guidance

    def run(progress: bool) -> Tensor:
        # diffusers' own progress bar; disable=None: tqdm shows it only when stderr is a terminal.
        pipe.set_progress_bar_config(disable=None if progress else True, leave=False)
        gen = torch.Generator(device="cpu").manual_seed(options.seed)
        out = pipe(options.prompt, generator=gen, output_type="pt", **kwargs).images[0]
        return out.float().cpu()

    guidance_value = float(guidance) if isinstance(guidance, (int, float)) else None
    return _Runner(functools.partial(parallelize_pipeline, pipe, vae=options.vae), pipe, run, guidance_value)


def png_text(options: GenerateOptions, guidance: float | None) -> dict[str, str]:
    """The PNG text chunks of the image: prompt, seed and every setting that made it.

    Args:
        options: The run's options.
        guidance: The CFG scale used (None if unknown).

    Returns:
        Key to text.
    """
    return {
        "prompt": options.prompt,
        "seed": str(options.seed),
        "size": f"{options.width}x{options.height}",
        "steps": str(options.steps),
        "guidance": "model default" if guidance is None else repr(guidance),
        **settings_text(options),
    }


def _compare(image: Tensor, reference: Tensor) -> dict[str, Any]:
    """PSNR (dB, pixels in [0, 1]) and largest difference; identical images have no PSNR (it is infinite)."""
    mse = float(torch.mean((image.float() - reference.float()) ** 2))
    return {
        "identical": mse == 0.0,
        "psnr_db": None if mse == 0.0 else 10 * math.log10(1.0 / mse),
        "max_abs_diff": float((image - reference).abs().max()),
    }


def _parallel_image(options: GenerateOptions) -> tuple[Tensor, float, _Runner]:
    device, own_group = init_distributed(options)
    try:
        logger.info("loading model %s on %s", options.model, device)
        runner = _tiny_runner(options, device) if options.model == "tiny" else _pipeline_runner(options, device)
        runner.parallelize(_comm(options, device), pcpp_config(options))
        start = time.perf_counter()
        image = runner.run(options.rank == 0)
        elapsed = time.perf_counter() - start
        revert(runner.converted)  # the reference (rank 0, below) runs on the plain model
    finally:
        if own_group:
            dist.destroy_process_group()
    return image, elapsed, runner


def _generate(options: GenerateOptions) -> int:
    logging.basicConfig(
        level=logging.INFO if options.rank == 0 else logging.WARNING,
        format=f"[rank {options.rank}] %(message)s",
        force=True,
    )
    if options.prompts is not None:
        from .prompts import run_prompts

        return run_prompts(options)
    if not options.exact and options.synchronous_steps == options.steps:
        logger.info(
            "every step is synchronous: --warmup-steps %d (the default) covers all %d --steps, so the image is "
            "exact; pass --steps %d or more for asynchronous steps",
            options.warmup_steps,
            options.steps,
            options.warmup_steps + 1,
        )
    image, elapsed, runner = _parallel_image(options)
    logger.info(
        "%d process(es), %s, %dx%d, %d steps: %.2f s",
        options.world,
        options.mode,
        options.width,
        options.height,
        options.steps,
        elapsed,
    )
    if options.rank != 0:
        return 0
    from pcpp.models.imageio import save_png

    options.out.parent.mkdir(parents=True, exist_ok=True)
    save_png(image, options.out, png_text(options, runner.guidance))
    logger.info("saved %s", options.out)
    report: dict[str, Any] = {
        "world": options.world,
        "mode": options.mode,
        "steps": options.steps,
        "synchronous_steps": options.synchronous_steps,
        **({} if options.model == "tiny" else {"vae": options.vae.value}),
        "seconds": elapsed,
        "image": str(options.out),
    }
    if options.reference:
        start = time.perf_counter()
        reference = runner.run(True)  # runner.converted is reverted: this is the plain single-device model
        report["single_device_seconds"] = time.perf_counter() - start
        report.update(_compare(image, reference))
        psnr = "identical" if report["identical"] else f"PSNR {report['psnr_db']:.2f} dB"
        logger.info(
            "single device: %.2f s; against it: %s, max abs difference %.3g (pixels in [0, 1])",
            report["single_device_seconds"],
            psnr,
            report["max_abs_diff"],
        )
    if options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    """Entry point of ``pcpp generate``; see :func:`~pcpp.cli.options.build_parser` for the options.

    Args:
        argv: The arguments after ``generate`` (``sys.argv[2:]`` if None).

    Returns:
        The exit status: 0 on success, 2 for a usage or input error (one line, printed by rank 0 only), 1 for any
        other failure (one line per failing rank). Tracebacks are printed only with ``--debug``.

    Example:
        >>> generate_main(["--steps", "0"])  # doctest: +SKIP
        pcpp generate: error: --steps 0 must be at least 1
        2
    """
    args = sys.argv[2:] if argv is None else argv
    rank, world = position()
    try:
        options = parse_options(args, rank=rank, world=world)
    except UsageError as exc:
        return report_failure(exc, rank=rank, debug="--debug" in args)
    try:
        return _generate(options)
    except Exception as exc:
        return report_failure(exc, rank=rank, debug=options.debug)
