"""The zoo: tiny UNets with the configurations of diffusers' own pipeline and model tests, random seeded weights.

Each entry builds the UNet exactly as the ``get_dummy_components`` / ``dummy_unet`` of the diffusers test it is
named after (diffusers' ``tests/pipelines/...`` and ``tests/models/unets/...``), and the inputs the pipeline gives
it: extra channels concatenated to the latent (inpainting mask and masked image, the upscalers' low-resolution
image), text embeddings, added conditions, class labels, ControlNet and T2I-Adapter residuals. ``expect`` says what
pcpp must do with it in exact mode: reproduce the single-device UNet, or refuse at conversion with a message that
contains ``refusal``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    T2IAdapter,
    UNet2DConditionModel,
    UNet2DModel,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.attention_processor import AttnAddedKVProcessor
from torch import Tensor, nn

Cond = dict[str, Any]


class Expect(enum.Enum):
    EXACT = "exact"
    REFUSED = "refused"


@dataclass(frozen=True)
class ZooModel:
    """One UNet of the zoo.

    ``extra_channels`` are fixed channels concatenated to the latent at every call; ``hint_scale`` is the size
    of a hint or conditioning image relative to the latent (0: none); ``refusal`` is a piece of the expected
    refusal message (the module's name or the reason).
    """

    name: str
    source: str  # the diffusers test whose dummy configuration this is
    build: Callable[[], nn.Module]
    latent_channels: int = 4
    extra_channels: int = 0
    expect: Expect = Expect.EXACT
    refusal: str = ""
    side: str = ""  # "controlnet" or "t2i": residuals computed outside the UNet, as the pipelines do
    video: bool = False  # a 3-D / video UNet: (B, C, F, H, W) samples, no 2-D loop to compare with
    fast: bool = False  # in the CI subset


def _seeded(fn: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return fn().eval()

    build.__name__ = fn.__name__
    return build


# ----- Stable Diffusion family -------------------------------------------------------------------------------------


def sd(**overrides: Any) -> UNet2DConditionModel:
    """tests/pipelines/stable_diffusion/test_stable_diffusion.py (get_dummy_components)."""
    config: dict[str, Any] = {
        "block_out_channels": (4, 8),
        "layers_per_block": 1,
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "norm_num_groups": 2,
    }
    config.update(overrides)
    return UNet2DConditionModel(**config)


def sd_freeu() -> UNet2DConditionModel:
    """The SD dummy with FreeU as in tests/pipelines/test_pipelines_common.py (SDFunctionTesterMixin)."""
    unet = sd()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    return unet


def sd2() -> UNet2DConditionModel:
    """tests/pipelines/stable_diffusion_2/test_stable_diffusion.py."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=32,
    )


def sdxl() -> UNet2DConditionModel:
    """tests/pipelines/stable_diffusion_xl/test_stable_diffusion_xl.py."""
    return UNet2DConditionModel(
        block_out_channels=(2, 4),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )


def x4_upscaler() -> UNet2DConditionModel:
    """tests/pipelines/stable_diffusion_2/test_stable_diffusion_upscale.py (class labels = noise level)."""
    return UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )


def stable_unclip() -> UNet2DConditionModel:
    """tests/pipelines/stable_unclip/test_stable_unclip.py (class_embed_type="projection")."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        attention_head_dim=(2, 4),
        class_embed_type="projection",
        projection_class_embeddings_input_dim=64,
        cross_attention_dim=32,
        layers_per_block=1,
        upcast_attention=True,
        use_linear_projection=True,
    )


def ldm_text2img() -> UNet2DConditionModel:
    """tests/pipelines/latent_diffusion/test_latent_diffusion.py."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )


