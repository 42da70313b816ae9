"""The patch-parallel VAE (pcpp.vae through pcpp.convert) on gloo ranks against the same VAE on one device."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import pcpp
import pcpp.pipeline
from pcpp.functional import partition_rows
from pcpp.testing import run_distributed
from pipeline_parts import Family, Spec, Task, build_pipeline
from pipeline_workers import Job, parallel, reference
from vae_workers import (
    bad_input,
    build_vae,
    decode,
    decode_reference,
    encode,
    encode_reference,
    latent,
    sdxl_fp16_image,
)

# The parallel decode adds up the same terms in another order: GroupNorm statistics merged from strips (fp32,
# Chan's formula), attention's softmax over keys gathered from strips. fp32 rounding is ~1e-7 relative per op; over
# the decoder's ~30 layers the pixels (about unit size) differ by ~1e-6. A wrong halo row or strip changes them by
# 1e-2 or more.
ATOL = 1e-4

# Latent heights that do not split evenly on 2, 3 and 4 ranks (7 = 4 + 3, 3 + 2 + 2, 2 + 2 + 2 + 1), and one that does.
HEIGHTS = [7, 8]
WIDTH = 5


@pytest.mark.parametrize("world", [2, 3, 4])
def test_parallel_decode_matches_one_device(world: int) -> None:
    """Every rank returns the single-device decode, at uneven and even latent heights; each rank's largest
    activation is its strip's: the image's times its share of the latent rows (nothing of the whole image)."""
    want = decode_reference(HEIGHTS, WIDTH)
    per_rank = run_distributed(decode, world, HEIGHTS, WIDTH)
    for rank, got in enumerate(per_rank):
        for index, height in enumerate(HEIGHTS):
            torch.testing.assert_close(got["images"][index], want["images"][index], rtol=0.0, atol=ATOL)
            rows = partition_rows(height, world)[rank]
            # Module outputs are strips (halo rows live only inside a conv's input), so the bound is exact.
            assert got["largest"][index] <= want["largest"][index] * rows / height
            assert got["largest"][index] < want["largest"][index] * 0.6


def test_slicing_decodes_each_latent_on_strips() -> None:
    """With vae.enable_slicing() each latent of the batch is decoded on its own, in parallel, as on one device."""
    want = decode_reference([7], WIDTH, slicing=True)
    for got in run_distributed(decode, 2, [7], WIDTH, True):
        torch.testing.assert_close(got["images"][0], want["images"][0], rtol=0.0, atol=ATOL)


@pytest.mark.parametrize("world", [2, 3])
def test_parallel_encode_matches_one_device(world: int) -> None:
    """The encoder on strips (of multiples of 8 pixel rows; 56 = 3 + 2 + 2 latent rows on 3 ranks) gives the
    single-device posterior moments on every rank."""
    want = encode_reference(56, 40)
    for got in run_distributed(encode, world, 56, 40):
        torch.testing.assert_close(got, want, rtol=0.0, atol=ATOL)


def test_bad_input_is_refused_and_changes_nothing() -> None:
    """A latent shorter than the ranks and tiling switched on after conversion are clear errors, after which the
    VAE still decodes the single-device image; a tiled VAE is refused at conversion and left unconverted."""
    world = 3
    want = decode_reference([world], 4)["images"][0]
    for got in run_distributed(bad_input, world):
        assert "cannot split a latent of height 2 into 3 strips" in got["short"]
        assert "disable_tiling" in got["tiling_after"]
        assert "tiled AutoencoderKL" in got["tiling_convert"]
        assert got["tiled_converted"] is False
        torch.testing.assert_close(got["after"], want, rtol=0.0, atol=ATOL)


def test_one_rank_is_bitwise_the_plain_vae() -> None:
    """On a world of one the converted VAE runs the original modules' arithmetic: bitwise equal; revert restores
    the original modules."""
    plain = build_vae()
    z = latent(7, WIDTH)
    with torch.no_grad():
        want = plain.decode(z).sample
        want_moments = plain.encode(torch.ones(1, 3, 16, 8)).latent_dist.parameters
        vae = pcpp.convert(build_vae(), comm=pcpp.comm.LocalCommunicator())
        assert pcpp.is_converted(vae)
        assert torch.equal(vae.decode(z).sample, want)
        assert torch.equal(vae.encode(torch.ones(1, 3, 16, 8)).latent_dist.parameters, want_moments)
    modules_before = [type(m) for m in build_vae().modules()]
    pcpp.revert(vae)
    assert not pcpp.is_converted(vae)
    assert [type(m) for m in vae.modules()] == modules_before


def test_step_options_are_refused_for_a_vae() -> None:
    """partial, warmup_steps and the like schedule denoising steps; a decode is one exact pass."""
    vae = build_vae()
    with pytest.raises(pcpp.ConversionError, match="warmup_steps do\\(es\\) not apply to a VAE"):
        pcpp.convert(vae, comm=pcpp.comm.LocalCommunicator(), warmup_steps=2)
    assert not pcpp.is_converted(vae)
    pcpp.convert(vae, comm=pcpp.comm.LocalCommunicator(), exact=True)
    with pytest.raises(pcpp.ConversionError, match="already converted"):
        pcpp.convert(vae, comm=pcpp.comm.LocalCommunicator())


# As tests/test_pipelines.py: a pixel in [0, 1] after 3-4 exact steps and the decode, fp32 rounding only.
PIXEL_ATOL = 1e-4


@pytest.mark.parametrize("world", [2, 3])
def test_pipeline_with_parallel_vae_matches_one_device(world: int) -> None:
    """``pcpp.parallelize(pipe, vae=VAEPlacement.PARALLEL, exact=True)``: SD- and SDXL-style text-to-image and
    img2img (the encoder too) give the one-device images on every rank (3 ranks split the 16-row latent 6, 5, 5).
    After asynchronous UNet steps, whose layers leave messages in flight for a next step on the communicator and
    tags that the VAE's layers use too, the parallel decode gives what the whole decode gives after the same loop."""
    parallel_vae = {"vae": pcpp.VAEPlacement.PARALLEL}
    exact_jobs = [
        Job(Spec(family, task), options=parallel_vae) for family in Family for task in (Task.TEXT, Task.IMG2IMG)
    ]
    asynchronous = {"exact": False, "warmup_steps": 1}
    async_jobs = [
        Job(Spec(Family.SD, Task.TEXT), options={**asynchronous, **parallel_vae}),
        Job(Spec(Family.SD, Task.TEXT), options=asynchronous),
    ]
    first_rank = Job(Spec(), options={**parallel_vae, "output": pcpp.OutputPlacement.FIRST_RANK})
    per_rank = run_distributed(parallel, world, [*exact_jobs, first_rank, *async_jobs])
    # FIRST_RANK: every rank takes part in the parallel decode; only the first returns the images.
    want = reference(first_rank)
    torch.testing.assert_close(per_rank[0][len(exact_jobs)][0], want[0], rtol=0.0, atol=PIXEL_ATOL)
    assert all(per_rank[rank][len(exact_jobs)] == [[]] for rank in range(1, world))
    for index, job in enumerate(exact_jobs):
        want = reference(job)
        for rank in range(world):
            for got, image in zip(per_rank[rank][index], want, strict=True):
                torch.testing.assert_close(got, image, rtol=0.0, atol=PIXEL_ATOL)
    for rank in range(world):
        for got, image in zip(per_rank[rank][-2], per_rank[rank][-1], strict=True):
            torch.testing.assert_close(got, image, rtol=0.0, atol=PIXEL_ATOL)


