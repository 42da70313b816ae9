"""Per-rank function of the fuzz tests: one drawn UNet, layout and schedule, against the single-device UNet."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

import pcpp


def _loop(unet: UNet2DConditionModel, spec: dict[str, Any]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(spec["seed"])
    config = unet.config
    x = torch.randn(spec["images"], config.in_channels, spec["height"], spec["width"], generator=gen)
    batch = 2 * spec["images"] if spec["guidance"] else spec["images"]
    context = torch.randn(batch, 3, config.cross_attention_dim, generator=gen)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    scheduler.set_timesteps(spec["steps"])
    eps_all = []
    with torch.no_grad():
        for t in scheduler.timesteps:
            sample = torch.cat([x, x]) if spec["guidance"] else x
            eps = unet(sample, t, encoder_hidden_states=context).sample
            if spec["guidance"]:
                uncond, cond = eps.chunk(2)
                eps = uncond + 5.0 * (cond - uncond)
            eps_all.append(eps)
            x = scheduler.step(eps, t, x).prev_sample
    return eps_all


def fuzz_case(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """The relative error of every step against the single-device loop, or the pcpp error this rank raised."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    reference = _loop(unet, spec)
    comm = None
    if spec["cfg_split"]:
        from torch.distributed.device_mesh import init_device_mesh

        comm = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("cfg", "patch"))
    try:
        pcpp.convert(unet, comm=comm, **spec["convert"])
        eps = _loop(unet, spec)
    except pcpp.PCPPError as err:
        return {"error": type(err).__name__, "message": str(err)}
    errors = [float((e - r).norm() / r.norm().clamp_min(1e-12)) for e, r in zip(eps, reference, strict=True)]
    return {"error": None, "errors": errors, "finite": all(bool(e.isfinite().all()) for e in eps)}
