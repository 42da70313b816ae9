"""The benchmark driver ``pcpp.bench`` end to end on gloo CPU ranks with a tiny SDXL-shaped UNet."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import pytest

from pcpp import bench
from pcpp.bench.arguments import ModeKind, ModeSpec, parse_args, parse_mode, parse_resolution
from pcpp.bench.denoisers import sm_carveout
from pcpp.bench.floor import floor_schedule, widening_table
from pcpp.bench.model import build_unet
from pcpp.bench.profile import kernel_kind
from pcpp.testing import run_distributed, tiny_unet_config

MODES = ["single", "floor", "exact", "full", "partial:0.3", "partial:0"]
# With 2 ranks the CFG split leaves one strip per image, where every pcpp mode computes the same: keep the test short.
MODES_CFG_ONLY = ["single", "floor", "exact", "partial:0"]


def bench_worker(rank: int, world: int, argv: list[str]) -> int:
    """One rank of ``python -m pcpp.bench`` inside an existing gloo group."""
    return bench.main(argv)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _strict_json(text: str) -> Any:
    """Parse ``text`` as strict JSON: NaN and infinities (which ``json.dumps`` writes unless ``allow_nan=False``)
    are refused."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"the report holds {name}, which strict JSON lacks")

    return json.loads(text, parse_constant=refuse)


# The tiny SDXL UNet has 2 downsampling levels, so strips are multiples of 4 latent rows: 96 px = 12 latent rows
# split 4/4/4 over 3 strips. Keys read at level 0 by each strip (own rows + others'): every strip 12; partial:0.3
# ceil(0.3 * 4) = 2 rows of each neighbour; partial:0 none.
KEY_ROWS_3 = {"all": [12, 12, 12], "partial:0.3": [6, 8, 6], "partial:0": [4, 4, 4]}


