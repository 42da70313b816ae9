"""Modes ``exact``, ``full`` and ``partial:P``: the UNet converted by :func:`pcpp.convert`, timed per variant, with
its traffic per step and its per-step fidelity against the plain UNet.

Each mode converts the UNet with the mesh, ``warmup_steps``, ``exact=True`` (``exact``), ``Conditioning.FULL``
(``full``, DistriFusion's attention) or ``partial=P``, and ``detect_new_image=False`` (each image starts with an
explicit reset); it runs under ``CUDAGraphUNet`` unless ``--no-cuda-graph``, and with ``--compile`` also
``torch.compile(unet, dynamic=False)`` under it. After the timed images one more image is traced; after
:func:`pcpp.revert` the plain UNet is evaluated on its inputs (:func:`pcpp.bench.fidelity.fidelity`).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import statistics
import time
from typing import Any

import torch

import pcpp

from .arguments import ModeSpec
from .common import Inputs, all_gather_floats, denoise, sync_point, time_summary
from .denoisers import cfg_step, sm_carveout
from .fidelity import Trace, fidelity, relative_l2, trace_checks
from .layout import all_gather_objects
from .loop import step_summary, time_images
from .model import make_scheduler
from .report import fmt
from .session import Session

__all__ = ["phase_traffic", "pcpp_variants", "run_pcpp"]

LOG = logging.getLogger(__name__)

REFERENCE = "plain diffusers UNet, same weights, batch 2, whole latent, same x_t and t"


def pcpp_variants(args: argparse.Namespace) -> list[str]:
    """Variants of every pcpp mode."""
    names = [] if args.compile_only else ["graph" if args.cuda_graph else "eager"]
    if args.compile or args.compile_only:
        names.append("compile+graph" if args.cuda_graph else "compile")
    return names


def convert_settings(mode: ModeSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`pcpp.convert` (and :class:`pcpp.PCPPConfig`) for ``mode``."""
    return {
        "partial": mode.partial,
        "warmup_steps": args.warmup_steps,
        "conditioning": pcpp.Conditioning.FULL if mode.full else pcpp.Conditioning.PARTIAL,
        "exact": mode.exact,
        "detect_new_image": False,
        "timeout": datetime.timedelta(seconds=args.pg_timeout_s),
        "exchange_batch": args.exchange_batch,
    }


def run_pcpp(session: Session, mode: ModeSpec, inputs: Inputs, label: str) -> dict[str, Any]:
    """Convert, time each variant, record a fidelity image, revert, compare with the plain UNet.

    Returns:
        The mode's entry of the report: settings, ``variants`` and the first variant's ``median_ms``, ``min_ms``
        and ``max_ms``.
    """
    args, unet = session.args, session.model.unet
    settings = convert_settings(mode, args)
    config = pcpp.PCPPConfig(**settings)
    first_async = next((i for i in range(args.steps) if config.phase_of(i) is pcpp.Phase.ASYNC), args.steps)
    tick = time.perf_counter()
    pcpp.convert(unet, comm=session.layout.mesh, **settings)
    entry: dict[str, Any] = {
        "partial": None if mode.full or mode.exact else mode.partial,
        "conditioning": config.conditioning.value,
        "exact": mode.exact,
        "warmup_steps": args.warmup_steps,
        "convert_s": time.perf_counter() - tick,
        "variants": {},
    }
    traces: dict[str, Trace] = {}
    try:
        for variant in pcpp_variants(args):
            result, trace = _pcpp_variant(session, variant, inputs, f"{label} {mode.name} {variant}", first_async)
            entry["variants"][variant] = result
            if trace is not None:
                traces[variant] = trace
    finally:
        pcpp.revert(unet)
    if args.fidelity:
        for variant, trace in traces.items():
            tick = time.perf_counter()
            fid = fidelity(unet, trace, inputs, args.guidance, max(1, args.warmup_steps), REFERENCE)
            fid["reference_s"] = time.perf_counter() - tick
            entry["variants"][variant]["fidelity"] = fid
            LOG.info(
                "%s %s %s: eps rel. L2 after warm-up %s", label, mode.name, variant, fid["rel_l2_eps_after_warmup"]
            )
    primary = entry["variants"].get(pcpp_variants(args)[0], {})
    for name in ("median_ms", "min_ms", "max_ms"):
        if name in primary:
            entry[name] = primary[name]
    return entry


