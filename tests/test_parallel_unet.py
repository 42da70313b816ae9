"""Whole-UNet tests on real gloo process groups: converted UNets against the single-device UNet."""

from __future__ import annotations

import pytest
import torch

import pcpp
from dist_workers import (
    Case,
    many_loops,
    one_rank_skips,
    repeated_input,
    resolution_change,
    traffic,
    two_images,
    two_modes,
)
from pcpp.testing import run_distributed

# Relative L2 error allowed between a synchronous (exact) parallel run and the single-device run, per step. The
# parallel run adds up the same terms in a different order (GroupNorm statistics merged from strips in fp32,
# attention and convolutions over split matrices), so results differ by fp32 rounding (~1e-7 relative per op),
# accumulated over the UNet's depth and amplified by classifier-free guidance (x(1 + 2 * 5)) and the sampler over
# a few steps: measured up to 3e-5 on these models; 1e-4 leaves margin while catching any real error (a wrong
# halo row or a missing strip gives 1e-2 or more).
EXACT_RTOL = 1e-4

EXACT = {"exact": True}
# warmup_steps >= steps makes every step synchronous through the warmup path rather than the exact flag.
WARM = {"warmup_steps": 10}

CASES = {
    2: [
        Case(family="tiny", convert=EXACT),
        Case(family="tiny", cfg_split=True, convert=WARM),  # cfg 2 x patch 1: a pure CFG split
        Case(family="unet2d", height=20, guidance=None, convert=EXACT),
    ],
    3: [
        Case(family="sd15", height=40, width=16, images=2, convert=WARM),  # 40 = 16 + 16 + 8 rows
        Case(family="sdxl", height=20, convert=EXACT),  # 20 = 8 + 8 + 4 rows
        Case(family="unet2d", height=20, guidance=None, images=2, convert=WARM),
    ],
    4: [
        Case(family="tiny", cfg_split=True, images=2, height=12, convert=EXACT),  # 12 = 8 + 4 rows per CFG half
        Case(family="sdxl", cfg_split=True, height=24, convert=WARM),
        Case(family="sd15", height=40, width=16, convert=EXACT),  # 40 = 16 + 8 + 8 + 8
    ],
}


@pytest.mark.parametrize("world", sorted(CASES))
def test_synchronous_loop_matches_single_device(world: int) -> None:
    """With every step synchronous, a DDIM+CFG loop on N ranks reproduces the single-device loop."""
    reports = run_distributed(many_loops, world, CASES[world], timeout=600)
    for rank, report in enumerate(reports):
        for case, errors in zip(CASES[world], report, strict=True):
            assert errors["eps"] < EXACT_RTOL, (rank, case, errors)
            assert errors["x"] < EXACT_RTOL, (rank, case, errors)


def test_one_rank_is_bitwise_identical() -> None:
    """Converting over a group of one changes nothing, bit for bit, in every phase."""
    for convert in ({"warmup_steps": 1}, {"warmup_steps": 1, "conditioning": pcpp.Conditioning.FULL}):
        (result,) = run_distributed(repeated_input, 1, Case(family="sdxl", height=20, convert=convert), 3)
        assert result["phases"] == ["sync", "async", "async"]
        for out in result["outs"]:
            assert torch.equal(out, result["ref"])


def test_fixed_point_full_conditioning_equals_synchronous() -> None:
    """Same input twice in a row: the asynchronous step (stale = fresh) equals the synchronous one.

    Holds for full conditioning (DistriFusion's key set), corrected GroupNorm (zero correction) and conv halos.
    Tolerance: the asynchronous path concatenates keys in another order than the synchronous one, which changes
    fp32 summation order only (1e-5 relative).
    """
    case = Case(family="sdxl", height=20, convert={"warmup_steps": 1, "conditioning": pcpp.Conditioning.FULL})
    for result in run_distributed(repeated_input, 3, case, 3):
        assert result["phases"] == ["sync", "async", "async"]
        for out in result["outs"]:
            torch.testing.assert_close(out, result["ref"], rtol=1e-5, atol=1e-5)


