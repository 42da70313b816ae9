"""Per-step fidelity of a run against the plain UNet, shared by ``pcpp bench`` and the DistriFusion runner.

Like :mod:`pcpp.bench.common`, this file imports only the standard library and torch at module level: the
DistriFusion runner (``benchmarks/distrifusion_runner.py``), which cannot import pcpp, loads it by its path
(``benchmarks/bench_common.py``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from .common import Inputs

__all__ = ["Trace", "fidelity", "relative_l2", "summarize", "trace_checks"]


@dataclass
class Trace:
    """What a run saw and produced at each step of one image (kept on the CPU)."""

    timesteps: list[int] = field(default_factory=list)
    latents: list[Tensor] = field(default_factory=list)  # x_t fed to step i, (1, C, h, w)
    eps: list[Tensor] = field(default_factory=list)  # the UNet's batch-2 output at step i
    final: Tensor | None = None


def relative_l2(actual: Tensor, expected: Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    diff = (actual.double() - expected.double()).norm()
    return float(diff / expected.double().norm().clamp_min(1e-30))


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and max of the finite values (None when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "median": None, "max": None}
    return {"mean": statistics.fmean(finite), "median": statistics.median(finite), "max": max(finite)}


def trace_checks(trace: Trace, last_final: Tensor) -> dict[str, Any]:
    """The traced image against a timed one (every image starts from the same x_T), and non-finite steps."""
    if trace.final is None:
        raise RuntimeError("the traced image has no final latent")
    return {
        "repeat_consistency_rel_l2": relative_l2(last_final.cpu(), trace.final),
        "nonfinite_eps_steps": [i for i, e in enumerate(trace.eps) if not torch.isfinite(e).all()],
    }


def fidelity(
    plain_unet: Callable[..., Any], trace: Trace, inputs: Inputs, guidance: float, first_async: int, reference: str
) -> dict[str, Any]:
    """Per-step relative L2 of a traced image's noise prediction (raw batch 2, and CFG-combined) against
    ``plain_unet`` (same weights, batch 2, whole latent) on the same x_t and t, summarised after and before
    ``first_async``. Every rank calls this: step ``i`` runs on rank ``i % world``, then one all-reduce sums them.
    ``reference`` says what ``plain_unet`` is, for the report.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    device = inputs.latents.device
    steps = len(trace.timesteps)
    errors = torch.zeros((2, steps), dtype=torch.float64)
    for i in range(rank, steps, world):
        latents = trace.latents[i].to(device)
        t = torch.tensor(trace.timesteps[i], device=device)
        # DDIM's scale_model_input is the identity, so the recorded x_t is the UNet's input as it was.
        expected = plain_unet(torch.cat([latents] * 2), t, return_dict=False, **inputs.cond())[0].cpu()
        actual = trace.eps[i]
        errors[0, i] = relative_l2(actual, expected)
        exp_u, exp_c = expected.double().chunk(2)
        act_u, act_c = actual.double().chunk(2)
        errors[1, i] = relative_l2(act_u + guidance * (act_c - act_u), exp_u + guidance * (exp_c - exp_u))
    errors_dev = errors.to(device)
    dist.all_reduce(errors_dev)
    eps_err, guided_err = errors_dev.cpu().tolist()
    after = range(min(first_async, steps), steps)
    return {
        "reference": reference,
        "rel_l2_eps_per_step": eps_err,
        "rel_l2_guided_per_step": guided_err,
        "after_warmup_steps": [after.start, after.stop - 1] if len(after) else None,
        "rel_l2_eps_after_warmup": summarize([eps_err[i] for i in after]),
        "rel_l2_guided_after_warmup": summarize([guided_err[i] for i in after]),
        "rel_l2_eps_warmup": summarize(eps_err[: min(first_async, steps)]),
    }
