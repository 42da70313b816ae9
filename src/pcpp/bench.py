"""End-to-end benchmark of pcpp on a diffusers UNet: time, fidelity, traffic and memory, against one GPU.

Run one process per GPU under ``torchrun`` (it also runs on CPU ranks over gloo for tests)::

    torchrun --standalone --nproc-per-node 4 -m pcpp.bench --resolutions 1024 2048 \\
        --modes single floor full partial:0.3 --out results/pcpp_n4.json

The UNet is built from a diffusers config JSON with seeded random weights (no checkpoint, no text encoders, no
VAE) and driven by the SDXL pipeline's denoising loop: classifier-free guidance batch of 2 ``[uncond, cond]``,
guidance scale 5, DDIM with SDXL-base's scheduler settings, eta 0. The timing methodology mirrors the DistriFusion
baseline runner (``benchmarks/distrifusion_runner.py``) so that the two JSON reports compare directly.

Modes (``--modes``):

* ``single``: the best single-GPU path, on rank 0 only (the other ranks wait at a bounded barrier): the plain
  diffusers UNet at batch 2 on the whole latent, eagerly and under :class:`pcpp.cuda_graph.CUDAGraphUNet`, and with
  ``--compile`` also ``torch.compile`` under the graph wrapper. Every variant is reported; speedups use the best.
* ``floor``: what each rank computes when communication is free: the plain UNet on this rank's strip alone (batch
  1 with the CFG split, else 2), its self-attention keys and values widened to the token count the measured pcpp
  mode reads (synchronous steps: every strip; asynchronous ``partial:p`` steps: ``ceil(p * rows)`` rows of each
  adjacent strip; ``full``/``exact``: every strip). All ranks run at once, without communication; the report
  gives the slowest rank. One floor is measured per pcpp mode in ``--modes`` (``--floor-modes`` overrides).
* ``exact``, ``full``, ``partial:P``: :func:`pcpp.convert` with the mesh, ``warmup_steps``, ``exact=True``
  (``exact``), ``Conditioning.FULL`` (``full``, DistriFusion's attention) or ``partial=P``, and
  ``detect_new_image=False`` (each image starts with an explicit reset); run under ``CUDAGraphUNet`` unless
  ``--no-cuda-graph``, and with ``--compile`` also ``torch.compile(unet, dynamic=False)`` under it.

For every mode and variant: one untimed warm-up image (``--warmup-images``), then ``--repeats`` timed images.
The clock covers the whole denoising loop of one image (``--steps`` UNet calls, CFG combines and DDIM steps)
between two ``torch.cuda.synchronize()`` calls; ranks line up on a tiny all-reduce before each image. Text
encoders and the VAE are not part of the run and not timed.

Fidelity (pcpp modes): one extra untimed image after the timed ones records, at each step, the latent x_t and
the batch-2 noise prediction pcpp returned. After :func:`pcpp.revert`, the plain UNet (batch 2, whole latent, same
weights and conditioning) is evaluated on the same x_t and t, the steps shared out over the ranks, and the report
gives the relative L2 error ``||eps_pcpp - eps_ref|| / ||eps_ref||`` per step, raw and CFG-combined, with mean,
median and max over the steps after warmup. Final latents are not compared: with random weights any approximate
method's trajectory diverges from the single-GPU one, so only the per-step error is meaningful.

Traffic (pcpp modes): bytes sent and received per step by this rank, per layer kind, from
:func:`pcpp.comm_stats`, for one synchronous and one asynchronous step of the warm-up image. Only steps that run
the UNet's Python code are recorded (eager steps and CUDA-graph captures; replays are not), which is why the
warm-up image is used. Peak memory: ``torch.cuda.max_memory_allocated`` per rank, reset before each variant.

Step times: each timed image's steps are timed by CUDA events recorded between them (no host synchronisation);
the report gives each step's median over the timed images and, for pcpp and the floor, the mean of the
synchronous steps, the first asynchronous step and the median of the later ones, per rank.

Profile (``--profile DIR``): after the timed images of each variant, one more image runs under
``torch.profiler``; each rank writes its 60 busiest kernels (CPU operators on CPU ranks) to
``DIR/<label>.rank<r>.txt``, and the report gives device time and kernel count per step by kind of kernel (NCCL,
Triton, attention, conv, GEMM, copies, other): where a compiled run loses time against its floor.

Tuning experiments: ``--exchange-batch N`` posts the asynchronous exchanges of N layers together
(``PCPPConfig.exchange_batch``); ``--sm-carveout N`` keeps cuBLASLt matmuls off N SMs during pcpp's runs. The
report records both, and every ``NCCL_*``, ``TORCH_NCCL_*`` and ``TORCH_BLAS_*`` variable that was set.

Model build: ``torch.manual_seed(seed)``, then ``UNet2DConditionModel.from_config`` in fp32 directly on the rank's
GPU (``--init-device device``, seconds; identical on identical cards, checked with a weight checksum gathered from
every rank) or on the CPU (``--init-device cpu``, about a minute for SDXL, the same bits on any card), then a cast
to ``--dtype``.

Every wait is bounded: process groups get ``--pg-timeout-s``, rank 0's single-GPU runs are awaited on a gloo
barrier bounded by ``--deadline-s``, :mod:`faulthandler` ends the process at ``--deadline-s`` (collectives inside
CUDA graphs escape the NCCL watchdog), captured graphs are released before the process group is destroyed, that
destruction runs in a thread abandoned after ``--teardown-timeout-s``, and ``python -m pcpp.bench`` ends with
``os._exit``. The JSON report is rewritten after each finished mode, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import faulthandler
import gc
import itertools
import json
import logging
import math
import os
import platform
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["build_parser", "main"]

LOG = logging.getLogger("pcpp.bench")

_REPO_CONFIG = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "sdxl-base-unet.json"
DEFAULT_CONFIG = _REPO_CONFIG if _REPO_CONFIG.exists() else Path("benchmarks/configs/sdxl-base-unet.json")

# NVLink multicast can take a shared host's GPUs out of service; it must stay off on the GPU machines.
FORCED_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

VAE_FACTOR = 8
TIMING_NOTE = (
    "whole denoising loop of one image (UNet calls, CFG combine, DDIM steps) between two device synchronisations; "
    "text encoders and VAE excluded (not run)"
)
FIDELITY_NOTE = (
    "per-step relative L2 of the noise prediction against the plain single-GPU UNet on the same x_t and t; final "
    "latents are not compared: with random weights every approximate method's trajectory diverges"
)


# --------------------------------------------------------------------------------------------------------------
# Command line


@dataclass(frozen=True)
class ModeSpec:
    """One entry of ``--modes``.

    Attributes:
        name: as given on the command line, normalised (``partial:0.3``).
        kind: ``"single"``, ``"floor"`` or ``"pcpp"``.
        partial: share of neighbour rows read by asynchronous attention (``partial`` modes).
        full: DistriFusion's attention (every strip) after warmup.
        exact: every step synchronous.
    """

    name: str
    kind: str
    partial: float = 0.3
    full: bool = False
    exact: bool = False


def parse_mode(text: str) -> ModeSpec:
    """Parse one ``--modes`` entry: ``single``, ``floor``, ``exact``, ``full``, ``partial`` or ``partial:P``.

    Raises:
        argparse.ArgumentTypeError: unknown mode or a partial ratio outside ``[0, 1]``.
    """
    name = text.strip().lower()
    if name in ("single", "floor"):
        return ModeSpec(name=name, kind=name)
    if name == "exact":
        return ModeSpec(name=name, kind="pcpp", exact=True)
    if name == "full":
        return ModeSpec(name=name, kind="pcpp", full=True)
    if name == "partial" or name.startswith("partial:"):
        value = name.partition(":")[2] or "0.3"
        try:
            partial = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the partial ratio {value!r} is not a number") from None
        if not 0.0 <= partial <= 1.0:
            raise argparse.ArgumentTypeError(f"{text!r}: the partial ratio must be in [0, 1]")
        return ModeSpec(name=f"partial:{partial:g}", kind="pcpp", partial=partial)
    raise argparse.ArgumentTypeError(
        f"unknown mode {text!r}; use single, floor, exact, full or partial:P (e.g. partial:0.3)"
    )


def parse_resolution(text: str) -> tuple[int, int]:
    """``1024`` (square) or ``HxW``, in pixels; both multiples of 8.

    Raises:
        argparse.ArgumentTypeError: not a size, or not a multiple of 8.
    """
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r} is not N or HxW (pixels)") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or any(s <= 0 or s % VAE_FACTOR for s in sizes):
        raise argparse.ArgumentTypeError(f"resolution {text!r}: need N or HxW, positive multiples of {VAE_FACTOR}")
    return sizes[0], sizes[1]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m pcpp.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m pcpp.bench",
        description=(
            "Time pcpp (patch parallelism with partially conditioned attention) on a diffusers UNet with random "
            "weights against the best single-GPU path, with per-step fidelity, traffic and memory. Launch with "
            "`torchrun --nproc-per-node N -m pcpp.bench ...`."
        ),
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="UNet config JSON (diffusers format)")
    parser.add_argument(
        "--resolutions",
        type=parse_resolution,
        nargs="+",
        default=[(1024, 1024), (2048, 2048), (3072, 3072)],
        metavar="PX",
        help="image sizes in pixels, N (square) or HxW; latent = /8 (default: 1024 2048 3072)",
    )
    parser.add_argument(
        "--modes",
        type=parse_mode,
        nargs="+",
        default=[parse_mode(m) for m in ("single", "floor", "exact", "full", "partial:0.3")],
        metavar="MODE",
        help="single, floor, exact, full, partial:P (default: single floor exact full partial:0.3)",
    )
    parser.add_argument(
        "--floor-modes",
        type=parse_mode,
        nargs="+",
        default=None,
        metavar="MODE",
        help="pcpp modes whose floor `floor` measures (default: the pcpp modes of --modes, else partial:0.3 full)",
    )
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per image")
    parser.add_argument("--warmup-steps", type=int, default=4, help="pcpp's synchronous steps per image")
    parser.add_argument(
        "--exchange-batch",
        type=int,
        default=1,
        help="layers whose asynchronous exchanges pcpp posts together (PCPPConfig.exchange_batch; 1: each at once)",
    )
    parser.add_argument(
        "--sm-carveout",
        type=int,
        default=None,
        metavar="N",
        help="pcpp runs only: keep cuBLASLt matmuls off N SMs (torch._C._set_sm_carveout_experimental), so that "
        "NCCL's kernels beside them do not hold up persistent GEMMs; matmuls that bypass cuBLASLt are unaffected "
        "unless TORCH_BLAS_PREFER_CUBLASLT=1",
    )
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per mode and variant")
    parser.add_argument("--warmup-images", type=int, default=1, help="untimed images before the timed ones")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, latents and embeddings")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="load the UNet's weights from this state dict (torch.save) instead of the seeded random ones",
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu", help="device"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights and activations (default: float16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--init-device",
        choices=["device", "cpu"],
        default="device",
        help="where the seeded random weights are drawn: the rank's device (fast; checked identical across "
        "ranks) or the CPU (slow for SDXL, the same bits on any card)",
    )
    parser.add_argument(
        "--fuse-qkv",
        action="store_true",
        help="call diffusers' unet.fuse_qkv_projections() after building the UNet, for every path alike (single, "
        "floor and pcpp): one to_qkv matrix multiplication per self-attention instead of three",
    )
    parser.add_argument(
        "--no-cfg-split",
        dest="cfg_split",
        action="store_false",
        help="with an even number of ranks, split only the image (1-D patch mesh) instead of cfg 2 x patch N/2",
    )
    parser.add_argument(
        "--no-cuda-graph", dest="cuda_graph", action="store_false", help="run every path eagerly (no CUDAGraphUNet)"
    )
    parser.add_argument(
        "--single-variants",
        nargs="+",
        choices=["eager", "graph"],
        default=["eager", "graph"],
        help="single-GPU paths to time (--compile adds the compiled one; graph needs CUDA graphs)",
    )
    parser.add_argument(
        "--single-from",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="take the single-GPU results from earlier reports (same card type!) instead of timing them: for each "
        "resolution, the first report that has it; mode `single` then costs nothing",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile variants (single, and every pcpp mode); compiling SDXL takes minutes",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="time pcpp modes only compiled (implies --compile for them; single keeps --single-variants)",
    )
    parser.add_argument(
        "--compile-floor",
        action="store_true",
        help="measure the floor with torch.compile (the compiled strip alone), to put beside compiled pcpp rows",
    )
    parser.add_argument(
        "--floor-warmup-steps",
        type=int,
        default=None,
        help="floor steps read at the synchronous (every-strip) width (default: as pcpp, max(1, --warmup-steps))",
    )
    parser.add_argument("--no-fidelity", dest="fidelity", action="store_false", help="skip the per-step check")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the timed images, run one more under torch.profiler per variant and write its busiest kernels "
        "(DIR/<label>.rank<r>.txt) and device time per step by kind of kernel (in the report)",
    )
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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "exchange_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.sm_carveout is not None:
        if args.device != "cuda":
            parser.error(f"--sm-carveout {args.sm_carveout} reserves GPU SMs; use it with --device cuda")
        if not hasattr(torch._C, "_set_sm_carveout_experimental"):
            parser.error(f"--sm-carveout needs torch._C._set_sm_carveout_experimental (torch {torch.__version__})")
    for name in ("warmup_steps", "warmup_images", "sm_carveout"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.device == "cpu" and args.cuda_graph:
        args.cuda_graph = False  # CUDA graphs need CUDA; logged once logging is set up
        args.cuda_graph_note = "CUDA graphs disabled: --device cpu"
    if args.floor_warmup_steps is None:
        args.floor_warmup_steps = max(1, args.warmup_steps)
    if args.floor_modes is None:
        pcpp_modes = [m for m in args.modes if m.kind == "pcpp"]
        args.floor_modes = pcpp_modes or [parse_mode("partial:0.3"), parse_mode("full")]
    if any(m.kind != "pcpp" for m in args.floor_modes):
        parser.error("--floor-modes takes pcpp modes only (exact, full, partial:P)")
    missing = [str(p) for p in args.single_from or () if not p.is_file()]
    if missing:
        parser.error(f"--single-from: no such report(s): {missing}")
    names = [m.name for m in args.modes]
    if len(set(names)) != len(names):
        parser.error(f"--modes lists a mode twice: {names}")
    return args


def setup_logging(rank: int, verbose: bool) -> None:
    """Log to stderr with the rank in every line; ranks other than 0 only warn unless ``verbose``."""
    level = logging.INFO if rank == 0 or verbose else logging.WARNING
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


# --------------------------------------------------------------------------------------------------------------
# Process group and mesh


@dataclass
class Layout:
    """Who this process is, and how the ranks split the work.

    Attributes:
        rank: global rank.
        world: number of ranks.
        device: this rank's device.
        mesh: the DeviceMesh passed to :func:`pcpp.convert` (``None`` with one rank).
        cfg_split: whether the CFG batch is split over a ``cfg`` mesh dimension of size 2.
        patch_size: ranks splitting one image.
        patch_index: this rank's strip (0 = top).
        cfg_index: this rank's CFG half (0 = unconditional) with the split, else 0.
        owns_group: whether this module initialised the default process group (and must destroy it).
        wait_group: gloo group for long host-side waits (rank 0's single-GPU runs).
    """

    rank: int
    world: int
    device: torch.device
    mesh: Any
    cfg_split: bool
    patch_size: int
    patch_index: int
    cfg_index: int
    owns_group: bool
    wait_group: Any


def init_layout(args: argparse.Namespace) -> Layout:
    """Initialise the process group (unless it is already), bind the GPU and build the mesh.

    ``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them a single-process group is made
    on an in-memory store.
    """
    timeout = datetime.timedelta(seconds=args.pg_timeout_s)
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available; use --device cpu")
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        for name, value in FORCED_ENV.items():
            os.environ[name] = value
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if owns:
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if device.type == "cuda":
            kwargs["device_id"] = device
        if "WORLD_SIZE" not in os.environ:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(**kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Host-side waits longer than the NCCL timeout (rank 0 alone on a 3072 px single-GPU run) go through gloo.
    wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.deadline_s))

    from torch.distributed.device_mesh import init_device_mesh

    mesh: Any = None
    cfg_split = False
    patch_size, patch_index, cfg_index = 1, 0, 0
    if world > 1:
        if args.cfg_split and world % 2 == 0:
            mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("cfg", "patch"))
            cfg_split = True
            patch_size = world // 2
            patch_index = mesh.get_local_rank("patch")
            cfg_index = mesh.get_local_rank("cfg")
        else:
            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("patch",))
            patch_size = world
            patch_index = mesh.get_local_rank()
    return Layout(
        rank=rank,
        world=world,
        device=device,
        mesh=mesh,
        cfg_split=cfg_split,
        patch_size=patch_size,
        patch_index=patch_index,
        cfg_index=cfg_index,
        owns_group=owns,
        wait_group=wait_group,
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


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


# --------------------------------------------------------------------------------------------------------------
# Model, inputs, scheduler


def load_unet_config(path: Path) -> dict[str, Any]:
    """Read a diffusers ``UNet2DConditionModel`` config JSON."""
    with path.open() as fh:
        config: dict[str, Any] = json.load(fh)
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{path} describes a {config['_class_name']}; the benchmark drives UNet2DConditionModel")
    return config


def build_unet(
    config: dict[str, Any], seed: int, device: torch.device, dtype: torch.dtype, on_device: bool
) -> nn.Module:
    """Seeded random weights with diffusers' default initialisation in fp32, cast to ``dtype``, in eval mode."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    if on_device and device.type == "cuda":
        with device:
            unet = UNet2DConditionModel.from_config(config)
    else:
        threads = torch.get_num_threads()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if device.type == "cuda":  # torchrun sets OMP_NUM_THREADS=1; give each rank its share for the init
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        try:
            unet = UNet2DConditionModel.from_config(config)
        finally:
            torch.set_num_threads(threads)
    unet = unet.to(device=device, dtype=dtype)
    unet.eval()
    unet.requires_grad_(False)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    return unet


def weight_checksum(unet: nn.Module) -> float:
    """A cheap fingerprint of the weights, to confirm every rank built the same model."""
    total = 0.0
    for i, param in enumerate(unet.parameters()):
        if i % 37 == 0:
            total += float(param.detach().double().sum())
    return total


@dataclass
class Inputs:
    """One image's conditioning and initial latent, identical on every rank (seeded CPU generator)."""

    latents: Tensor  # (1, C, h, w): x_T
    prompt_embeds: Tensor  # (2, 77, cross_attention_dim): [uncond, cond]
    text_embeds: Tensor | None  # (2, pooled dim), SDXL-style text_time UNets only
    time_ids: Tensor | None  # (2, 6): (orig h, orig w, crop top, crop left, target h, target w)

    def cond(self, half: slice = slice(None)) -> dict[str, Any]:
        """UNet keyword arguments for the CFG batch (or one half of it); a fresh dict per call."""
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
    """Random text conditioning and the SDXL pipeline's real ``add_time_ids``; latent = pixels / 8."""
    cross_dim, pooled_dim = embedding_dims(config)
    gen = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(
        (1, int(config.get("in_channels", 4)), height // VAE_FACTOR, width // VAE_FACTOR), generator=gen
    )
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


def make_scheduler() -> Any:
    """DDIM with SDXL-base's scheduler settings, as the DistriFusion runner uses."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
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


# --------------------------------------------------------------------------------------------------------------
# Denoisers: eager or CUDA-graph wrappers with one interface


class Denoiser(Protocol):
    """What the loop calls: :class:`pcpp.cuda_graph.CUDAGraphUNet` or :class:`EagerUNet`."""

    def __call__(self, sample: Tensor, timestep: Any, **kwargs: Any) -> Tensor:
        """The UNet's output sample."""
        ...

    def reset(self) -> None:
        """Make the next call start a new image."""
        ...

    def release(self) -> None:
        """Drop captured state."""
        ...


class EagerUNet:
    """The :class:`Denoiser` interface over a UNet (or a compiled one) called eagerly.

    Args:
        module: what to call (the UNet, or ``torch.compile`` of it).
        unet: the UNet itself, for :func:`pcpp.reset` when it is converted.
    """

    def __init__(self, module: Callable[..., Any], unet: nn.Module) -> None:
        self.module = module
        self.unet = unet

    def __call__(self, sample: Tensor, timestep: Any, **kwargs: Any) -> Tensor:
        """The UNet's output sample."""
        out: Tensor = self.module(sample, timestep, return_dict=False, **kwargs)[0]
        return out

    def reset(self) -> None:
        """Start a new image on a converted UNet."""
        import pcpp

        if pcpp.is_converted(self.unet):
            pcpp.reset(self.unet)

    def release(self) -> None:
        """Nothing is captured."""


_LIVE: list[Denoiser] = []
"""Every denoiser made and not yet released, so that graphs go before the process group on any exit."""


def make_denoiser(unet: nn.Module, *, graph: bool, compile_: bool, reset_dynamo: bool = True) -> tuple[Denoiser, float]:
    """Wrap ``unet`` (optionally ``torch.compile`` of it) in a CUDA-graph or eager denoiser.

    Args:
        unet: the (converted or plain) UNet.
        graph: replay from CUDA graphs (:class:`pcpp.cuda_graph.CUDAGraphUNet`) rather than call eagerly.
        compile_: wrap ``torch.compile(unet, dynamic=False)``.
        reset_dynamo: start from an empty Dynamo cache (off when several denoisers share one compilation).

    Returns:
        The denoiser and the seconds spent building it (compilation itself happens at the first calls).
    """
    tick = time.perf_counter()
    target: Any = unet
    if compile_:
        import torch._dynamo

        if reset_dynamo:
            torch._dynamo.reset()  # a fresh cache per variant: shapes and phases change between runs
        # Headroom for the UNet hooks' resume functions across phases and shapes; the default limit (8 per code
        # object) silently leaves code uncompiled once reached.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 8192)
        target = torch.compile(unet, dynamic=False)
    den: Denoiser
    if graph:
        from pcpp.cuda_graph import CUDAGraphUNet

        den = CUDAGraphUNet(target)
    else:
        den = EagerUNet(target, unet)
    _LIVE.append(den)
    return den, time.perf_counter() - tick


@contextlib.contextmanager
def sm_carveout(sms: int | None) -> Iterator[None]:
    """Keep cuBLASLt matmuls off ``sms`` SMs inside the block (``None``: leave the setting alone).

    Matmuls captured into CUDA graphs keep the SM count they were captured with, so the block must cover the
    capture as well as the replays.
    """
    if sms is None:
        yield
        return
    before = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)


def release(den: Denoiser, device: torch.device) -> None:
    """Release one denoiser's graphs and give their memory back."""
    try:
        den.release()
    finally:
        if den in _LIVE:
            _LIVE.remove(den)
        gc.collect()
        sync_device(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def release_all(device: torch.device) -> None:
    """Release every live denoiser (before the process group goes); errors are logged."""
    for den in list(_LIVE):
        try:
            release(den, device)
        except Exception:
            LOG.exception("releasing a denoiser failed (ignored)")


# --------------------------------------------------------------------------------------------------------------
# The denoising loop


@dataclass
class Trace:
    """What a run saw and produced at each step of one image (kept on the CPU)."""

    timesteps: list[int] = field(default_factory=list)
    latents: list[Tensor] = field(default_factory=list)  # x_t fed to step i, (1, C, h, w)
    eps: list[Tensor] = field(default_factory=list)  # the UNet's batch-2 output at step i
    final: Tensor | None = None


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

    A batch-2 output is combined with the guidance scale; a batch-1 output (one CFG half, floor runs) is used as
    it is, which costs the same. If ``step_ms`` is given, it receives each step's time (UNet call, CFG combine and
    DDIM step): on CUDA from events recorded between the steps, which add no host synchronisation.
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


def cfg_step(den: Denoiser, inputs: Inputs) -> StepFn:
    """The step of the whole latent: batch 2 ``[uncond, cond]`` through ``den``."""
    cond = inputs.cond()

    def step(i: int, latents: Tensor, t: Tensor) -> Tensor:
        return den(torch.cat([latents] * 2), t, **cond)

    return step


@dataclass
class Timing:
    """Times of one variant on this rank (milliseconds)."""

    warmup_ms: list[float]
    times_ms: list[float]
    peak_mem_bytes: int
    warmup_final: Tensor | None
    last_final: Tensor | None
    profile: dict[str, Any] | None = None
    step_ms: list[float] = field(default_factory=list)  # each step's median over the timed images


def time_images(
    step_fn: StepFn,
    reset: Callable[[], None],
    inputs: Inputs,
    latents0: Tensor,
    args: argparse.Namespace,
    device: torch.device,
    collective: bool,
    label: str,
    after_warmup: Callable[[], None] | None = None,
) -> Timing:
    """Warm-up images, then ``--repeats`` timed images; resets the peak-memory counter first."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    scheduler = make_scheduler()
    line_up: Callable[[torch.device], None] = sync_point if collective else sync_device
    warm, times = [], []
    warm_final = last_final = None
    for i in range(args.warmup_images):
        reset()
        line_up(device)
        elapsed, warm_final = denoise(step_fn, scheduler, latents0, args.steps, args.guidance)
        warm.append(elapsed)
        LOG.info("%s: warm-up image %d: %.1f ms (includes captures/compilation)", label, i + 1, elapsed)
    if after_warmup is not None:
        after_warmup()
    per_image: list[list[float]] = []
    for i in range(args.repeats):
        reset()
        line_up(device)
        per_image.append([])
        elapsed, last_final = denoise(step_fn, scheduler, latents0, args.steps, args.guidance, step_ms=per_image[-1])
        times.append(elapsed)
        LOG.info("%s: image %d/%d: %.1f ms", label, i + 1, args.repeats, elapsed)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    profiled = None
    if args.profile is not None:
        reset()
        line_up(device)
        profiled = profile_image(step_fn, latents0, args, device, label)
    step_ms = [statistics.median(s) for s in zip(*per_image, strict=True)] if per_image else []
    return Timing(warm, times, int(peak), warm_final, last_final, profiled, step_ms)


def step_summary(step_ms: Sequence[float], first_async: int | None) -> dict[str, Any]:
    """Per-step times (median over the timed images) and their means by phase.

    Args:
        step_ms: milliseconds of each step of the image.
        first_async: index of the first asynchronous step (``None`` for a run without phases).

    Returns:
        ``{"per_step_ms", "median_ms"}``, plus ``"sync_mean_ms"``, ``"first_async_ms"`` and ``"async_median_ms"``
        when ``first_async`` is given (``None`` where a phase has no step).
    """
    out: dict[str, Any] = {
        "per_step_ms": [round(x, 4) for x in step_ms],
        "median_ms": statistics.median(step_ms) if step_ms else None,
    }
    if first_async is not None:
        sync, rest = step_ms[:first_async], step_ms[first_async:]
        out["sync_mean_ms"] = statistics.fmean(sync) if sync else None
        out["first_async_ms"] = rest[0] if rest else None
        out["async_median_ms"] = statistics.median(rest[1:]) if len(rest) > 1 else None
    return out


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


def time_summary(times_ms: Sequence[float]) -> dict[str, Any]:
    """times, median, min and max."""
    return {
        "times_ms": list(times_ms),
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
    }


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


# --------------------------------------------------------------------------------------------------------------
# Floor: the strip alone, self-attention widened to the keys a mode reads


class _FloorState:
    """Which key widening the floor processors apply now: ``tables[spec][tokens] = extra tokens``."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[int, int]] = {}
        self.spec = ""

    def extra(self, tokens: int) -> int:
        table = self.tables.get(self.spec, {})
        if tokens not in table:
            raise RuntimeError(f"floor: self-attention over {tokens} tokens matches no level of the strip ({table})")
        return table[tokens]


def _widened(x: Tensor, extra: int) -> Tensor:
    """``x`` (B, L, C) followed by ``extra`` tokens taken from its start, repeated as needed (one concatenation,
    like the real layer's concatenation of received rows; the values do not matter, only the cost)."""
    tokens = x.shape[1]
    pieces = [x] + [x] * (extra // tokens)
    if extra % tokens:
        pieces.append(x[:, : extra % tokens])
    return torch.cat(pieces, dim=1)


def _make_floor_processor(state: _FloorState) -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pcpp.layers.attention import attend_heads  # the same attention core as pcpp's own layer

    class WidenedSelfAttention(AttnProcessor2_0):
        """Diffusers' SDPA processor whose self-attention keys/values are padded to the widened token count."""

        def __call__(
            self,
            attn: Any,
            hidden_states: Tensor,
            encoder_hidden_states: Tensor | None = None,
            attention_mask: Tensor | None = None,
            temb: Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Tensor:
            if encoder_hidden_states is not None or attn.is_cross_attention or attention_mask is not None:
                out: Tensor = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
                return out
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            ndim = hidden_states.ndim
            if ndim == 4:
                b, c, h, w = hidden_states.shape
                hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
            batch, tokens, _ = hidden_states.shape
            extra = state.extra(tokens)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
                # --fuse-qkv: one projection, as pcpp's layer and diffusers' FusedAttnProcessor2_0 compute it.
                query, key, value = attn.to_qkv(hidden_states).split(
                    [attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features], dim=-1
                )
            else:
                query = attn.to_q(hidden_states)
                key = attn.to_k(hidden_states)
                value = attn.to_v(hidden_states)
            if extra:
                key, value = _widened(key, extra), _widened(value, extra)
            out = attend_heads(attn, query, key, value)
            out = attn.to_out[1](attn.to_out[0](out))
            if ndim == 4:
                out = out.transpose(-1, -2).reshape(residual.shape)
            if attn.residual_connection:
                out = out + residual
            result: Tensor = out / attn.rescale_output_factor
            return result

    return WidenedSelfAttention()


def install_floor_processors(unet: nn.Module, state: _FloorState) -> list[tuple[Any, Any]]:
    """Put the widening processor on every self-attention module; returns ``(module, old processor)`` pairs."""
    from diffusers.models.attention_processor import Attention

    processor = _make_floor_processor(state)
    saved = []
    for module in unet.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            saved.append((module, module.processor))
            module.set_processor(processor)
    return saved


def restore_processors(saved: list[tuple[Any, Any]]) -> None:
    """Undo :func:`install_floor_processors`."""
    for module, processor in saved:
        module.set_processor(processor)


def level_widths(width: int, levels: int) -> list[int]:
    """Activation width at each level (stride-2 convs with padding 1 give ceil(w / 2))."""
    widths = [width]
    for _ in range(levels):
        widths.append(-(-widths[-1] // 2))
    return widths


def widening_table(rows: Sequence[int], index: int, width: int, levels: int, spec: str) -> dict[int, int]:
    """``{own tokens: extra tokens}`` per level for strip ``index``.

    ``spec`` is ``"all"`` (every other strip: synchronous steps, ``full`` and ``exact``), ``"none"`` or
    ``"partial:P"`` (``ceil(P * rows)`` of each existing neighbour, as :func:`pcpp.functional.partial_rows`).
    """
    from pcpp.functional import partial_rows

    table: dict[int, int] = {}
    for level, w in enumerate(level_widths(width, levels)):
        level_rows = [r >> level for r in rows]
        own = level_rows[index]
        if spec == "all":
            extra_rows = sum(level_rows) - own
        elif spec == "none":
            extra_rows = 0
        else:
            p = float(spec.partition(":")[2])
            neighbours = [j for j in (index - 1, index + 1) if 0 <= j < len(rows)]
            extra_rows = sum(partial_rows(p, level_rows[j]) for j in neighbours)
        table[own * w] = extra_rows * w
    return table


def floor_schedule(mode: ModeSpec, steps: int, sync_steps: int) -> list[str]:
    """The widening of each step of a floor image for ``mode``: synchronous steps read every strip."""
    if mode.exact or mode.full:
        return ["all"] * steps
    return ["all" if i < sync_steps else f"partial:{mode.partial:g}" for i in range(steps)]


# --------------------------------------------------------------------------------------------------------------
# The benchmark


class Bench:
    """State of one run: arguments, layout, model, and the report being filled in."""

    def __init__(self, args: argparse.Namespace, layout: Layout) -> None:
        self.args = args
        self.layout = layout
        self.device = layout.device
        self.dtype = DTYPES[args.dtype]
        self.report: dict[str, Any] = {}
        self.unet: nn.Module
        self.config: dict[str, Any] = {}
        self.unit = 1
        self.levels = 0

    # ---- set-up

    def environment(self) -> dict[str, Any]:
        """Versions, card, layout and date."""
        import diffusers

        import pcpp

        def version_of(name: str) -> str:
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                return "unknown"

        cuda = self.device.type == "cuda"
        lay = self.layout
        return {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "pcpp": pcpp.__version__,
            "triton": version_of("triton"),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "n/a",
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "world_size": lay.world,
            "mesh": {"cfg": 2 if lay.cfg_split else 1, "patch": lay.patch_size},
            "mesh_dim_names": list(lay.mesh.mesh_dim_names) if lay.mesh is not None else None,
            # NCCL's and cuBLAS's tuning variables change timings (channels, protocols, matmul backend).
            "tuning_env": {
                k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_", "TORCH_BLAS_"))
            },
        }

    def setup(self) -> None:
        """Build the UNet (identical on every rank) and start the report."""
        args = self.args
        self.config = load_unet_config(args.config)
        tick = time.perf_counter()
        self.unet = build_unet(self.config, args.seed, self.device, self.dtype, args.init_device == "device")
        if args.weights is not None:
            # e.g. the weights DistriFusion's runner drew (its --save-weights), so fidelity numbers pair up.
            state = torch.load(args.weights, map_location=self.device, weights_only=True)
            self.unet.load_state_dict(state, strict=True)
            del state
        if args.fuse_qkv:
            # Before anything is timed or converted, so that every path (and the fidelity reference) uses it.
            self.unet.fuse_qkv_projections()  # type: ignore[operator]  # diffusers' UNet method, nn.Module typed
        build_s = time.perf_counter() - tick
        checksums = [c[0] for c in all_gather_floats([weight_checksum(self.unet)], self.device)]
        if any(abs(c - checksums[0]) > 1e-9 * max(1.0, abs(checksums[0])) for c in checksums):
            raise RuntimeError(
                f"ranks built different weights (checksums {checksums}); with --init-device device this means the "
                "cards differ: use --init-device cpu"
            )
        from pcpp.plan import unet_levels

        self.levels = unet_levels(self.unet)
        self.unit = 2**self.levels
        n_params = sum(p.numel() for p in self.unet.parameters())
        LOG.info(
            "UNet built in %.1f s: %.3fe9 parameters, %s, levels %d", build_s, n_params / 1e9, args.dtype, self.levels
        )
        self.report = {
            "benchmark": "pcpp",
            "environment": self.environment(),
            "settings": {
                "config": str(args.config),
                "resolutions": [list(r) for r in args.resolutions],
                "modes": [m.name for m in args.modes],
                "floor_modes": [m.name for m in args.floor_modes],
                "steps": args.steps,
                "warmup_steps": args.warmup_steps,
                "exchange_batch": args.exchange_batch,
                "sm_carveout": args.sm_carveout,
                "floor_sync_steps": args.floor_warmup_steps,
                "guidance": args.guidance,
                "repeats": args.repeats,
                "warmup_images": args.warmup_images,
                "seed": args.seed,
                "dtype": args.dtype,
                "init_device": args.init_device,
                "fuse_qkv": args.fuse_qkv,
                "cuda_graph": args.cuda_graph,
                "compile": args.compile,
                "single_variants": args.single_variants,
                "single_from": [str(p) for p in args.single_from] if args.single_from else None,
                "scheduler": "DDIM (SDXL-base settings: scaled_linear 0.00085-0.012, steps_offset 1, leading), eta 0",
            },
            "unet": {"parameters": n_params, "levels": self.levels, "unit_rows": self.unit, "build_s": build_s},
            "timing": TIMING_NOTE,
            "fidelity_note": FIDELITY_NOTE,
            "traffic_note": (
                "bytes per step of one synchronous and one asynchronous step of the warm-up image, per rank, as "
                "pcpp.comm_stats records them (eager and capture steps only; replays are not recorded)"
            ),
            "results": {},
        }

    def check_geometry(self) -> None:
        """Reject sizes the strips cannot split, before anything runs."""
        from pcpp.functional import partition_rows

        for height, width in self.args.resolutions:
            partition_rows(height // VAE_FACTOR, self.layout.patch_size, self.unit)
            if (width // VAE_FACTOR) % self.unit:
                raise ValueError(f"latent width {width // VAE_FACTOR} is not a multiple of {self.unit}")

    def write(self) -> None:
        """Rank 0 writes the report (after every mode, so a cut-short run keeps its results)."""
        if self.layout.rank != 0:
            return
        text = json.dumps(json_safe(self.report), indent=2, allow_nan=False)
        out = self.args.out
        if out is None:
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)

    # ---- single

    def single_variants(self) -> list[str]:
        """The single-GPU variants to time."""
        names = [v for v in self.args.single_variants if v == "eager" or self.args.cuda_graph]
        if self.args.compile:
            names.append("compile+graph" if self.args.cuda_graph else "compile")
        return list(dict.fromkeys(names))

    def single_from_reports(self, label: str) -> dict[str, Any] | None:
        """The ``single`` entry of ``label`` from the ``--single-from`` reports, or ``None``."""
        device = self.report["environment"]["device"]
        for path in self.args.single_from or ():
            with path.open() as fh:
                old = json.load(fh)
            entry = old.get("results", {}).get(label, {}).get("modes", {}).get("single")
            if not entry or "median_ms" not in entry:
                continue
            entry = dict(entry, source=str(path), source_device=old.get("environment", {}).get("device"))
            if entry["source_device"] != device:
                LOG.warning(
                    "%s: single-GPU results from %s were taken on %s, not %s: speedups are not comparable",
                    label,
                    path,
                    entry["source_device"],
                    device,
                )
            LOG.info("%s single: from %s, median %.1f ms", label, path, entry["median_ms"])
            return entry
        return None

    def run_single(self, inputs: Inputs, label: str) -> dict[str, Any]:
        """Rank 0 times the plain UNet at batch 2 on the whole latent; the others wait on a bounded barrier."""
        if self.args.single_from:
            found = self.single_from_reports(label)
            if found is not None:
                return found
            LOG.warning("%s: no single-GPU result in %s; timing it", label, [str(p) for p in self.args.single_from])
        entry: dict[str, Any] = {"batch": 2, "rank": 0, "variants": {}}
        if self.layout.rank == 0:
            for variant in self.single_variants():
                entry["variants"][variant] = self._single_variant(variant, inputs, f"{label} single {variant}")
            ok = {k: v for k, v in entry["variants"].items() if "median_ms" in v}
            if ok:
                best = min(ok, key=lambda k: ok[k]["median_ms"])
                entry.update(best_variant=best, median_ms=ok[best]["median_ms"])
                entry.update(min_ms=ok[best]["min_ms"], max_ms=ok[best]["max_ms"])
                LOG.info("%s single: best %s, median %.1f ms", label, best, entry["median_ms"])
        dist.barrier(group=self.layout.wait_group)
        return entry

    def _single_variant(self, variant: str, inputs: Inputs, label: str) -> dict[str, Any]:
        graph = variant in ("graph", "compile+graph")
        den = None
        try:
            den, build_s = make_denoiser(self.unet, graph=graph, compile_=variant.startswith("compile"))
            timing = time_images(
                cfg_step(den, inputs), den.reset, inputs, inputs.latents, self.args, self.device, False, label
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
        except Exception as err:  # one failed path (OOM, compile error) must not end the run
            LOG.exception("%s failed", label)
            return {"error": f"{type(err).__name__}: {err}"}
        finally:
            if den is not None:
                release(den, self.device)
            if variant.startswith("compile"):
                torch._dynamo.reset()

    # ---- floor

    def run_floor(self, inputs: Inputs, rows: Sequence[int], label: str) -> dict[str, Any]:
        """Every rank at once: the plain UNet on its strip, self-attention widened per step as each mode reads."""
        args, lay = self.args, self.layout
        index = lay.patch_index
        width = inputs.latents.shape[3]
        start = sum(rows[:index])
        strip = inputs.latents[:, :, start : start + rows[index]].contiguous()
        half = slice(lay.cfg_index, lay.cfg_index + 1) if lay.cfg_split else slice(None)
        batch = 1 if lay.cfg_split else 2
        cond = inputs.cond(half)
        state = _FloorState()
        saved = install_floor_processors(self.unet, state)
        results: dict[str, Any] = {}
        denoisers: dict[str, Denoiser] = {}
        measured: dict[tuple[str, ...], dict[str, Any]] = {}
        try:
            for mode in args.floor_modes:
                schedule = floor_schedule(mode, args.steps, args.floor_warmup_steps)
                for spec in set(schedule):
                    state.tables[spec] = widening_table(rows, index, width, self.levels, spec)
                    if spec not in denoisers:
                        denoisers[spec], _ = make_denoiser(
                            self.unet, graph=args.cuda_graph, compile_=args.compile_floor, reset_dynamo=not denoisers
                        )
                key = tuple(schedule)
                if key in measured:  # e.g. exact and full read the same keys at every step
                    results[mode.name] = dict(measured[key], mode=mode.name, same_as=measured[key]["mode"])
                    continue

                def step(i: int, latents: Tensor, t: Tensor, schedule: list[str] = schedule) -> Tensor:
                    state.spec = schedule[i]
                    sample = latents if batch == 1 else torch.cat([latents] * 2)
                    return denoisers[schedule[i]](sample, t, **cond)

                def reset() -> None:
                    for den in denoisers.values():
                        den.reset()

                timing = time_images(step, reset, inputs, strip, args, self.device, True, f"{label} floor {mode.name}")
                medians = [m[0] for m in all_gather_floats([statistics.median(timing.times_ms)], self.device)]
                peaks = [int(m[0]) for m in all_gather_floats([float(timing.peak_mem_bytes)], self.device)]
                own = rows[index]
                key_rows = {spec: own + state.tables[spec][own * width] // width for spec in sorted(set(schedule))}
                result = {
                    "mode": mode.name,
                    "median_ms": max(medians),
                    "per_rank_median_ms": medians,
                    "rank0": time_summary(timing.times_ms),
                    "batch": batch,
                    "strip_rows_per_rank": list(rows),
                    "key_rows_level0_per_rank": all_gather_objects(key_rows),
                    "sync_steps": sum(s == "all" for s in schedule),
                    "peak_mem_bytes_per_rank": peaks,
                    "steps_per_rank": all_gather_objects(
                        step_summary(timing.step_ms, sum(s == "all" for s in schedule))
                    ),
                }
                if timing.profile is not None:
                    result["profile_per_rank"] = all_gather_objects(timing.profile)
                LOG.info(
                    "%s floor %s: slowest rank median %.1f ms (per rank %s)",
                    label,
                    mode.name,
                    max(medians),
                    ", ".join(f"{m:.1f}" for m in medians),
                )
                measured[key] = result
                results[mode.name] = result
        finally:
            for den in denoisers.values():
                release(den, self.device)
            restore_processors(saved)
        return results

    # ---- pcpp modes

    def pcpp_variants(self) -> list[str]:
        """Variants of every pcpp mode."""
        names = [] if self.args.compile_only else ["graph" if self.args.cuda_graph else "eager"]
        if self.args.compile or self.args.compile_only:
            names.append("compile+graph" if self.args.cuda_graph else "compile")
        return names

    def run_pcpp(self, mode: ModeSpec, inputs: Inputs, label: str) -> dict[str, Any]:
        """Convert, time each variant, record a fidelity image, revert, compare with the plain UNet."""
        import pcpp

        args = self.args
        conditioning = pcpp.Conditioning.FULL if mode.full else pcpp.Conditioning.PARTIAL
        tick = time.perf_counter()
        pcpp.convert(
            self.unet,
            comm=self.layout.mesh,
            partial=mode.partial,
            warmup_steps=args.warmup_steps,
            conditioning=conditioning,
            exact=mode.exact,
            detect_new_image=False,
            timeout=datetime.timedelta(seconds=args.pg_timeout_s),
            exchange_batch=args.exchange_batch,
        )
        entry: dict[str, Any] = {
            "partial": None if mode.full or mode.exact else mode.partial,
            "conditioning": conditioning.value,
            "exact": mode.exact,
            "warmup_steps": args.warmup_steps,
            "convert_s": time.perf_counter() - tick,
            "variants": {},
        }
        traces: dict[str, Trace] = {}
        try:
            for variant in self.pcpp_variants():
                result, trace = self._pcpp_variant(variant, inputs, f"{label} {mode.name} {variant}")
                entry["variants"][variant] = result
                if trace is not None:
                    traces[variant] = trace
        finally:
            pcpp.revert(self.unet)
        if args.fidelity:
            for variant, trace in traces.items():
                tick = time.perf_counter()
                entry["variants"][variant]["fidelity"] = self.fidelity(trace, inputs, max(1, args.warmup_steps))
                entry["variants"][variant]["fidelity"]["reference_s"] = time.perf_counter() - tick
                fid = entry["variants"][variant]["fidelity"]
                LOG.info(
                    "%s %s %s: eps rel. L2 after warm-up %s", label, mode.name, variant, fid["rel_l2_eps_after_warmup"]
                )
        primary = entry["variants"].get(self.pcpp_variants()[0], {})
        for name in ("median_ms", "min_ms", "max_ms"):
            if name in primary:
                entry[name] = primary[name]
        return entry

    def _pcpp_variant(self, variant: str, inputs: Inputs, label: str) -> tuple[dict[str, Any], Trace | None]:
        import pcpp

        args, device = self.args, self.device
        compile_ = variant.startswith("compile")
        den = None
        result: dict[str, Any] = {}
        stats = pcpp.comm_stats(self.unet)
        config = pcpp.get_context(self.unet).config
        first_async = next((i for i in range(args.steps) if config.phase_of(i) is pcpp.Phase.ASYNC), args.steps)
        try:
            with sm_carveout(args.sm_carveout):
                den, build_s = make_denoiser(self.unet, graph=variant.endswith("graph"), compile_=compile_)
                stats.clear()
                traffic: dict[str, Any] = {}

                def snapshot() -> None:
                    traffic.update(phase_traffic(stats))

                timing = time_images(
                    cfg_step(den, inputs), den.reset, inputs, inputs.latents, args, device, True, label, snapshot
                )
                trace = Trace()
                if args.fidelity:
                    den.reset()
                    sync_point(device)
                    denoise(cfg_step(den, inputs), make_scheduler(), inputs.latents, args.steps, args.guidance, trace)
        except Exception as err:
            if not compile_:
                raise
            # A compile failure is deterministic (every rank raises alike): record it and go on.
            LOG.exception("%s failed", label)
            pcpp.reset(self.unet)
            return {"error": f"{type(err).__name__}: {err}"}, None
        finally:
            if den is not None:
                release(den, device)
            if compile_:
                torch._dynamo.reset()
        medians = [statistics.median(t) for t in all_gather_floats(timing.times_ms, device)]
        peaks = [int(m[0]) for m in all_gather_floats([float(timing.peak_mem_bytes)], device)]
        result.update(time_summary(timing.times_ms))
        result.update(
            warmup_ms=timing.warmup_ms,
            per_rank_median_ms=medians,
            peak_mem_bytes_per_rank=peaks,
            traffic_per_rank=all_gather_objects(traffic),
            steps_per_rank=all_gather_objects(step_summary(timing.step_ms, first_async)),
        )
        own = result["steps_per_rank"][self.layout.rank]
        if own.get("first_async_ms") is not None:
            LOG.info(
                "%s: step times on this rank: synchronous mean %.2f ms, first asynchronous %.2f ms, then median %s ms",
                label,
                own["sync_mean_ms"],
                own["first_async_ms"],
                _fmt(own["async_median_ms"], ".2f"),
            )
        if timing.profile is not None:
            result["profile_per_rank"] = all_gather_objects(timing.profile)
        if compile_:
            result["compile_s"] = build_s + sum(timing.warmup_ms) / 1000.0
            LOG.info("%s: compile (warm-up images included) %.1f s", label, result["compile_s"])
        if trace.final is not None and timing.last_final is not None:
            result["repeat_consistency_rel_l2"] = relative_l2(timing.last_final.cpu(), trace.final)
            result["nonfinite_eps_steps"] = [i for i, e in enumerate(trace.eps) if not torch.isfinite(e).all()]
        if timing.warmup_final is not None and timing.last_final is not None:
            result["warmup_vs_timed_rel_l2"] = relative_l2(timing.last_final.cpu(), timing.warmup_final.cpu())
        LOG.info("%s: median %.1f ms (per rank %s)", label, result["median_ms"], ", ".join(f"{m:.1f}" for m in medians))
        return result, (trace if args.fidelity else None)

    def fidelity(self, trace: Trace, inputs: Inputs, first_async: int) -> dict[str, Any]:
        """Per-step error against the plain UNet (already reverted); steps shared out over the ranks."""
        rank, world = self.layout.rank, self.layout.world
        steps = len(trace.timesteps)
        errors = torch.zeros((2, steps), dtype=torch.float64)
        cond = inputs.cond()
        for i in range(rank, steps, world):
            latents = trace.latents[i].to(self.device)
            t = torch.tensor(trace.timesteps[i], device=self.device)
            expected = self.unet(torch.cat([latents] * 2), t, return_dict=False, **cond)[0].cpu()
            actual = trace.eps[i]
            errors[0, i] = relative_l2(actual, expected)
            exp_u, exp_c = expected.double().chunk(2)
            act_u, act_c = actual.double().chunk(2)
            g = self.args.guidance
            errors[1, i] = relative_l2(act_u + g * (act_c - act_u), exp_u + g * (exp_c - exp_u))
        errors_dev = errors.to(self.device)
        dist.all_reduce(errors_dev)
        eps_err, guided_err = errors_dev.cpu().tolist()
        after = range(min(first_async, steps), steps)
        return {
            "reference": "plain diffusers UNet, same weights, batch 2, whole latent, same x_t and t",
            "rel_l2_eps_per_step": eps_err,
            "rel_l2_guided_per_step": guided_err,
            "after_warmup_steps": [after.start, after.stop - 1] if len(after) else None,
            "rel_l2_eps_after_warmup": summarize([eps_err[i] for i in after]),
            "rel_l2_guided_after_warmup": summarize([guided_err[i] for i in after]),
            "rel_l2_eps_warmup": summarize(eps_err[: min(first_async, steps)]),
        }

    # ---- driver

    def run(self) -> dict[str, Any]:
        """Every resolution, every mode; returns the report."""
        args, lay = self.args, self.layout
        from pcpp.functional import partition_rows

        self.check_geometry()
        with torch.no_grad():
            for height, width in args.resolutions:
                label = f"{height}x{width}"
                inputs = make_inputs(self.config, height, width, args.seed, self.device, self.dtype)
                rows = partition_rows(height // VAE_FACTOR, lay.patch_size, self.unit)
                res: dict[str, Any] = {
                    "height": height,
                    "width": width,
                    "latent": [height // VAE_FACTOR, width // VAE_FACTOR],
                    "strip_rows": list(rows),
                    "modes": {},
                }
                self.report["results"][label] = res
                for mode in args.modes:
                    tick = time.perf_counter()
                    if mode.kind == "single":
                        res["modes"]["single"] = self.run_single(inputs, label)
                    elif mode.kind == "floor":
                        res["modes"]["floor"] = self.run_floor(inputs, rows, label)
                    else:  # on one rank this measures what pcpp costs where nothing is split
                        res["modes"][mode.name] = self.run_pcpp(mode, inputs, label)
                    res["modes"][mode.name]["wall_s"] = time.perf_counter() - tick
                    add_speedups(res)
                    self.write()
                    if self.device.type == "cuda":
                        gc.collect()
                        torch.cuda.empty_cache()
        for line in markdown_table(self.report).splitlines():
            LOG.info("%s", line)
        return self.report


def phase_traffic(stats: Any) -> dict[str, Any]:
    """Bytes of one synchronous and one asynchronous step of the recorded steps, by layer kind.

    CUDA-graph replays open a step record without traffic (no Python runs in a layer), so the step with the most
    bytes sent is taken for each phase: an eager or capture step, whose traffic every replay of it repeats.
    """
    from pcpp.stats import LayerKind

    steps = stats.steps
    out: dict[str, Any] = {"recorded_steps": len(steps)}
    for phase in ("sync", "async"):
        records = [s for s in steps if s.phase == phase]
        if not records:
            out[phase] = None
            continue
        step = max(records, key=lambda s: (s.sent, s.received))
        sent = {k.value: (step.by_kind[k].sent if k in step.by_kind else 0) for k in LayerKind}
        received = {k.value: (step.by_kind[k].received if k in step.by_kind else 0) for k in LayerKind}
        out[phase] = {
            "step": step.step,
            "steps_recorded": len(records),
            "steps_with_traffic": sum(1 for s in records if s.by_kind),
            "sent_bytes": step.sent,
            "received_bytes": step.received,
            "sent_bytes_by_kind": sent,
            "received_bytes_by_kind": received,
        }
    return out


def add_speedups(res: dict[str, Any]) -> None:
    """Speedup of every mode and variant against the best single-GPU median; floors attached to their modes."""
    modes = res["modes"]
    single = modes.get("single", {}).get("median_ms")
    floors = modes.get("floor", {})

    def ratio(ms: Any) -> float | None:
        return single / ms if isinstance(single, (int, float)) and isinstance(ms, (int, float)) and ms > 0 else None

    for floor in floors.values():
        if isinstance(floor, dict) and "median_ms" in floor:
            floor["speedup_vs_single"] = ratio(floor["median_ms"])
    for name, entry in modes.items():
        if name in ("single", "floor") or "variants" not in entry:
            continue
        entry["speedup_vs_single"] = ratio(entry.get("median_ms"))
        for variant in entry["variants"].values():
            variant["speedup_vs_single"] = ratio(variant.get("median_ms"))
        floor = floors.get(name)
        if isinstance(floor, dict) and "median_ms" in floor:
            entry["floor_ms"] = floor["median_ms"]
            entry["floor_speedup_vs_single"] = floor.get("speedup_vs_single")
            median = entry.get("median_ms")
            entry["floor_over_mode"] = floor["median_ms"] / median if isinstance(median, (int, float)) else None


def _fmt(value: Any, spec: str = ".1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per resolution, mode and variant."""
    head = (
        "| size | mode | variant | median ms | min | max | speedup | floor ms | floor speedup | eps rel L2 mean/max "
        "after warmup | attn sent/step async (max rank) | sent/step sync/async (max rank) | peak GiB (max rank) |"
    )
    lines = [
        f"pcpp benchmark, {report['environment']['device']}, N={report['environment']['world_size']} "
        f"mesh {report['environment']['mesh']}; {TIMING_NOTE}.",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for size, res in report.get("results", {}).items():
        modes = res["modes"]
        single = modes.get("single", {})
        best = single.get("median_ms")
        for variant, v in single.get("variants", {}).items():
            median = v.get("median_ms")
            speedup = best / median if isinstance(best, (int, float)) and isinstance(median, (int, float)) else None
            lines.append(
                f"| {size} | single | {variant} | {_fmt(median)} | {_fmt(v.get('min_ms'))} | "
                f"{_fmt(v.get('max_ms'))} | {_fmt(speedup, '.2f')} | - | - | - | - | - | "
                f"{_fmt(v.get('peak_mem_bytes', 0) / 2**30, '.2f')} |"
                + (f" error: {v['error']}" if "error" in v else "")
            )
        for name, entry in modes.items():
            if name in ("single", "floor") or "variants" not in entry:
                continue
            floor = modes.get("floor", {}).get(name, {})
            for variant, v in entry["variants"].items():
                fid = v.get("fidelity", {}).get("rel_l2_eps_after_warmup", {})
                traffic = v.get("traffic_per_rank") or []
                attn = max(
                    (t["async"]["sent_bytes_by_kind"]["attention"] for t in traffic if t.get("async")), default=None
                )
                sync_b = max((t["sync"]["sent_bytes"] for t in traffic if t.get("sync")), default=None)
                async_b = max((t["async"]["sent_bytes"] for t in traffic if t.get("async")), default=None)
                peak = max(v.get("peak_mem_bytes_per_rank") or [0])
                lines.append(
                    f"| {size} | {name} | {variant} | {_fmt(v.get('median_ms'))} | {_fmt(v.get('min_ms'))} | "
                    f"{_fmt(v.get('max_ms'))} | {_fmt(v.get('speedup_vs_single'), '.2f')} | "
                    f"{_fmt(floor.get('median_ms'))} | {_fmt(floor.get('speedup_vs_single'), '.2f')} | "
                    f"{_fmt(fid.get('mean'), '.2e')}/{_fmt(fid.get('max'), '.2e')} | "
                    f"{_mib(attn)} | {_mib(sync_b)}/{_mib(async_b)} | {_fmt(peak / 2**30, '.2f')} |"
                    + (f" error: {v['error']}" if "error" in v else "")
                )
    return "\n".join(lines)


def _mib(nbytes: Any) -> str:
    """Bytes in B, KiB or MiB."""
    if not isinstance(nbytes, (int, float)):
        return "-"
    if nbytes < 2**10:
        return f"{nbytes:.0f} B"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.1f} MiB"


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (which strict JSON lacks) by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# Entry point


def teardown(timeout_s: float, destroy: bool) -> None:
    """Synchronise and (if this module made it) destroy the process group, giving up after ``timeout_s``."""

    def work() -> None:
        try:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            if destroy and dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            LOG.exception("teardown failed (ignored)")

    thread = threading.Thread(target=work, name="pcpp-bench-teardown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        LOG.warning("teardown still running after %.0f s; going on without it", timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (``python -m pcpp.bench`` then ends with ``os._exit``).

    Works under ``torchrun`` (it initialises the process group itself) and inside an already initialised group
    (tests under :func:`pcpp.testing.run_distributed`), which it then leaves for its owner to destroy.
    """
    args = parse_args(argv)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    setup_logging(rank, args.verbose)
    if getattr(args, "cuda_graph_note", None):
        LOG.info("%s", args.cuda_graph_note)
    # A hard bound on everything, graphs and NCCL kernels included: dump every thread's stack and exit.
    faulthandler.dump_traceback_later(args.deadline_s, exit=True)
    layout: Layout | None = None
    code = 0
    try:
        layout = init_layout(args)
        LOG.info(
            "pcpp.bench: %d rank(s) on %s, mesh cfg %d x patch %d; modes %s; resolutions %s",
            layout.world,
            layout.device.type,
            2 if layout.cfg_split else 1,
            layout.patch_size,
            " ".join(m.name for m in args.modes),
            " ".join(f"{h}x{w}" for h, w in args.resolutions),
        )
        bench = Bench(args, layout)
        bench.setup()
        bench.run()
        bench.write()
        if rank == 0 and args.out is None:
            LOG.info("report:\n%s", json.dumps(json_safe(bench.report), indent=2))
        elif rank == 0:
            LOG.info("report written to %s", args.out)
        release_all(layout.device)
        dist.barrier(group=layout.wait_group)
    except Exception:
        LOG.exception("pcpp.bench failed on rank %d", rank)
        code = 1
    finally:
        release_all(layout.device if layout is not None else torch.device(args.device))
    teardown(args.teardown_timeout_s, destroy=layout is not None and layout.owns_group)
    faulthandler.cancel_dump_traceback_later()
    return code


if __name__ == "__main__":
    exit_code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: NCCL and CUDA-graph destructors have hung there on these machines.
    os._exit(exit_code)
