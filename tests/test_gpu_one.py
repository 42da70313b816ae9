"""GPU tests that one GPU can run: CUDA-graph replay and torch.compile of a converted UNet on a group of one,
pcpp's fused GroupNorm kernels, and the ranks-agree checksum on the device. Skipped without a CUDA GPU.

A group of one runs the original layers, so these check the step clock's public API as the CUDA-graph runner
uses it (phases, replayed steps, recapture after a reset) and the compiled path on a real GPU; the exchanges
under capture need two GPUs (tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from dist_workers import Case, graphs_vs_eager
from pcpp.agreement import tensor_checksum
from pcpp.testing import run_distributed

pytestmark = pytest.mark.gpu

SDXL = {"family": "sdxl", "height": 32, "width": 32, "steps": 8}


@pytest.mark.parametrize("compile_", [False, True])
def test_one_gpu_graphs_and_compile_replay_the_eager_trajectory(compile_: bool) -> None:
    """As tests/test_gpu.py on a group of one: graph replay equals eager to 1e-6 (same kernels, same order); a
    compiled run moves as far from eager as the plain UNet's compiled run, at most 4x (at least 1e-4)."""
    case = Case(**SDXL, convert={"warmup_steps": 2, "partial": 0.3})  # type: ignore[arg-type]
    (result,) = run_distributed(graphs_vs_eager, 1, case, compile_, backend="nccl", timeout=900)
    for eager, graphed in zip(result["eager"], result["graphs"], strict=True):
        torch.testing.assert_close(graphed, eager, rtol=1e-6, atol=1e-6)
    if compile_:
        plain = max(
            float((c - e).abs().max()) for c, e in zip(result["plain_compiled"], result["plain_eager"], strict=True)
        )
        worst = max(float((c - e).abs().max()) for c, e in zip(result["compiled"], result["eager"], strict=True))
        assert worst <= max(4 * plain, 1e-4), (worst, plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_checksum_is_the_same_on_the_gpu_and_the_cpu(dtype: torch.dtype) -> None:
    """Ranks compare checksums computed on their own devices: integer sums of the bits, so exact anywhere."""
    x = torch.randn(2, 4, 64, 48).to(dtype)
    assert torch.equal(tensor_checksum(x), tensor_checksum(x.cuda()).cpu())
    y = x.clone()
    y[1, 2, 30, 7] += 1
    assert not torch.equal(tensor_checksum(x.cuda()), tensor_checksum(y.cuda()))
