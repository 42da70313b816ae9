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
    attn.group_norm = torch.nn.Identity()  # type: ignore[assignment]
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
