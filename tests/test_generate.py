"""The README's main job, small: `pcpp generate` with the shipped tiny model on 2 gloo ranks and on 1 process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pcpp.testing import run_distributed


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _generate(rank: int, world: int, out: str, extra: list[str]) -> int:
    from pcpp.cli import generate_main

    args = ["--height", "32", "--width", "32", "--steps", "6", "--out", out, "--report", out + ".json", *extra]
    return generate_main(args)


@pytest.mark.parametrize(("extra", "min_psnr"), [(["--exact"], 60.0), ([], 20.0)])
def test_generate_on_two_ranks_writes_an_image_close_to_one_device(
    tmp_path: Path, extra: list[str], min_psnr: float
) -> None:
    """Both ranks exit 0, rank 0 writes a PNG and reports PSNR against the single-device image: exact mode is
    float rounding away (> 60 dB; measured ~100 dB or identical), partial 0.3 with 4 warmup steps of 6 stays
    recognisably the same image (> 20 dB; measured 35-40 dB at 64 px). The report is strict JSON: identical images
    have ``"psnr_db": null`` and ``"identical": true`` instead of an infinite PSNR."""
    out = tmp_path / "image.png"
    assert run_distributed(_generate, 2, str(out), extra) == [0, 0]
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    report = _strict_json(Path(str(out) + ".json").read_text())
    assert report["world"] == 2
    assert report["synchronous_steps"] == (6 if extra else 4)
    if report["identical"]:
        assert report["psnr_db"] is None, report
        assert report["max_abs_diff"] == 0.0, report
    else:
        assert report["psnr_db"] > min_psnr, report


def _generate_with_slow_reference(rank: int, world: int, out: str, timeout_s: float) -> int:
    """`pcpp generate` on this rank, with every single-device run (an unconverted UNet) made timeout_s + 2 s slower."""
    import time

    import pcpp
    import pcpp.models
    from pcpp.cli import generate_main

    plain = pcpp.models.sample

    def slow_when_single_device(model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not pcpp.is_converted(model.unet):
            time.sleep(timeout_s + 2)
        return plain(model, *args, **kwargs)

    pcpp.models.sample = slow_when_single_device  # the command looks it up when it loads the model
    args = ["--height", "16", "--width", "16", "--steps", "2", "--exact", "--timeout-s", str(timeout_s)]
    return generate_main([*args, "--out", out, "--report", out + ".json"])


def test_single_device_reference_does_not_count_against_the_peer_timeout(tmp_path: Path) -> None:
    """Issue 14: with --timeout-s 10 the other ranks used to time out while rank 0 computed the single-device
    reference. Here the reference takes longer than the timeout (15 s + 2 s) and both ranks still succeed."""
    out = tmp_path / "image.png"
    assert run_distributed(_generate_with_slow_reference, 2, str(out), 15.0) == [0, 0]
    report = _strict_json(Path(str(out) + ".json").read_text())
    assert report["single_device_seconds"] > 17.0
    assert report["identical"] or report["psnr_db"] > 60.0, report


@pytest.mark.slow  # a whole image or study: out of the quick loop
def test_generate_without_torchrun_runs_on_one_process(tmp_path: Path) -> None:
    """One process, no torchrun: the saved image is the plain single-device sampler's image for the same prompt,
    seed and settings (3 steps, all synchronous, so up to float rounding; compared after 8-bit quantisation, so
    within 1/255), and the PNG's text chunks hold the prompt, seed and settings."""
    from PIL import Image

    from pcpp.cli import generate_main
    from pcpp.models import load_tiny, sample
    from pcpp.models.imageio import read_png_text

    prompt = "a green ring on a pink background"
    out = tmp_path / "one.png"
    args = ["--prompt", prompt, "--seed", "5", "--height", "32", "--width", "24", "--steps", "3", "--guidance", "3"]
    assert generate_main([*args, "--no-reference", "--out", str(out)]) == 0

    expected = sample(load_tiny(), [prompt], height=32, width=24, steps=3, guidance=3.0, seed=5)[0]
    with Image.open(out) as image:
        assert image.mode == "RGB"
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(pixels, expected, rtol=0, atol=1 / 255 + 1e-6)  # 8-bit rounding of equal floats

    text = read_png_text(out)
    assert text["prompt"] == prompt
    assert text["seed"] == "5"
    assert (text["model"], text["size"], text["steps"], text["guidance"]) == ("tiny", "24x32", "3", "3.0")
    assert (text["world_size"], text["exact"], text["warmup_steps"]) == ("1", "false", "4")
    assert text["mode"] == "exact (warmup 4 covers all 3 steps)"
    assert text["pcpp_version"]


