"""What both kinds of ``pcpp generate`` run share: joining the torchrun job, loading a pipeline, the settings saved
in every PNG."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pcpp import Conditioning, PCPPConfig, __version__

from .options import GenerateOptions, UsageError

__all__ = ["init_distributed", "load_pipeline", "pcpp_config", "position", "settings_text"]


def position() -> tuple[int, int]:
    """(rank, world) of this process: from the process group if one exists, else from torchrun's environment."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(options: GenerateOptions) -> tuple[torch.device, bool]:
    """Join the torchrun job if there is one.

    Args:
        options: The run's options (world size and peer timeout).

    Returns:
        This process's device, and whether this call created the process group (then the caller destroys it).
    """
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if options.world == 1 or dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=options.timeout_s))
    return device, True


def load_pipeline(model: str, device: torch.device) -> Any:
    """``--model`` as a diffusers pipeline on ``device`` (float16 on CUDA).

    Raises:
        UsageError: it cannot be loaded (not found, not a pipeline, not cached without network).
    """
    from diffusers import DiffusionPipeline

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {model}: cannot load it as a diffusers pipeline: {exc}") from exc


def pcpp_config(options: GenerateOptions) -> PCPPConfig:
    """How pcpp splits the model, from the run's options (the other settings keep :class:`pcpp.PCPPConfig`'s
    defaults).

    Args:
        options: The run's options.

    Returns:
        The configuration every rank converts with.
    """
    return PCPPConfig(
        partial=options.partial,
        warmup_steps=options.warmup_steps,
        conditioning=options.conditioning,
        exact=options.exact,
        timeout=timedelta(seconds=options.timeout_s),
    )


def settings_text(options: GenerateOptions) -> dict[str, str]:
    """The PNG text chunks of the run's settings (the model and how pcpp split it), the same for every image.

    Args:
        options: The run's options.

    Returns:
        Key to text.
    """
    if options.prompts is None:
        mode = options.mode
    else:  # steps vary by line; the steps and warmup_steps chunks tell whether every step was synchronous
        full = options.conditioning is Conditioning.FULL
        mode = "exact" if options.exact else "full conditioning" if full else f"partial {options.partial}"
    text = {
        "model": options.model,
        "mode": mode,
        "partial": repr(options.partial),
        "warmup_steps": str(options.warmup_steps),
        "conditioning": options.conditioning.value,
        "exact": str(options.exact).lower(),
        "cfg_split": str(options.cfg_split).lower(),
        "world_size": str(options.world),
    }
    if options.model != "tiny":  # a pipeline's VAE; --prompts always decodes in parallel
        text["vae"] = options.vae.value
    if options.prompts is not None:
        text["group_size"] = str(options.group_size)
    text["pcpp_version"] = __version__
    text["Software"] = f"pcpp {__version__}"
    return text
