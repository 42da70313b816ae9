"""pcpp's own tiny text-to-image diffusion model: a pixel-space UNet trained on :mod:`pcpp.models.shapes`.

The model is a diffusers :class:`~diffusers.UNet2DConditionModel` built from Stable Diffusion's blocks (ResNet
blocks with GroupNorm, cross-attention transformer blocks, stride-2 downsampling, nearest upsampling) that works
directly on RGB pixels in [-1, 1], conditioned on a :class:`TinyTextEncoder` over the closed vocabulary of the
shapes captions. Its weights ship inside the package (``pcpp/models/weights``), so :func:`load_tiny` needs no
network.

Typical use::

    model = load_tiny()
    images = sample(model, ["a red circle on a blue background"], height=64, width=64)

:func:`~pcpp.models.sampler.sample` is a plain DDIM loop with classifier-free guidance that calls ``model.unet``
once per step on the batch ``[unconditional, conditional]``; to run a converted (patch-parallel) UNet, pass
``dataclasses.replace(model, unet=converted)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pcpp.models.text import TinyTextEncoder, TinyTextEncoderConfig, TinyTokenizer

__all__ = [
    "DEFAULT_GUIDANCE",
    "TinyModel",
    "build_scheduler",
    "build_unet",
    "load_tiny",
    "load_tokenizer",
    "save_tiny",
    "unet_config",
    "weights_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE: Final = 2.0
"""Classifier-free guidance scale used by :func:`pcpp.models.sample` unless told otherwise."""

UNET_DIR: Final = "unet"
UNET_WEIGHTS: Final = "diffusion_pytorch_model.safetensors"
TEXT_ENCODER_FILE: Final = "text_encoder.safetensors"
TEXT_ENCODER_CONFIG: Final = "text_encoder.json"
SCHEDULER_DIR: Final = "scheduler"


def unet_config(sample_size: int = 64, cross_attention_dim: int = 128) -> dict[str, Any]:
    """Returns the tiny UNet's diffusers config (kwargs of :class:`~diffusers.UNet2DConditionModel`).

    Three resolution levels (channels 32, 64, 128; two stride-2 downsamplings), two ResNet blocks per level,
    cross-attention on the two lower levels and in the middle block, GroupNorm with 8 groups. About 6.2M
    parameters.

    Args:
        sample_size: Nominal image size (informational; the UNet is fully convolutional).
        cross_attention_dim: Width of the text encoder's output.

    Returns:
        The config dict.
    """
    return {
        "sample_size": sample_size,
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 128],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 4,  # diffusers' name for the number of heads in this class
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }


def build_unet(config: Mapping[str, Any] | None = None) -> UNet2DConditionModel:
    """Creates a randomly initialised tiny UNet.

    Args:
        config: A config from :func:`unet_config` (the default one if None).

    Returns:
        The UNet.
    """
    return UNet2DConditionModel(**dict(config if config is not None else unet_config()))


def build_scheduler() -> DDIMScheduler:
    """Returns the DDIM scheduler matching the training noise schedule.

    Cosine ("squaredcos_cap_v2") betas over 1000 steps, v-prediction, "trailing" timestep spacing (sampling
    starts at the last training timestep), samples clipped to [-1, 1].

    Returns:
        The scheduler.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=True,
    )


@dataclass(frozen=True)
class TinyModel:
    """Everything needed to sample from the tiny model.

    Attributes:
        unet: The denoiser (predicts v); may be replaced by a converted UNet with :func:`dataclasses.replace`.
        text_encoder: Prompt encoder.
        tokenizer: Prompt tokenizer.
        scheduler: The DDIM scheduler configured as trained (copied before use by :func:`pcpp.models.sample`).
    """

    unet: nn.Module
    text_encoder: TinyTextEncoder
    tokenizer: TinyTokenizer
    scheduler: DDIMScheduler

    @property
    def device(self) -> torch.device:
        """Device of the text encoder's weights."""
        return self.text_encoder.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the text encoder's weights."""
        return self.text_encoder.proj.weight.dtype


def weights_dir() -> Path:
    """Returns the folder of the committed weights inside the installed package.

    Returns:
        The path of ``pcpp/models/weights``.
    """
    return Path(str(resources.files("pcpp.models").joinpath("weights")))


def _cpu_state(module: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}


