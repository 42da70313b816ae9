"""Tiny diffusers pipelines from random-weight components built here: nothing is downloaded.

The configurations follow diffusers' own ``get_dummy_components`` (tests/pipelines/stable_diffusion*/...), a little
smaller. The tokenizer is a real ``CLIPTokenizer`` over a byte-level vocabulary with no merges (every character a
token), written to a folder the caller gives, so prompts go through the whole text path.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pcpp.bench import text as bench_text

TEXT_DIM = 16  # hidden size of each text encoder
TOKENS = 16  # tokenizer.model_max_length: prompts are padded to this many tokens


class Family(enum.Enum):
    """Which model family the tiny pipeline imitates."""

    SD = "sd"  # one text encoder, cross-attention width TEXT_DIM
    SDXL = "sdxl"  # two text encoders (concatenated), text_time added conditioning


class Task(enum.Enum):
    """Which pipeline class of the family."""

    TEXT = "text2img"
    IMG2IMG = "img2img"
    INPAINT = "inpaint"
    CONTROLNET = "controlnet"


class Sched(enum.Enum):
    """Which scheduler the pipeline gets (all built from the same config, as ``from_config`` would)."""

    DDIM = "ddim"
    EULER = "euler"
    DPM = "dpm"


_PIPELINES: dict[tuple[Family, Task], type] = {
    (Family.SD, Task.TEXT): StableDiffusionPipeline,
    (Family.SD, Task.IMG2IMG): StableDiffusionImg2ImgPipeline,
    (Family.SD, Task.INPAINT): StableDiffusionInpaintPipeline,
    (Family.SD, Task.CONTROLNET): StableDiffusionControlNetPipeline,
    (Family.SDXL, Task.TEXT): StableDiffusionXLPipeline,
    (Family.SDXL, Task.IMG2IMG): StableDiffusionXLImg2ImgPipeline,
    (Family.SDXL, Task.INPAINT): StableDiffusionXLInpaintPipeline,
    (Family.SDXL, Task.CONTROLNET): StableDiffusionXLControlNetPipeline,
}


@dataclass(frozen=True)
class Spec:
    """One tiny pipeline: family, task, scheduler, number of ControlNets and the seed of its weights."""

    family: Family = Family.SD
    task: Task = Task.TEXT
    sched: Sched = Sched.DDIM
    controlnets: int = 1  # with Task.CONTROLNET: 1 (a ControlNetModel) or more (a MultiControlNetModel)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def write_tokenizer(folder: Path) -> CLIPTokenizer:
    """The bench's byte-level CLIP tokenizer (:func:`pcpp.bench.text.write_tokenizer`), padding and truncating to
    :data:`TOKENS` tokens.

    Args:
        folder: where ``vocab.json`` and ``merges.txt`` are written.
    """
    tokenizer: CLIPTokenizer = bench_text.write_tokenizer(folder, TOKENS)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, **extra: Any) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # not 2: the pooled output then looks for the real end token
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=TEXT_DIM,
        intermediate_size=24,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=TOKENS,
        vocab_size=len(tokenizer),
        **extra,
    )


def unet_config(family: Family, in_channels: int = 4) -> dict[str, Any]:
    """A two-level UNet (one stride-2 stage) like diffusers' test UNets, SD or SDXL style."""
    config: dict[str, Any] = {
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "sample_size": 16,
        "in_channels": in_channels,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "norm_num_groups": 4,
        "attention_head_dim": 2,
        "cross_attention_dim": TEXT_DIM,
    }
    if family is Family.SDXL:
        config.update(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=2 * TEXT_DIM,  # both encoders' hidden states, concatenated
            projection_class_embeddings_input_dim=6 * 4 + TEXT_DIM,  # 6 time ids x 4 + the pooled text embedding
        )
    return config


def _scheduler(sched: Sched) -> Any:
    config = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    if sched is Sched.DDIM:
        return DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=False)
    if sched is Sched.EULER:
        return EulerDiscreteScheduler(**config)
    return DPMSolverMultistepScheduler(**config)


def build_pipeline(spec: Spec, folder: Path) -> Any:
    """The tiny pipeline of ``spec`` in fp32 on the CPU, progress bar off; the same weights for the same spec.

    Args:
        spec: what to build.
        folder: where the tokenizer's files go.
    """
    tokenizer = write_tokenizer(folder)
    torch.manual_seed(spec.seed)
    in_channels = 9 if spec.task is Task.INPAINT else 4
    unet = UNet2DConditionModel(**unet_config(spec.family, in_channels))
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )  # two blocks: pixels = latent x 2
    components: dict[str, Any] = {"unet": unet, "vae": vae, "scheduler": _scheduler(spec.sched), "tokenizer": tokenizer}
    if spec.family is Family.SD:
        components.update(
            text_encoder=CLIPTextModel(_text_config(tokenizer)),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    else:
        components.update(
            text_encoder=CLIPTextModel(_text_config(tokenizer)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer, projection_dim=TEXT_DIM)),
            tokenizer_2=tokenizer,
        )
        if spec.task is not Task.CONTROLNET:
            components["add_watermarker"] = False
    if spec.task is Task.CONTROLNET:
        nets = [
            ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16))
            for _ in range(spec.controlnets)
        ]
        for net in nets:  # from_unet copies the UNet; fresh random zero-convs make the residuals (and the control
            # image's part in them, through the embedding's conv_out) non-zero
            for module in [
                *net.controlnet_down_blocks,
                net.controlnet_mid_block,
                net.controlnet_cond_embedding.conv_out,
            ]:
                torch.nn.init.normal_(module.weight, std=0.2)
        components["controlnet"] = nets[0] if spec.controlnets == 1 else nets
    pipe = _PIPELINES[(spec.family, spec.task)](**components)
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipe


def call_kwargs(spec: Spec, *, seed: int = 1, prompt: str = "a red fox", size: int = 32) -> dict[str, Any]:
    """Arguments of one call of the pipeline of ``spec``: real prompts, its images, 3 steps, a seeded generator."""
    gen = torch.Generator().manual_seed(100 + seed)
    kwargs: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": "blurry",
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "height": size,
        "width": size,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(seed),
    }
    image = torch.rand(1, 3, size, size, generator=gen)
    if spec.task in (Task.IMG2IMG, Task.INPAINT):
        kwargs.update(image=image, strength=0.75, num_inference_steps=4)
        if spec.task is Task.IMG2IMG:
            kwargs.pop("height")
            kwargs.pop("width")
    if spec.task is Task.INPAINT:
        mask = torch.zeros(1, 1, size, size)
        mask[..., size // 4 : 3 * size // 4, size // 4 :] = 1.0
        kwargs["mask_image"] = mask
    if spec.task is Task.CONTROLNET:
        control = [torch.rand(1, 3, size, size, generator=gen) for _ in range(spec.controlnets)]
        kwargs["image"] = control[0] if spec.controlnets == 1 else control
    return kwargs
