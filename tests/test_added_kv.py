"""AddedKVAttention (pcpp.layers.added_kv): diffusers' added-K/V attention of DeepFloyd IF, Kandinsky and unCLIP
over strips, on real gloo groups.

Synchronous steps are exact; asynchronous ones read the text (fresh, it is the same on every rank), the own strip
fresh and the other strips' image keys and values exactly as PartialPatchAttention reads them: one step old, the
``ceil(partial * rows)`` boundary rows of each adjacent strip (PARTIAL) or every other strip (FULL). Whole UNets
(IF, Kandinsky, unCLIP) are checked in exact mode by the zoo (tests/test_zoo.py).
"""

from __future__ import annotations

import pytest
import torch

import pcpp
from layer_workers_extra import added_kv_attention, added_kv_staleness
from pcpp.errors import ConversionError
from pcpp.functional import partial_rows
from pcpp.testing import run_distributed

# The same sums over the same keys as diffusers' processor, possibly blocked differently: fp32 rounding only.
RTOL = ATOL = 1e-5


def _seen(frames: list[torch.Tensor], step: int, rows: tuple[int, ...], rank: int) -> torch.Tensor:
    """The image as rank ``rank``'s keys see it at ``step``: its own rows fresh, every other row one step old."""
    if step == 0:
        return frames[0]
    start = sum(rows[:rank])
    mixed = frames[step - 1].clone()
    mixed[:, :, start : start + rows[rank]] = frames[step][:, :, start : start + rows[rank]]
    return mixed


@pytest.mark.parametrize(
    ("world", "height", "partial", "full"),
    [(2, 8, 0.0, False), (3, 10, 0.3, False), (3, 7, 1.0, False), (3, 10, 0.5, True)],
)
def test_added_kv_attention_reads_the_text_and_exactly_the_specified_image_keys(
    world: int, height: int, partial: float, full: bool
) -> None:
    """Step 0 equals diffusers' processor on the whole image; later steps equal it on the rows the strip reads
    (a contiguous window of the image as the rank sees it), so they differ from exact only by staleness."""
    results = run_distributed(added_kv_staleness, world, height, partial, full)
    attn = added_kv_attention()  # the same seeded weights, diffusers' own processor
    for rank, result in enumerate(results):
        rows = result["rows"]
        start, stop = sum(rows[:rank]), sum(rows[: rank + 1])
        for step in range(len(result["outs"])):
            got = result["outs"][step]
            assert torch.isfinite(got).all()
            seen = _seen(result["frames"], step, rows, rank)
            lo, hi = 0, height  # synchronous and FULL steps read every row
            if step > 0 and not full:
                lo = start - (partial_rows(partial, rows[rank - 1]) if rank > 0 else 0)
                hi = stop + (partial_rows(partial, rows[rank + 1]) if rank + 1 < world else 0)
            with torch.no_grad():
                expected = attn(seen[:, :, lo:hi], encoder_hidden_states=result["text"])[:, :, start - lo : stop - lo]
                exact = attn(result["frames"][step], encoder_hidden_states=result["text"])[:, :, start:stop]
            torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL, msg=f"rank {rank}, step {step}")
            if step == 0:
                torch.testing.assert_close(got, exact, rtol=RTOL, atol=ATOL)
            else:
                assert not torch.allclose(got, exact, rtol=RTOL, atol=ATOL)  # stale keys: not exact, as specified


def test_pure_cross_attention_is_not_an_added_kv_layer() -> None:
    torch.manual_seed(0)
    attn = added_kv_attention()
    attn.only_cross_attention = True
    ctx = pcpp.PatchContext(pcpp.PCPPConfig(), pcpp.comm.LocalCommunicator(), unit=1, levels=0)
    with pytest.raises(ConversionError, match=r"only_cross_attention=True"):
        pcpp.layers.AddedKVAttention.from_attention(attn, ctx, name="x.attn")
    with pytest.raises(ConversionError, match=r"x\.attn .*AddedKVAttention"):
        pcpp.layers.PartialPatchAttention.from_attention(added_kv_attention(), ctx, name="x.attn")
