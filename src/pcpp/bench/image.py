"""``--whole-image``: whole images through a diffusers pipeline, text encoding, denoising loop and VAE decode apart.

Per resolution and mode: ``single`` runs the plain pipeline on rank 0 (the other ranks wait at a bounded barrier);
each pcpp mode runs ``pcpp.parallelize(pipe, comm=mesh, vae=placement, ...)`` with the mode's
:func:`pcpp.convert` settings, once per ``--vae-placements`` entry, then :func:`pcpp.revert`. Every image is a
``pipe(prompt, negative_prompt="", ...)`` call with a seeded generator; ranks line up before each one. Inside it
four marks, each after a device synchronisation: when ``encode_prompt`` returns (text encoding), at the end of
the last step (``callback_on_step_end``: the denoising loop, latent preparation included), and around
``vae.decode`` (the decode); the rest (the pipeline's VAE upcast, post-processing) is ``other_ms``. The report
gives each phase's median over the timed images on every rank, the slowest rank's, the VAE's share of the image
(decode / image) and each rank's peak memory (``torch.cuda.max_memory_allocated``; ``None`` on the CPU).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

import pcpp
from pcpp.functional import partition_rows

from .arguments import ModeKind, ModeSpec
from .common import sync_device, sync_point, write_report
from .image_pipeline import build_pipeline, vae_factor
from .layout import all_gather_objects
from .pcpp_modes import convert_settings
from .report import add_speedups, fmt, run_line, table_start
from .session import Session

__all__ = ["PHASES", "image_table", "run_images"]

LOG = logging.getLogger(__name__)

PHASES = ("image_ms", "text_ms", "loop_ms", "decode_ms", "other_ms")

TIMING_NOTE = (
    "one pipe(...) call per image between device synchronisations: text encoding (encode_prompt), denoising loop "
    "(latent preparation and every step), VAE decode (vae.decode), other (VAE upcast, post-processing); "
    "eager, no CUDA graphs"
)


@contextlib.contextmanager
def phase_marks(pipe: Any, device: torch.device, steps: int, marks: dict[str, float]) -> Iterator[dict[str, Any]]:
    """Time stamps of one pipeline call's phases into ``marks``; yields the call's extra keyword arguments.

    ``encode_prompt`` and ``vae.decode`` are wrapped by instance attributes (removed on exit), the loop's end is
    marked by ``callback_on_step_end`` at the last step. Each mark waits for the device first.
    """

    def now() -> float:
        sync_device(device)
        return time.perf_counter()

    encode, decode = pipe.encode_prompt, pipe.vae.decode

    def timed_encode(*args: Any, **kwargs: Any) -> Any:
        out = encode(*args, **kwargs)
        marks["text_end"] = now()
        return out

    def timed_decode(*args: Any, **kwargs: Any) -> Any:
        marks["decode_start"] = now()
        out = decode(*args, **kwargs)
        marks["decode_end"] = now()
        return out

    def on_step_end(pipe_: Any, i: int, t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if i == steps - 1:
            marks["loop_end"] = now()
        return callback_kwargs

    pipe.encode_prompt, pipe.vae.decode = timed_encode, timed_decode
    try:
        yield {"callback_on_step_end": on_step_end}
    finally:
        del pipe.encode_prompt, pipe.vae.decode


def time_pipeline(session: Session, pipe: Any, call: dict[str, Any], collective: bool, label: str) -> dict[str, Any]:
    """Warm-up and timed images of ``pipe`` on this rank: each phase's times, medians, and the peak memory."""
    args, device = session.args, session.device
    marks: dict[str, float] = {}
    images: list[dict[str, float]] = []
    with phase_marks(pipe, device, args.steps, marks) as extra:
        for i in range(args.warmup_images + args.repeats):
            if i == args.warmup_images and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            marks.clear()
            (sync_point if collective else sync_device)(device)
            start = time.perf_counter()
            pipe(**call, **extra, generator=torch.Generator("cpu").manual_seed(args.seed))
            sync_device(device)
            end = time.perf_counter()
            phases = {
                "image_ms": end - start,
                "text_ms": marks["text_end"] - start,
                "loop_ms": marks["loop_end"] - marks["text_end"],
                "decode_ms": marks["decode_end"] - marks["decode_start"],
            }
            phases = {k: 1e3 * v for k, v in phases.items()}
            phases["other_ms"] = phases["image_ms"] - phases["text_ms"] - phases["loop_ms"] - phases["decode_ms"]
            kind = "warm-up image" if i < args.warmup_images else "image"
            LOG.info("%s: %s %d: %s", label, kind, i + 1, ", ".join(f"{k} {v:.1f}" for k, v in phases.items()))
            if i >= args.warmup_images:
                images.append(phases)
    medians = {k: statistics.median(p[k] for p in images) for k in PHASES}
    return {
        "medians": medians,
        "vae_share": medians["decode_ms"] / medians["image_ms"],
        "times_ms": {k: [p[k] for p in images] for k in PHASES},
        "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
    }


