"""The README's main job, small: `pcpp generate` with the shipped tiny model on 2 gloo ranks and on 1 process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pcpp.testing import run_distributed


def _generate(rank: int, world: int, out: str, extra: list[str]) -> int:
    from pcpp.cli import generate_main

    args = ["--height", "32", "--width", "32", "--steps", "6", "--out", out, "--report", out + ".json", *extra]
    return generate_main(args)


@pytest.mark.parametrize(("extra", "min_psnr"), [(["--exact"], 60.0), ([], 20.0)])
def test_generate_on_two_ranks_writes_an_image_close_to_one_device(
    tmp_path: Path, extra: list[str], min_psnr: float
) -> None:
    """Both ranks exit 0, rank 0 writes a PNG and reports PSNR against the single-device image: exact mode is
    float rounding away (> 60 dB; measured ~100 dB or infinite), partial 0.3 with 4 warmup steps of 6 stays
    recognisably the same image (> 20 dB; measured 35-40 dB at 64 px)."""
    out = tmp_path / "image.png"
    assert run_distributed(_generate, 2, str(out), extra) == [0, 0]
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = json.loads(Path(str(out) + ".json").read_text())
    assert report["world"] == 2
    assert report["psnr_db"] > min_psnr, report


def test_generate_without_torchrun_runs_on_one_process(tmp_path: Path) -> None:
    from pcpp.cli import generate_main

    out = tmp_path / "one.png"
    assert generate_main(["--height", "32", "--width", "32", "--steps", "3", "--no-reference", "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
