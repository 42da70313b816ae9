"""pcpp's own small diffusion model and its synthetic training data.

:func:`load_tiny` loads the tiny pixel-space text-to-image UNet shipped with pcpp (trained on the coloured
shapes of :mod:`pcpp.models.shapes`), :func:`encode_prompts` encodes prompts for it and :func:`sample` is the
plain single-device DDIM sampler with classifier-free guidance. See ``docs/tiny-model.md``.
"""

from pcpp.models.sampler import encode_prompts, sample
from pcpp.models.shapes import COLORS, SHAPES, VOCABULARY, SceneBatch, render_scenes, sample_scenes, scene_captions
from pcpp.models.text import TinyTextEncoder, TinyTextEncoderConfig, TinyTokenizer
from pcpp.models.tiny import (
    DEFAULT_GUIDANCE,
    TinyModel,
    build_scheduler,
    build_unet,
    load_tiny,
    load_tokenizer,
    save_tiny,
    unet_config,
    weights_dir,
)

__all__ = [
    "COLORS",
    "DEFAULT_GUIDANCE",
    "SHAPES",
    "VOCABULARY",
    "SceneBatch",
    "TinyModel",
    "TinyTextEncoder",
    "TinyTextEncoderConfig",
    "TinyTokenizer",
    "build_scheduler",
    "build_unet",
    "encode_prompts",
    "load_tiny",
    "load_tokenizer",
    "render_scenes",
    "sample",
    "sample_scenes",
    "save_tiny",
    "scene_captions",
    "unet_config",
    "weights_dir",
]
