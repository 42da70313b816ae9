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


@pytest.mark.parametrize(
    ("world", "mesh", "modes"), [(2, {"cfg": 2, "patch": 1}, MODES_CFG_ONLY), (3, {"cfg": 1, "patch": 3}, MODES)]
)
def test_bench_on_gloo(tmp_path: Path, world: int, mesh: dict[str, int], modes: list[str]) -> None:
    """2 ranks (CFG split) and 3 ranks (three strips): the report has every field, exact mode is exact, partial:0
    sends no attention bytes after warmup, and floors and speedups are numbers."""
    config = {"_class_name": "UNet2DConditionModel", **tiny_unet_config("sdxl")}
    config_path = tmp_path / "tiny-sdxl.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "report.json"
    argv = [
        "--config", str(config_path),
        "--device", "cpu",
        "--dtype", "float32",
        "--steps", "3",
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

    report = json.loads(out.read_text())
    for key in ("environment", "settings", "unet", "timing", "fidelity_note", "results"):
        assert key in report, key
    assert report["environment"]["world_size"] == world
    assert report["environment"]["mesh"] == mesh
    res = report["results"]["96x96"]
    assert res["latent"] == [12, 12]
    assert set(modes) <= res["modes"].keys()
    pcpp_modes = [m for m in modes if m not in ("single", "floor")]
    modes = res["modes"]

    single = modes["single"]
    assert single["best_variant"] == "eager"
    assert _is_number(single["median_ms"])
    single_steps = single["variants"]["eager"]["steps"]
    assert len(single_steps["per_step_ms"]) == 3
    assert all(_is_number(x) and x > 0 for x in single_steps["per_step_ms"])
    # The steps are inside the loop's clock: their sum cannot exceed the image's time.
    assert sum(single_steps["per_step_ms"]) <= single["variants"]["eager"]["median_ms"] * 1.01

    floors = modes["floor"]
    for name in pcpp_modes:
        assert _is_number(floors[name]["median_ms"]), name
        assert _is_number(floors[name]["speedup_vs_single"]), name
        assert len(floors[name]["per_rank_median_ms"]) == world
        assert [len(r["per_step_ms"]) for r in floors[name]["steps_per_rank"]] == [3] * world

    for name in pcpp_modes:
        entry = modes[name]
        variant = entry["variants"]["eager"]
        assert _is_number(entry["median_ms"]), name
        assert _is_number(entry["speedup_vs_single"]), name
        assert _is_number(entry["floor_ms"]), name
        assert len(variant["per_rank_median_ms"]) == world
        assert len(variant["traffic_per_rank"]) == world
        fidelity = variant["fidelity"]
        assert len(fidelity["rel_l2_eps_per_step"]) == 3
        assert all(_is_number(e) for e in fidelity["rel_l2_eps_per_step"])
        assert fidelity["after_warmup_steps"] == [1, 2]
        assert variant["repeat_consistency_rel_l2"] < 1e-6, name  # every image starts from the same x_T
        assert variant["nonfinite_eps_steps"] == []
        for steps in variant["steps_per_rank"]:  # step 0 synchronous, step 1 the first asynchronous, then step 2
            per_step = steps["per_step_ms"]
            assert len(per_step) == 3
            if name == "exact":
                assert steps["sync_mean_ms"] == pytest.approx(sum(per_step) / 3, abs=1e-3)
                assert steps["first_async_ms"] is None
                assert steps["async_median_ms"] is None
            else:
                assert steps["sync_mean_ms"] == pytest.approx(per_step[0], abs=1e-3)
                assert steps["first_async_ms"] == pytest.approx(per_step[1], abs=1e-3)
                assert steps["async_median_ms"] == pytest.approx(per_step[2], abs=1e-3)

    exact = modes["exact"]["variants"]["eager"]
    assert exact["fidelity"]["rel_l2_eps_after_warmup"]["max"] < 1e-4
    assert all(t["async"] is None for t in exact["traffic_per_rank"])  # exact: every step synchronous

    for rank_traffic in modes["partial:0"]["variants"]["eager"]["traffic_per_rank"]:
        assert rank_traffic["async"]["sent_bytes_by_kind"]["attention"] == 0
        assert rank_traffic["async"]["received_bytes_by_kind"]["attention"] == 0
    if mesh["patch"] > 1:
        partial = modes["partial:0.3"]["variants"]["eager"]["traffic_per_rank"]
        assert all(t["async"]["sent_bytes_by_kind"]["attention"] > 0 for t in partial)  # neighbour rows after warmup
        sync = modes["partial:0"]["variants"]["eager"]["traffic_per_rank"][0]["sync"]
        assert sync["sent_bytes_by_kind"]["attention"] > 0  # warmup steps gather every strip
    else:
        sync = modes["partial:0"]["variants"]["eager"]["traffic_per_rank"][0]["sync"]
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
