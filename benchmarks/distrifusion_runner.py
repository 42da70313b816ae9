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
import contextlib
import datetime
import faulthandler
import functools
import gc
import importlib
import json
import logging
import math
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

LOG = logging.getLogger("distrifusion_runner")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl-base-unet.json"

# Packages that must not be imported next to diffusers 0.24: the GPU image's peft and accelerate are
# written for diffusers/transformers of 2025-26, and diffusers 0.24 would pick them up (USE_PEFT_BACKEND,
# accelerate hooks) if `importlib.util.find_spec` found them.
ALWAYS_BLOCKED = ("peft", "accelerate")

# diffusers 0.24's models/lora.py imports transformers' CLIP classes when transformers is importable. The
# runner needs no text encoder, so by default transformers is hidden too (one 2024 library less beside
# torch 2.11); --keep-transformers lets transformers 4.44.2 from the DistriFusion target load instead.
OPTIONALLY_BLOCKED = ("transformers",)

# NVLink multicast can take a shared host's GPUs out of service; it must stay off on the GPU machines.
FORCED_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------------------------
# Command line and environment


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description=(
            "Time DistriFusion (distrifuser 0.0.1b1, DistriUNetPP) on the SDXL UNet with random weights and "
            "measure its per-step noise-prediction error against the plain single-GPU UNet. Launch with "
            "`torchrun --nproc-per-node N` (N a power of two) with the DistriFusion stack on PYTHONPATH."
        )
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="UNet config JSON (diffusers format)")
    parser.add_argument("--height", type=int, default=1024, help="image height in pixels (latent = height/8)")
    parser.add_argument("--width", type=int, default=1024, help="image width in pixels (latent = width/8)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per image")
    parser.add_argument("--warmup-steps", type=int, default=4, help="DistriFusion synchronous warm-up steps")
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--repeats", type=int, default=3, help="timed images after the warm-up image")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, latents and embeddings")
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
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16", help="weights and activations")
    parser.add_argument(
        "--init-device",
        choices=["gpu", "cpu"],
        default="gpu",
        help="where the seeded random weights are drawn: gpu is fast, cpu gives the same bits on any card",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON report path (written by rank 0)")
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
    parser.add_argument(
        "--pg-timeout-s", type=float, default=300.0, help="timeout of every process group (NCCL watchdog)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=540.0,
        help="hard limit on the whole run: past it every thread's stack is dumped and the process exits",
    )
    parser.add_argument("--teardown-timeout-s", type=float, default=30.0, help="longest wait for destroy_process_group")
    parser.add_argument("--verbose", action="store_true", help="log INFO on every rank, not only rank 0")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.height % 8 or args.width % 8:
        parser.error(f"--height and --width must be multiples of 8, got {args.height}x{args.width}")
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


def prepare_import_environment(block_transformers: bool) -> None:
    """Make the 2023-era DistriFusion stack importable beside torch 2.11; call before importing diffusers.

    * A ``None`` entry in ``sys.modules`` makes ``import X`` raise ``ImportError`` and makes
      ``importlib.util.find_spec(X)`` return ``None``, which is how diffusers 0.24 and transformers 4.44
      probe for optional packages; so they take their no-peft / no-accelerate code paths.
    * diffusers 0.24 registers its output dataclasses with ``torch.utils._pytree._register_pytree_node``,
      which newer torch releases removed in favour of ``register_pytree_node`` (same positional arguments).
    """
    for env_name, value in FORCED_ENV.items():
        os.environ[env_name] = value
    # Nothing may be fetched from a hub (the GPU machines reach nothing); fail fast rather than retry.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

    blocked = ALWAYS_BLOCKED + (OPTIONALLY_BLOCKED if block_transformers else ())
    for name in blocked:
        loaded = sys.modules.get(name)
        if loaded is not None:
            raise RuntimeError(f"{name} was imported before the DistriFusion stack could hide it: {loaded!r}")
        sys.modules[name] = None  # type: ignore[assignment]

    pytree: Any = importlib.import_module("torch.utils._pytree")
    if not hasattr(pytree, "_register_pytree_node"):
        pytree._register_pytree_node = pytree.register_pytree_node
    # diffusers 0.24 also passes these two private helpers; keep the call working should they go too.
    if not hasattr(pytree, "_dict_flatten"):
        pytree._dict_flatten = lambda d: (list(d.values()), list(d.keys()))
    if not hasattr(pytree, "_dict_unflatten"):
        pytree._dict_unflatten = lambda values, context: dict(zip(context, values, strict=True))
    warnings.filterwarnings("ignore", message=r".*_register_pytree_node.*", category=FutureWarning)


@dataclass(frozen=True)
class DfStack:
    """The classes this runner takes from diffusers 0.24 and distrifuser, imported after patching."""

    unet_cls: Any
    ddim_cls: Any
    distri_unet_cls: Any
    distri_config_cls: Any
    comm_manager_cls: Any
    base_module_cls: Any
    versions: dict[str, str]


def import_df_stack() -> DfStack:
    """Import the DistriFusion stack (only the UNet path: ``distrifuser.pipelines`` needs text encoders)."""
    diffusers = importlib.import_module("diffusers")
    if not diffusers.__version__.startswith("0.24."):
        # distrifuser imports diffusers.models.unet_2d_condition, which later diffusers moved (issue #31).
        raise RuntimeError(
            f"diffusers {diffusers.__version__} imported from {diffusers.__file__}; DistriFusion needs 0.24.0 "
            "first on PYTHONPATH (pip install --no-index --no-deps --target /tmp/site-df .whl-df/*.whl)"
        )
    distri_unet_mod = importlib.import_module("distrifuser.models.distri_sdxl_unet_pp")
    distri_utils = importlib.import_module("distrifuser.utils")
    base_module_mod = importlib.import_module("distrifuser.modules.base_module")

    def version_of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    return DfStack(
        unet_cls=diffusers.UNet2DConditionModel,
        ddim_cls=diffusers.DDIMScheduler,
        distri_unet_cls=distri_unet_mod.DistriUNetPP,
        distri_config_cls=distri_utils.DistriConfig,
        comm_manager_cls=distri_utils.PatchParallelismCommManager,
        base_module_cls=base_module_mod.BaseModule,
        versions={
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "distrifuser": version_of("distrifuser"),
            "huggingface_hub": version_of("huggingface_hub"),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a",
        },
    )


@contextlib.contextmanager
def bounded_process_groups(timeout: datetime.timedelta) -> Iterator[None]:
    """Give every process group created inside the block ``timeout`` unless the caller passed one.

    ``DistriConfig.__init__`` calls ``dist.init_process_group("nccl")`` and ``dist.new_group(...)`` with no
    timeout, so NCCL would fall back to its 10-minute default. It also swallows any exception from
    ``init_process_group`` (falling back to one GPU), so an already-initialised group cannot be passed in:
    injecting the timeout into its own calls is the way to bound them.
    """
    original_init = dist.init_process_group
    original_new_group = dist.new_group

    @functools.wraps(original_init)
    def init_with_timeout(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return original_init(*args, **kwargs)

    @functools.wraps(original_new_group)
    def new_group_with_timeout(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return original_new_group(*args, **kwargs)

    dist.init_process_group = init_with_timeout
    dist.new_group = new_group_with_timeout
    try:
        yield
    finally:
        dist.init_process_group = original_init
        dist.new_group = original_new_group


def launch_env() -> tuple[int, int, int]:
    """Return (rank, local_rank, world_size) as set by torchrun."""
    missing = [name for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if name not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: launch with `torchrun --nproc-per-node N {__file__}`")
    return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])


def make_distri_config(args: argparse.Namespace, stack: DfStack, rank: int, local_rank: int, world: int) -> Any:
    """Build DistriFusion's ``DistriConfig`` (it initialises NCCL and binds the process to ``cuda:{rank}``)."""
    if rank != local_rank:
        # DistriConfig picks the GPU by global rank; only a single-node launch maps that to the right card.
        raise RuntimeError(f"DistriConfig binds cuda:{{RANK}}; RANK={rank} != LOCAL_RANK={local_rank} (multi-node)")
    if world & (world - 1) or world < 1:
        raise RuntimeError(f"DistriFusion needs a power-of-two world size, got {world}")
    if torch.cuda.device_count() <= local_rank:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
    # On a collective that outlives the process-group timeout, the NCCL watchdog ends the process (torch's
    # default TORCH_NCCL_ASYNC_ERROR_HANDLING); collectives replayed inside a CUDA graph escape it, which
    # is what --deadline-s is for.
    torch.cuda.set_device(local_rank)
    with bounded_process_groups(datetime.timedelta(seconds=args.pg_timeout_s)):
        config = stack.distri_config_cls(
            height=args.height,
            width=args.width,
            do_classifier_free_guidance=True,
            split_batch=args.split_batch,
            warmup_steps=args.warmup_steps,
            comm_checkpoint=args.comm_checkpoint,
            mode=args.mode,
            use_cuda_graph=args.use_cuda_graph,
            parallelism="patch",
        )
    if config.world_size != world or config.rank != rank:
        # DistriConfig prints and falls back to a single GPU when init_process_group fails.
        raise RuntimeError(
            f"DistriConfig saw rank {config.rank} of {config.world_size}, torchrun says {rank} of {world}: "
            "process-group initialisation failed (see the message printed above)"
        )
    return config


def check_geometry(height: int, width: int, n_device_per_batch: int) -> None:
    """Reject sizes at which SDXL's three UNet levels cannot be split evenly into row strips."""
    latent_h, latent_w = height // 8, width // 8
    # Two stride-2 downsamplers: each rank's strip must stay a whole, even number of rows at every level.
    if latent_h % (4 * n_device_per_batch) or latent_w % 4:
        raise ValueError(
            f"latent {latent_h}x{latent_w} (image {height}x{width}) cannot be split over {n_device_per_batch} "
            f"patches: latent height must be a multiple of {4 * n_device_per_batch} and width of 4"
        )


# --------------------------------------------------------------------------------------------------------------
# Model and inputs


def load_unet_config(path: Path) -> dict[str, Any]:
    """Read a diffusers UNet config JSON."""
    with path.open() as fh:
        config: dict[str, Any] = json.load(fh)
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise ValueError(f"{path} describes a {config['_class_name']}; DistriUNetPP wraps UNet2DConditionModel only")
    return config


def build_unet(
    stack: DfStack, config: dict[str, Any], seed: int, device: torch.device, dtype: torch.dtype, init_on_device: bool
) -> nn.Module:
    """Build the UNet with diffusers' default initialisation under ``torch.manual_seed(seed)``, then cast.

    Initialisation runs in fp32, as loading fp32 weights with ``torch_dtype=...`` would give, either on the
    rank's GPU (seconds; identical on identical cards, which the caller checks) or on the CPU (a minute or
    more for ~2.6e9 parameters, but bit-identical whatever the GPU).
    """
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    if init_on_device:
        with device:
            unet = stack.unet_cls.from_config(config)
    else:
        threads = torch.get_num_threads()
        # torchrun sets OMP_NUM_THREADS=1; give each local rank its share of the cores for the init.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
        try:
            unet = stack.unet_cls.from_config(config)
        finally:
            torch.set_num_threads(threads)
    unet = unet.to(device=device, dtype=dtype)
    unet.eval()
    unet.requires_grad_(False)
    if device.type == "cuda":
        # Drop the fp32 originals' cached blocks so they count in neither reserved memory nor later peaks.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return unet


def weight_checksum(unet: nn.Module) -> float:
    """A cheap fingerprint of the weights, to confirm every rank built the same model."""
    total = 0.0
    for i, param in enumerate(unet.parameters()):
        if i % 37 == 0:  # a spread-out sample of tensors is enough to catch a different seed or order
            total += float(param.detach().double().sum())
    return total


@dataclass
class Inputs:
    """One image's conditioning and initial latent, identical on every rank (seeded CPU generator)."""

    latents: torch.Tensor  # (1, C, h, w): the initial noise x_T
    prompt_embeds: torch.Tensor  # (2, 77, cross_attention_dim): [negative, positive], as the pipeline orders them
    text_embeds: torch.Tensor  # (2, pooled dim)
    time_ids: torch.Tensor  # (2, 6): (orig h, orig w, crop top, crop left, target h, target w)

    def added_cond_kwargs(self) -> dict[str, torch.Tensor]:
        """A fresh dict per call: DistriUNetPP's graph path slices the caller's dict in place."""
        return {"text_embeds": self.text_embeds, "time_ids": self.time_ids}


def embedding_dims(config: dict[str, Any]) -> tuple[int, int]:
    """(cross-attention dim, pooled text-embedding dim) implied by an SDXL-style ``text_time`` config."""
    if config.get("addition_embed_type") != "text_time":
        raise ValueError("the runner drives SDXL-style UNets (addition_embed_type 'text_time')")
    cross_dim = config["cross_attention_dim"]
    if not isinstance(cross_dim, int):
        raise ValueError(f"cross_attention_dim must be one integer, got {cross_dim!r}")
    pooled_dim = int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])
    return cross_dim, pooled_dim