@pytest.mark.parametrize(
    ("world", "mesh", "modes"), [(2, {"cfg": 2, "patch": 1}, MODES_CFG_ONLY), (3, {"cfg": 1, "patch": 3}, MODES)]
)
def test_bench_on_gloo(tmp_path: Path, world: int, mesh: dict[str, int], modes: list[str]) -> None:
    """2 ranks (CFG split) and 3 ranks (three strips): the report is strict JSON; step counts, phases and their
    arithmetic are right; synchronous steps (and every step where nothing is split) match the plain UNet while
    approximate steps do not; the floor widens keys as each mode reads; speedups are the ratios of the medians;
    exact sends only synchronous traffic and partial:0 no attention bytes after warmup."""
    config = {"_class_name": "UNet2DConditionModel", **tiny_unet_config("sdxl")}
    config_path = tmp_path / "tiny-sdxl.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "report.json"
    steps = 3
    argv = [
        "--config", str(config_path),
        "--device", "cpu",
        "--dtype", "float32",
        "--steps", str(steps),
        "--warmup-steps", "1",
        "--repeats", "1",
        "--resolutions", "96",
        "--modes", *modes,
        "--no-cuda-graph",
        "--deadline-s", "240",
        "--pg-timeout-s", "120",
        "--out", str(out),
    ]  # fmt: skip
    codes = run_distributed(bench_worker, world, argv, timeout=240, group_timeout=120)
    assert codes == [0] * world

    report = _strict_json(out.read_text())
    assert report["environment"]["world_size"] == world
    assert report["environment"]["mesh"] == mesh
    assert report["settings"]["steps"] == steps
    assert report["unet"]["levels"] == 2
    assert report["unet"]["unit_rows"] == 4
    res = report["results"]["96x96"]
    assert res["latent"] == [12, 12]
    assert res["strip_rows"] == ([4, 4, 4] if mesh["patch"] == 3 else [12])
    assert set(res["modes"]) == set(modes)
    pcpp_modes = [m for m in modes if m not in ("single", "floor")]
    modes_ = res["modes"]

    single = modes_["single"]
    eager = single["variants"]["eager"]
    assert single["best_variant"] == "eager"
    assert single["median_ms"] == eager["median_ms"] == eager["times_ms"][0] > 0  # one timed image
    assert len(eager["warmup_ms"]) == 1
    per_step = eager["steps"]["per_step_ms"]
    assert len(per_step) == steps
    assert all(_is_number(x) and x > 0 for x in per_step)
    # The steps are inside the loop's clock: their sum cannot exceed the image's time.
    assert sum(per_step) <= eager["median_ms"] * 1.01

    floors = modes_["floor"]
    assert set(floors) == {*pcpp_modes, "wall_s"}  # one floor per pcpp mode, and the time they took
    for name in pcpp_modes:
        floor = floors[name]
        assert floor["median_ms"] == pytest.approx(max(floor["per_rank_median_ms"]))  # the slowest rank
        assert floor["speedup_vs_single"] == pytest.approx(single["median_ms"] / floor["median_ms"])
        assert floor["sync_steps"] == (steps if name in ("exact", "full") else 1)
        assert [len(r["per_step_ms"]) for r in floor["steps_per_rank"]] == [steps] * world
        for rank_steps in floor["steps_per_rank"]:
            assert rank_steps["sync_mean_ms"] == pytest.approx(
                sum(rank_steps["per_step_ms"][: floor["sync_steps"]]) / floor["sync_steps"], abs=1e-3
            )
        key_rows = floor["key_rows_level0_per_rank"]
        assert len(key_rows) == world
        if mesh["patch"] == 3:
            assert [r["all"] for r in key_rows] == KEY_ROWS_3["all"], name
            if name.startswith("partial"):
                assert [r[name] for r in key_rows] == KEY_ROWS_3[name], name
        else:  # one strip per image: nothing to widen
            assert all(set(r.values()) == {12} for r in key_rows), name
    if "full" in floors:  # exact and full read every strip at every step: measured once
        assert floors["full"]["same_as"] == "exact"

    for name in pcpp_modes:
        entry = modes_[name]
        variant = entry["variants"]["eager"]
        assert entry["median_ms"] == variant["median_ms"] == variant["per_rank_median_ms"][0]
        assert len(variant["per_rank_median_ms"]) == world
        assert entry["speedup_vs_single"] == pytest.approx(single["median_ms"] / entry["median_ms"]), name
        assert entry["floor_ms"] == floors[name]["median_ms"], name
        assert entry["floor_over_mode"] == pytest.approx(entry["floor_ms"] / entry["median_ms"]), name
        assert variant["repeat_consistency_rel_l2"] < 1e-6, name  # every image starts from the same x_T
        assert variant["warmup_vs_timed_rel_l2"] < 1e-6, name
        assert variant["nonfinite_eps_steps"] == []
        n_sync = steps if name == "exact" else 1
        for steps_ in variant["steps_per_rank"]:  # step 0 synchronous, step 1 the first asynchronous, then step 2
            per_step = steps_["per_step_ms"]
            assert len(per_step) == steps
            assert steps_["sync_mean_ms"] == pytest.approx(sum(per_step[:n_sync]) / n_sync, abs=1e-3)
            if name == "exact":
                assert steps_["first_async_ms"] is None
                assert steps_["async_median_ms"] is None
            else:
                assert steps_["first_async_ms"] == pytest.approx(per_step[1], abs=1e-3)
                assert steps_["async_median_ms"] == pytest.approx(per_step[2], abs=1e-3)
        assert sum(variant["steps_per_rank"][0]["per_step_ms"]) <= variant["median_ms"] * 1.01  # rank 0's clock
        for traffic in variant["traffic_per_rank"]:  # the warm-up image's 3 eager steps
            assert traffic["recorded_steps"] == steps
            assert traffic["sync"]["step"] == 0
            assert traffic["sync"]["steps_recorded"] == n_sync
            if name == "exact":
                assert traffic["async"] is None
            else:
                assert traffic["async"]["steps_recorded"] == steps - 1
                assert traffic["async"]["step"] in (1, 2)
            for phase in ("sync", "async"):
                if traffic[phase] is not None:
                    assert sum(traffic[phase]["sent_bytes_by_kind"].values()) == traffic[phase]["sent_bytes"]

        fidelity = variant["fidelity"]
        eps_err, guided_err = fidelity["rel_l2_eps_per_step"], fidelity["rel_l2_guided_per_step"]
        assert len(eps_err) == len(guided_err) == steps
        assert fidelity["after_warmup_steps"] == [1, 2]
        assert fidelity["rel_l2_eps_after_warmup"]["max"] == pytest.approx(max(eps_err[1:]))
        assert fidelity["rel_l2_eps_after_warmup"]["mean"] == pytest.approx(sum(eps_err[1:]) / 2)
        # float32 on the CPU: a synchronous step equals the plain UNet up to the rounding of a different
        # summation order (about 1e-7 here); 1e-5 leaves room and is far below any approximation's error.
        assert eps_err[0] < 1e-5, name
        assert guided_err[0] < 1e-5, name
        if name == "exact" or mesh["patch"] == 1:  # exact, or nothing split: every step as the plain UNet
            assert max(eps_err) < 1e-5, name
            assert max(guided_err) < 1e-5, name
        else:  # stale neighbour activations after warmup: the error is measured, not zero
            assert min(eps_err[1:]) > 1e-5, name

    for rank_traffic in modes_["partial:0"]["variants"]["eager"]["traffic_per_rank"]:
        assert rank_traffic["async"]["sent_bytes_by_kind"]["attention"] == 0
        assert rank_traffic["async"]["received_bytes_by_kind"]["attention"] == 0
    if mesh["patch"] > 1:
        partial = modes_["partial:0.3"]["variants"]["eager"]["traffic_per_rank"]
        assert all(t["async"]["sent_bytes_by_kind"]["attention"] > 0 for t in partial)  # neighbour rows after warmup
        sync = modes_["partial:0"]["variants"]["eager"]["traffic_per_rank"][0]["sync"]
        assert sync["sent_bytes_by_kind"]["attention"] > 0  # warmup steps gather every strip
    else:
        sync = modes_["partial:0"]["variants"]["eager"]["traffic_per_rank"][0]["sync"]
        assert sync["sent_bytes_by_kind"]["attention"] == 0  # a CFG split alone has no strips to exchange
        assert sync["sent_bytes_by_kind"]["output"] > 0  # only the CFG halves are gathered


