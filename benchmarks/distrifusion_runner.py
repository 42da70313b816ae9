"""DistriFusion baseline: the SDXL UNet under ``distrifuser==0.0.1b1``, timed and checked against one GPU.

Run one process per GPU under ``torchrun`` with the DistriFusion stack (diffusers 0.24.0, huggingface_hub
0.25.2, transformers 4.44.2, distrifuser 0.0.1b1) first on ``PYTHONPATH``; see ``benchmarks/README.md``.

What it does, in order:

1. Makes ``peft``, ``accelerate`` (and by default ``transformers``) unimportable and restores
   ``torch.utils._pytree._register_pytree_node`` before diffusers 0.24 is imported, so the 2023-era stack
   loads beside torch 2.11.
2. Builds ``DistriConfig`` (which itself calls ``init_process_group("nccl")`` and creates the CFG batch
   groups), with every process group given a bounded timeout.
3. Builds the UNet from a config JSON with seeded random weights (CPU, fp32 init, then cast), wraps it in
   ``DistriUNetPP`` and repeats ``DistriSDXLPipeline.prepare()`` step for step: recording pass,
   ``create_buffer``, one synchronous pass, ``clear()``, and CUDA graphs at counters 0, w+1 and w+2.
4. Runs DistriFusion's denoising loop (the diffusers 0.24 SDXL pipeline's loop: CFG batch of 2, DDIM,
   ``set_counter(0)`` per image): one warm-up image, whose per-step inputs and outputs are recorded, then
   ``--repeats`` timed images.
5. After the timed images, releases the graphs, puts the original layers back in place (the wrappers kept
   them) and evaluates the plain single-GPU UNet on the recorded inputs: the relative L2 error of
   DistriFusion's noise prediction at each step.
6. Rank 0 writes a JSON report. Teardown never waits without a bound and the process ends with
   ``os._exit``, since ``destroy_process_group`` has hung after graph capture on these machines.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from bench_common import DEFAULT_CONFIG, common, fidelity
from distrifusion_stack import (
    DfStack,
    check_geometry,
    count_wrapped,
    import_df_stack,
    launch_env,
    make_distri_config,
    prepare_distrifusion,
    prepare_import_environment,
    release_cuda_graphs,
    unwrap_distri_layers,
)

LOG = logging.getLogger("distrifusion_runner")

REFERENCE = "plain diffusers UNet, same weights, batch 2, same x_t and t, one GPU"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Time DistriFusion (distrifuser 0.0.1b1, DistriUNetPP) on the SDXL UNet with random weights and "
            "measure its per-step noise-prediction error against the plain single-GPU UNet. Launch with "
            "`torchrun --nproc-per-node N` (N a power of two) with the DistriFusion stack on PYTHONPATH."
        )
    )
    common.add_loop_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (latent = height/8)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (latent = width/8)")
    parser.add_argument("--warmup-steps", type=int, default=4, help="DistriFusion synchronous warm-up steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed images after the warm-up image")
    parser.add_argument(
        "--no-split-batch",
        dest="split_batch",
        action="store_false",
        help="every rank runs both CFG halves (DistriConfig split_batch=False)",
    )
    parser.add_argument(
        "--no-cuda-graph",
        dest="use_cuda_graph",
        action="store_false",
        help="run DistriFusion eagerly (DistriConfig use_cuda_graph=False)",
    )
    parser.add_argument(
        "--mode",
        default="corrected_async_gn",
        choices=["corrected_async_gn", "stale_gn", "sync_gn", "separate_gn", "full_sync", "no_sync"],
        help="DistriFusion GroupNorm/communication mode",
    )
    parser.add_argument("--comm-checkpoint", type=int, default=60, help="DistriConfig comm_checkpoint")
    parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="float16", help="weights and activations")
    parser.add_argument(
        "--init-device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="where the seeded random weights are drawn: gpu is fast, cpu gives the same bits on any card",
    )
    parser.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the per-step comparison with the plain single-GPU UNet",
    )
    parser.add_argument(
        "--trajectory-reference",
        action="store_true",
        help="also run the whole plain single-GPU denoising loop and compare final latents",
    )
    parser.add_argument(
        "--save-weights",
        type=Path,
        default=None,
        help="rank 0 saves the random UNet's state dict here (torch.save), for pcpp.bench --weights",
    )
    parser.add_argument(
        "--keep-transformers",
        action="store_true",
        help="let diffusers 0.24 import transformers (by default it is hidden: no text encoder is needed)",
    )
    common.add_run_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.height % 8 or args.width % 8:
        parser.error(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
    return args


def run_benchmark(args: argparse.Namespace, stack: DfStack, distri_config: Any) -> dict[str, Any]:
    """Build, prepare, time and check DistriFusion; returns the report (identical on every rank)."""
    device = torch.device(distri_config.device)
    dtype = common.DTYPES[args.dtype]
    world = distri_config.world_size
    check_geometry(args.height, args.width, distri_config.n_device_per_batch)
    report: dict[str, Any] = {
        "method": "distrifusion",
        "versions": stack.versions,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "world_size": world,
        "n_device_per_batch": distri_config.n_device_per_batch,
        "height": args.height,
        "width": args.width,
        "latent": [args.height // 8, args.width // 8],
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "guidance": args.guidance,
        "split_batch": args.split_batch,
        "use_cuda_graph": args.use_cuda_graph,
        "mode": args.mode,
        "comm_checkpoint": args.comm_checkpoint,
        "dtype": args.dtype,
        "seed": args.seed,
        "config": str(args.config),
        "scheduler": "DDIM (SDXL-base settings), eta 0",
    }
    setup_s: dict[str, float] = {}

    tick = time.perf_counter()
    config = common.load_unet_config(args.config)
    unet = common.build_unet(stack.unet_cls, config, args.seed, device, dtype, on_device=args.init_device == "gpu")
    setup_s["build"] = time.perf_counter() - tick
    if args.save_weights is not None and distri_config.rank == 0:
        # So that pcpp's bench (--weights) runs on these exact weights and the fidelity columns pair up.
        torch.save(unet.state_dict(), args.save_weights)
        LOG.info("weights saved to %s", args.save_weights)
    n_params = sum(p.numel() for p in unet.parameters())
    common.check_same_weights(unet, device, "gpu")
    LOG.info("UNet built in %.1f s: %.3fe9 parameters, %s", setup_s["build"], n_params / 1e9, args.dtype)
    report["unet_parameters"] = n_params

    distri_unet = stack.distri_unet_cls(unet, distri_config)
    report["wrapped_layers"] = count_wrapped(distri_unet, stack)
    LOG.info("DistriUNetPP wrapped %s", report["wrapped_layers"] or "nothing (CFG parallelism only)")

    inputs = common.make_inputs(config, args.height, args.width, args.seed, device, dtype)

    def step(i: int, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The diffusers 0.24 SDXL pipeline's call; a fresh `added_cond_kwargs` each time (DistriUNetPP slices it).
        out: torch.Tensor = distri_unet(
            torch.cat([latents] * 2), t, timestep_cond=None, cross_attention_kwargs=None, return_dict=False,
            **inputs.cond(),
        )[0]  # fmt: skip
        return out

    scheduler = common.make_scheduler(stack.ddim_cls)

    def image(trace: fidelity.Trace | None = None) -> tuple[float, torch.Tensor]:
        distri_unet.set_counter(0)  # DistriSDXLPipeline.__call__ does this before every image
        return common.denoise(step, scheduler, inputs.latents, args.steps, args.guidance, trace)

    with torch.no_grad():
        tick = time.perf_counter()
        prepare_distrifusion(distri_unet, distri_config, stack, inputs, args.seed)
        setup_s["prepare"] = time.perf_counter() - tick
        comm = distri_unet.comm_manager
        report["comm_buffer"] = (
            {"tensors": len(comm.starts), "elements_per_rank_slot": comm.numel, "slots": len(comm.buffer_list or [])}
            if comm is not None
            else None
        )
        LOG.info("prepare() done in %.1f s (graphs: %s)", setup_s["prepare"], args.use_cuda_graph)

        # Warm-up image, recorded for the fidelity check (the copies to the CPU make it slower: not timed).
        trace = fidelity.Trace()
        common.sync_point(device)
        warm_ms, _ = image(trace)
        LOG.info("warm-up image: %.1f ms (with recording)", warm_ms)
        peak_setup = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times_ms = []
        final_latents = None
        for i in range(args.repeats):
            common.sync_point(device)
            elapsed, final_latents = image()
            times_ms.append(elapsed)
            LOG.info("image %d/%d: %.1f ms", i + 1, args.repeats, elapsed)
        peak_timed = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        peak_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0

        # Every image starts from the same x_T, so the timed images must reproduce the recorded one.
        if final_latents is None:
            raise RuntimeError("no image was produced")
        report.update(fidelity.trace_checks(trace, final_latents))

        all_times = common.all_gather_floats(times_ms, device)
        mems = common.all_gather_floats([float(peak_timed), float(peak_setup), float(peak_reserved)], device)
        report.update(common.time_summary(times_ms))
        report.update(
            {
                "per_rank_median_ms": [statistics.median(t) for t in all_times],
                "peak_mem_bytes_per_rank": [int(m[0]) for m in mems],
                "peak_mem_setup_bytes_per_rank": [int(m[1]) for m in mems],
                "peak_mem_reserved_bytes_per_rank": [int(m[2]) for m in mems],
                "setup_s": setup_s,
            }
        )
        LOG.info(
            "DistriFusion %d GPU(s), %dx%d, %d steps: median %.1f ms (min %.1f, max %.1f); peak %.2f GiB",
            world,
            args.height,
            args.width,
            args.steps,
            report["median_ms"],
            report["min_ms"],
            report["max_ms"],
            max(m[0] for m in mems) / 2**30,
        )

        # Fidelity, after all timing: the graphs go first (their pools free memory for the batch-2 reference
        # and the process group must outlive no graph), then the original layers are put back.
        if args.use_cuda_graph:
            release_cuda_graphs(distri_unet, device)
        if args.reference:
            restored = unwrap_distri_layers(distri_unet.model, stack.base_module_cls)
            plain_unet = distri_unet.model
            LOG.info("restored %d original layers; computing the single-GPU reference", restored)
            tick = time.perf_counter()
            # DistriFusion's warmup_steps=w means w + 1 synchronous steps (counter <= w).
            report["fidelity"] = fidelity.fidelity(
                plain_unet, trace, inputs, args.guidance, args.warmup_steps + 1, REFERENCE
            )
            if args.trajectory_reference:
                # Every rank runs the same plain loop, so no rank sits in a collective while another works.
                cond = inputs.cond()
                _, ref_final = common.denoise(
                    lambda i, x, t: plain_unet(torch.cat([x] * 2), t, return_dict=False, **cond)[0],
                    common.make_scheduler(stack.ddim_cls),
                    inputs.latents,
                    args.steps,
                    args.guidance,
                )
                report["final_latent_rel_l2_vs_single_gpu"] = fidelity.relative_l2(final_of(trace), ref_final.cpu())
            setup_s["reference"] = time.perf_counter() - tick
            LOG.info(
                "noise-prediction rel. L2 after warm-up: %s; during warm-up: %s",
                report["fidelity"]["rel_l2_eps_after_warmup"],
                report["fidelity"]["rel_l2_eps_warmup"],
            )
    return report


def final_of(trace: fidelity.Trace) -> torch.Tensor:
    """The traced image's final latent."""
    if trace.final is None:
        raise RuntimeError("the traced image has no final latent")
    return trace.final


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """Write the JSON report (rank 0 calls this); without ``out``, log it."""
    if out is None:
        LOG.info("report:\n%s", common.report_text(report))
        return
    common.write_report(report, out)
    LOG.info("report written to %s", out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (the caller ends the process with ``os._exit``)."""
    args = parse_args(argv)
    rank, local_rank, world = launch_env()
    common.setup_logging(rank, args.verbose)
    # A hard bound on everything, captured graphs and NCCL kernels included (the watchdog does not see
    # collectives inside a graph): dump every thread's stack and exit.
    faulthandler.dump_traceback_later(args.deadline_s, exit=True)
    try:
        prepare_import_environment(block_transformers=not args.keep_transformers)
        stack = import_df_stack()
        LOG.info("stack: %s", stack.versions)
        distri_config = make_distri_config(args, stack, rank, local_rank, world)
        report = run_benchmark(args, stack, distri_config)
        if rank == 0:
            write_report(report, args.out)
        common.sync_point(torch.device(distri_config.device))
    except Exception:
        LOG.exception("DistriFusion run failed on rank %d", rank)
        return 1
    common.teardown(args.teardown_timeout_s)
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    common.exit_process(main())