def t2i_unet() -> UNet2DConditionModel:
    """tests/pipelines/controlnet... t2i_adapter/test_stable_diffusion_adapter.py (full adapter)."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )


# ----- UNet2DModel --------------------------------------------------------------------------------------------------


def ddpm() -> UNet2DModel:
    """tests/pipelines/ddpm/test_ddpm.py (dummy_uncond_unet)."""
    return UNet2DModel(
        block_out_channels=(4, 8),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


def ldm_superres() -> UNet2DModel:
    """tests/pipelines/latent_diffusion/test_latent_diffusion_superresolution.py."""
    return UNet2DModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=6,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


# ----- SimpleCrossAttn families: DeepFloyd IF, Kandinsky, unCLIP ----------------------------------------------------


def _if(superres: bool, **overrides: Any) -> UNet2DConditionModel:
    """tests/pipelines/deepfloyd_if/__init__.py (_get_dummy_components, _get_superresolution_dummy_components)."""
    config: dict[str, Any] = {
        "sample_size": 32,
        "layers_per_block": [1, 2] if superres else 1,
        "block_out_channels": [32, 64],
        "down_block_types": ["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": ["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
        "in_channels": 6 if superres else 3,
        "out_channels": 6,
        "cross_attention_dim": 32,
        "encoder_hid_dim": 32,
        "attention_head_dim": 8,
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": 2,
        "cross_attention_norm": "group_norm",
        "resnet_time_scale_shift": "scale_shift",
        "act_fn": "gelu",
    }
    if superres:
        config.update(
            class_embed_type="timestep",
            mid_block_scale_factor=1.414,
            time_embedding_act_fn="gelu",
            time_embedding_dim=32,
        )
    config.update(overrides)
    unet = UNet2DConditionModel(**config)
    unet.set_attn_processor(AttnAddedKVProcessor())  # as the IF tests do
    return unet


def if_stage1() -> UNet2DConditionModel:
    return _if(False)


def if_superres() -> UNet2DConditionModel:
    return _if(True)


def if_stage1_only_cross() -> UNet2DConditionModel:
    return _if(False, only_cross_attention=True)


_KANDINSKY_ADD = {"text_image": "text_image_proj", "image": "image_proj", "image_hint": "image_proj"}


def _kandinsky(add: str, in_channels: int, cross: int, **overrides: Any) -> UNet2DConditionModel:
    """tests/pipelines/kandinsky/test_kandinsky*.py (2.1, text_image) and kandinsky2_2/ (image, image_hint)."""
    config: dict[str, Any] = {
        "in_channels": in_channels,
        "out_channels": 8,
        "addition_embed_type": add,
        "down_block_types": ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        "up_block_types": ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "encoder_hid_dim": 32,
        "encoder_hid_dim_type": _KANDINSKY_ADD[add],
        "cross_attention_dim": cross,
        "attention_head_dim": 4,
        "resnet_time_scale_shift": "scale_shift",
        "class_embed_type": None,
    }
    config.update(overrides)
    return UNet2DConditionModel(**config)


def kandinsky21() -> UNet2DConditionModel:
    return _kandinsky("text_image", 4, 32)


def kandinsky21_inpaint() -> UNet2DConditionModel:
    return _kandinsky("text_image", 9, 32)


def kandinsky22() -> UNet2DConditionModel:
    return _kandinsky("image", 4, 100)


def kandinsky22_inpaint() -> UNet2DConditionModel:
    return _kandinsky("image", 9, 100)


def kandinsky22_controlnet() -> UNet2DConditionModel:
    return _kandinsky("image_hint", 8, 100)


def kandinsky22_controlnet_only_cross() -> UNet2DConditionModel:
    return _kandinsky("image_hint", 8, 100, only_cross_attention=True)


def kandinsky21_only_cross() -> UNet2DConditionModel:
    return _kandinsky("text_image", 4, 32, only_cross_attention=True)


def unclip_decoder() -> UNet2DConditionModel:
    """tests/pipelines/unclip/test_unclip.py (dummy_decoder; class_embed_type="identity")."""
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=100,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )


# ----- 3-D and video UNets (tests/models/unets/) -------------------------------------------------------------------


def unet3d() -> UNet3DConditionModel:
    return UNet3DConditionModel(
        block_out_channels=(4, 8),
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        out_channels=4,
        in_channels=4,
        layers_per_block=1,
        sample_size=16,
    )


def unet_svd() -> UNetSpatioTemporalConditionModel:
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,
        num_attention_heads=8,
        out_channels=4,
        in_channels=4,
        layers_per_block=2,
        sample_size=32,
        projection_class_embeddings_input_dim=32 * 3,
        addition_time_embed_dim=32,
    )


def unet_motion() -> UNetMotionModel:
    return UNetMotionModel(
        block_out_channels=(16, 32),
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=16,
        num_attention_heads=2,
        out_channels=4,
        in_channels=4,
        layers_per_block=1,
        sample_size=16,
    )


# ----- the zoo -----------------------------------------------------------------------------------------------------

_NOT_2D = "pcpp.convert expects a diffusers UNet"

ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in [
        ZooModel("sd", "stable_diffusion/test_stable_diffusion.py", _seeded(sd), fast=True),
        ZooModel(
            "sd-inpaint",
            "stable_diffusion/test_stable_diffusion_inpaint.py",
            _seeded(lambda: sd(in_channels=9)),
            extra_channels=5,
        ),
        ZooModel(
            "lcm",
            "latent_consistency_models/test_latent_consistency_models.py",
            _seeded(lambda: sd(time_cond_proj_dim=256)),
        ),
        ZooModel("sd2", "stable_diffusion_2/test_stable_diffusion.py", _seeded(sd2)),
        ZooModel("sdxl", "stable_diffusion_xl/test_stable_diffusion_xl.py", _seeded(sdxl), fast=True),
        ZooModel(
            "x4-upscaler", "stable_diffusion_2/test_stable_diffusion_upscale.py", _seeded(x4_upscaler), extra_channels=3
        ),
        ZooModel("stable-unclip", "stable_unclip/test_stable_unclip.py", _seeded(stable_unclip)),
        ZooModel("ldm-text2img", "latent_diffusion/test_latent_diffusion.py", _seeded(ldm_text2img)),
        ZooModel("controlnet", "controlnet/test_controlnet.py", _seeded(sd), side="controlnet", fast=True),
        ZooModel("t2i-adapter", "t2i_adapter/test_stable_diffusion_adapter.py", _seeded(t2i_unet), side="t2i"),
        ZooModel("ddpm", "ddpm/test_ddpm.py", _seeded(ddpm), latent_channels=3, fast=True),
        ZooModel(
            "ldm-superres",
            "latent_diffusion/test_latent_diffusion_superresolution.py",
            _seeded(ldm_superres),
            latent_channels=3,
            extra_channels=3,
        ),
        ZooModel(
            "sd-freeu",
            "test_pipelines_common.py (SDFunctionTesterMixin)",
            _seeded(sd_freeu),
            fast=True,
        ),
        ZooModel(
            "if-stage1",
            "deepfloyd_if/__init__.py",
            _seeded(if_stage1),
            latent_channels=3,
            fast=True,
        ),
        ZooModel(
            "if-superres",
            "deepfloyd_if/__init__.py",
            _seeded(if_superres),
            latent_channels=3,
            extra_channels=3,
        ),
        ZooModel(
            "if-stage1-only-cross",
            "deepfloyd_if/__init__.py + only_cross_attention=True",
            _seeded(if_stage1_only_cross),
            latent_channels=3,
        ),
        ZooModel("kandinsky21", "kandinsky/test_kandinsky.py", _seeded(kandinsky21)),
        ZooModel(
            "kandinsky21-inpaint",
            "kandinsky/test_kandinsky_inpaint.py",
            _seeded(kandinsky21_inpaint),
            extra_channels=5,
        ),
        ZooModel(
            "kandinsky21-only-cross",
            "kandinsky/test_kandinsky.py + only_cross_attention=True",
            _seeded(kandinsky21_only_cross),
        ),
        ZooModel(
            "kandinsky22",
            "kandinsky2_2/test_kandinsky.py",
            _seeded(kandinsky22),
            fast=True,
        ),
        ZooModel(
            "kandinsky22-inpaint",
            "kandinsky2_2/test_kandinsky_inpaint.py",
            _seeded(kandinsky22_inpaint),
            extra_channels=5,
        ),
        ZooModel(
            "kandinsky22-controlnet",
            "kandinsky2_2/test_kandinsky_controlnet.py",
            _seeded(kandinsky22_controlnet),
        ),
        ZooModel(
            "kandinsky22-controlnet-only-cross",
            "kandinsky2_2/test_kandinsky_controlnet.py + only_cross_attention=True",
            _seeded(kandinsky22_controlnet_only_cross),
            fast=True,
        ),
        ZooModel(
            "unclip-decoder",
            "unclip/test_unclip.py",
            _seeded(unclip_decoder),
            latent_channels=3,
        ),
        ZooModel(
            "unet3d",
            "models/unets/test_models_unet_3d_condition.py",
            _seeded(unet3d),
            video=True,
            expect=Expect.REFUSED,
            refusal="got UNet3DConditionModel",
        ),
        ZooModel(
            "svd",
            "models/unets/test_models_unet_spatiotemporal.py",
            _seeded(unet_svd),
            video=True,
            expect=Expect.REFUSED,
            refusal=_NOT_2D,
            fast=True,
        ),
        ZooModel(
            "motion",
            "models/unets/test_models_unet_motion.py",
            _seeded(unet_motion),
            video=True,
            expect=Expect.REFUSED,
            refusal=_NOT_2D,
        ),
    ]
}


# ----- inputs -------------------------------------------------------------------------------------------------------


def unit(unet: nn.Module) -> int:
    """Rows each strip must be a multiple of: 2 ** (down blocks with a downsampler)."""
    return 2 ** sum(1 for block in getattr(unet, "down_blocks", ()) if getattr(block, "downsamplers", None))


def conditioning(model: ZooModel, unet: nn.Module, batch: int, height: int, width: int, gen: torch.Generator) -> Cond:
    """The UNet keyword arguments the model's pipeline passes (apart from sample and timestep), fixed per image."""
    config: Any = unet.config  # diffusers' FrozenDict of the UNet's settings
    kwargs: Cond = {}
    if isinstance(unet, UNet2DModel):
        return kwargs
    cross = config.cross_attention_dim
    hid = config.encoder_hid_dim
    kwargs["encoder_hidden_states"] = torch.randn(batch, 7, hid if hid else cross, generator=gen)
    added: Cond = {}
    add = config.addition_embed_type
    if add == "text_time":
        text = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {
            "text_embeds": torch.randn(batch, text, generator=gen),
            "time_ids": torch.rand(batch, 6, generator=gen),
        }
    elif add in ("text_image", "image", "image_hint"):
        image_dim = cross if add == "text_image" else hid
        added = {"image_embeds": torch.randn(batch, image_dim, generator=gen)}
        if add == "text_image":  # Kandinsky 2.1 also passes the pooled text embedding
            added["text_embeds"] = torch.randn(batch, cross, generator=gen)
        if add == "image_hint":
            added["hint"] = torch.randn(batch, 3, 8 * height, 8 * width, generator=gen)
    if added:
        kwargs["added_cond_kwargs"] = added
    if config.time_cond_proj_dim is not None:
        kwargs["timestep_cond"] = torch.randn(batch, config.time_cond_proj_dim, generator=gen)
    if config.num_class_embeds is not None:
        kwargs["class_labels"] = torch.randint(0, config.num_class_embeds, (batch,), generator=gen)
    elif config.class_embed_type == "timestep":
        kwargs["class_labels"] = torch.randint(0, 1000, (batch,), generator=gen)
    elif config.class_embed_type == "projection":
        kwargs["class_labels"] = torch.randn(batch, config.projection_class_embeddings_input_dim, generator=gen)
    elif config.class_embed_type == "identity":
        kwargs["class_labels"] = torch.randn(batch, 4 * config.block_out_channels[0], generator=gen)
    return kwargs


def controlnet_for(unet: UNet2DConditionModel) -> ControlNetModel:
    """tests/pipelines/controlnet/test_controlnet.py's ControlNet, built from the UNet (seeded random weights)."""
    torch.manual_seed(1)
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32)).eval()


def t2i_residuals(batch: int, height: int, width: int, gen: torch.Generator) -> list[Tensor]:
    """tests/pipelines/t2i_adapter/test_stable_diffusion_adapter.py's full adapter, on a random image."""
    torch.manual_seed(1)
    adapter = T2IAdapter(
        in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=2, adapter_type="full_adapter"
    ).eval()
    image = torch.randn(batch, 3, 2 * height, 2 * width, generator=gen)
    with torch.no_grad():
        return [f.clone() for f in adapter(image)]
