"""GPU tests (NCCL): CUDA-graph replay and torch.compile give the eager trajectory. Skipped without 2 GPUs."""

from __future__ import annotations

from typing import TypedDict

import pytest
import torch

import pcpp
from dist_workers import Case, graphs_vs_eager
from pcpp.testing import run_distributed


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


FULL = {"warmup_steps": 2, "conditioning": pcpp.Conditioning.FULL}


class _Sizes(TypedDict):
    """The Case fields SDXL sets (typed, so that Case(**SDXL, ...) type-checks field by field)."""

    family: str
    height: int
    width: int
    steps: int


SDXL: _Sizes = {"family": "sdxl", "height": 32, "width": 32, "steps": 8}


@pytest.mark.parametrize(
    ("world", "case", "compile_"),
    [
        # One GPU: a group of one runs the original layers; this checks the step clock as the graph runner uses it.
        pytest.param(1, Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3}), False, marks=pytest.mark.gpu),
        pytest.param(1, Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3}), True, marks=pytest.mark.gpu),
        (2, Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3}), False),
        (4, Case(**SDXL, cfg_split=True, convert={"warmup_steps": 2}), False),
        (2, Case(family="sd15", height=32, width=32, steps=8, convert=FULL), False),
        # Batched exchanges: a batch is posted by a later layer (or the step's end) inside the captured graph.
        (2, Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3, "exchange_batch": 8}), False),
        pytest.param(2, Case(**SDXL, convert={"warmup_steps": 2}), True, marks=pytest.mark.slow),
        # diffusers' fused projections: keys and values a strided view of to_qkv's output, eager and compiled.
        (2, Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3}, fuse_qkv=True), False),
        pytest.param(
            2, Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3}, fuse_qkv=True), True, marks=pytest.mark.slow
        ),
    ],
)
def test_cuda_graphs_replay_the_eager_trajectory(world: int, case: Case, compile_: bool) -> None:
    """A whole loop replayed from per-phase CUDA graphs equals the eager loop (same kernels, same order: fp32
    results agree to 1e-6). torch.compile under graphs moves the trajectory as far as it moves the unconverted
    UNet's: Inductor fuses and reorders fp32 arithmetic and CFG amplifies the difference x11, so the yardstick
    is measured, not guessed: the converted UNet's worst step may differ from eager by at most 4x the plain
    UNet's worst step (at least 1e-4), where a wrong exchange gives errors of order one."""
    if _gpus() < world or _gpus() == 0:
        pytest.skip(f"needs {world} GPUs")
    results = run_distributed(graphs_vs_eager, world, case, compile_, backend="nccl", timeout=900)
    for result in results:
        for eager, graphed in zip(result["eager"], result["graphs"], strict=True):
            torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
        if compile_:
            plain = max(
                float((c - e).abs().max()) for c, e in zip(result["plain_compiled"], result["plain_eager"], strict=True)
            )
            worst = max(float((c - e).abs().max()) for c, e in zip(result["compiled"], result["eager"], strict=True))
            assert worst <= max(4 * plain, 1e-4), (worst, plain)