def save_tiny(
    directory: str | Path,
    unet: nn.Module,
    text_encoder: TinyTextEncoder,
    scheduler: DDIMScheduler,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Saves a model in the layout :func:`load_tiny` reads.

    ``unet/`` (as diffusers' ``save_pretrained`` lays it out: ``config.json`` +
    ``diffusion_pytorch_model.safetensors``, so ``UNet2DConditionModel.from_pretrained`` reads it too),
    ``text_encoder.safetensors`` +
    ``text_encoder.json``, and ``scheduler/scheduler_config.json``. Weights are stored as ``dtype`` (float16 by
    default, to keep the package small).

    Args:
        directory: Target folder (created if missing).
        unet: The UNet (a :class:`~diffusers.UNet2DConditionModel`).
        text_encoder: The text encoder.
        scheduler: The scheduler.
        dtype: Storage dtype of the weights.

    Raises:
        TypeError: If ``unet`` is not a diffusers UNet2DConditionModel.
    """
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    diffusers_unet: Any = unet  # diffusers' mixins are opaque to mypy
    diffusers_scheduler: Any = scheduler
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet_dir = directory / UNET_DIR
    unet_dir.mkdir(exist_ok=True)
    diffusers_unet.save_config(unet_dir)  # config.json, as save_pretrained writes it
    save_file(_cpu_state(unet, dtype), str(unet_dir / UNET_WEIGHTS), metadata={"format": "pt"})
    save_file(_cpu_state(text_encoder, dtype), str(directory / TEXT_ENCODER_FILE), metadata={"format": "pt"})
    (directory / TEXT_ENCODER_CONFIG).write_text(text_encoder.config.to_json() + "\n")
    diffusers_scheduler.save_pretrained(directory / SCHEDULER_DIR)
    logger.info("saved tiny model to %s", directory)


def load_tokenizer(directory: str | Path | None = None) -> TinyTokenizer:
    """Reads the tiny model's tokenizer from its text-encoder config alone (no weights), e.g. to check a prompt.

    Args:
        directory: A folder written by :func:`save_tiny`; the packaged weights if None.

    Returns:
        The tokenizer :func:`load_tiny` would return.

    Raises:
        FileNotFoundError: If the folder has no text-encoder config.
    """
    root = Path(directory) if directory is not None else weights_dir()
    config = TinyTextEncoderConfig.from_json((root / TEXT_ENCODER_CONFIG).read_text())
    return TinyTokenizer(config.vocabulary, config.max_length)


def load_tiny(
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    directory: str | Path | None = None,
) -> TinyModel:
    """Loads the tiny model (by default the weights shipped in the package), in eval mode, without gradients.

    Args:
        device: Where to put the weights (CPU if None).
        dtype: Floating dtype of the weights.
        directory: A folder written by :func:`save_tiny`; the packaged weights if None.

    Returns:
        The model.

    Raises:
        FileNotFoundError: If the folder lacks one of the model's files.
    """
    root = Path(directory) if directory is not None else weights_dir()
    target = torch.device(device) if device is not None else torch.device("cpu")
    unet_dir = root / UNET_DIR
    needed = [unet_dir / "config.json", unet_dir / UNET_WEIGHTS, root / TEXT_ENCODER_FILE, root / TEXT_ENCODER_CONFIG]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"tiny model files missing: {missing}")

    unet_config_dict = json.loads((unet_dir / "config.json").read_text())
    unet = UNet2DConditionModel.from_config(unet_config_dict)
    unet.load_state_dict(load_file(str(unet_dir / UNET_WEIGHTS)))

    te_config = TinyTextEncoderConfig.from_json((root / TEXT_ENCODER_CONFIG).read_text())
    text_encoder = TinyTextEncoder(te_config)
    text_encoder.load_state_dict(load_file(str(root / TEXT_ENCODER_FILE)))

    scheduler_file = root / SCHEDULER_DIR / "scheduler_config.json"
    scheduler = DDIMScheduler.from_pretrained(root / SCHEDULER_DIR) if scheduler_file.is_file() else build_scheduler()

    for module in (unet, text_encoder):
        # nn.Module.to: diffusers' override warns about fp32-only modules, which this UNet has none of.
        nn.Module.to(module, device=target, dtype=dtype).eval().requires_grad_(False)
    logger.debug("loaded tiny model from %s on %s (%s)", root, target, dtype)
    return TinyModel(unet=unet, text_encoder=text_encoder, tokenizer=text_encoder.tokenizer(), scheduler=scheduler)
