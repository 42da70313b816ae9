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

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from pcpp.models.shapes import VOCABULARY

__all__ = [
    "DEFAULT_GUIDANCE",
    "TinyModel",
    "TinyTextEncoder",
    "TinyTextEncoderConfig",
    "TinyTokenizer",
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

PAD: Final = "<pad>"
BOS: Final = "<bos>"


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


class TinyTokenizer:
    """Word tokenizer over a closed vocabulary.

    A prompt is lower-cased, commas and full stops are dropped, and it is split on whitespace. Token ids are
    ``[BOS, words..., PAD, ...]`` of fixed length ``max_length``; the empty prompt (all padding after BOS) is the
    unconditional input used for classifier-free guidance.

    Args:
        vocabulary: The known words (without the special tokens).
        max_length: Tokens per prompt, BOS included.

    Raises:
        ValueError: If the vocabulary has duplicates or ``max_length < 2``.
    """

    def __init__(self, vocabulary: Sequence[str], max_length: int) -> None:
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has duplicate words")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.vocabulary: tuple[str, ...] = tuple(vocabulary)
        self.max_length = max_length
        self._ids: dict[str, int] = {w: i for i, w in enumerate((PAD, BOS, *self.vocabulary))}

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self._ids)

    def words(self, prompt: str) -> list[str]:
        """Splits a prompt into words, checking each against the vocabulary.

        Args:
            prompt: The prompt.

        Returns:
            The words.

        Raises:
            ValueError: If a word is not in the vocabulary (the message lists the vocabulary) or the prompt is too
                long.
        """
        words = re.sub(r"[,.]", " ", prompt.lower()).split()
        unknown = [w for w in words if w not in self._ids or w in (PAD, BOS)]
        if unknown:
            raise ValueError(
                f"unknown word(s) {unknown} in prompt {prompt!r}; the tiny model knows only: "
                + ", ".join(self.vocabulary)
            )
        if len(words) > self.max_length - 1:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {self.max_length - 1} fit")
        return words

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """Tokenizes prompts.

        Args:
            prompts: The prompts (``""`` for unconditional).

        Returns:
            ``(len(prompts), max_length)`` int64 token ids.

        Raises:
            ValueError: As :meth:`words`.
        """
        rows = []
        for prompt in prompts:
            ids = [self._ids[BOS]] + [self._ids[w] for w in self.words(prompt)]
            rows.append(ids + [self._ids[PAD]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)


@dataclass(frozen=True)
class TinyTextEncoderConfig:
    """Shape of a :class:`TinyTextEncoder`.

    Attributes:
        vocabulary: Known words, in token-id order after the special tokens.
        max_length: Tokens per prompt.
        width: Transformer width.
        layers: Transformer layers.
        heads: Attention heads.
        output_dim: Output width (the UNet's ``cross_attention_dim``).
    """

    vocabulary: tuple[str, ...] = VOCABULARY
    max_length: int = 20
    width: int = 128
    layers: int = 2
    heads: int = 4
    output_dim: int = 128

    def to_json(self) -> str:
        """Returns the config as JSON text."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TinyTextEncoderConfig:
        """Parses :meth:`to_json` output.

        Args:
            text: The JSON text.

        Returns:
            The config.
        """
        data = json.loads(text)
        data["vocabulary"] = tuple(data["vocabulary"])
        return cls(**data)


class TinyTextEncoder(nn.Module):
    """Token embedding + learned positions + small pre-norm transformer, projected to the UNet's context width.

    Args:
        config: The encoder's shape.
    """

    def __init__(self, config: TinyTextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = len(config.vocabulary) + 2
        self.token_embedding = nn.Embedding(vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.width,
                config.heads,
                dim_feedforward=4 * config.width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.layers)
        )
        self.final_norm = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, config.output_dim)

    def tokenizer(self) -> TinyTokenizer:
        """Returns the tokenizer that matches this encoder."""
        return TinyTokenizer(self.config.vocabulary, self.config.max_length)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Encodes token ids.

        Args:
            input_ids: ``(B, T)`` int64 ids from :class:`TinyTokenizer`.

        Returns:
            ``(B, T, output_dim)`` context for the UNet's cross-attention.
        """
        h = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        for layer in self.layers:
            h = layer(h)
        out: Tensor = self.proj(self.final_norm(h))
        return out


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
