"""Mode ``single``: the best single-GPU path, on rank 0 only, while the other ranks wait at a bounded barrier.

The plain diffusers UNet at batch 2 on the whole latent, eagerly and under :class:`pcpp.cuda_graph.CUDAGraphUNet`,
and with ``--compile`` also ``torch.compile`` under the graph wrapper. Every variant is reported; speedups use the
best. ``--single-from`` takes the results from earlier reports instead.
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

import torch
import torch.distributed as dist

from .common import Inputs, time_summary
from .denoisers import cfg_step
from .loop import step_summary, time_images
from .session import Session

__all__ = ["run_single", "single_variants"]

LOG = logging.getLogger(__name__)


def single_variants(args: argparse.Namespace) -> list[str]:
    """The single-GPU variants to time."""
    names = [v for v in args.single_variants if v == "eager" or args.cuda_graph]
    if args.compile:
        names.append("compile+graph" if args.cuda_graph else "compile")
    return list(dict.fromkeys(names))


def single_from_reports(args: argparse.Namespace, label: str, device_name: str) -> dict[str, Any] | None:
    """The ``single`` entry of ``label`` from the ``--single-from`` reports, or ``None``."""
    for path in args.single_from or ():
        with path.open() as fh:
            old = json.load(fh)
        entry = old.get("results", {}).get(label, {}).get("modes", {}).get("single")
        if not entry or "median_ms" not in entry:
            continue
        entry = dict(entry, source=str(path), source_device=old.get("environment", {}).get("device"))
        if entry["source_device"] != device_name:
            LOG.warning(
                "%s: single-GPU results from %s were taken on %s, not %s: speedups are not comparable",
                label,
                path,
                entry["source_device"],
                device_name,
            )
        LOG.info("%s single: from %s, median %.1f ms", label, path, entry["median_ms"])
        return entry
    return None


def run_single(session: Session, inputs: Inputs, label: str, device_name: str) -> dict[str, Any]:
    """Rank 0 times the plain UNet at batch 2 on the whole latent; the others wait on a bounded barrier.

    Args:
        session: the run.
        inputs: the image's conditioning and initial latent.
        label: the resolution, for the log and ``--single-from``.
        device_name: this card's name, to warn when ``--single-from`` results come from another.

    Returns:
        The ``single`` entry of the report (``variants``, and the best one's ``median_ms``, ``min_ms``, ``max_ms``).
    """
    args = session.args
    if args.single_from:
        found = single_from_reports(args, label, device_name)
        if found is not None:
            return found
        LOG.warning("%s: no single-GPU result in %s; timing it", label, [str(p) for p in args.single_from])
    entry: dict[str, Any] = {"batch": 2, "rank": 0, "variants": {}}
    if session.layout.rank == 0:
        for variant in single_variants(args):
            entry["variants"][variant] = _single_variant(session, variant, inputs, f"{label} single {variant}")
        ok = {k: v for k, v in entry["variants"].items() if "median_ms" in v}
        if ok:
            best = min(ok, key=lambda k: ok[k]["median_ms"])
            entry.update(best_variant=best, median_ms=ok[best]["median_ms"])
            entry.update(min_ms=ok[best]["min_ms"], max_ms=ok[best]["max_ms"])
            LOG.info("%s single: best %s, median %.1f ms", label, best, entry["median_ms"])
    dist.barrier(group=session.layout.wait_group)
    return entry


def _single_variant(session: Session, variant: str, inputs: Inputs, label: str) -> dict[str, Any]:
    """One variant on rank 0; a failure (OOM, compile error) is recorded, not raised."""
    graph = variant in ("graph", "compile+graph")
    den = None
    try:
        den, build_s = session.denoisers.make(session.model.unet, graph=graph, compile_=variant.startswith("compile"))
        timing = time_images(
            cfg_step(den, inputs), den.reset, inputs.latents, session.args, session.device, False, label
        )
        result = time_summary(timing.times_ms)
        result.update(warmup_ms=timing.warmup_ms, peak_mem_bytes=timing.peak_mem_bytes)
        result["steps"] = step_summary(timing.step_ms, None)
        if timing.profile is not None:
            result["profile"] = timing.profile
        if variant.startswith("compile"):
            result["compile_s"] = build_s + sum(timing.warmup_ms) / 1000.0
            LOG.info("%s: compile (warm-up images included) %.1f s", label, result["compile_s"])
        return result
    except Exception as err:  # one failed path must not end the run
        LOG.exception("%s failed", label)
        return {"error": f"{type(err).__name__}: {err}"}
    finally:
        if den is not None:
            session.denoisers.release(den)
        if variant.startswith("compile"):
            torch._dynamo.reset()
