"""Exact FreeU on strips (pcpp.layers.freeu): the whole-map Fourier filter of the skip features, on every rank.

The zoo (tests/test_zoo.py, row ``sd-freeu``) checks a UNet converted with FreeU on; here FreeU is switched on
after conversion, the prefilter is checked against diffusers' own filter, and the audit's rule.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.utils.torch_utils import fourier_filter

import pcpp
from layer_workers_extra import freeu_after_conversion
from pcpp.audit import audit_conversion, check_call
from pcpp.errors import PCPPError, UnsupportedModuleError
from pcpp.layers.freeu import freeu_multiplier, strip_prefilter
from pcpp.plan import plan_conversion
from pcpp.testing import run_distributed
from zoo import sd

# As the zoo (tests/test_zoo.py): fp32 rounding of the same sums in another order over 3 DDIM steps, plus the FFT
# round trip of the prefilter (about 1e-6 relative); any strip-wise filter is off by 1e-1.
ATOL = RTOL = 5e-5


@pytest.mark.parametrize(("world", "uneven"), [(2, False), (3, True)])
def test_freeu_switched_on_after_conversion_is_exact(world: int, uneven: bool) -> None:
    for rank, result in enumerate(run_distributed(freeu_after_conversion, world, uneven, timeout=300)):
        for step, (got, want) in enumerate(zip(result["parallel"], result["reference"], strict=True)):
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=f"rank {rank}, output {step}")
        # FreeU changes the image (so the check above can fail), and its gathers are counted every step.
        assert (result["reference"][-1] - result["without"][-1]).abs().max() > 1e-2
        assert all(b > 0 for b in result["freeu_sent"])
        assert len(set(result["freeu_sent"])) == 1
        assert result["on_after_revert"]  # the settings live on the original blocks


def test_freeu_in_asynchronous_steps_is_gathered_fresh() -> None:
    """With one synchronous step and PARTIAL asynchronous ones, the first UNet call is exact, the later ones finite,
    and FreeU's own gather runs (synchronously) in every step."""
    for rank, result in enumerate(run_distributed(freeu_after_conversion, 2, False, False, timeout=300)):
        first, want = result["parallel"][0], result["reference"][0]
        torch.testing.assert_close(first, want, atol=ATOL, rtol=RTOL, msg=f"rank {rank}, synchronous step")
        assert all(torch.isfinite(got).all() for got in result["parallel"][1:])
        assert all(b > 0 for b in result["freeu_sent"])  # gathered in every step, asynchronous ones included


@pytest.mark.parametrize(("height", "width"), [(4, 12), (3, 12), (2, 6), (1, 6), (5, 7)])
@pytest.mark.parametrize("scale", [0.2, 0.9, 1.4, -0.5])
def test_the_prefilter_undoes_diffusers_filter(height: int, width: int, scale: float) -> None:
    target = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    # fp32 FFT round trip; the prefilter amplifies some frequencies by up to 1 / |scale| (here 5).
    torch.testing.assert_close(
        fourier_filter(strip_prefilter(target, freeu_multiplier(height, width, scale, "b")), threshold=1, scale=scale),
        target,
        atol=1e-5,
        rtol=1e-5,
    )
    # Filtering with 1 / scale does not undo it (the real part spreads the mask over conjugate frequencies).
    if scale != 1.0:
        assert not torch.allclose(fourier_filter(fourier_filter(target, 1, 1 / scale), 1, scale), target, atol=1e-3)


@pytest.mark.parametrize("scale", [1e-3, -0.999])
def test_a_scale_that_nearly_removes_a_frequency_is_refused(scale: float) -> None:
    with pytest.raises(PCPPError, match=r"up_blocks\.1: FreeU scale"):
        freeu_multiplier(4, 6, scale, "up_blocks.1")


def test_a_plan_that_leaves_a_freeu_block_unconverted_is_refused() -> None:
    torch.manual_seed(0)
    unet = sd()
    names = [r.name for r in plan_conversion(unet)]
    assert {"up_blocks.0", "up_blocks.1"} <= set(names)
    audit_conversion(unet, names)
    with pytest.raises(UnsupportedModuleError, match=r"up_blocks\.0 \(CrossAttnUpBlock2D\): it applies FreeU"):
        audit_conversion(unet, [n for n in names if n != "up_blocks.0"])


def test_freeu_on_a_block_swapped_in_after_conversion_is_refused_at_call_time() -> None:
    torch.manual_seed(0)
    unet = pcpp.convert(sd(), comm=pcpp.comm.LocalCommunicator())
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    check_call(unet)  # the converted blocks apply it exactly
    unet.up_blocks[1] = sd().up_blocks[1]
    with pytest.raises(PCPPError, match=r"up_blocks\.1 \(UpBlock2D\) was not converted"):
        check_call(unet)
