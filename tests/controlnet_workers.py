"""Per-rank functions for the parallel-ControlNet tests (tests/test_controlnet.py), and the one-device references.

They run in spawned processes (module level, picklable arguments and results).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import Tensor, nn

import pcpp
from pipeline_parts import TEXT_DIM, TOKENS, Family, Spec, build_pipeline, unet_config
from pipeline_workers import Call

# (8, 8, 16): two stride-2 convs, so the control image is 4x the latent (SD's real embedding: 8x; the tiny
# pipelines: 2x). The converted ControlNet must take the factor from the model.
EMBEDDING_CHANNELS = (8, 8, 16)
FACTOR = 4


def build_controlnet(family: Family, seed: int = 0) -> ControlNetModel:
    """A ControlNet built from the tiny UNet of ``family``, with random (not zero) output convs, so the residuals
    and the control image's part in them are non-zero."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_config(family))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=EMBEDDING_CHANNELS)
    for module in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
        torch.nn.init.normal_(module.weight, std=0.2)
    return net.eval()


def inputs(family: Family, height: int, width: int, timestep: int, *, cond_scale: int = FACTOR) -> dict[str, Any]:
    """One call's arguments: a CFG-sized batch of 2, a control image ``cond_scale`` times the latent."""
    gen = torch.Generator().manual_seed(height * 1000 + width * 10 + timestep)
    text = 2 * TEXT_DIM if family is Family.SDXL else TEXT_DIM
    kwargs: dict[str, Any] = {
        "sample": torch.randn(2, 4, height, width, generator=gen),
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(2, TOKENS, text, generator=gen),
        "controlnet_cond": torch.rand(2, 3, cond_scale * height, cond_scale * width, generator=gen),
        "return_dict": False,
    }
    if family is Family.SDXL:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, TEXT_DIM, generator=gen),
            "time_ids": torch.randn(2, 6, generator=gen),
        }
    return kwargs


# Each image: (height, width, timesteps of its steps). The second image changes the size (a new image, a new split).
def images(heights: tuple[int, int]) -> list[tuple[int, int, tuple[int, ...]]]:
    return [(heights[0], 12, (800, 500)), (heights[1], 10, (700,))]


def build_unet(family: Family) -> UNet2DConditionModel:
    torch.manual_seed(7)
    return UNet2DConditionModel(**unet_config(family)).eval()


def unet_output(unet: nn.Module, kwargs: dict[str, Any], res: list[Tensor]) -> Tensor:
    """The UNet's output on the ControlNet's inputs and residuals ``res`` (down ones, then the mid one)."""
    names = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs")
    with torch.no_grad():
        return unet(
            **{k: v for k, v in kwargs.items() if k in names},
            down_block_additional_residuals=res[:-1],
            mid_block_additional_residual=res[-1],
        ).sample


def residuals(net: nn.Module, kwargs: dict[str, Any]) -> list[Tensor]:
    with torch.no_grad():
        down, mid = net(**kwargs)
    return [*down, mid]


def reference(family: Family, heights: tuple[int, int]) -> list[list[Tensor]]:
    """Every call's residuals on one device, unconverted."""
    net = build_controlnet(family)
    return [residuals(net, inputs(family, h, w, t)) for h, w, ts in images(heights) for t in ts]


def direct(rank: int, world: int, family: Family, heights: tuple[int, int]) -> dict[str, Any]:
    """This rank's residuals of every call of a converted ControlNet (exact); the heights its conditioning
    embedding's converted convs saw; a wrong-sized control image's error; the full residuals after revert."""
    net = pcpp.convert(build_controlnet(family), exact=True)
    seen: dict[str, list[int]] = {"embedding_in": [], "embedding_out": [], "body_in": []}
    embedding = net.controlnet_cond_embedding
    handles = [
        embedding.blocks[0].register_forward_pre_hook(lambda _m, a: seen["embedding_in"].append(a[0].shape[2])),
        embedding.register_forward_hook(lambda _m, _a, out: seen["embedding_out"].append(out.shape[2])),
        net.down_blocks[0].register_forward_pre_hook(
            lambda _m, a, kw: seen["body_in"].append(kw["hidden_states"].shape[2]), with_kwargs=True
        ),
    ]
    out: dict[str, Any] = {"calls": [], "converted": pcpp.is_converted(net)}
    for h, w, steps in images(heights):
        for t in steps:
            out["calls"].append(residuals(net, inputs(family, h, w, t)))
    for handle in handles:
        handle.remove()
    out["seen"] = seen
    before = (pcpp.get_context(net).image, pcpp.get_context(net).step)
    try:
        residuals(net, inputs(family, heights[0], 12, 300, cond_scale=FACTOR - 1))
        out["error"] = None
    except pcpp.PCPPError as error:
        out["error"] = (type(error).__name__, str(error))
    out["clock_unchanged"] = before == (pcpp.get_context(net).image, pcpp.get_context(net).step)
    first = inputs(family, heights[0], 12, 800)
    out["after_error"] = residuals(net, first)  # a new image (the timestep rose)
    # The converted UNet keeps these rows as they are; residuals of any other height are refused.
    unet = pcpp.convert(build_unet(family), exact=True)
    out["unet"] = unet_output(unet, first, out["after_error"])
    try:
        unet_output(unet, first, [*(t[:, :, 1:] for t in out["after_error"][:-1]), out["after_error"][-1]])
        out["unet_error"] = None
    except pcpp.PCPPError as error:
        out["unet_error"] = (type(error).__name__, str(error))
    assert pcpp.revert(net) is net
    out["reverted"] = not pcpp.is_converted(net)
    out["after_revert"] = residuals(net, inputs(family, heights[0], 12, 800))
    return out


def pipeline_run(rank: int, world: int, spec: Spec, calls: list[Call], options: dict[str, Any]) -> dict[str, Any]:
    """``pcpp.parallelize(pipe, **options)`` and the images of ``calls``; the shapes of what each ControlNet
    returned to the UNet (first call) and whether every ControlNet was converted."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(spec, Path(tmp))
        pcpp.parallelize(pipe, **options)
        nets = list(getattr(pipe.controlnet, "nets", [pipe.controlnet]))
        shapes: list[list[tuple[int, ...]]] = []

        def record(_m: nn.Module, _a: Any, output: Any) -> None:
            if len(shapes) < len(nets):
                shapes.append([tuple(t.shape) for t in [*output[0], output[1]]])

        handles = [net.register_forward_hook(record) for net in nets]
        result: dict[str, Any] = {
            "converted": [pcpp.is_converted(net) for net in nets],
            "images": [pipe(**call.kwargs(spec)).images for call in calls],
            "shapes": shapes,
        }
        geometry = pcpp.get_context(pipe.unet).geometry
        assert geometry is not None
        result["rows"] = geometry.rows
        for handle in handles:
            handle.remove()
        pcpp.revert(pipe)
        result["reverted"] = not any(pcpp.is_converted(net) for net in nets)
        return result


__all__ = ["build_controlnet", "build_unet", "unet_output", "direct", "images", "inputs", "pipeline_run", "reference"]
