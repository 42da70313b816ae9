"""The ranks-agree checksum on a GPU (the graph-replay cases that one GPU can run are in tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from pcpp.agreement import tensor_checksum

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_checksum_is_the_same_on_the_gpu_and_the_cpu(dtype: torch.dtype) -> None:
    """Ranks compare checksums computed on their own devices: integer sums of the bits, so exact anywhere."""
    x = torch.randn(2, 4, 64, 48).to(dtype)
    assert torch.equal(tensor_checksum(x), tensor_checksum(x.cuda()).cpu())
    y = x.clone()
    y[1, 2, 30, 7] += 1
    assert not torch.equal(tensor_checksum(x.cuda()), tensor_checksum(y.cuda()))
