"""Memory: what the layers keep between steps, and the context's shared scratch buffer."""

from __future__ import annotations

import torch

import pcpp
from dist_workers import Case, attention_buffers
from pcpp.comm import LocalCommunicator
from pcpp.context import PatchContext
from pcpp.testing import run_distributed


def test_scratch_is_one_growing_buffer_kept_for_graphs() -> None:
    ctx = PatchContext(pcpp.PCPPConfig(), LocalCommunicator(), unit=1, levels=0)
    service = ctx.exchange
    like = torch.zeros(1)
    small = service.scratch((2, 3), like)
    again = service.scratch((3, 2), like)
    assert again.data_ptr() == small.data_ptr()  # one buffer, reused by every layer
    big = service.scratch((4, 5), like)
    assert big.shape == (4, 5)
    assert big.numel() == 20
    # The outgrown buffer stays alive: a captured CUDA graph may still hold its address.
    assert service.scratch_held() == {(torch.float32, like.device): (6, 20)}
    assert service.scratch((2, 2), like).data_ptr() == big.data_ptr()
    # One buffer per dtype: alternating dtypes reuse theirs instead of stacking new ones.
    double = torch.zeros(1, dtype=torch.float64)
    assert service.scratch((2,), double).dtype == torch.float64
    assert service.scratch((2, 2), like).data_ptr() == big.data_ptr()
    assert service.scratch((2,), double).data_ptr() == service.scratch((1,), double).data_ptr()
    assert service.scratch_held() == {(torch.float32, like.device): (6, 20), (torch.float64, like.device): (2,)}
    generation = ctx.buffer_generation
    ctx.drain()
    assert service.scratch_held() == {}
    assert ctx.buffer_generation == generation + 1  # CUDAGraphUNet recaptures: its graphs used the freed buffers


def test_partial_conditioning_keeps_only_neighbour_rows() -> None:
    """After a loop, partial conditioning's attention layers hold only the neighbour rows the next step reads
    (the synchronous steps' every-strip K/V went through the shared scratch buffer); full conditioning keeps
    every other strip's K/V per layer, which its asynchronous steps read, and no slot for its own strip (read
    fresh at every step): 2 of 3 strips' worth on 3 ranks."""
    partial = Case(height=16, width=8, steps=3, convert={"warmup_steps": 2, "partial": 0.5})
    full = Case(height=24, width=8, steps=3, convert={"warmup_steps": 2, "conditioning": pcpp.Conditioning.FULL})
    for layers in run_distributed(attention_buffers, 2, partial):
        assert layers
        assert all(set(buffers) <= {"up", "down"} and buffers for buffers in layers)
    batch = 2  # guidance: uncond and cond
    for layers in run_distributed(attention_buffers, 3, full):
        assert layers
        assert all(set(buffers) == {"others"} for buffers in layers)
        assert all(buffers["others"][0] == 2 * batch for buffers in layers)
