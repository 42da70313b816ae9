"""The diffusers pipeline that ``--whole-image`` times, built offline around the bench's UNet.

SD or SDXL as the UNet's config says (an SDXL-style ``text_time`` UNet gets ``StableDiffusionXLPipeline`` with two
text encoders, another ``StableDiffusionPipeline`` with one), the text encoders of :mod:`pcpp.bench.text`, the VAE
from ``--vae-config`` and the bench's DDIM scheduler. Every part is drawn with seeded random weights as the UNet
is (on the rank's GPU with ``--init-device device``, checked identical across ranks), then cast to ``--dtype``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import common
from .model import Model, make_scheduler
from .text import encoder_configs, write_tokenizer

__all__ = ["ImagePipeline", "build_pipeline", "load_vae_config", "vae_factor"]

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImagePipeline:
    """The pipeline and what the report says of its parts.

    Attributes:
        pipe: the diffusers pipeline (its UNet is the bench's, converted and reverted by the pcpp runs).
        parameters: parameter count of each part (``text_encoder``, ``text_encoder_2``, ``vae``).
        build_s: seconds spent building the parts other than the UNet.
    """

    pipe: Any
    parameters: dict[str, int]
    build_s: float


def load_vae_config(path: Path) -> dict[str, Any]:
    """Read a diffusers ``AutoencoderKL`` config JSON.

    Raises:
        ValueError: it describes another class.
    """
    with path.open() as fh:
        config: dict[str, Any] = json.load(fh)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"{path} describes a {config['_class_name']}; the bench builds an AutoencoderKL")
    return config


def vae_factor(config: dict[str, Any]) -> int:
    """Image pixels per latent pixel along each side: 2 per upsampling stage, as diffusers' pipelines compute it."""
    return int(2 ** (len(config.get("block_out_channels", [64])) - 1))


def seeded(factory: Callable[[], nn.Module], seed: int, device: torch.device, on_device: bool) -> nn.Module:
    """``factory()`` after ``torch.manual_seed(seed)``, drawn on a GPU ``device`` if ``on_device`` (seconds) or on
    the CPU (the same bits on any card), then moved to ``device`` in eval mode without gradients."""
    torch.manual_seed(seed)
    if on_device and device.type == "cuda":
        with device:
            module = factory()
    else:
        module = factory()
    module = module.to(device).eval()
    module.requires_grad_(False)
    return module


def build_pipeline(args: argparse.Namespace, model: Model, device: torch.device) -> ImagePipeline:
    """The whole pipeline around ``model.unet``, in ``--dtype`` on ``device``, progress bar off.

    Raises:
        RuntimeError: the ranks built different text encoders or VAEs.
        ValueError: the UNet's conditioning does not split into text encoders, or the VAE config is not one.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tick = time.perf_counter()
    dtype = common.DTYPES[args.dtype]
    on_device = args.init_device == "device"
    vae_config = {k: v for k, v in load_vae_config(args.vae_config).items() if not k.startswith("_")}
    with tempfile.TemporaryDirectory(prefix=f"pcpp-bench-tokenizer-{os.getpid()}-") as folder:
        tokenizer = write_tokenizer(Path(folder))  # read into memory: the folder may go
    configs = encoder_configs(model.config, tokenizer)
    parts: dict[str, nn.Module] = {
        "text_encoder": seeded(lambda: CLIPTextModel(configs[0]), args.seed + 1, device, on_device),
        "vae": seeded(lambda: AutoencoderKL.from_config(vae_config), args.seed + 3, device, on_device),
    }
    if len(configs) == 2:
        parts["text_encoder_2"] = seeded(
            lambda: CLIPTextModelWithProjection(configs[1]), args.seed + 2, device, on_device
        )
    for name, part in parts.items():
        parts[name] = part.to(dtype=dtype)
        common.check_same_weights(part, device, args.init_device)
    if device.type == "cuda":
        common.free_memory(device)
    components: dict[str, Any] = {**parts, "unet": model.unet, "scheduler": make_scheduler(), "tokenizer": tokenizer}
    if len(configs) == 2:
        pipe = StableDiffusionXLPipeline(**components, tokenizer_2=tokenizer, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)  # the bench logs each image
    build_s = time.perf_counter() - tick
    parameters = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    LOG.info("%s built in %.1f s around the UNet: %s", type(pipe).__name__, build_s, parameters)
    return ImagePipeline(pipe=pipe, parameters=parameters, build_s=build_s)
