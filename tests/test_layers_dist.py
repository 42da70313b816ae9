"""Each parallel layer on its own, on real gloo groups, against a full-image reference built from the frames.

Every worker runs three steps with different inputs a, b, c: step 0 synchronous, steps 1 and 2 asynchronous
(warmup_steps=1). The references read the neighbours' rows from the frame of exactly one step earlier, so these
tests pin staleness to one step.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from dist_workers import attention_staleness, conv_staleness, groupnorm_staleness, shift_staleness
from pcpp.testing import run_distributed
from reference import MaskedSelfAttention

# Same sums over the same windows, possibly blocked differently: fp32 rounding only.
RTOL = ATOL = 1e-5


def _mixed(frames: list[torch.Tensor], step: int, rows: tuple[int, ...], rank: int) -> torch.Tensor:
    """The image as rank ``rank`` sees it at ``step``: its own rows fresh, every other row one step old."""
    if step == 0:
        return frames[0]
    start = sum(rows[:rank])
    mixed = frames[step - 1].clone()
    mixed[:, :, start : start + rows[rank]] = frames[step][:, :, start : start + rows[rank]]
    return mixed


@pytest.mark.parametrize(("world", "height"), [(2, 8), (3, 7), (4, 9)])
def test_conv_halo_is_exactly_one_step_old(world: int, height: int) -> None:
    """A 3x3 conv: step 0 equals the full conv; step t reads the neighbours' rows of step t-1."""
    for rank, result in enumerate(run_distributed(conv_staleness, world, height)):
        rows = result["rows"]
        start = sum(rows[:rank])
        for step in range(3):
            full = F.conv2d(_mixed(result["frames"], step, rows, rank), result["weight"], result["bias"], padding=1)
            expected = full[:, :, start : start + rows[rank]]
            torch.testing.assert_close(result["outs"][step], expected, rtol=RTOL, atol=ATOL, msg=f"step {step}")


@pytest.mark.parametrize(
    ("world", "height", "partial", "full"),
    [(2, 8, 0.0, False), (3, 10, 0.3, False), (4, 9, 0.5, False), (3, 10, 1.0, False), (3, 10, 0.3, True)],
)
def test_attention_reads_exactly_the_specified_keys(world: int, height: int, partial: float, full: bool) -> None:
    """Step 0 attends to every strip (fresh). After warmup, PARTIAL attends to the own strip (fresh) plus ceil(p *
    rows) boundary rows of each adjacent strip from the previous step; FULL to every other strip from the
    previous step. The reference is a masked attention over the image as the rank sees it.
    """
    results = run_distributed(attention_staleness, world, height, partial, full)
    attn = Attention(8, heads=2, dim_head=4).eval()
    attn.load_state_dict(results[0]["state"])
    for rank, result in enumerate(results):
        rows = result["rows"]
        start = sum(rows[:rank])
        for step in range(3):
            mask_partial = 1.0 if (step == 0 or full) else partial
            # p >= N-1 strips never applies here; mask_partial=1 with only adjacent strips is not "every strip",
            # so FULL and step 0 use an all-true mask instead.
            processor = MaskedSelfAttention(height, 3, rows, mask_partial, 0)
            if step == 0 or full:
                processor.masks = {k: torch.ones_like(m) for k, m in processor.masks.items()}
            attn.set_processor(processor)
            with torch.no_grad():
                expected = attn(_mixed(result["frames"], step, rows, rank))[:, :, start : start + rows[rank]]
            torch.testing.assert_close(result["outs"][step], expected, rtol=RTOL, atol=ATOL, msg=f"step {step}")
        if partial == 0.0 and not full:
            assert result["sent"][1:] == [(0, 0), (0, 0)]  # nothing sent after warmup


@pytest.mark.parametrize(("world", "height"), [(2, 8), (3, 7)])
def test_groupnorm_uses_corrected_statistics_of_the_previous_step(world: int, height: int) -> None:
    """Step 0: exact GroupNorm. Step t: raw moments M_k = global_k(t-1) + own_k(t) - own_k(t-1) (DistriFusion's
    corrected asynchronous GroupNorm), computed here in float64 from the frames."""
    for rank, result in enumerate(run_distributed(groupnorm_staleness, world, height)):
        rows, frames = result["rows"], result["frames"]
        start = sum(rows[:rank])
        weight, bias = result["weight"], result["bias"]
        for step in range(3):
            own = frames[step][:, :, start : start + rows[rank]]
            if step == 0:
                expected = F.group_norm(frames[0], 2, weight, bias, 1e-5)[:, :, start : start + rows[rank]]
            else:

                def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    g = x.double().reshape(x.shape[0], 2, -1)
                    return g.mean(-1), (g * g).mean(-1)

                prev_own = frames[step - 1][:, :, start : start + rows[rank]]
                g1, g2 = moments(frames[step - 1])
                o1, o2 = moments(own)
                p1, p2 = moments(prev_own)
                m1, m2 = g1 + o1 - p1, g2 + o2 - p2
                var = m2 - m1 * m1
                g = own.double().reshape(own.shape[0], 2, -1)
                normed = ((g - m1[..., None]) / torch.sqrt(var[..., None] + 1e-5)).reshape(own.shape)
                expected = (normed * weight.double()[None, :, None, None] + bias.double()[None, :, None, None]).float()
            torch.testing.assert_close(result["outs"][step], expected, rtol=RTOL, atol=ATOL, msg=f"step {step}")


@pytest.mark.parametrize(("world", "height"), [(2, 6), (3, 7)])
def test_a_toy_layer_written_on_the_exchange_protocol(world: int, height: int) -> None:
    """docs/design.md's smallest parallel layer (dist_workers.ShiftDown, one row down): exact in the synchronous
    step, the row from above one step old after it, and its bytes counted by the protocol (one row of 2 x 3 fp32
    values sent down by every rank but the last). Bitwise: a shift moves values, it computes nothing."""
    for rank, result in enumerate(run_distributed(shift_staleness, world, height)):
        rows = result["rows"]
        start = sum(rows[:rank])
        for step in range(3):
            seen = _mixed(result["frames"], step, rows, rank)
            shifted = torch.cat([torch.zeros_like(seen[:, :, :1]), seen[:, :, :-1]], dim=2)
            assert torch.equal(result["outs"][step], shifted[:, :, start : start + rows[rank]]), step
        assert result["sent"] == [0 if rank == world - 1 else 2 * 3 * 4] * 3
