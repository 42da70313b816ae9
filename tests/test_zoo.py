"""The zoo (tests/zoo.py): every diffusers test UNet is exact in pcpp's exact mode on 2 and 3 gloo ranks, or refused.

Never a silently wrong image, a crash or a hang: each UNet either equals the unconverted single-device UNet over a
few DDIM steps, on every rank, or ``pcpp.convert`` raises a pcpp error naming the module and why, leaving the UNet
unchanged. The fast subset runs two process groups (2 ranks, and 3 ranks with strips of different heights); the
full zoo on 2, 3 and unevenly split 3 ranks is marked slow.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from pcpp.audit import audit_conversion, freeu_enabled, runs_on_latent, split_reason
from pcpp.errors import UnsupportedModuleError
from pcpp.layers.freeu import applies_freeu
from pcpp.testing import run_distributed
from zoo import ZOO, Expect, ZooModel, if_stage1_only_cross, kandinsky22_controlnet_only_cross, sd
from zoo_workers import zoo_run

# Exact mode adds up the same terms as the single-device UNet in another order (GroupNorm statistics merged from
# strips, attention and convs over split matrices), so fp32 results differ by rounding only (~1e-7 relative per
# op), accumulated over the UNet's depth and 3 DDIM steps: measured at most 1.5e-5 absolute on the zoo, on outputs
# and latents of magnitude up to about 10 (docs/zoo.md). 5e-5 leaves margin while any real error (a wrong halo row,
# a norm or an attention that sees only its strip) gives 1e-2 or more (issue 14: 8e-2 to 4e-1).
ATOL = 5e-5
RTOL = 5e-5

LAYOUTS = {"2": (2, False), "3": (3, False), "3-uneven": (3, True)}
FAST = tuple(name for name, model in ZOO.items() if model.fast)
_cache: dict[tuple[str, tuple[str, ...]], list[dict[str, dict[str, Any]]]] = {}


def _results(layout: str, names: tuple[str, ...]) -> list[dict[str, dict[str, Any]]]:
    """Every rank's results for ``names`` on ``layout``, run once per test session (one process group for all)."""
    key = (layout, names)
    if key not in _cache:
        world, uneven = LAYOUTS[layout]
        # A hang would end here as PeerTimeoutError; pcpp's own timeout (30 s in the worker) fires first.
        _cache[key] = run_distributed(zoo_run, world, list(names), uneven, timeout=600, group_timeout=120)
    return _cache[key]


def _check(model: ZooModel, per_rank: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(per_rank):
        where = f"{model.name} ({model.source}), rank {rank}/{len(per_rank)}, latent height {result['height']}"
        assert result["status"] != "error", f"{where}: neither exact nor refused:\n{result['message']}"
        if model.expect is Expect.REFUSED:
            assert result["status"] == "refused", f"{where}: expected a refusal, but pcpp converted it"
            assert model.refusal in result["message"], (
                f"{where}: refusal does not say {model.refusal!r}:\n" + result["message"]
            )
            assert result["unchanged"], f"{where}: refused, but the UNet was changed"
            continue
        assert result["status"] == "exact", f"{where}: expected exact, refused with:\n{result.get('message')}"
        for step, (got, want) in enumerate(zip(result["parallel"], result["reference"], strict=True)):
            label = f"{where}, {'final latent' if step == len(result['reference']) - 1 else f'UNet call {step}'}"
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=functools.partial(_labelled, label))


@pytest.mark.parametrize("layout", ["2", "3-uneven"])
@pytest.mark.parametrize("name", FAST)
def test_zoo_fast(name: str, layout: str) -> None:
    _check(ZOO[name], [ranks[name] for ranks in _results(layout, FAST)])


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_full(name: str, layout: str) -> None:
    _check(ZOO[name], [ranks[name] for ranks in _results(layout, tuple(ZOO))])


# ----- the audit's rule, in-process --------------------------------------------------------------------------------


def test_hint_block_does_not_run_on_the_latent() -> None:
    torch.manual_seed(0)
    unet = kandinsky22_controlnet_only_cross()
    hint_convs = [n for n, m in unet.named_modules() if n.startswith("add_embedding.input_hint_block.")]
    assert hint_convs
    assert not any(runs_on_latent(unet, n) for n in hint_convs)
    assert runs_on_latent(unet, "conv_in")
    assert runs_on_latent(unet, "down_blocks.1.attentions.0.group_norm")


