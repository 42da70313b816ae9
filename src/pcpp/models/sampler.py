"""The plain single-device sampler of the tiny model: DDIM (eta = 0) with classifier-free guidance.

Typical use::

    from pcpp.models import load_tiny, sample

    images = sample(load_tiny(), ["a red circle on a blue background"], height=64, width=64, progress=True)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor
from tqdm.auto import tqdm

from pcpp.models.tiny import DEFAULT_GUIDANCE, TinyModel

__all__ = ["encode_prompts", "sample"]


def encode_prompts(model: TinyModel, prompts: Sequence[str]) -> Tensor:
    """Encodes prompts for the UNet's cross-attention.

    Args:
        model: The model.
        prompts: The prompts (``""`` is the unconditional prompt).

    Returns:
        ``(len(prompts), max_length, cross_attention_dim)`` on the model's device and dtype.

    Raises:
        ValueError: If a prompt has a word outside the vocabulary (the message lists the vocabulary).
    """
    ids = model.tokenizer(prompts).to(model.device)
    with torch.no_grad():
        context: Tensor = model.text_encoder(ids)
    return context


@torch.no_grad()
def sample(
    model: TinyModel,
    prompts: Sequence[str],
    *,
    height: int,
    width: int,
    steps: int = 20,
    guidance: float = DEFAULT_GUIDANCE,
    seed: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Generates one image per prompt with DDIM (eta = 0) and classifier-free guidance, on one device.

    Each step calls ``model.unet(x, t, encoder_hidden_states=context).sample`` once, on the batch
    ``[x_uncond, x_cond]`` (``2 * len(prompts)`` images) with ``context = [encode(""), encode(prompts)]``.

    Args:
        model: The model (:func:`load_tiny`).
        prompts: The prompts.
        height: Image height in pixels (a multiple of 4: the UNet downsamples twice).
        width: Image width in pixels (a multiple of 4).
        steps: DDIM steps.
        guidance: Classifier-free guidance scale (1.0 = conditional prediction only).
        seed: Seed of the initial noise when ``generator`` is None.
        generator: Source of the initial noise (drawn on the generator's device, then moved).
        progress: Show a ``tqdm`` bar over the steps on stderr. tqdm's own rule decides where it appears: it is
            hidden when stderr is not a terminal (as in logs and tests). Pass ``False`` on every rank but the
            first in a distributed run.

    Returns:
        ``(len(prompts), 3, height, width)`` float32 images in [0, 1] on the model's device.

    Raises:
        ValueError: On an empty prompt list, a size that is not a positive multiple of 4, ``steps < 1``, or an
            unknown word.
    """
    if not prompts:
        raise ValueError("prompts is empty")
    if height <= 0 or width <= 0 or height % 4 or width % 4:
        raise ValueError(f"height and width must be positive multiples of 4, got {height}x{width}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    n = len(prompts)
    context = torch.cat([encode_prompts(model, [""] * n), encode_prompts(model, prompts)])
    trained: Any = model.scheduler  # diffusers' mixins are opaque to mypy
    scheduler: Any = DDIMScheduler.from_config(trained.config)
    scheduler.set_timesteps(steps, device=model.device)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 3, height, width), generator=generator, device=generator.device, dtype=torch.float32)
    x: Tensor = noise.to(model.device) * scheduler.init_noise_sigma
    # disable=None: tqdm hides the bar when stderr is not a terminal; leave=False: no finished bar in the log.
    for t in tqdm(scheduler.timesteps, desc="denoising", unit="step", disable=None if progress else True, leave=False):
        x_in = scheduler.scale_model_input(torch.cat([x, x]), t).to(model.dtype)
        out: Tensor = model.unet(x_in, t, encoder_hidden_states=context).sample
        uncond, cond = out.float().chunk(2)
        guided = uncond + guidance * (cond - uncond)
        x = scheduler.step(guided, t, x).prev_sample
    return (x.clamp(-1, 1) + 1) / 2