def make_inputs(
    config: dict[str, Any], height: int, width: int, seed: int, device: torch.device, dtype: torch.dtype
) -> Inputs:
    """Random text conditioning (no text encoders) and the pipeline's real ``add_time_ids``."""
    cross_dim, pooled_dim = embedding_dims(config)
    gen = torch.Generator("cpu").manual_seed(seed)
    latent_shape = (1, int(config["in_channels"]), height // 8, width // 8)
    latents = torch.randn(latent_shape, generator=gen)  # DDIM's init_noise_sigma is 1
    prompt_embeds = torch.randn((2, 77, cross_dim), generator=gen)
    text_embeds = torch.randn((2, pooled_dim), generator=gen)
    # What StableDiffusionXLPipeline._get_add_time_ids gives for original = target = (height, width), no crop.
    time_ids = torch.tensor([[height, width, 0, 0, height, width]] * 2, dtype=torch.float32)
    return Inputs(
        latents=latents.to(device=device, dtype=dtype),
        prompt_embeds=prompt_embeds.to(device=device, dtype=dtype),
        text_embeds=text_embeds.to(device=device, dtype=dtype),
        time_ids=time_ids.to(device=device, dtype=dtype),
    )


def make_scheduler(stack: DfStack) -> Any:
    """DDIM with SDXL-base's scheduler settings (its scheduler_config.json, read as DDIMScheduler)."""
    return stack.ddim_cls(
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


def count_wrapped(unet: nn.Module, stack: DfStack) -> dict[str, int]:
    """How many layers of each DistriFusion wrapper type ``DistriUNetPP`` installed."""
    counts: dict[str, int] = {}
    for module in unet.modules():
        if isinstance(module, stack.base_module_cls):
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------------------
# DistriFusion set-up and denoising


def sync_device(device: torch.device) -> None:
    """Wait for all work on ``device`` (every stream, NCCL's included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_distrifusion(unet: Any, distri_config: Any, stack: DfStack, inputs: Inputs, seed: int) -> None:
    """Repeat ``DistriSDXLPipeline.prepare()`` (distrifuser 0.0.1b1, pipelines.py) without the text encoders.

    The static inputs play the role of the pipeline's empty-prompt batch: a random batch-2 latent, the
    prompt embedding repeated twice, the real time ids and timestep 0. Their values do not matter (each
    step copies its own inputs into them), but their shapes, dtypes and addresses are what the graphs bake in.
    """
    dtype = inputs.latents.dtype
    device = inputs.latents.device
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    batch_size = 2 if distri_config.do_classifier_free_guidance else 1
    static_inputs: dict[str, Any] = {
        "sample": torch.randn((batch_size, *inputs.latents.shape[1:]), generator=gen).to(device, dtype),
        "timestep": torch.zeros([batch_size], device=device, dtype=torch.long),
        "encoder_hidden_states": inputs.prompt_embeds[1:2].repeat(batch_size, 1, 1),
        "added_cond_kwargs": {
            "text_embeds": inputs.text_embeds[1:2].repeat(batch_size, 1),
            "time_ids": inputs.time_ids[1:2].repeat(batch_size, 1),
        },
    }
    static_outputs = []
    cuda_graphs = []

    # Used to create the communication buffer: a forward in which every layer registers its tensor.
    comm_manager = None
    if distri_config.n_device_per_batch > 1:
        comm_manager = stack.comm_manager_cls(distri_config)
        unet.set_comm_manager(comm_manager)
        unet.set_counter(0)
        unet(**static_inputs, return_dict=False, record=True)
        if comm_manager.numel > 0:
            comm_manager.create_buffer()

    # Pre-run: a synchronous forward that fills the buffers (and warms every NCCL communicator up eagerly,
    # which NCCL needs before it can be captured in a graph).
    unet.set_counter(0)
    unet(**static_inputs, return_dict=False, record=True)

    if distri_config.use_cuda_graph:
        if comm_manager is not None:
            comm_manager.clear()
        # Python control flow differs in these three steps: synchronous gathers (counter <= w), the first
        # asynchronous step (no tail left from a previous one) and every later step (flushes that tail).
        counters = [0, distri_config.warmup_steps + 1, distri_config.warmup_steps + 2]
        for counter in counters:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                unet.set_counter(counter)
                output = unet(**static_inputs, return_dict=False, record=True)[0]
                static_outputs.append(output)
            cuda_graphs.append(graph)
        unet.setup_cuda_graph(static_outputs, cuda_graphs)
    sync_device(device)


@dataclass
class Trace:
    """What DistriFusion saw and produced at each step of one image (kept on the CPU)."""

    timesteps: list[int] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)  # x_t fed to step i, (1, C, h, w)
    eps: list[torch.Tensor] = field(default_factory=list)  # the UNet's batch-2 output at step i
    final: torch.Tensor | None = None


def denoise(
    unet: Callable[..., Any],
    scheduler: Any,
    inputs: Inputs,
    steps: int,
    guidance: float,
    trace: Trace | None = None,
    reset_counter: Callable[[], None] | None = None,
) -> tuple[float, torch.Tensor]:
    """One image: the diffusers 0.24 SDXL pipeline's denoising loop. Returns (loop milliseconds, final latent).

    The clock covers the 50 UNet calls, CFG combines and scheduler steps, between two device synchronisations;
    not the text encoders or the VAE, which this runner does not have.
    """
    device = inputs.latents.device
    if reset_counter is not None:
        reset_counter()  # DistriSDXLPipeline.__call__ does unet.set_counter(0) before every image
    scheduler.set_timesteps(steps, device=device)
    latents = inputs.latents.clone()
    sync_device(device)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2)
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        noise_pred = unet(
            latent_model_input,
            t,
            encoder_hidden_states=inputs.prompt_embeds,
            timestep_cond=None,
            cross_attention_kwargs=None,
            added_cond_kwargs=inputs.added_cond_kwargs(),
            return_dict=False,
        )[0]
        if trace is not None:
            # The output is a static buffer that the next call overwrites: copy it out now (copy=True, since
            # `.cpu()` of a tensor already on the CPU would return the same buffer).
            trace.timesteps.append(int(t))
            trace.latents.append(latents.detach().to("cpu", copy=True))
            trace.eps.append(noise_pred.detach().to("cpu", copy=True))
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, eta=0.0, return_dict=False)[0]
    sync_device(device)
    elapsed_ms = (time.perf_counter() - start) * 1000.0
    if trace is not None:
        trace.final = latents.detach().to("cpu", copy=True)
    return elapsed_ms, latents


def release_cuda_graphs(unet: Any, device: torch.device) -> None:
    """Drop DistriFusion's CUDA graphs and their memory pools (must happen before the process group goes)."""
    graphs = unet.cuda_graphs or []
    unet.setup_cuda_graph(None, None)
    for graph in graphs:
        graph.reset()
    del graphs
    gc.collect()
    sync_device(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def unwrap_distri_layers(model: nn.Module, base_module_cls: type) -> int:
    """Put back the original layers that DistriFusion's wrappers hold as ``.module``; returns how many.

    The wrappers were installed with ``setattr`` on their parents and keep the original module (and its
    weights) untouched, so this restores the plain diffusers UNet exactly. DistriFusion cannot run afterwards.
    """
    swaps = []
    for parent in model.modules():
        if isinstance(parent, base_module_cls):
            continue
        for name, child in parent.named_children():
            if isinstance(child, base_module_cls):
                swaps.append((parent, name, child.module))
    for parent, name, original in swaps:
        setattr(parent, name, original)
    return len(swaps)


def relative_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    diff = (actual.double() - expected.double()).norm()
    return float(diff / expected.double().norm().clamp_min(1e-30))


def reference_errors(
    plain_unet: Callable[..., Any],
    trace: Trace,
    inputs: Inputs,
    guidance: float,
    rank: int,
    world: int,
) -> torch.Tensor:
    """Per-step errors of DistriFusion against the plain UNet on the same x_t; this rank's share of steps.

    Returns a (2, steps) float64 tensor, zero except at the steps this rank owns (i % world == rank), so a
    SUM all-reduce assembles the whole table. Row 0: relative L2 of the raw batch-2 noise prediction; row 1:
    of the CFG-combined noise prediction that drives the scheduler.
    """
    device = inputs.latents.device
    steps = len(trace.timesteps)
    errors = torch.zeros((2, steps), dtype=torch.float64)
    for i in range(rank, steps, world):
        latents = trace.latents[i].to(device)
        t = torch.tensor(trace.timesteps[i], device=device)
        # DDIM's scale_model_input is the identity, so the recorded x_t is the UNet's input as it was.
        expected = plain_unet(
            torch.cat([latents] * 2),
            t,
            encoder_hidden_states=inputs.prompt_embeds,
            added_cond_kwargs=inputs.added_cond_kwargs(),
            return_dict=False,
        )[0].cpu()
        actual = trace.eps[i]
        errors[0, i] = relative_l2(actual, expected)
        exp_u, exp_c = expected.double().chunk(2)
        act_u, act_c = actual.double().chunk(2)
        errors[1, i] = relative_l2(act_u + guidance * (act_c - act_u), exp_u + guidance * (exp_c - exp_u))
    return errors


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, median and max of the finite values (None when there are none)."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": None, "median": None, "max": None}
    return {"mean": statistics.fmean(finite), "median": statistics.median(finite), "max": max(finite)}


def finite_or_none(values: Sequence[float]) -> list[float | None]:
    """JSON has no NaN/inf: write them as null."""
    return [v if math.isfinite(v) else None for v in values]


def all_gather_floats(values: Sequence[float], device: torch.device) -> list[list[float]]:
    """Every rank's list of floats (all ranks must pass the same length)."""
    mine = torch.tensor(list(values), dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [t.cpu().tolist() for t in gathered]


def sync_point(device: torch.device) -> None:
    """Line the ranks up (a tiny all-reduce) so each timed image starts together."""
    flag = torch.ones(1, device=device)
    dist.all_reduce(flag)
    sync_device(device)


# --------------------------------------------------------------------------------------------------------------
# The benchmark


def run_benchmark(args: argparse.Namespace, stack: DfStack, distri_config: Any) -> dict[str, Any]:
    """Build, prepare, time and check DistriFusion; returns the report (identical on every rank)."""
    device = torch.device(distri_config.device)
    dtype = DTYPES[args.dtype]
    rank, world = distri_config.rank, distri_config.world_size
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
    config = load_unet_config(args.config)
    unet = build_unet(stack, config, args.seed, device, dtype, init_on_device=args.init_device == "gpu")
    setup_s["build"] = time.perf_counter() - tick
    if args.save_weights is not None and rank == 0:
        # So that pcpp's bench (--weights) runs on these exact weights and the fidelity columns pair up.
        torch.save(unet.state_dict(), args.save_weights)
        LOG.info("weights saved to %s", args.save_weights)
    n_params = sum(p.numel() for p in unet.parameters())
    checksums = [c[0] for c in all_gather_floats([weight_checksum(unet)], device)]
    # Different weights differ at the first digits; the tolerance only absorbs reduction-order noise.
    if any(abs(c - checksums[0]) > 1e-9 * max(1.0, abs(checksums[0])) for c in checksums):
        raise RuntimeError(
            f"ranks built different weights (checksums {checksums}); with --init-device gpu this means the "
            "cards differ: use --init-device cpu"
        )
    LOG.info("UNet built in %.1f s: %.3fe9 parameters, %s", setup_s["build"], n_params / 1e9, args.dtype)
    report["unet_parameters"] = n_params

    distri_unet = stack.distri_unet_cls(unet, distri_config)
    report["wrapped_layers"] = count_wrapped(distri_unet, stack)
    LOG.info("DistriUNetPP wrapped %s", report["wrapped_layers"] or "nothing (CFG parallelism only)")

    inputs = make_inputs(config, args.height, args.width, args.seed, device, dtype)
    scheduler = make_scheduler(stack)

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

        def reset_counter() -> None:
            distri_unet.set_counter(0)

        # Warm-up image, recorded for the fidelity check (the copies to the CPU make it slower: not timed).
        trace = Trace()
        sync_point(device)
        warm_ms, _ = denoise(distri_unet, scheduler, inputs, args.steps, args.guidance, trace, reset_counter)
        LOG.info("warm-up image: %.1f ms (with recording)", warm_ms)
        peak_setup = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times_ms = []
        final_latents = None
        for i in range(args.repeats):
            sync_point(device)
            elapsed, final_latents = denoise(
                distri_unet, scheduler, inputs, args.steps, args.guidance, reset_counter=reset_counter
            )
            times_ms.append(elapsed)
            LOG.info("image %d/%d: %.1f ms", i + 1, args.repeats, elapsed)
        peak_timed = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        peak_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0

        # Every image starts from the same x_T, so the timed images must reproduce the recorded one.
        if final_latents is None or trace.final is None:
            raise RuntimeError("no image was produced")
        report["repeat_consistency_rel_l2"] = relative_l2(final_latents.cpu(), trace.final)
        report["nonfinite_eps_steps"] = [i for i, e in enumerate(trace.eps) if not torch.isfinite(e).all()]

        all_times = all_gather_floats(times_ms, device)
        mems = all_gather_floats([float(peak_timed), float(peak_setup), float(peak_reserved)], device)
        report.update(
            {
                "times_ms": times_ms,
                "median_ms": statistics.median(times_ms),
                "min_ms": min(times_ms),
                "max_ms": max(times_ms),
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
            errors = reference_errors(plain_unet, trace, inputs, args.guidance, rank, world)
            if args.trajectory_reference:
                # Every rank runs the same plain loop, so no rank sits in a collective while another works.
                _, ref_final = denoise(plain_unet, make_scheduler(stack), inputs, args.steps, args.guidance)
                report["final_latent_rel_l2_vs_single_gpu"] = relative_l2(trace.final, ref_final.cpu())
            errors_dev = errors.to(device)
            dist.all_reduce(errors_dev)
            errors = errors_dev.cpu()
            setup_s["reference"] = time.perf_counter() - tick
            after = range(args.warmup_steps + 1, args.steps)
            eps_err, guided_err = errors[0].tolist(), errors[1].tolist()
            report["fidelity"] = {
                "reference": "plain diffusers UNet, same weights, batch 2, same x_t and t, one GPU",
                "rel_l2_eps_per_step": finite_or_none(eps_err),
                "rel_l2_guided_per_step": finite_or_none(guided_err),
                "after_warmup_steps": [after.start, after.stop - 1] if len(after) else None,
                "rel_l2_eps_after_warmup": summarize([eps_err[i] for i in after]),
                "rel_l2_guided_after_warmup": summarize([guided_err[i] for i in after]),
                "rel_l2_eps_warmup": summarize(eps_err[: args.warmup_steps + 1]),
            }
            LOG.info(
                "noise-prediction rel. L2 after warm-up: %s; during warm-up: %s",
                report["fidelity"]["rel_l2_eps_after_warmup"],
                report["fidelity"]["rel_l2_eps_warmup"],
            )
    return report


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (which strict JSON lacks) by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_report(report: dict[str, Any], out: Path | None) -> None:
    """Write the JSON report (rank 0 calls this)."""
    text = json.dumps(json_safe(report), indent=2, allow_nan=False)
    if out is None:
        LOG.info("report:\n%s", text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    LOG.info("report written to %s", out)


def teardown(timeout_s: float) -> None:
    """Synchronise and destroy the process group, giving up after ``timeout_s`` (it hung after capture)."""

    def work() -> None:
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:
            LOG.exception("teardown failed (ignored)")

    thread = threading.Thread(target=work, name="teardown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        LOG.warning("destroy_process_group still running after %.0f s; exiting without it", timeout_s)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (the caller ends the process with ``os._exit``)."""
    args = parse_args(argv)
    rank, local_rank, world = launch_env()
    setup_logging(rank, args.verbose)
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
        sync_point(torch.device(distri_config.device))
    except Exception:
        LOG.exception("DistriFusion run failed on rank %d", rank)
        return 1
    teardown(args.teardown_timeout_s)
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter shutdown: NCCL and CUDA-graph destructors have hung there on these machines.
    os._exit(code)
