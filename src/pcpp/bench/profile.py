"""One more image under ``torch.profiler``: the busiest kernels to a file, device time per step by kind."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .common import StepFn, denoise
from .model import make_scheduler

__all__ = ["kernel_kind", "profile_image"]

LOG = logging.getLogger(__name__)

# Kinds of kernel, by name: the first pattern a kernel's lower-cased name contains decides (order matters: NCCL
# kernels and Inductor's Triton kernels, named after the ops they fuse, may contain "conv" or "gemm").
_KERNEL_KINDS = (
    ("nccl", ("nccl",)),
    ("triton", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("conv", ("conv", "implicit_gemm", "cudnn", "xmma_fprop", "dgrad", "wgrad")),
    ("gemm", ("gemm", "cutlass", "cublas", "nvjet", "sm90_xmma", "matmul")),
    ("copy", ("copy", "catarray", "fill", "memcpy", "memset")),
)


def kernel_kind(name: str) -> str:
    """The kind of a device kernel by its name: nccl, triton, attention, conv, gemm, copy, or other."""
    lowered = name.lower()
    for kind, patterns in _KERNEL_KINDS:
        if any(p in lowered for p in patterns):
            return kind
    return "other"


def profile_image(
    step_fn: StepFn, latents0: Tensor, args: argparse.Namespace, device: torch.device, label: str
) -> dict[str, Any]:
    """One more image under ``torch.profiler``: its busiest kernels go to ``--profile``'s folder, and the device
    time and kernel count per denoising step by kind of kernel come back (on the CPU: operators and CPU time).

    Args:
        step_fn: the step of the variant just timed (graphs already captured, code already compiled).
        latents0: the initial latent.
        args: the bench's arguments (``--profile``, ``--steps``, ``--guidance``).
        device: where it runs.
        label: the variant's label, which names the table's file.

    Returns:
        ``{"file", "device_ms_per_step": {kind: ms}, "kernels_per_step": {kind: n}}``.
    """
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        denoise(step_fn, make_scheduler(), latents0, args.steps, args.guidance)
    events = prof.key_averages()
    rank = dist.get_rank() if dist.is_initialized() else 0
    folder: Path = args.profile
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}.rank{rank}.txt"
    sort = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    path.write_text(events.table(sort_by=sort, row_limit=60) + "\n")
    ms: dict[str, float] = {}
    count: dict[str, float] = {}
    for event in events:
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA or event.self_device_time_total <= 0:
                continue
            kind, micros = kernel_kind(event.key), event.self_device_time_total
        else:
            if not event.key.startswith("aten::"):
                continue
            kind, micros = "cpu_ops", event.self_cpu_time_total
        ms[kind] = ms.get(kind, 0.0) + micros / 1000.0 / args.steps
        count[kind] = count.get(kind, 0.0) + event.count / args.steps
    LOG.info(
        "%s: profile per step: %s (table: %s)",
        label,
        ", ".join(f"{k} {ms[k]:.2f} ms/{count[k]:.0f}" for k in sorted(ms, key=ms.__getitem__, reverse=True)),
        path,
    )
    return {"file": str(path), "device_ms_per_step": ms, "kernels_per_step": count}
