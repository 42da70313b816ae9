"""Per-rank functions of the zoo tests (tests/test_zoo.py): module level, so spawned processes can import them."""

from __future__ import annotations

import traceback
from datetime import timedelta
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

import pcpp
from pcpp.errors import PCPPError
from zoo import ZOO, ZooModel, conditioning, controlnet_for, t2i_residuals, unit

STEPS = 3
BATCH = 2
WIDTH = 12


def height_for(unet: nn.Module, world: int, uneven: bool) -> int:
    """A latent height: 4 units on 2 ranks; 6 units (2 each) or 7 units (3, 2, 2: strips differ) on 3."""
    units = 4 if world == 2 else (7 if uneven else 6)
    return max(units, 2 * world) * unit(unet)


def _loop(model: ZooModel, unet: nn.Module, height: int) -> list[Tensor]:
    """A DDIM loop the way the model's pipeline calls its UNet; returns every step's UNet output and the latent."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(BATCH, model.latent_channels, height, WIDTH, generator=gen)
    extra = torch.randn(BATCH, model.extra_channels, height, WIDTH, generator=gen)
    kwargs = conditioning(model, unet, BATCH, height, WIDTH, gen)
    controlnet = controlnet_for(unet) if model.side == "controlnet" else None
    control_image = torch.randn(BATCH, 3, 2 * height, 2 * WIDTH, generator=gen)
    adapter = t2i_residuals(BATCH, height, WIDTH, gen) if model.side == "t2i" else None
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(STEPS)
    outs = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = torch.cat([x, extra], dim=1)
            call = dict(kwargs)
            if controlnet is not None:
                down, mid = controlnet(sample, t, encoder_hidden_states=kwargs["encoder_hidden_states"],
                                       controlnet_cond=control_image, return_dict=False)  # fmt: skip
                call["down_block_additional_residuals"] = down
                call["mid_block_additional_residual"] = mid
            if adapter is not None:
                call["down_intrablock_additional_residuals"] = [r.clone() for r in adapter]  # the UNet pops them
            out = unet(sample, t, **call).sample
            eps = out[:, : model.latent_channels]
            outs.append(out)
            x = scheduler.step(eps, t, x).prev_sample
    return [*outs, x]


def zoo_run(rank: int, world: int, names: list[str], uneven: bool) -> dict[str, dict[str, Any]]:
    """Each named UNet: the single-device loop, then pcpp.convert(exact=True) and the same loop on ``world`` ranks.

    Returns, per name: ``status`` ("exact" with ``max_error`` and ``scale``, "refused" with ``message`` and
    ``unchanged``, or "error" with a traceback: anything else than the two allowed outcomes) and ``height``.
    """
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        model = ZOO[name]
        unet = model.build()
        height = height_for(unet, world, uneven)
        result: dict[str, Any] = {"height": height}
        try:
            reference = [] if model.video else _loop(model, unet, height)
            before = [id(m) for m in unet.modules()]
            try:
                pcpp.convert(unet, comm=torch.distributed.group.WORLD, exact=True, timeout=timedelta(seconds=30))
            except PCPPError as err:  # ConversionError, UnsupportedModuleError included
                unchanged = before == [id(m) for m in unet.modules()] and not pcpp.is_converted(unet)
                result.update(status="refused", message=f"{type(err).__name__}: {err}", unchanged=unchanged)
                results[name] = result
                continue
            if model.video:
                raise AssertionError(f"pcpp.convert accepted the video UNet {type(unet).__name__}; no loop for it")
            parallel = _loop(model, unet, height)
            pcpp.revert(unet)
            result.update(
                status="exact",
                reference=reference,
                parallel=parallel,
                max_error=max(float((p - r).abs().max()) for p, r in zip(parallel, reference, strict=True)),
                scale=max(float(r.abs().max()) for r in reference),
            )
        except Exception:  # recorded, so the test names the model and shows why
            result.update(status="error", message=traceback.format_exc())
        results[name] = result
    return results