def _pcpp_variant(
    session: Session, variant: str, inputs: Inputs, label: str, first_async: int
) -> tuple[dict[str, Any], Trace | None]:
    """Time one variant of the converted UNet on every rank; trace one more image for the fidelity check."""
    args, device, unet = session.args, session.device, session.model.unet
    compile_ = variant.startswith("compile")
    den = None
    stats = pcpp.comm_stats(unet)
    try:
        with sm_carveout(args.sm_carveout):
            den, build_s = session.denoisers.make(unet, graph=variant.endswith("graph"), compile_=compile_)
            stats.clear()
            traffic: dict[str, Any] = {}

            def snapshot() -> None:
                traffic.update(phase_traffic(stats))

            step = cfg_step(den, inputs)
            timing = time_images(step, den.reset, inputs.latents, args, device, True, label, snapshot)
            trace = Trace()
            if args.fidelity:
                den.reset()
                sync_point(device)
                denoise(step, make_scheduler(), inputs.latents, args.steps, args.guidance, trace)
    except Exception as err:
        if not compile_:
            raise
        # A compile failure is deterministic (every rank raises alike): record it and go on.
        LOG.exception("%s failed", label)
        pcpp.reset(unet)
        return {"error": f"{type(err).__name__}: {err}"}, None
    finally:
        if den is not None:
            session.denoisers.release(den)
        if compile_:
            torch._dynamo.reset()
    medians = [statistics.median(t) for t in all_gather_floats(timing.times_ms, device)]
    peaks = [int(m[0]) for m in all_gather_floats([float(timing.peak_mem_bytes)], device)]
    result = time_summary(timing.times_ms)
    result.update(
        warmup_ms=timing.warmup_ms,
        per_rank_median_ms=medians,
        peak_mem_bytes_per_rank=peaks,
        traffic_per_rank=all_gather_objects(traffic),
        steps_per_rank=all_gather_objects(step_summary(timing.step_ms, first_async)),
    )
    own = result["steps_per_rank"][session.layout.rank]
    if own.get("first_async_ms") is not None:
        LOG.info(
            "%s: step times on this rank: synchronous mean %.2f ms, first asynchronous %.2f ms, then median %s ms",
            label,
            own["sync_mean_ms"],
            own["first_async_ms"],
            fmt(own["async_median_ms"], ".2f"),
        )
    if timing.profile is not None:
        result["profile_per_rank"] = all_gather_objects(timing.profile)
    if compile_:
        result["compile_s"] = build_s + sum(timing.warmup_ms) / 1000.0
        LOG.info("%s: compile (warm-up images included) %.1f s", label, result["compile_s"])
    if trace.final is not None and timing.last_final is not None:
        result.update(trace_checks(trace, timing.last_final))
    if timing.warmup_final is not None and timing.last_final is not None:
        result["warmup_vs_timed_rel_l2"] = relative_l2(timing.last_final.cpu(), timing.warmup_final.cpu())
    LOG.info("%s: median %.1f ms (per rank %s)", label, result["median_ms"], ", ".join(f"{m:.1f}" for m in medians))
    return result, (trace if args.fidelity else None)


def phase_traffic(stats: pcpp.CommStats) -> dict[str, Any]:
    """Bytes of one synchronous and one asynchronous step of the recorded steps, by layer kind.

    CUDA-graph replays open a step record without traffic (no Python runs in a layer), so the step with the most
    bytes sent is taken for each phase: an eager or capture step, whose traffic every replay of it repeats.
    """
    steps = stats.steps
    out: dict[str, Any] = {"recorded_steps": len(steps)}
    for phase in ("sync", "async"):
        records = [s for s in steps if s.phase == phase]
        if not records:
            out[phase] = None
            continue
        step = max(records, key=lambda s: (s.sent, s.received))
        kinds = pcpp.LayerKind
        out[phase] = {
            "step": step.step,
            "steps_recorded": len(records),
            "steps_with_traffic": sum(1 for s in records if s.by_kind),
            "sent_bytes": step.sent,
            "received_bytes": step.received,
            "sent_bytes_by_kind": {k.value: (step.by_kind[k].sent if k in step.by_kind else 0) for k in kinds},
            "received_bytes_by_kind": {k.value: (step.by_kind[k].received if k in step.by_kind else 0) for k in kinds},
        }
    return out
