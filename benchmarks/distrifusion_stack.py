"""DistriFusion's stack for the runner: importing diffusers 0.24 and distrifuser beside a recent torch, its
process groups, and the set-up and tear-down of ``DistriUNetPP`` that ``DistriSDXLPipeline`` would do.

Used by ``distrifusion_runner.py``; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import torch
import torch.distributed as dist
from bench_common import common
from torch import nn

# Packages that must not be imported next to diffusers 0.24: the GPU image's peft and accelerate are
# written for diffusers/transformers of 2025-26, and diffusers 0.24 would pick them up (USE_PEFT_BACKEND,
# accelerate hooks) if `importlib.util.find_spec` found them.
ALWAYS_BLOCKED = ("peft", "accelerate")

# diffusers 0.24's models/lora.py imports transformers' CLIP classes when transformers is importable. The
# runner needs no text encoder, so by default transformers is hidden too (one 2024 library less beside
# torch 2.11); --keep-transformers lets transformers 4.44.2 from the DistriFusion target load instead.
OPTIONALLY_BLOCKED = ("transformers",)


def prepare_import_environment(block_transformers: bool) -> None:
    """Make the 2023-era DistriFusion stack importable beside torch 2.11; call before importing diffusers.

    * A ``None`` entry in ``sys.modules`` makes ``import X`` raise ``ImportError`` and makes
      ``importlib.util.find_spec(X)`` return ``None``, which is how diffusers 0.24 and transformers 4.44
      probe for optional packages; so they take their no-peft / no-accelerate code paths.
    * diffusers 0.24 registers its output dataclasses with ``torch.utils._pytree._register_pytree_node``,
      which newer torch releases removed in favour of ``register_pytree_node`` (same positional arguments).
    """
    for env_name, value in common.FORCED_ENV.items():
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


def count_wrapped(unet: nn.Module, stack: DfStack) -> dict[str, int]:
    """How many layers of each DistriFusion wrapper type ``DistriUNetPP`` installed."""
    counts: dict[str, int] = {}
    for module in unet.modules():
        if isinstance(module, stack.base_module_cls):
            name = type(module).__name__
            counts[name] = counts.get(name, 0) + 1
    return counts


def prepare_distrifusion(unet: Any, distri_config: Any, stack: DfStack, inputs: common.Inputs, seed: int) -> None:
    """Repeat ``DistriSDXLPipeline.prepare()`` (distrifuser 0.0.1b1, pipelines.py) without the text encoders.

    The static inputs play the role of the pipeline's empty-prompt batch: a random batch-2 latent, the
    prompt embedding repeated twice, the real time ids and timestep 0. Their values do not matter (each
    step copies its own inputs into them), but their shapes, dtypes and addresses are what the graphs bake in.
    """
    if inputs.text_embeds is None or inputs.time_ids is None:
        raise ValueError("DistriUNetPP drives SDXL-style UNets (addition_embed_type 'text_time')")
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
    common.sync_device(device)


def release_cuda_graphs(unet: Any, device: torch.device) -> None:
    """Drop DistriFusion's CUDA graphs and their memory pools (must happen before the process group goes)."""
    graphs = unet.cuda_graphs or []
    unet.setup_cuda_graph(None, None)
    for graph in graphs:
        graph.reset()
    del graphs
    common.free_memory(device)


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
