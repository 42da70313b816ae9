"""Whole diffusers pipelines under ``pcpp.parallelize`` on gloo ranks against the same pipeline on one device.

The pipelines are tiny and random (tests/pipeline_parts.py: nothing downloaded; real prompts through a CLIP
tokenizer written by the test). Starting the processes (importing diffusers and transformers) costs far more than
the pipelines, so each distributed test runs several pipelines in one spawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import StableDiffusionControlNetImg2ImgPipeline

import pcpp
from pcpp.testing import run_distributed
from pipeline_parts import Family, Sched, Spec, Task, build_pipeline
from pipeline_workers import (
    Call,
    Job,
    Lora,
    errors_then_recovers,
    make_lora,
    output_placement,
    parallel,
    progress_bars,
    ranks_disagree,
    reference,
    revert_round_trip,
)

# Largest absolute difference allowed between a pixel (in [0, 1]) of the parallel image and of the one-device
# image. In exact mode every step is synchronous, so the parallel run adds up the same terms in another order
# (GroupNorm statistics merged from strips, convolutions and attention over split matrices): fp32 rounding,
# ~1e-7 relative per op, accumulated over 3-4 steps, amplified by guidance 5 (x11) and carried through the VAE.
# Measured at most 1.4e-6 on these pipelines on 3 ranks; a wrong halo row or strip changes pixels by 1e-2 or more.
PIXEL_ATOL = 1e-4


def _assert_images_match(parallel_images: list[Any], reference_images: list[Any]) -> None:
    assert len(parallel_images) == len(reference_images)
    for got, want in zip(parallel_images, reference_images, strict=True):
        torch.testing.assert_close(got, want, rtol=0.0, atol=PIXEL_ATOL)


def _check_jobs(world: int, jobs: list[Job]) -> None:
    """Every rank's images of every job equal the one-device images."""
    per_rank = run_distributed(parallel, world, jobs)
    for job_index, job in enumerate(jobs):
        want = reference(job)
        for rank in range(world):
            _assert_images_match(per_rank[rank][job_index], want)


def _tasks(family: Family) -> list[Job]:
    return [
        Job(Spec(family, Task.TEXT)),
        Job(Spec(family, Task.IMG2IMG)),
        Job(Spec(family, Task.INPAINT)),
        Job(Spec(family, Task.CONTROLNET, controlnets=1)),
        Job(Spec(family, Task.CONTROLNET, controlnets=2)),
    ]


@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.value)
def test_text_to_image_matches_one_device(family: Family) -> None:
    """SD- and SDXL-style text-to-image on 2 and 3 ranks (3 splits the 16-row latent unevenly: 6, 6, 4), two
    prompts in a row on the same pipeline: every rank returns the one-device images."""
    job = Job(Spec(family, Task.TEXT), calls=(Call(), Call(seed=2, prompt="two blue birds")))
    for world in (2, 3):
        _check_jobs(world, [job])


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.value)
def test_every_task_matches_one_device(family: Family, world: int) -> None:
    """Text-to-image, img2img, inpainting (9-channel UNet), one ControlNet and two (MultiControlNetModel)."""
    _check_jobs(world, _tasks(family))


@pytest.mark.parametrize("family", list(Family), ids=lambda f: f.value)
def test_img2img_inpainting_and_controlnets_match_one_device_on_two_ranks(family: Family) -> None:
    _check_jobs(2, _tasks(family)[1:])


@pytest.mark.parametrize("controlnets", [1, 2])
def test_the_controlnets_change_the_image(controlnets: int) -> None:
    """One device: without the ControlNet residuals the image differs, so the tests above check their use."""
    spec = Spec(Family.SD, Task.CONTROLNET, controlnets=controlnets)
    off = Call(extra={"controlnet_conditioning_scale": 0.0 if controlnets == 1 else [0.0] * controlnets})
    with_nets, without = reference(Job(spec, calls=(Call(), off)))
    assert (with_nets - without).abs().max() > 1e-2


def test_other_schedulers_match_one_device() -> None:
    """Euler (scales the model input, float timesteps) and DPM-Solver++ (multistep: reads earlier outputs)."""
    _check_jobs(2, [Job(Spec(Family.SD, Task.TEXT, sched=sched)) for sched in (Sched.EULER, Sched.DPM)])


def test_lora_before_and_after_parallelize_matches_one_device(tmp_path: Path) -> None:
    """A LoRA loaded before parallelize (set_adapters), after it (set_adapters), and after it and fused."""
    spec = Spec(Family.SD, Task.TEXT)
    path = make_lora(spec, tmp_path)
    jobs = [Job(spec, lora=lora, lora_path=path) for lora in (Lora.BEFORE, Lora.AFTER, Lora.AFTER_FUSED)]
    plain = reference(Job(spec))[0]
    for job in jobs:  # the LoRA must change the image, or the comparison below would prove nothing
        assert (reference(job)[0] - plain).abs().max() > 1e-2
    _check_jobs(2, jobs)