def test_parse_modes_and_resolutions() -> None:
    """Mode and size parsing, with readable errors."""
    assert parse_mode("partial:0.30").name == "partial:0.3"
    assert parse_mode("partial") == ModeSpec(name="partial:0.3", kind=ModeKind.PCPP, partial=0.3)
    assert parse_mode("full").full
    assert parse_mode("exact").exact
    assert parse_resolution("1024") == (1024, 1024)
    assert parse_resolution("768x1024") == (768, 1024)
    for bad in ("partial:2", "fast"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_mode(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_resolution("1001")
    args = parse_args(["--device", "cpu", "--modes", "single", "floor", "full"])
    assert [m.name for m in args.floor_modes] == ["full"]
    assert not args.cuda_graph
    assert args.dtype == "float32"


def test_sm_carveout_option(capsys: pytest.CaptureFixture[str]) -> None:
    """``--sm-carveout`` is checked before anything runs, and the setting is restored after a pcpp run."""
    assert parse_args(["--device", "cuda", "--sm-carveout", "8"]).sm_carveout == 8
    for argv, message in (
        (["--device", "cpu", "--sm-carveout", "8"], "use it with --device cuda"),
        (["--device", "cuda", "--sm-carveout", "-1"], "must be >= 0, got -1"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    torch = pytest.importorskip("torch")
    before = torch._C._get_sm_carveout_experimental()
    with sm_carveout(8):
        assert torch._C._get_sm_carveout_experimental() == 8
    assert torch._C._get_sm_carveout_experimental() == before
    with pytest.raises(RuntimeError, match="inside"), sm_carveout(4):
        raise RuntimeError("inside")
    assert torch._C._get_sm_carveout_experimental() == before
    with sm_carveout(None):
        assert torch._C._get_sm_carveout_experimental() == before


def test_floor_widening() -> None:
    """Floor key widths: every other strip, or ceil(p * rows) of each existing neighbour, at every level."""
    rows = (8, 4, 4)
    assert widening_table(rows, 0, 16, 2, "all") == {8 * 16: 8 * 16, 4 * 8: 4 * 8, 2 * 4: 2 * 4}
    assert widening_table(rows, 1, 16, 2, "partial:0.3") == {4 * 16: 5 * 16, 2 * 8: 3 * 8, 1 * 4: 2 * 4}
    assert widening_table(rows, 2, 16, 2, "partial:0") == {4 * 16: 0, 2 * 8: 0, 1 * 4: 0}
    schedule = floor_schedule(parse_mode("partial:0.3"), steps=6, sync_steps=2)
    assert schedule == ["all", "all"] + ["partial:0.3"] * 4
    assert floor_schedule(parse_mode("full"), steps=3, sync_steps=1) == ["all"] * 3


def test_bench_one_rank_with_given_weights(tmp_path: Path) -> None:
    """One rank: pcpp modes run (nothing is split, so they reproduce the plain UNet), on weights loaded with
    --weights (what the DistriFusion runner's --save-weights writes) instead of the seeded random ones."""
    import torch

    config = {"_class_name": "UNet2DConditionModel", **tiny_unet_config("sdxl")}
    config_path = tmp_path / "tiny-sdxl.json"
    config_path.write_text(json.dumps(config))
    unet = build_unet(config, 123, torch.device("cpu"), torch.float32, on_device=False)
    weights = tmp_path / "weights.pt"
    torch.save(unet.state_dict(), weights)
    out = tmp_path / "report.json"
    argv = [
        "--config", str(config_path), "--device", "cpu", "--dtype", "float32", "--steps", "3",
        "--warmup-steps", "1", "--repeats", "1", "--resolutions", "64", "--modes", "single", "partial:0.3",
        "--no-cuda-graph", "--weights", str(weights), "--deadline-s", "120", "--out", str(out),
    ]  # fmt: skip
    assert run_distributed(bench_worker, 1, argv, timeout=150) == [0]
    modes = json.loads(out.read_text())["results"]["64x64"]["modes"]
    variant = modes["partial:0.3"]["variants"]["eager"]
    assert variant["fidelity"]["rel_l2_eps_after_warmup"]["max"] < 1e-6  # one rank: the plain UNet's output
    assert _is_number(modes["single"]["median_ms"])

    wrong = tmp_path / "wrong.pt"
    torch.save({"not_a_key": torch.zeros(1)}, wrong)
    argv[argv.index(str(weights))] = str(wrong)
    assert run_distributed(bench_worker, 1, argv, timeout=150) != [0]  # strict loading: a wrong file fails


def test_bench_profile_writes_tables_and_per_step_summaries(tmp_path: Path) -> None:
    """`--profile DIR`: one more image per variant under torch.profiler; every rank writes its table, and the
    report gives operators (CPU) per step for the single path, the floor and pcpp."""
    config = {"_class_name": "UNet2DConditionModel", **tiny_unet_config("sdxl")}
    config_path = tmp_path / "tiny-sdxl.json"
    config_path.write_text(json.dumps(config))
    out, folder = tmp_path / "report.json", tmp_path / "profiles"
    argv = [
        "--config", str(config_path), "--device", "cpu", "--dtype", "float32", "--steps", "2",
        "--warmup-steps", "1", "--repeats", "1", "--resolutions", "64", "--no-cfg-split",
        "--modes", "single", "floor", "partial:0.3", "--no-cuda-graph", "--no-fidelity",
        "--profile", str(folder), "--deadline-s", "240", "--pg-timeout-s", "120", "--out", str(out),
    ]  # fmt: skip
    assert run_distributed(bench_worker, 2, argv, timeout=240, group_timeout=120) == [0, 0]
    modes = json.loads(out.read_text())["results"]["64x64"]["modes"]
    summaries = [modes["single"]["variants"]["eager"]["profile"]]
    summaries += modes["floor"]["partial:0.3"]["profile_per_rank"]
    summaries += modes["partial:0.3"]["variants"]["eager"]["profile_per_rank"]
    assert len(summaries) == 5
    for summary in summaries:
        assert summary["kernels_per_step"]["cpu_ops"] > 10, summary
        assert summary["device_ms_per_step"]["cpu_ops"] > 0, summary
        assert "aten::" in Path(summary["file"]).read_text()
    assert {Path(s["file"]).name.rsplit(".rank", 1)[1] for s in summaries} == {"0.txt", "1.txt"}


def test_kernel_kinds() -> None:
    """Kernel names from an H100 profile fall into the kinds the profile summary reports."""
    assert kernel_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "nccl"
    assert kernel_kind("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert kernel_kind("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64") == "gemm"
    assert kernel_kind("triton_red_fused_add_bmm_div_native_layer_norm_view_71") == "triton"
    assert kernel_kind("triton_poi_fused_add_convolution_native_group_norm_3") == "triton"
    assert kernel_kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NTN") == "gemm"
    assert kernel_kind("void at::native::(anonymous namespace)::scatter_gather_elementwise_kernel") == "other"
    assert kernel_kind("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc") == "conv"
    assert kernel_kind("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>") == "copy"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"
