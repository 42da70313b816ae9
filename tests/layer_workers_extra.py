"""Per-rank functions of tests/test_added_kv.py and tests/test_freeu.py (module level, so spawned processes can
import them)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor2_0
from torch import Tensor

import pcpp

STEPS = 3


def added_kv_attention() -> Attention:
    """A small added-K/V attention as diffusers' SimpleCrossAttn blocks build it (seeded random weights), with its
    group_norm replaced by an identity so that a reference can read exactly the rows a strip reads (the GroupNorm
    has its own staleness tests)."""
    torch.manual_seed(0)
    attn = Attention(
        8, cross_attention_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6, norm_num_groups=2, bias=True,
        upcast_softmax=True, processor=AttnAddedKVProcessor2_0(),
    ).eval()  # fmt: skip
    attn.group_norm = torch.nn.Identity()
    return attn


def added_kv_staleness(rank: int, world: int, height: int, partial: float, full: bool) -> dict[str, Any]:
    """The added-K/V attention over steps a (sync), b, c (async, warmup_steps=1); returns outputs and inputs."""
    attn = added_kv_attention()
    conditioning = pcpp.Conditioning.FULL if full else pcpp.Conditioning.PARTIAL
    config = pcpp.PCPPConfig(warmup_steps=1, partial=partial, conditioning=conditioning)
    ctx = pcpp.PatchContext(config, pcpp.comm.TorchCommunicator(), unit=1, levels=0)
    layer = pcpp.layers.AddedKVAttention.from_attention(attn, ctx, name="attn")
    gen = torch.Generator().manual_seed(1)
    frames = [torch.randn(2, 8, height, 3, generator=gen) for _ in range(STEPS)]
    text = torch.randn(2, 5, 6, generator=gen)
    outs: list[Tensor] = []
    with torch.no_grad():
        for x in frames:
            ctx.begin_step(height, 3, None)
            geo = ctx.geometry
            assert geo is not None
            start = geo.strip_start(rank, 0)
            outs.append(layer(x[:, :, start : start + geo.rows[rank]], encoder_hidden_states=text))
            ctx.end_step()
    ctx.exchange.drain()  # the last step's exchange is in flight: finish it before this process leaves
    assert ctx.geometry is not None
    return {"outs": outs, "frames": frames, "text": text, "rows": ctx.geometry.rows}


def freeu_after_conversion(rank: int, world: int, uneven: bool, exact: bool = True) -> dict[str, Any]:
    """The SD dummy UNet converted with FreeU off, FreeU switched on afterwards; the zoo's DDIM loop with FreeU on,
    single-device and converted (in exact mode, or with one synchronous step and PARTIAL asynchronous steps after),
    then the FreeU traffic per step and whether FreeU is still on after revert."""
    from datetime import timedelta

    from pcpp.audit import freeu_enabled
    from zoo import ZOO
    from zoo_workers import _loop, height_for

    model = ZOO["sd-freeu"]  # the SD dummy with FreeU (s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    unet: Any = model.build()  # a UNet2DConditionModel: disable_freeu and enable_freeu are its own
    height = height_for(unet, world, uneven)
    reference = _loop(model, unet, height)
    unet.disable_freeu()
    without = _loop(model, unet, height)
    mode: dict[str, Any] = {"exact": True} if exact else {"warmup_steps": 1, "partial": 0.5}
    pcpp.convert(unet, comm=torch.distributed.group.WORLD, timeout=timedelta(seconds=30), **mode)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    parallel = _loop(model, unet, height)
    steps = pcpp.get_context(unet).stats.steps
    freeu_bytes = [s.by_kind[pcpp.LayerKind.FREEU].sent if pcpp.LayerKind.FREEU in s.by_kind else 0 for s in steps]
    pcpp.revert(unet)
    return {
        "reference": reference,
        "without": without,
        "parallel": parallel,
        "freeu_sent": freeu_bytes,
        "on_after_revert": freeu_enabled(unet),
        "height": height,
    }
