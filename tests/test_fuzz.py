"""Fuzzing: drawn UNet configurations, sizes, world sizes, ratios, warmups, batches and CFG split.

Whatever is drawn, pcpp either reproduces the single-device UNet (exact mode, and every synchronous step) or
refuses with a pcpp error on every rank: never a crash, a hang or a silently wrong result. CI draws a few
derandomised examples; ``PCPP_FUZZ_EXAMPLES=200 python -m pytest tests/test_fuzz.py`` runs a longer search
(docs/reliability.md records one).
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pcpp
from fuzz_workers import fuzz_case
from pcpp.functional import partition_rows
from pcpp.testing import run_distributed

pytestmark = pytest.mark.slow

# As tests/test_parallel_unet.py: synchronous parallel steps differ from one device by fp32 rounding only,
# amplified by CFG (x11) and the sampler; a wrong row or strip gives 1e-2 or more.
EXACT_RTOL = 1e-4
EXAMPLES = int(os.environ.get("PCPP_FUZZ_EXAMPLES", "4"))


@st.composite
def specs(draw: st.DrawFn) -> dict[str, Any]:
    levels = draw(st.integers(1, 3))
    width = draw(st.sampled_from([4, 8]))
    groups = draw(st.sampled_from([1, 2, 4]))
    kinds = [draw(st.booleans()) for _ in range(levels)]  # cross-attention at each level?
    if not any(kinds):
        kinds[-1] = True
    down = tuple("CrossAttnDownBlock2D" if k else "DownBlock2D" for k in kinds)
    unet = {
        "block_out_channels": tuple(width * min(2**i, 4) for i in range(levels)),
        "norm_num_groups": groups,
        "down_block_types": down,
        "up_block_types": tuple(d.replace("Down", "Up") for d in reversed(down)),
        "cross_attention_dim": 8,
        "attention_head_dim": draw(st.sampled_from([1, 2, 4])),
        "layers_per_block": draw(st.integers(1, 2)),
        "transformer_layers_per_block": draw(st.integers(1, 2)),
        "use_linear_projection": draw(st.booleans()),
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
    }
    world = draw(st.integers(1, 6))
    cfg_split = world % 2 == 0 and draw(st.booleans())
    guidance = cfg_split or draw(st.booleans())
    patch = world // 2 if cfg_split else world
    unit = 2 ** (levels - 1)
    # Mostly splittable heights (possibly uneven), sometimes one that is not: pcpp must then refuse.
    height = unit * draw(st.integers(patch, 3 * patch)) + (unit > 1 and draw(st.integers(0, 9)) == 0)
    exact = draw(st.booleans())
    convert: dict[str, Any] = (
        {"exact": True}
        if exact
        else {
            "warmup_steps": draw(st.integers(1, 3)),
            "partial": draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
            "conditioning": draw(st.sampled_from(list(pcpp.Conditioning))),
        }
    )
    return {
        "unet": unet,
        "world": world,
        "cfg_split": cfg_split,
        "guidance": guidance,
        "images": draw(st.integers(1, 2)),
        "height": height,
        "width": draw(st.integers(2, 6)) * unit,
        "steps": draw(st.integers(2, 4)),
        "seed": draw(st.integers(0, 2**16)),
        "convert": convert,
        "unit": unit,
        "patch": patch,
    }


def _splittable(spec: dict[str, Any]) -> bool:
    try:
        partition_rows(spec["height"], spec["patch"], spec["unit"])
    except pcpp.SplitError:
        return False
    return True


@settings(max_examples=EXAMPLES)
@given(spec=specs())
def test_exact_or_refused(spec: dict[str, Any]) -> None:
    results = run_distributed(fuzz_case, spec["world"], spec, timeout=600)
    if not _splittable(spec):
        assert {r["error"] for r in results} == {"SplitError"}, results  # every rank refuses, with the reason
        assert all(str(spec["height"]) in r["message"] for r in results)
        return
    for rank, result in enumerate(results):
        assert result["error"] is None, (rank, result)
        assert result["finite"], (rank, result)
        synchronous = result["errors"] if "exact" in spec["convert"] else result["errors"][:1]
        assert max(synchronous) < EXACT_RTOL, (rank, spec, result["errors"])