def test_cross_attention_group_norm_does_not_run_on_the_latent() -> None:
    torch.manual_seed(0)
    unet = if_stage1_only_cross()  # cross_attention_norm="group_norm": a GroupNorm over the text tokens
    assert isinstance(unet.get_submodule("mid_block.attentions.0.norm_cross"), torch.nn.GroupNorm)
    assert not runs_on_latent(unet, "mid_block.attentions.0.norm_cross")
    assert runs_on_latent(unet, "mid_block.attentions.0.group_norm")  # the image tokens' norm


def test_a_plan_that_splits_the_hint_block_is_refused() -> None:
    torch.manual_seed(0)
    unet = kandinsky22_controlnet_only_cross()
    splittable = [n for n, m in unet.named_modules() if n and split_reason(m) is not None]
    with pytest.raises(UnsupportedModuleError, match=r"add_embedding\.input_hint_block\.0 \(Conv2d\) does not run"):
        audit_conversion(unet, splittable)  # the plan of pcpp before runs_on_latent: every conv, hint block included


def test_a_plan_that_skips_a_row_mixing_module_is_refused() -> None:
    torch.manual_seed(0)
    unet = sd()
    converted = [n for n, m in unet.named_modules() if n and runs_on_latent(unet, n) and split_reason(m) is not None]
    converted += [n for n, m in unet.named_modules() if applies_freeu(m)]  # FreeU's up blocks (pcpp.layers.freeu)
    audit_conversion(unet, converted)  # complete: accepted
    with pytest.raises(UnsupportedModuleError, match=r"conv_out \(Conv2d\): a conv with 3 kernel rows"):
        audit_conversion(unet, [n for n in converted if n != "conv_out"])


def test_added_kv_attention_must_be_split_unless_only_cross_attention() -> None:
    from zoo import _kandinsky

    torch.manual_seed(0)
    mixed = _kandinsky("image", 4, 100).get_submodule("mid_block.attentions.0")
    pure = _kandinsky("image", 4, 100, only_cross_attention=True).get_submodule("mid_block.attentions.0")
    assert mixed.is_cross_attention
    assert pure.is_cross_attention
    assert "attends over the image tokens" in (split_reason(mixed) or "")
    assert split_reason(pure) is None


def test_freeu_enabled_follows_diffusers() -> None:
    torch.manual_seed(0)
    unet: UNet2DConditionModel = sd()
    assert not freeu_enabled(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert freeu_enabled(unet)
    unet.disable_freeu()
    assert not freeu_enabled(unet)
    unet.enable_freeu(s1=0.0, s2=0.2, b1=1.2, b2=1.4)  # diffusers runs FreeU only when all four are nonzero
    assert not freeu_enabled(unet)


def _table() -> str:
    """The zoo's table for docs/zoo.md: ``PYTHONPATH=src python tests/test_zoo.py`` (about 3 process groups)."""
    rows = ["| model | diffusers test | 2 ranks | 3 ranks | 3 ranks, uneven strips |", "|---|---|---|---|---|"]
    results = {layout: _results(layout, tuple(ZOO)) for layout in LAYOUTS}
    for name, model in ZOO.items():
        cells = []
        for layout in LAYOUTS:
            per_rank = [ranks[name] for ranks in results[layout]]
            first = per_rank[0]
            if first["status"] == "exact" and all(r["status"] == "exact" for r in per_rank):
                error = max(r["max_error"] for r in per_rank)
                cells.append(f"exact, {error:.1e} (H={first['height']})")
            elif first["status"] == "refused":
                cells.append("refused")
            else:
                cells.append(f"**{first['status']}**")
        refusal = ""
        if per_rank[0]["status"] == "refused":
            refusal = " ".join(per_rank[0]["message"].split("\n")[:2]).replace("|", "\\|")
        rows.append(
            f"| {name} | {model.source} | "
            + " | ".join(cells)
            + " |"
            + (f"\n| | ↳ {refusal} | | | |" if refusal else "")
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(_table())


def _labelled(label: str, message: str) -> str:
    return f"{label}: {message}"