@pytest.mark.parametrize(("what", "differs"), [("seed", "latent"), ("prompt", "encoder_hidden_states")])
def test_ranks_given_different_inputs_are_refused(what: str, differs: str) -> None:
    """Each rank passes its own seed (or prompt): every rank raises RanksDisagreeError naming what differs, before
    any image comes back."""
    messages = run_distributed(ranks_disagree, 2, Spec(), what)
    for message in messages:
        assert message is not None, messages
        assert message.startswith("RanksDisagreeError"), message
        assert differs in message, message


@pytest.mark.parametrize("return_dict", [True, False])
def test_first_rank_output_placement(return_dict: bool) -> None:
    """OutputPlacement.FIRST_RANK: rank 0 decodes and gets the one-device image; rank 1 skips the decode and gets
    an empty list of images (and None for the other output fields)."""
    first, other = run_distributed(output_placement, 2, Spec(), return_dict)
    _assert_images_match([first["images"]], reference(Job(Spec())))
    assert first["decodes"] == 1
    assert other["decodes"] == 0
    assert other["images"] == []
    assert other["rest"] == [None] * len(first["rest"])
    assert other["type"] == first["type"]


def test_revert_restores_the_pipeline_and_a_second_parallelize_is_refused() -> None:
    result = run_distributed(revert_round_trip, 2, Spec(Family.SDXL, Task.CONTROLNET))[1]
    assert result["during"]["converted"]
    assert not result["after"]["converted"]
    assert "already parallelised" in result["again"]
    assert result["unchanged_by_refusal"]
    assert result["after"] == result["before"]
    assert result["during"]["is_instance"]
    assert result["during"]["class_name"] == result["before"]["class_name"]  # save_pretrained writes this name
    _assert_images_match([result["image"]], reference(Job(Spec(Family.SDXL, Task.CONTROLNET))))


def test_progress_bar_on_the_first_rank_only() -> None:
    """Bars on (set by the user) draw on both ranks before, on rank 0 only while parallelised, on both after."""
    assert run_distributed(progress_bars, 2, Spec()) == [[True, True, True], [True, False, True]]


def test_a_size_that_cannot_be_split_is_refused_and_the_pipeline_still_works() -> None:
    """3 ranks and an 8-pixel ControlNet image (a 4-row latent: fewer 2-row units than ranks): every rank raises
    SplitError; the next call on the same pipeline is the one-device image."""
    spec = Spec(Family.SD, Task.CONTROLNET)
    results = run_distributed(errors_then_recovers, 3, spec, Call(size=8), Call())
    want = reference(Job(spec))
    for result in results:
        assert result["error"] is not None
        assert result["error"][0] == "SplitError", result["error"]
        _assert_images_match([result["image"]], want)


def test_a_control_image_of_another_size_is_resized_as_on_one_device() -> None:
    """diffusers resizes a control image to the requested size before the ControlNet runs, on one device too; the
    parallel pipeline gives the one-device image for a 24-pixel control image and a 32-pixel output."""
    spec = Spec(Family.SD, Task.CONTROLNET)
    job = Job(
        spec, calls=(Call(extra={"image": torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5))}),)
    )
    _check_jobs(2, [job])


def test_unsupported_pipelines_and_options_are_refused_before_anything_changes(tmp_path: Path) -> None:
    """No process group is needed: the checks run before anything is built or converted."""
    pipe = build_pipeline(Spec(Family.SD, Task.CONTROLNET), tmp_path)
    other = StableDiffusionControlNetImg2ImgPipeline(**pipe.components)
    classes = (type(pipe), type(other))
    with pytest.raises(pcpp.ConversionError, match="StableDiffusionControlNetImg2ImgPipeline.*StableDiffusionPipeline"):
        pcpp.parallelize(other)
    for bad in ({"vae": "whole"}, {"output": "first_rank"}, {"partal": 0.3}, {"partial": 2.0}):
        with pytest.raises(pcpp.ConversionError):
            pcpp.parallelize(pipe, **bad)
    pcpp.convert(pipe.unet, comm=pcpp.comm.LocalCommunicator())
    with pytest.raises(pcpp.ConversionError, match="already converted"):
        pcpp.parallelize(pipe)
    pcpp.revert(pipe.unet)
    assert (type(pipe), type(other)) == classes
    assert not pcpp.is_converted(pipe.unet)
