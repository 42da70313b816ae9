"""The fused GroupNorm arithmetic (torch.compile) computes what the plain functions compute."""

from __future__ import annotations

import shutil

import pytest
import torch

import pcpp
from pcpp.comm import LocalCommunicator
from pcpp.context import PatchContext
from pcpp.kernels import NormOps, fusion_available


def test_plain_ops_off_cuda_and_when_disabled() -> None:
    """On the CPU, and with fused_norm=False anywhere, the plain functions run (nothing is compiled)."""
    ctx = PatchContext(pcpp.PCPPConfig(), LocalCommunicator(), unit=1, levels=0)
    assert ctx.norm_ops(torch.device("cpu")) == NormOps.plain()
    off = PatchContext(pcpp.PCPPConfig(fused_norm=False), LocalCommunicator(), unit=1, levels=0)
    assert off.norm_ops(torch.device("cuda", 0)) == NormOps.plain()
    assert not fusion_available(torch.device("cpu"))


def test_fused_norm_must_be_bool() -> None:
    with pytest.raises(pcpp.ConversionError, match="fused_norm"):
        pcpp.PCPPConfig(fused_norm="yes")  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None, reason="inductor needs a C++ compiler")
def test_fused_ops_match_plain() -> None:
    """Compiled (inductor's C++ backend here, Triton on CUDA) against the eager functions: fp32 results agree to
    1e-6 relative (the compiler may reorder the reductions' additions); half outputs to one ulp."""
    plain, fused = NormOps.plain(), NormOps.fused()
    gen = torch.Generator().manual_seed(0)
    for shape, groups in (((1, 8, 6, 5), 4), ((2, 6, 30), 3)):
        for dtype in (torch.float32, torch.float16):
            x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype)
            stats = fused.local_stats(x, groups)
            torch.testing.assert_close(stats, plain.local_stats(x, groups), rtol=1e-6, atol=1e-6)
            stale = torch.stack([stats, plain.local_stats(x.flip(2), groups)])
            for got, want in zip(fused.merged_stats(stale), plain.merged_stats(stale), strict=True):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            fresh = plain.local_stats(x * 1.1, groups)
            for got, want in zip(
                fused.corrected_stats(stale, 1, fresh), plain.corrected_stats(stale, 1, fresh), strict=True
            ):
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            weight = torch.randn(shape[1], generator=gen).to(dtype)
            bias = torch.randn(shape[1], generator=gen).to(dtype)
            mean, var = plain.merged_stats(stale)
            got = fused.normalize(x, groups, mean, var, 1e-5, weight, bias)
            want = plain.normalize(x, groups, mean, var, 1e-5, weight, bias)
            assert got.dtype == x.dtype
            ulp = 1e-3 if dtype == torch.float16 else 1e-6
            torch.testing.assert_close(got.float(), want.float(), rtol=ulp, atol=ulp)
