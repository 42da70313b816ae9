"""What ``pcpp bench`` and the DistriFusion runner share, so that both build, time and check alike.

The runner (``benchmarks/distrifusion_runner.py``) runs beside diffusers 0.24 and cannot import pcpp: it loads
this file by its path. So it imports only the standard library and torch at module level and takes diffusers'
classes (the UNet, ``DDIMScheduler``) as arguments. The per-step fidelity check lives beside it in
:mod:`pcpp.bench.fidelity`, loaded the same way.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:  # the runner loads this file alone: the trace's type is only named here
    from .fidelity import Trace

LOG = logging.getLogger(__name__)

# NVLink multicast can take a shared host's GPUs out of service; it must stay off on the GPU machines.
FORCED_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

VAE_FACTOR = 8
"""Latent pixels per image pixel along each side."""


def add_loop_arguments(parser: argparse.ArgumentParser, default_config: Path) -> None:
    """The options of the model and its denoising loop that both commands share."""
    parser.add_argument("--config", type=Path, default=default_config, help="UNet config JSON (diffusers format)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per image")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, latents and embeddings")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both commands share: the report's path, the bounds on every wait, and logging."""
    parser.add_argument("--out", type=Path, default=None, help="JSON report path (written by rank 0)")
    parser.add_argument("--pg-timeout-s", type=float, default=300.0, help="timeout of every NCCL/gloo group")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=540.0,
        help="hard limit on the whole run: past it every thread's stack is dumped and the process exits",
    )
    parser.add_argument("--teardown-timeout-s", type=float, default=30.0, help="longest wait for teardown")
    parser.add_argument("--verbose", action="store_true", help="log INFO on every rank, not only rank 0")


def exit_process(code: int) -> NoReturn:
    """End the process after flushing the logs, skipping interpreter shutdown (NCCL and CUDA-graph destructors
    have hung there on the GPU machines)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def setup_logging(rank: int, verbose: bool) -> None:
    """Log to stderr with the rank in every line; ranks other than 0 only warn unless ``verbose``."""
    level = logging.INFO if rank == 0 or verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def sync_device(device: torch.device) -> None:
    """Wait for all work on ``device`` (every stream, NCCL's included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_point(device: torch.device) -> None:
    """Line the ranks up (a tiny all-reduce) so each timed image starts together."""
    flag = torch.ones(1, device=device)
    dist.all_reduce(flag)
    sync_device(device)


def all_gather_floats(values: Sequence[float], device: torch.device) -> list[list[float]]:
    """Every rank's list of floats (all ranks must pass the same length)."""
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.cpu().tolist() for t in gathered]


