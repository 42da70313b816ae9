"""The patch-parallel ControlNet (pcpp.controlnet): each rank runs it on its strip and hands the UNet its own rows.

Converted ControlNets on gloo ranks against the same ControlNet (or pipeline) on one device; the pipelines are the
tiny random ones of tests/pipeline_parts.py. Each distributed test runs several cases in one spawn (starting the
processes costs more than these models).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import pcpp
from controlnet_workers import (
    FACTOR,
    build_controlnet,
    build_unet,
    direct,
    images,
    inputs,
    pipeline_run,
    reference,
    residuals,
    unet_output,
)
from pcpp.functional import partition_rows
from pcpp.testing import run_distributed
from pipeline_parts import Family, Spec, Task, build_pipeline
from pipeline_workers import Call, Job
from pipeline_workers import reference as pipeline_reference

# Exact mode: every exchange is synchronous, so a rank's rows of each residual are the one-device rows computed with
# the terms summed in another order (GroupNorm statistics merged from strips, attention over split K/V): fp32
# rounding, ~1e-7 relative per op over a dozen layers on O(1) values. A wrong or missing halo row changes the
# rows next to a strip boundary by O(0.1).
RESIDUAL_ATOL = 1e-5
# Whole pipelines in exact mode: the tolerance of tests/test_pipelines.py, with its reason (pixels in [0, 1]).
PIXEL_ATOL = 1e-4


def _check_direct(world: int, family: Family, heights: tuple[int, int]) -> None:
    want = reference(family, heights)
    unet_want = unet_output(build_unet(family), inputs(family, heights[0], 12, 800), want[0])
    results = run_distributed(direct, world, family, heights)
    for call, expected in enumerate(want):
        for i, full in enumerate(expected):
            joined = torch.cat([results[rank]["calls"][call][i] for rank in range(world)], dim=2)
            torch.testing.assert_close(joined, full, rtol=0.0, atol=RESIDUAL_ATOL, msg=f"call {call}, residual {i}")
    for rank, result in enumerate(results):
        assert result["converted"]
        assert result["reverted"]
        # Nothing runs twice: the embedding's first stride-1 conv sees this rank's pixel rows only, the embedding
        # returns (and the body's first block sees) this rank's latent rows only, for every call.
        rows = [height_rows[rank] for height_rows in _rows_per_call(result, world, heights)]
        assert result["seen"]["embedding_in"] == [FACTOR * r for r in rows]
        assert result["seen"]["embedding_out"] == rows
        assert result["seen"]["body_in"] == rows
        # A control image of the wrong size: a clear error naming the model and the sizes, and nothing changed.
        kind, message = result["error"]
        assert kind == "PCPPError"
        assert "ControlNetModel" in message, message
        assert f"{FACTOR * heights[0]}x{FACTOR * 12} pixels" in message, message
        assert result["clock_unchanged"]
        split = _split(heights[0], world)
        start = sum(split[:rank])
        own = want[0][0][:, :, start : start + split[rank]]
        torch.testing.assert_close(result["after_error"][0], own, rtol=0.0, atol=RESIDUAL_ATOL)  # still works
        # The converted UNet given this rank's rows: the one-device output (gathered; same tolerance and reason).
        torch.testing.assert_close(result["unet"], unet_want, rtol=0.0, atol=RESIDUAL_ATOL)
        kind, message = result["unet_error"]
        assert kind == "PCPPError"
        assert "down_block_additional_residuals" in message, message
        assert f"level 0: {heights[0]} rows whole or {split[rank]} rows on rank {rank}" in message, message
        # The original modules, whole again (not bitwise: the ranks run one thread, this process several).
        torch.testing.assert_close(result["after_revert"], want[0], rtol=0.0, atol=RESIDUAL_ATOL)


def _split(height: int, world: int) -> tuple[int, ...]:
    return partition_rows(height, world, 2)  # the tiny UNet has one stride-2 stage


def _rows_per_call(result: dict[str, Any], world: int, heights: tuple[int, int]) -> list[tuple[int, ...]]:
    return [_split(h, world) for h, _, steps in images(heights) for _ in steps]


@pytest.mark.parametrize(
    ("family", "world", "heights"),
    [(Family.SD, 2, (16, 20)), (Family.SD, 3, (20, 16)), (Family.SDXL, 3, (16, 20))],
    ids=["sd-2", "sd-3", "sdxl-3"],
)
def test_converted_controlnet_gives_each_rank_its_rows_of_the_one_device_residuals(
    family: Family, world: int, heights: tuple[int, int]
) -> None:
    """SD and SDXL ControlNets, exact, two images (the second of another size): 2 ranks (16 rows, then 20) and 3
    ranks (20 rows: strips of 8, 6 and 6; 16: 6, 6 and 4). Each rank's residuals are its rows of the one-device
    residuals, at every step."""
    _check_direct(world, family, heights)


def test_pipelines_run_the_converted_controlnets_on_strips() -> None:
    """SD with two ControlNets on 3 ranks and a 20-row latent (strips of 8, 6 and 6), exact: the one-device image;
    every ControlNet converted, and what each returns to the UNet is this rank's rows only. (SD and SDXL with one
    and two ControlNets on 2 ranks: tests/test_pipelines.py, which now runs the converted ControlNets.)"""
    cases = [(3, Spec(Family.SD, Task.CONTROLNET, controlnets=2), Call(size=40))]
    for world, spec, call in cases:
        want = pipeline_reference(Job(spec, calls=(call,)))[0]
        results = run_distributed(pipeline_run, world, spec, [call], {"exact": True})
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["images"][0], want, rtol=0.0, atol=PIXEL_ATOL)
            assert result["converted"] == [True] * spec.controlnets
            assert result["reverted"]
            rows = result["rows"]
            assert len(result["shapes"]) == spec.controlnets
            for shapes in result["shapes"]:
                # conv_in's residual (level 0) and the deepest ones (level 1, halved): this rank's rows at each.
                assert shapes[0][2] == rows[rank], shapes
                assert shapes[-1][2] == rows[rank] // 2, shapes


def test_async_controlnet_pipeline_stays_close_to_one_device_and_ranks_agree() -> None:
    """Asynchronous PCPP (exact=False, 1 warmup step, 4 steps) with two ControlNets and the parallel VAE on 2
    ranks, two images in a row: the UNet, both ControlNets and the VAE share the communicator and message tags, so
    this also checks that their messages meet their own kind after asynchronous steps left some in flight."""
    spec = Spec(Family.SD, Task.CONTROLNET, controlnets=2)
    calls = [Call(extra={"num_inference_steps": 4}), Call(seed=2, extra={"num_inference_steps": 4})]
    results = run_distributed(pipeline_run, 2, spec, calls, {"exact": False, "warmup_steps": 1})
    want = pipeline_reference(Job(spec, calls=tuple(calls)))
    for got, expected, rank1 in zip(results[0]["images"], want, results[1]["images"], strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(rank1, got, rtol=0.0, atol=0.0)  # every rank gathers the same strips
        # Steps 1-3 read the neighbours' halo rows, GroupNorm statistics and K/V of the step before (the PCPP
        # approximation): measured at most 0.02 here (mean 0.002), allowed 5x that. Another seed's image differs
        # by about 1 (pixels in [0, 1]), as does a strip built from another model's messages or misplaced.
        torch.testing.assert_close(got, expected, rtol=0.0, atol=0.1)


def test_wrong_sized_control_image_is_refused_on_one_rank_and_nothing_changes() -> None:
    """One rank (no process group): the size check does not depend on the split."""
    net = pcpp.convert(build_controlnet(Family.SD), comm=pcpp.comm.LocalCommunicator(), exact=True)
    good = inputs(Family.SD, 16, 12, 800)
    first = residuals(net, good)
    step = pcpp.get_context(net).step
    bad = inputs(Family.SD, 16, 12, 500, cond_scale=FACTOR * 2)
    with pytest.raises(pcpp.PCPPError, match=r"controlnet_cond of 64x48 pixels .*got \(2, 3, 128, 96\)"):
        residuals(net, bad)
    assert pcpp.get_context(net).step == step
    torch.testing.assert_close(residuals(net, good), first, rtol=0.0, atol=0.0)


def test_global_pool_controlnet_is_refused_and_parallelize_changes_nothing(tmp_path: Path) -> None:
    """global_pool_conditions residuals are whole-image means, which a strip does not have: convert refuses it,
    and parallelize, having converted the UNet (and another ControlNet) first, reverts them."""
    pipe = build_pipeline(Spec(Family.SD, Task.CONTROLNET, controlnets=2), tmp_path)
    pooled = pipe.controlnet.nets[1]
    pooled.register_to_config(global_pool_conditions=True)
    modules = [type(m) for m in pipe.components["unet"].modules()]
    with pytest.raises(pcpp.ConversionError, match="global_pool_conditions"):
        pcpp.parallelize(pipe, comm=pcpp.comm.LocalCommunicator())
    assert not pcpp.is_converted(pipe.unet)
    assert not any(pcpp.is_converted(net) for net in pipe.controlnet.nets)
    assert [type(m) for m in pipe.unet.modules()] == modules
    assert not pcpp.pipeline.is_parallelized(pipe)


def test_convert_and_revert_round_trip_keeps_the_state_dict() -> None:
    net = build_controlnet(Family.SDXL)
    keys = list(net.state_dict())
    types = [type(m) for m in net.modules()]
    pcpp.convert(net, comm=pcpp.comm.LocalCommunicator())
    assert pcpp.is_converted(net)
    assert list(net.state_dict()) == keys
    converted = {type(m).__name__ for m in net.controlnet_cond_embedding.modules()}
    assert "PartialPatchConv2d" in converted
    with pytest.raises(pcpp.ConversionError, match="already converted"):
        pcpp.convert(net, comm=pcpp.comm.LocalCommunicator())
    pcpp.reset(net)
    pcpp.configure(net, partial=0.5)
    assert pcpp.get_context(net).config.partial == 0.5
    pcpp.revert(net)
    assert not pcpp.is_converted(net)
    assert [type(m) for m in net.modules()] == types