def test_partial_one_on_two_ranks_equals_full_conditioning() -> None:
    """With two strips, partial=1 reads the whole other strip: the same key set as DistriFusion's, every step.

    (There is no UNet-level fixed point for partial < 1: the warmup step used every strip's keys, so the stale
    activations of the first asynchronous step come from another function than its own, and so on down the chain.
    The partial key set is checked exactly at layer level in test_layers_dist.py.) Tolerance 1e-5: the two modes
    concatenate keys in another order.
    """
    steps = {"warmup_steps": 2, "partial": 1.0}
    partial = Case(family="sdxl", height=24, convert=steps)
    full = Case(family="sdxl", height=24, convert={**steps, "conditioning": pcpp.Conditioning.FULL})
    for result in run_distributed(two_modes, 2, partial, full):
        for a, b in zip(result["first"], result["second"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_next_image_does_not_see_the_previous_one() -> None:
    """Image B is bitwise the same whether it follows image A through the same UNet or runs alone."""
    first = Case(family="tiny", seed=5, convert={"warmup_steps": 2})
    second = Case(family="tiny", seed=0, convert={"warmup_steps": 2})
    for result in run_distributed(two_images, 2, second, first):
        assert result["images"] == 1  # detected as a new image: the timestep went up
        for after, alone in zip(result["after"], result["alone"], strict=True):
            assert torch.equal(after, alone)


def test_partial_zero_sends_no_attention_rows_and_counts_match() -> None:
    """Asynchronous steps with partial=0 send no attention bytes; partial=0.3 sends exactly the analytic count.

    Analytic count per attention layer and neighbour: ceil(p * own rows) rows x width tokens x batch x (key +
    value channels) x 4 bytes (fp32), sent to each existing neighbour; received: the neighbour's ceil(p * its
    rows) rows likewise.
    """
    from pcpp.functional import partial_rows

    for partial in (0.0, 0.3):
        case = Case(family="sd15", height=40, width=16, convert={"warmup_steps": 2, "partial": partial})
        results = run_distributed(traffic, 3, case)
        for rank, result in enumerate(results):
            rows = result["rows"]
            widths = result["widths"]
            per_step = len(result["seen"]) // case.steps
            expected_sent = expected_received = 0
            for _name, batch, tokens, inner in result["seen"][:per_step]:
                level = next(k for k in range(4) if (rows[rank] >> k) * widths.get(rows[rank] >> k, -1) == tokens)
                width = widths[rows[rank] >> level]
                kv = batch * width * 2 * inner * 4
                for neighbour in (rank - 1, rank + 1):
                    if 0 <= neighbour < len(rows):
                        expected_sent += partial_rows(partial, rows[rank] >> level) * kv
                        expected_received += partial_rows(partial, rows[neighbour] >> level) * kv
            for step in result["steps"]:
                sent, received = step["by_kind"].get("attention", (0, 0))
                if step["phase"] == "async":
                    assert (sent, received) == (expected_sent, expected_received), (rank, partial, step)
                    if partial == 0:
                        assert sent == received == 0
                else:
                    assert sent > 0  # warmup gathers every strip's keys and values


def test_silent_peer_raises_peer_timeout_instead_of_hanging() -> None:
    """A rank that never calls the UNet makes the others fail with PeerTimeoutError within the timeout."""
    case = Case(family="tiny")
    results = run_distributed(one_rank_skips, 2, case, timeout=120, group_timeout=30)
    assert results[1] == "skipped"
    assert results[0].startswith("timeout:"), results[0]
    assert "did not answer within 2 s" in results[0]


def test_resolution_may_change_between_images() -> None:
    """Buffers are rebuilt when the latent size changes (and back): every loop still matches the plain UNet."""
    sizes = [(16, 12), (24, 8), (16, 12)]
    cases = [Case(family="tiny", height=h, width=w, steps=3, convert=EXACT) for h, w in sizes]
    for errors in run_distributed(resolution_change, 3, cases):
        assert max(errors) < EXACT_RTOL, errors


# Fused against separate projections: the to_qkv product adds the same terms as to_q, to_k and to_v in another
# blocking (fp32 rounding, measured 1.7e-5 relative per step on one device for the SDXL-layout tiny model, guidance
# 5 included); a wrong split of the fused output (queries read as keys, say) gives errors of order 1.
FUSED_RTOL = 1e-4


@pytest.mark.parametrize(
    "convert",
    [EXACT, {"warmup_steps": 2, "partial": 0.5}, {"warmup_steps": 2, "conditioning": pcpp.Conditioning.FULL}],
    ids=["exact", "partial", "full"],
)
def test_fused_qkv_projections_follow_the_unfused_loop(convert: dict) -> None:
    """After diffusers' ``fuse_qkv_projections()`` the converted loop (3 ranks: the middle one sends up and down)
    matches the converted loop of the same weights unfused, step by step, in every phase."""
    unfused = Case(family="sdxl", height=20, convert=convert)
    fused = Case(family="sdxl", height=20, convert=convert, fuse_qkv=True)
    for result in run_distributed(two_modes, 3, unfused, fused):
        for a, b in zip(result["second"], result["first"], strict=True):
            assert float((a - b).norm() / b.norm()) < FUSED_RTOL