# ----------------------------------------------------------------------------------------------- a pipeline folder


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight StableDiffusionPipeline saved as a folder, for ``--model <folder>`` (nothing is
    downloaded): a two-level UNet under a 2x VAE, so 32x32 pixels are a 16x16 latent, 8 rows a rank on 2."""
    from pipeline_parts import Spec, build_pipeline

    root = tmp_path_factory.mktemp("tiny-sd")
    build_pipeline(Spec(), root / "tokenizer-files").save_pretrained(root / "pipeline")
    return root / "pipeline"


def _generate_logged(rank: int, world: int, out: str, extra: list[str]) -> tuple[int, list[str]]:
    """:func:`_generate`, and the messages pcpp logged on this rank (rank 0 logs at INFO, the others WARNING)."""
    import logging

    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logging.getLogger("pcpp").addHandler(Keep())
    return _generate(rank, world, out, extra), messages


@pytest.mark.parametrize("vae", ["parallel", "whole"])
def test_generate_a_pipeline_on_two_ranks_matches_one_device(tiny_sd: Path, tmp_path: Path, vae: str) -> None:
    """`pcpp generate --model <pipeline folder> --exact` on 2 gloo ranks goes through pcpp.parallelize (the VAE
    on strips by default, whole with --vae whole), reverts the pipeline, and its image is the single-device
    pipeline's up to float rounding: > 60 dB (the exact UNet and the exact parallel VAE differ from one device only
    in the order of fp32 sums; measured 134 dB) against the reference it computes after pcpp.revert."""
    from pcpp.models.imageio import read_png_text

    out = tmp_path / "image.png"
    results = run_distributed(_generate_logged, 2, str(out), ["--model", str(tiny_sd), "--exact", "--vae", vae])
    assert [status for status, _ in results] == [0, 0]
    report = _strict_json(Path(str(out) + ".json").read_text())
    assert (report["world"], report["vae"], report["synchronous_steps"]) == (2, vae, 6)
    assert report["identical"] or report["psnr_db"] > 60.0, report
    log = "\n".join(results[0][1])
    assert f"parallelised StableDiffusionPipeline (vae {vae.upper()}" in log, log
    assert ("converted AutoencoderKL" in log) == (vae == "parallel"), log
    assert read_png_text(out)["vae"] == vae


def test_vae_option_default_and_refusals(tiny_sd: Path, tmp_path: Path) -> None:
    """--vae defaults to parallel (and --help says so), for one image and for --prompts; it is refused where it
    would have no effect: the tiny model has no VAE."""
    from pcpp import VAEPlacement
    from pcpp.cli.options import UsageError, build_parser, parse_options

    out = ["--out", str(tmp_path / "x.png")]
    model = ["--model", str(tiny_sd), "--height", "32", "--width", "32"]
    assert parse_options([*model, *out], rank=0, world=2).vae is VAEPlacement.PARALLEL
    assert parse_options([*model, "--vae", "whole", *out], rank=0, world=2).vae is VAEPlacement.WHOLE
    assert "(default: parallel)" in " ".join(build_parser().format_help().split())
    with pytest.raises(UsageError, match="the tiny model draws pixels directly and has no VAE"):
        parse_options(["--vae", "parallel", *out], rank=0, world=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    batch = [*model, "--prompts", str(prompts), "--out-dir", str(tmp_path / "images")]
    assert parse_options([*batch, "--vae", "whole"], rank=0, world=2).vae is VAEPlacement.WHOLE
    assert parse_options([*batch, "--vae", "parallel"], rank=0, world=2).vae is VAEPlacement.PARALLEL
    with pytest.raises(UsageError, match="invalid choice: 'tiled'"):
        parse_options([*model, "--vae", "tiled", *out], rank=0, world=2)


@pytest.mark.parametrize("vae", ["parallel", "whole"])
def test_prompts_backend_places_the_vae_as_asked(tiny_sd: Path, vae: str) -> None:
    """``--prompts`` builds its pipeline backend with ``--vae``: the VAE is converted only for ``parallel``."""
    from diffusers import DiffusionPipeline

    import pcpp
    from pcpp.batch import pipeline_backend
    from pcpp.comm import LocalCommunicator

    placement = pcpp.VAEPlacement(vae)
    backend = pipeline_backend(lambda device: DiffusionPipeline.from_pretrained(tiny_sd).to(device), placement)(
        torch.device("cpu")
    )
    backend.parallelize(LocalCommunicator(), pcpp.PCPPConfig(exact=True))
    pipe = backend.pipe  # type: ignore[attr-defined]
    assert pcpp.is_converted(pipe.unet)
    assert pcpp.is_converted(pipe.vae) == (placement is pcpp.VAEPlacement.PARALLEL)