def test_a_tiled_vae_is_refused_by_parallelize_before_anything_changes(tmp_path: Path) -> None:
    """No process group is needed: the checks run before anything is converted."""
    pipe = build_pipeline(Spec(), tmp_path)
    pipe.vae.enable_tiling()
    with pytest.raises(pcpp.ConversionError, match="disable_tiling"):
        pcpp.parallelize(pipe, vae=pcpp.VAEPlacement.PARALLEL)
    assert not pcpp.pipeline.is_parallelized(pipe)
    assert not pcpp.is_converted(pipe.unet)
    assert not pcpp.is_converted(pipe.vae)


def test_sdxl_in_float16_upcasts_the_parallel_vae_as_on_one_device() -> None:
    """SDXL's VAE has ``force_upcast``: in a float16 pipeline diffusers casts the VAE to float32 for the decode and
    back to float16 after it. The converted VAE follows both casts (its layers share the original parameters, and
    the exchange buffers follow the activations' dtype), on 2 ranks as on one device.

    Tolerance 5e-3 on pixels in [0, 1]: the UNet loop runs in float16, where sums taken in another order (strips,
    whole-image GroupNorm statistics) round at float16's 2**-11 relative step, three steps running; measured 1.5e-3
    on 2 ranks (2.0e-3 on 3)."""
    want = sdxl_fp16_image()
    for got in run_distributed(sdxl_fp16_image, 2):
        torch.testing.assert_close(got, want, rtol=0.0, atol=5e-3)