def teardown(timeout_s: float, destroy: bool = True) -> None:
    """Synchronise and (if ``destroy``) destroy the process group in a thread abandoned after ``timeout_s``
    (``destroy_process_group`` has hung after CUDA-graph capture); then end the process with :func:`exit_process`.
    """

    def work() -> None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            if destroy and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            LOG.exception("teardown failed (ignored)")

    thread = threading.Thread(target=work, name="bench-teardown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        LOG.warning("teardown still running after %.0f s; going on without it", timeout_s)


def load_unet_config(path: Path) -> dict[str, Any]:
    """Read a diffusers ``UNet2DConditionModel`` config JSON (``ValueError`` if it describes another class)."""
    with path.open() as fh:
        config: dict[str, Any] = json.load(fh)
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{path} describes a {config['_class_name']}; the benchmarks drive UNet2DConditionModel")
    return config


def build_unet(
    unet_cls: Any, config: dict[str, Any], seed: int, device: torch.device, dtype: torch.dtype, on_device: bool
) -> nn.Module:
    """Seeded random weights with diffusers' default initialisation in fp32, cast to ``dtype``, in eval mode.

    ``unet_cls`` is the caller's diffusers ``UNet2DConditionModel``; ``torch.manual_seed(seed)`` seeds the CPU and
    every GPU. ``on_device`` draws the weights on a GPU ``device`` (seconds; identical on identical cards) rather
    than on the CPU (about a minute for SDXL; the same bits on any card).
    """
    torch.manual_seed(seed)
    if on_device and device.type == "cuda":
        with device:
            unet = unet_cls.from_config(config)
    else:
        threads = torch.get_num_threads()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if device.type == "cuda":  # torchrun sets OMP_NUM_THREADS=1; give each rank its share for the init
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        try:
            unet = unet_cls.from_config(config)
        finally:
            torch.set_num_threads(threads)
    unet = unet.to(device=device, dtype=dtype)
    unet.eval()
    unet.requires_grad_(False)
    if device.type == "cuda":
        # Drop the fp32 originals' cached blocks so they count in neither reserved memory nor later peaks.
        free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
    return unet


def free_memory(device: torch.device) -> None:
    """Collect garbage, wait for ``device`` and give its cached blocks back (after releasing CUDA graphs)."""
    gc.collect()
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def weight_checksum(unet: nn.Module) -> float:
    """A cheap fingerprint of the weights, to confirm every rank built the same model."""
    total = 0.0
    for i, param in enumerate(unet.parameters()):
        if i % 37 == 0:  # a spread-out sample of tensors is enough to catch a different seed or order
            total += float(param.detach().double().sum())
    return total


def check_same_weights(unet: nn.Module, device: torch.device, on_device_flag: str) -> None:
    """Gather every rank's :func:`weight_checksum`; ``RuntimeError`` if they differ (``on_device_flag`` names
    the ``--init-device`` value that drew the weights on the card, the usual cause)."""
    checksums = [c[0] for c in all_gather_floats([weight_checksum(unet)], device)]
    # Different weights differ at the first digits; the tolerance only absorbs reduction-order noise.
    if any(abs(c - checksums[0]) > 1e-9 * max(1.0, abs(checksums[0])) for c in checksums):
        raise RuntimeError(
            f"ranks built different weights (checksums {checksums}); with --init-device {on_device_flag} this "
            "means the cards differ: use --init-device cpu"
        )


@dataclass
class Inputs:
    """One image's conditioning and initial latent, identical on every rank (seeded CPU generator)."""

    latents: Tensor  # (1, C, h, w): x_T
    prompt_embeds: Tensor  # (2, 77, cross_attention_dim): [uncond, cond]
    text_embeds: Tensor | None  # (2, pooled dim), SDXL-style text_time UNets only
    time_ids: Tensor | None  # (2, 6): (orig h, orig w, crop top, crop left, target h, target w)

    def cond(self, half: slice = slice(None)) -> dict[str, Any]:
        """UNet keyword arguments for the CFG batch or one half; a fresh dict (DistriFusion slices it in place)."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.prompt_embeds[half]}
        if self.text_embeds is not None and self.time_ids is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.text_embeds[half], "time_ids": self.time_ids[half]}
        return kwargs


def embedding_dims(config: dict[str, Any]) -> tuple[int, int | None]:
    """(cross-attention dim, pooled text-embedding dim or ``None``) of a UNet config."""
    cross_dim = config.get("cross_attention_dim")
    if not isinstance(cross_dim, int):
        raise ValueError(f"cross_attention_dim must be one integer, got {cross_dim!r}")
    if config.get("addition_embed_type") != "text_time":
        return cross_dim, None
    pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
    return cross_dim, pooled


def make_inputs(
    config: dict[str, Any], height: int, width: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Inputs:
    """Random text conditioning (no text encoders), latent = pixels / 8, and the ``time_ids`` that the SDXL
    pipeline's ``_get_add_time_ids`` gives for original = target = (height, width) and no crop."""
    cross_dim, pooled_dim = embedding_dims(config)
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(
        (1, int(config.get("in_channels", 4)), height // VAE_FACTOR, width // VAE_FACTOR), generator=gen
    )  # DDIM's init_noise_sigma is 1
    prompt_embeds = torch.randn((2, 77, cross_dim), generator=gen)
    text_embeds = time_ids = None
    if pooled_dim is not None:
        text_embeds = torch.randn((2, pooled_dim), generator=gen).to(device=device, dtype=dtype)
        ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)
        time_ids = ids.to(device=device, dtype=dtype)
    return Inputs(
        latents=latents.to(device=device, dtype=dtype),
        prompt_embeds=prompt_embeds.to(device=device, dtype=dtype),
        text_embeds=text_embeds,
        time_ids=time_ids,
    )


SCHEDULER_NOTE = "DDIM (SDXL-base settings: scaled_linear 0.00085-0.012, steps_offset 1, leading), eta 0"


def make_scheduler(ddim_cls: Any) -> Any:
    """``ddim_cls`` (diffusers' ``DDIMScheduler``) with SDXL-base's scheduler settings."""
    return ddim_cls(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )


StepFn = Callable[[int, Tensor, Tensor], Tensor]
"""``(step index, scaled latent, timestep) -> raw UNet output`` (batch 2 = [uncond, cond], or batch 1)."""


def denoise(
    step_fn: StepFn,
    scheduler: Any,
    latents0: Tensor,
    steps: int,
    guidance: float,
    trace: Trace | None = None,
    step_ms: list[float] | None = None,
) -> tuple[float, Tensor]:
    """One image: the SDXL pipeline's denoising loop. Returns (loop milliseconds, final latent).

    The clock covers the UNet calls, CFG combines and scheduler steps between two device synchronisations. A
    batch-2 output is combined with the guidance scale; a batch-1 output (one CFG half, floor runs) is used as it
    is, which costs the same. If ``step_ms`` is given, it receives each step's time: on CUDA from events recorded
    between the steps, which add no host synchronisation. ``trace`` receives copies of each step's input and
    output (copied at once: a CUDA-graph output is a static buffer that the next call overwrites).
    """
    device = latents0.device
    scheduler.set_timesteps(steps, device=device)
    latents = latents0.clone()
    marks: list[Any] = []

    def mark() -> None:
        if step_ms is None:
            return
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    sync_device(device)
    start = time.perf_counter()
    for i, t in enumerate(scheduler.timesteps):
        mark()
        eps = step_fn(i, scheduler.scale_model_input(latents, t), t)
        if trace is not None:
            trace.timesteps.append(int(t))
            trace.latents.append(latents.detach().to("cpu", copy=True))
            trace.eps.append(eps.detach().to("cpu", copy=True))
        if eps.shape[0] == 2 * latents.shape[0]:
            uncond, cond = eps.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        latents = scheduler.step(eps, t, latents, eta=0.0, return_dict=False)[0]
    mark()
    sync_device(device)
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    if step_ms is not None:
        step_ms.clear()
        if device.type == "cuda":
            step_ms.extend(a.elapsed_time(b) for a, b in itertools.pairwise(marks))
        else:
            step_ms.extend((b - a) * 1000.0 for a, b in itertools.pairwise(marks))
    if trace is not None:
        trace.final = latents.detach().to("cpu", copy=True)
    return elapsed_ms, latents


def time_summary(times_ms: Sequence[float]) -> dict[str, Any]:
    """times, median, min and max."""
    return {
        "times_ms": list(times_ms),
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
    }


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (which strict JSON lacks) by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def report_text(report: dict[str, Any]) -> str:
    """The report as strict JSON (NaN and infinities written as null)."""
    return json.dumps(json_safe(report), indent=2, allow_nan=False)


def write_report(report: dict[str, Any], out: Path) -> None:
    """Write :func:`report_text` to ``out`` through a temporary file, so a reader never sees half a report."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(report_text(report) + "\n")
    tmp.replace(out)
