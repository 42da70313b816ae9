"""``pcpp bench --whole-image`` and ``--vae-floor`` on the CPU with a tiny SDXL-shaped pipeline."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pcpp import bench
from pcpp.bench.arguments import parse_args
from pcpp.bench.vae_floor import strip_rows
from pcpp.testing import run_distributed, tiny_unet_config

# Four blocks, as SDXL's VAE: 8 image pixels per latent pixel.
TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [8, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "latent_channels": 4,
    "in_channels": 3,
    "out_channels": 3,
    "sample_size": 64,
}


def bench_worker(rank: int, world: int, argv: list[str]) -> int:
    """One rank of ``python -m pcpp.bench`` inside an existing gloo group."""
    return bench.main(argv)


def _configs(tmp_path: Path) -> list[str]:
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({"_class_name": "UNet2DConditionModel", **tiny_unet_config("sdxl")}))
    vae = tmp_path / "vae.json"
    vae.write_text(json.dumps(TINY_VAE))
    return ["--config", str(unet), "--vae-config", str(vae), "--device", "cpu", "--dtype", "float32"]


@pytest.mark.parametrize("world", [1, 2])
def test_whole_image(tmp_path: Path, world: int) -> None:
    """Whole images: every phase timed on every rank, the phases add up to the image, the VAE's share is the
    decode over the image, no peak memory on the CPU; with 2 ranks (two strips) both VAE placements and the plain
    pipeline on rank 0 alone."""
    out = tmp_path / "report.json"
    placements = ["parallel", "whole"] if world == 2 else ["parallel"]
    argv = [
        *_configs(tmp_path), "--whole-image", "--modes", "single", "partial:0.3", "--vae-placements", *placements,
        "--resolutions", "64", "--steps", "2", "--warmup-steps", "1", "--repeats", "1", "--no-cfg-split",
        "--deadline-s", "120", "--pg-timeout-s", "60", "--out", str(out),
    ]  # fmt: skip
    assert run_distributed(bench_worker, world, argv, timeout=150, group_timeout=60) == [0] * world
    report = json.loads(out.read_text())
    assert report["task"] == "whole-image"
    assert report["pipeline"] == "StableDiffusionXLPipeline"
    assert set(report["parts"]) == {"text_encoder", "text_encoder_2", "vae"}
    res = report["results"]["64x64"]
    assert res["latent"] == [8, 8]
    assert res["strip_rows"] == ([4, 4] if world == 2 else [8])
    single = res["modes"]["single"]
    assert single["median_ms"] == single["variants"]["whole"]["image_ms"]
    entries = [("single", "whole", single["variants"]["whole"], 1)]
    pcpp_entry = res["modes"]["partial:0.3"]
    assert list(pcpp_entry["variants"]) == placements
    entries += [("partial:0.3", p, pcpp_entry["variants"][p], world) for p in placements]
    for name, placement, v, ranks in entries:
        assert len(v["per_rank"]) == ranks, (name, placement)
        assert v["peak_mem_bytes_per_rank"] == [None] * ranks  # the CPU has no allocator peak to report
        for rank in v["per_rank"]:
            med = rank["medians"]
            assert all(med[k] > 0 for k in ("image_ms", "text_ms", "loop_ms", "decode_ms")), med
            parts = med["text_ms"] + med["loop_ms"] + med["decode_ms"] + med["other_ms"]
            assert parts == pytest.approx(med["image_ms"], rel=1e-9)
            assert rank["vae_share"] == pytest.approx(med["decode_ms"] / med["image_ms"])
        assert v["image_ms"] == max(r["medians"]["image_ms"] for r in v["per_rank"])  # the slowest rank
        assert v["vae_share"] == pytest.approx(v["decode_ms"] / v["image_ms"])
        assert 0 < v["vae_share"] < 1
        if name != "single":
            assert v["speedup_vs_single"] == pytest.approx(single["median_ms"] / v["median_ms"])


def test_vae_floor(tmp_path: Path) -> None:
    """The decode floor: the whole latent and rank 0's strip of 4 with its halo row, eagerly and compiled
    (backend eager: Dynamo traces the plain and the pcpp-converted decoder, hooks included; aot_eager fails on the
    CPU for the plain diffusers VAE alone, in GroupNorm: "Expected X.is_contiguous"), the converted decoder on one
    rank beside the plain one at strips 1."""
    out = tmp_path / "floor.json"
    argv = [
        *_configs(tmp_path), "--vae-floor", "--resolutions", "64", "--strips", "1", "4", "--vae-converted",
        "--compile", "--compile-backend", "eager", "--repeats", "1", "--deadline-s", "120", "--out", str(out),
    ]  # fmt: skip
    assert run_distributed(bench_worker, 1, argv, timeout=150) == [0]
    report = json.loads(out.read_text())
    assert report["task"] == "vae-floor"
    assert report["vae"]["halo_rows"] == 1
    rows = report["results"]["64x64"]["rows"]
    assert [(r["strips"], r["variant"]) for r in rows] == [(s, v) for s in (1, 4) for v in ("eager", "compile")]
    for r in rows:
        assert "error" not in r, r
        assert "skipped" not in r, r
        assert r["median_ms"] > 0
        assert r["peak_mem_bytes"] is None
        assert (r["strip_rows"], r["decoded_rows"]) == {1: (8, 8), 2: (4, 5), 4: (2, 3)}[r["strips"]]
        if r["strips"] == 1:
            assert math.isfinite(r["pcpp_over_plain"])
            assert r["pcpp_one_rank_ms"] > 0
        else:
            assert "pcpp_over_plain" not in r


def test_strip_rows_and_usage_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's strip as the parallel decoder splits rows (the first strips one longer), with its halo; one-line
    usage errors for what the two tasks do not do."""
    assert strip_rows(10, 3, 1) == (4, 5)
    assert strip_rows(2, 2, 1) == (1, 2)
    assert strip_rows(7, 1, 1) == (7, 7)
    args = parse_args(["--device", "cpu", "--whole-image"])
    assert [m.name for m in args.modes] == ["partial:0.3"]
    assert [p.value for p in args.vae_placements] == ["parallel"]
    assert parse_args(["--device", "cpu"]).modes[0].name == "single"  # the UNet's defaults are unchanged
    cases: list[tuple[list[str], str]] = [
        (["--whole-image", "--modes", "floor"], "--whole-image runs single and pcpp modes"),
        (["--whole-image", "--compile"], "--compile applies to the UNet's loop alone"),
        (["--whole-image", "--vae-placements", "tiled"], "unknown VAE placement 'tiled'"),
        (["--whole-image", "--vae-floor"], "not allowed with argument"),
        (["--vae-floor", "--strips", "0"], "--strips must be at least 1"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_:
            parse_args(["--device", "cpu", *argv])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err, argv
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--vae-floor"])
    assert "--vae-floor runs on one process" in capsys.readouterr().err