def summarise(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's entry from every rank's :func:`time_pipeline`: the slowest rank's median of each phase."""
    entry: dict[str, Any] = {k: max(r["medians"][k] for r in per_rank) for k in PHASES}
    entry["median_ms"] = entry["image_ms"]
    entry["vae_share"] = entry["decode_ms"] / entry["image_ms"]
    entry["per_rank"] = per_rank
    entry["peak_mem_bytes_per_rank"] = [r["peak_mem_bytes"] for r in per_rank]
    return entry


def run_images(session: Session, report: dict[str, Any]) -> dict[str, Any]:
    """Every resolution and mode into ``report["results"]``; rank 0 rewrites ``--out`` after each mode.

    Raises:
        pcpp.SplitError: a latent the strips cannot split.
    """
    args, lay = session.args, session.layout
    built = build_pipeline(args, session.model, session.device)
    pipe = built.pipe
    factor = vae_factor(dict(pipe.vae.config))
    report.update(timing=TIMING_NOTE, pipeline=type(pipe).__name__, parts=built.parameters, parts_build_s=built.build_s)
    report["settings"].update(
        vae_config=str(args.vae_config),
        vae_placements=[p.value for p in args.vae_placements],
        prompt=args.prompt,
        vae_force_upcast=bool(pipe.vae.config.get("force_upcast", False)),
    )
    for height, width in args.resolutions:
        rows = partition_rows(height // factor, lay.patch_size, session.model.unit)
        label = f"{height}x{width}"
        res: dict[str, Any] = {"height": height, "width": width, "latent": [height // factor, width // factor]}
        res.update(strip_rows=list(rows), modes={})
        report["results"][label] = res
        call = {"prompt": args.prompt, "negative_prompt": "", "num_inference_steps": args.steps}
        call.update(guidance_scale=args.guidance, height=height, width=width, output_type="pt")
        for mode in args.modes:
            tick = time.perf_counter()
            if mode.kind is ModeKind.SINGLE:
                res["modes"]["single"] = _single(session, pipe, call, label)
            else:
                res["modes"][mode.name] = _parallel(session, pipe, mode, call, label)
            res["modes"][mode.name]["wall_s"] = time.perf_counter() - tick
            add_speedups(res)
            if lay.rank == 0 and args.out is not None:
                write_report(report, args.out)
    for line in image_table(report).splitlines():
        LOG.info("%s", line)
    return report


def _single(session: Session, pipe: Any, call: dict[str, Any], label: str) -> dict[str, Any]:
    """The plain pipeline on rank 0 (the whole VAE), the other ranks waiting; a failure is recorded."""
    entry: dict[str, Any] = {"rank": 0, "variants": {}}
    if session.layout.rank == 0:
        try:
            variant = summarise([time_pipeline(session, pipe, call, False, f"{label} single")])
            entry["variants"]["whole"] = variant
            entry.update(best_variant="whole", median_ms=variant["median_ms"])
        except Exception as err:  # e.g. out of memory on one GPU: the pcpp rows still run
            LOG.exception("%s single failed", label)
            entry["variants"]["whole"] = {"error": f"{type(err).__name__}: {err}"}
    dist.barrier(group=session.layout.wait_group)
    return entry


def _parallel(session: Session, pipe: Any, mode: ModeSpec, call: dict[str, Any], label: str) -> dict[str, Any]:
    """``pcpp.parallelize`` with each VAE placement, timed on every rank, then reverted."""
    settings = convert_settings(mode, session.args)  # each pipe(...) call starts a new image (pcpp.parallelize)
    entry: dict[str, Any] = {"variants": {}}
    for placement in session.args.vae_placements:
        pcpp.parallelize(pipe, comm=session.layout.mesh, vae=placement, **settings)
        try:
            mine = time_pipeline(session, pipe, call, True, f"{label} {mode.name} vae {placement.value}")
        finally:
            pcpp.revert(pipe)
        entry["variants"][placement.value] = summarise(all_gather_objects(mine))
    first = next(iter(entry["variants"].values()))
    entry.update(median_ms=first["median_ms"], conditioning=settings["conditioning"].name)
    return entry


def image_table(report: dict[str, Any]) -> str:
    """One row per resolution, mode and VAE placement: the phases, the VAE's share and the peak memory."""
    head = (
        "| size | mode | VAE | image ms | text ms | loop ms | decode ms | other ms | VAE share | speedup | "
        "peak GiB (max rank) |"
    )
    lines = table_start(f"pcpp whole-image benchmark, {run_line(report)}; slowest rank's medians; {TIMING_NOTE}.", head)
    for size, res in report.get("results", {}).items():
        for name, entry in res["modes"].items():
            for placement, v in entry.get("variants", {}).items():
                if "error" in v:
                    lines.append(f"| {size} | {name} | {placement} | error: {v['error']} |")
                    continue
                peaks = [p for p in v["peak_mem_bytes_per_rank"] if p is not None]
                peak = fmt(max(peaks) / 2**30, ".2f") if peaks else "-"
                phases = " | ".join(fmt(v[k]) for k in PHASES)
                speedup = fmt(v.get("speedup_vs_single"), ".2f")
                lines.append(
                    f"| {size} | {name} | {placement} | {phases} | {fmt(v['vae_share'], '.3f')} | {speedup} | {peak} |"
                )
    return "\n".join(lines)
