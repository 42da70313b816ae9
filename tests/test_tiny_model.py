"""Tests of pcpp's own tiny model (pcpp.models): data, tokenizer, packaged weights and the plain sampler.

Everything runs on the CPU in a few seconds: the model is loaded once per module and images are 32x32 with 10
DDIM steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from pcpp.models import (
    COLORS,
    SHAPES,
    VOCABULARY,
    TinyModel,
    TinyTokenizer,
    encode_prompts,
    load_tiny,
    render_scenes,
    sample,
    sample_scenes,
    save_tiny,
    scene_captions,
    weights_dir,
)
from pcpp.models.check import UNIT_AREAS, nearest_colors, read_colors, read_shape, total_variation
from pcpp.models.imageio import encode_png, image_grid, read_png_text, save_png
from pcpp.models.shapes import shape_sdf

# (prompt, object colour, background colour, shape)
PROMPTS = (
    ("a red circle on a blue background", "red", "blue", "circle"),
    ("a yellow square on a black background", "yellow", "black", "square"),
)


@pytest.fixture(scope="module")
def model() -> TinyModel:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_tiny()


@pytest.fixture(scope="module")
def images(model: TinyModel) -> Tensor:
    return sample(model, [p for p, *_ in PROMPTS], height=32, width=32, steps=10, seed=0)


def _noise_image() -> Tensor:
    gen = torch.Generator().manual_seed(0)
    return ((torch.randn(3, 32, 32, generator=gen) + 1) / 2).clamp(0, 1)


# --- data ---------------------------------------------------------------------------------------------------------


def test_scenes_are_deterministic_and_captioned_in_vocabulary() -> None:
    a = sample_scenes(64, torch.Generator().manual_seed(3))
    b = sample_scenes(64, torch.Generator().manual_seed(3))
    captions = scene_captions(a)
    assert captions == scene_captions(b)
    assert captions != scene_captions(sample_scenes(64, torch.Generator().manual_seed(4)))
    words = {w for c in captions for w in c.split()}
    assert words <= set(VOCABULARY)
    assert any(" and " in c and "stripes" not in c for c in captions)  # several shapes occur
    assert any("stripes" in c for c in captions)
    for caption, n in zip(captions, a.n_objects.tolist(), strict=True):
        assert sum(caption.split().count(s) for s in SHAPES) == n


def test_render_any_size_in_range_and_consistent_across_sizes() -> None:
    scenes = sample_scenes(8, torch.Generator().manual_seed(1))
    small = render_scenes(scenes, 32, 32)
    large = render_scenes(scenes, 128, 128)
    wide = render_scenes(scenes, 32, 48)
    assert small.shape == (8, 3, 32, 32)
    assert large.shape == (8, 3, 128, 128)
    assert wide.shape == (8, 3, 32, 48)
    assert float(small.min()) >= 0.0
    assert float(small.max()) <= 1.0
    # The same scene at 4x the size, averaged back down, is close to the small rendering (resolution independence).
    pooled = torch.nn.functional.avg_pool2d(large, 4)
    assert float((pooled - small).abs().mean()) < 0.03


def test_unit_areas_match_the_drawn_shapes() -> None:
    n = 512
    grid = (torch.arange(n, dtype=torch.float32) + 0.5) / (n / 4) - 2  # [-2, 2] squared, 16 square units
    px = grid.view(1, 1, n).expand(len(SHAPES), n, n)
    py = grid.view(1, n, 1).expand(len(SHAPES), n, n)
    inside = shape_sdf(torch.arange(len(SHAPES)), px, py, torch.ones(len(SHAPES), 1, 1)) < 0
    areas = inside.float().mean((1, 2)) * 16
    assert torch.allclose(areas, torch.tensor(UNIT_AREAS, dtype=torch.float32), rtol=0.01)


@pytest.mark.slow  # a whole image or study: out of the quick loop
def test_shape_reader_reads_rendered_shapes() -> None:
    """read_shape recognises at least 85% of single rendered shapes (it reads about 96%; chance is 17%)."""
    scenes = sample_scenes(200, torch.Generator().manual_seed(5))
    imgs = render_scenes(scenes, 64, 64)
    hits = total = 0
    for i in range(len(scenes)):
        if int(scenes.n_objects[i]) != 1:
            continue
        mask = nearest_colors(imgs[i].permute(1, 2, 0)) == int(scenes.color[i, 0])
        hits += read_shape(mask).shape == SHAPES[int(scenes.shape[i, 0])]
        total += 1
    assert total > 50
    assert hits / total >= 0.85


# --- tokenizer ----------------------------------------------------------------------------------------------------


def test_tokenizer_ids_and_padding() -> None:
    tok = TinyTokenizer(VOCABULARY, 20)
    ids = tok(["A red circle, on a blue background.", ""])
    assert ids.shape == (2, 20)
    assert ids.dtype == torch.long
    assert int(ids[0, 0]) == int(ids[1, 0])  # both start with BOS
    assert int((ids[0] != ids[1, -1]).sum()) == 8  # BOS + 7 words, then padding
    assert int((ids[1] != ids[1, -1]).sum()) == 1  # the empty prompt is BOS + padding


def test_unknown_word_raises_with_vocabulary(model: TinyModel) -> None:
    with pytest.raises(ValueError, match=r"unknown word\(s\) \['dog'\].*knows only: a, an, and, on"):
        model.tokenizer(["a red dog on a blue background"])
    with pytest.raises(ValueError, match="knows only"):
        encode_prompts(model, ["a <pad> circle"])
    with pytest.raises(ValueError, match="unknown word"):
        sample(model, ["a red circle on a plaid background"], height=32, width=32, steps=1)


def test_too_long_prompt_raises() -> None:
    tok = TinyTokenizer(VOCABULARY, 5)
    with pytest.raises(ValueError, match="at most 4 fit"):
        tok(["a red circle on a blue background"])


# --- packaged model -----------------------------------------------------------------------------------------------


def test_packaged_weights_load(model: TinyModel) -> None:
    root = weights_dir()
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    config = json.loads((root / "unet" / "config.json").read_text())
    assert config["in_channels"] == 3
    assert len(config["block_out_channels"]) == 3
    assert "CrossAttnDownBlock2D" in config["down_block_types"]
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    n_params = sum(p.numel() for p in model.unet.parameters())
    assert 1_000_000 < n_params < 8_000_000
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert model.scheduler.config.prediction_type == "v_prediction"
    context = encode_prompts(model, ["a red circle on a blue background", ""])
    assert context.shape == (2, model.tokenizer.max_length, config["cross_attention_dim"])


def test_save_and_reload_round_trip(model: TinyModel, tmp_path: Path) -> None:
    save_tiny(tmp_path, model.unet, model.text_encoder, model.scheduler)
    again = load_tiny(directory=tmp_path)
    for a, b in zip(model.unet.state_dict().values(), again.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the packaged weights are float16 values, so a float16 round trip is exact
    ids = model.tokenizer(["a green ring on a pink background"])
    assert torch.equal(model.text_encoder(ids), again.text_encoder(ids))


@pytest.mark.slow  # a whole image or study: out of the quick loop
def test_samples_match_prompt_colours_and_are_not_noise(images: Tensor) -> None:
    """Generated 32x32 images (10 DDIM steps, seed 0) show the prompt's colours and are smooth.

    Measured properties, each of which an image of clamped Gaussian noise fails:

    * the palette colour nearest to the median border colour is the prompt's background colour;
    * the most frequent non-background palette colour is the prompt's object colour, and it covers between 2% and
      50% of the image;
    * total variation (mean absolute difference of neighbouring pixel values) is below 0.1; generated images score
      about 0.02, noise about 0.4.

    The model passes these for every one of seeds 0-9 (checked when the test was written); seed 0 is used here.
    """
    noise = _noise_image()
    assert total_variation(noise) > 0.3
    assert images.shape == (len(PROMPTS), 3, 32, 32)
    assert float(images.min()) >= 0.0
    assert float(images.max()) <= 1.0
    for image, (prompt, fg, bg, _) in zip(images, PROMPTS, strict=True):
        reading = read_colors(image)
        assert reading.background == bg, prompt
        assert reading.foreground == fg, prompt
        assert 0.02 <= reading.foreground_fraction <= 0.5, prompt
        assert total_variation(image) < 0.1, prompt


def test_sampled_circle_is_a_circle(images: Tensor) -> None:
    """The red object of "a red circle on a blue background" is read as a circle with IoU >= 0.75.

    read_shape fits each shape's template to the object mask; the model's circles score 0.86-0.97 over seeds 0-9,
    while a mask taken from noise scores below 0.2 for every template.
    """
    noise_mask = nearest_colors(_noise_image().permute(1, 2, 0)) == list(COLORS).index("red")
    assert read_shape(noise_mask).iou < 0.3
    mask = nearest_colors(images[0].permute(1, 2, 0)) == list(COLORS).index("red")
    reading = read_shape(mask)
    assert reading.shape == "circle"
    assert reading.iou >= 0.75


def test_sample_is_deterministic_and_accepts_a_generator(model: TinyModel) -> None:
    a = sample(model, ["a green ring on a pink background"], height=16, width=24, steps=2, seed=7)
    b = sample(model, ["a green ring on a pink background"], height=16, width=24, steps=2, seed=7)
    c = sample(
        model,
        ["a green ring on a pink background"],
        height=16,
        width=24,
        steps=2,
        generator=torch.Generator().manual_seed(7),
    )
    assert a.shape == (1, 3, 16, 24)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


def test_sample_calls_unet_once_per_step_on_uncond_cond_batch(model: TinyModel) -> None:
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    class Spy(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Tensor, t: Tensor, encoder_hidden_states: Tensor) -> object:
            calls.append((tuple(x.shape), tuple(encoder_hidden_states.shape)))
            return self.inner(x, t, encoder_hidden_states=encoder_hidden_states)

    spied = dataclasses.replace(model, unet=Spy(model.unet))
    sample(spied, ["a red circle on a blue background"] * 3, height=16, width=16, steps=3)
    assert len(calls) == 3
    assert all(c == ((6, 3, 16, 16), (6, model.tokenizer.max_length, 128)) for c in calls)


def test_sample_rejects_bad_sizes(model: TinyModel) -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        sample(model, ["a red circle on a blue background"], height=30, width=32)
    with pytest.raises(ValueError, match="empty"):
        sample(model, [], height=32, width=32)


# --- PNG helpers --------------------------------------------------------------------------------------------------


def test_png_round_trips_pixels_and_text(tmp_path: Path) -> None:
    image = render_scenes(sample_scenes(1, torch.Generator().manual_seed(2)), 12, 20)[0]
    text = {"prompt": "a red circle on a blue background", "seed": "7", "note": "non-Latin-1 text: \u2713"}
    save_png(image, tmp_path / "a.png", text)
    assert (tmp_path / "a.png").read_bytes() == encode_png(image, text)
    with Image.open(tmp_path / "a.png") as png:
        assert (png.format, png.mode, png.size) == ("PNG", "RGB", (20, 12))
        decoded = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 255
    assert float((decoded - image).abs().max()) <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    assert read_png_text(tmp_path / "a.png") == text
    assert read_png_text(_plain_png(tmp_path, image)) == {}
    with pytest.raises(ValueError, match=r"expected a \(3, H, W\) image"):
        encode_png(image[:2])
    grid = image_grid([[image, image], [image]], cell=24, pad=2)
    assert grid.shape == (3, 2 * 24 + 3 * 2, 2 * 24 + 3 * 2)


def _plain_png(folder: Path, image: Tensor) -> Path:
    path = folder / "plain.png"
    save_png(image, path)
    return path


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_sample_shows_progress_only_when_asked_and_on_a_terminal(
    model: TinyModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """progress=True draws a tqdm bar over the steps on a terminal; never with progress=False; tqdm's own default
    hides it when stderr is not a terminal (logs, tests, other ranks' redirected output)."""
    prompt = ["a red circle on a blue background"]
    for progress, stream, shown in (
        (True, _Terminal(), True),
        (False, _Terminal(), False),
        (True, io.StringIO(), False),
    ):
        monkeypatch.setattr(sys, "stderr", stream)
        sample(model, prompt, height=8, width=8, steps=2, progress=progress)
        assert ("denoising" in stream.getvalue() and "/2" in stream.getvalue()) is shown, stream.getvalue()
