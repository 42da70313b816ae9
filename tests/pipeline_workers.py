"""Per-rank functions for the pipeline tests (spawned processes: module level), and their one-device references."""

from __future__ import annotations

import contextlib
import enum
import io
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import pcpp
from pcpp.pipeline import revert_pipeline
from pipeline_parts import Family, Spec, build_pipeline, call_kwargs, unet_config


class Lora(enum.Enum):
    """When and how a LoRA is applied, relative to ``pcpp.parallelize``."""

    NONE = "none"
    BEFORE = "before"  # load_lora_weights + set_adapters(weight 0.7), then parallelize
    AFTER = "after"  # parallelize, then load_lora_weights + set_adapters(weight 0.7)
    AFTER_FUSED = "after_fused"  # parallelize, then load_lora_weights + fuse_lora(lora_scale=0.8)


@dataclass(frozen=True)
class Call:
    """One call of the pipeline (see :func:`pipeline_parts.call_kwargs`) plus overrides."""

    seed: int = 1
    prompt: str = "a red fox"
    size: int = 32
    extra: dict[str, Any] = field(default_factory=dict)

    def kwargs(self, spec: Spec) -> dict[str, Any]:
        return {**call_kwargs(spec, seed=self.seed, prompt=self.prompt, size=self.size), **self.extra}


def make_lora(spec: Spec, folder: Path) -> Path:
    """A rank-4 LoRA on the UNet's attention projections, random (not zero) so it changes the image, saved with
    the pipeline's ``save_lora_weights`` into ``folder``."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe_class = type(build_pipeline(spec, folder / "tokenizer"))
    torch.manual_seed(1234)
    unet = UNet2DConditionModel(**unet_config(spec.family, 9 if spec.task.name == "INPAINT" else 4))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config)
    pipe_class.save_lora_weights(str(folder / "lora"), unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "lora"


def _apply_lora(pipe: Any, lora: Lora, path: Path | None) -> None:
    assert path is not None
    pipe.load_lora_weights(str(path), adapter_name="style")
    if lora is Lora.AFTER_FUSED:
        pipe.fuse_lora(lora_scale=0.8)
    else:
        pipe.set_adapters(["style"], adapter_weights=[0.7])


def _images(out: Any) -> Any:
    return out.images


@dataclass(frozen=True)
class Job:
    """One pipeline (``spec``, with ``lora``) parallelised with ``options`` (plus ``exact=True``), and its calls."""

    spec: Spec
    calls: tuple[Call, ...] = (Call(),)
    options: dict[str, Any] = field(default_factory=dict)
    lora: Lora = Lora.NONE
    lora_path: Path | None = None


def reference(job: Job) -> list[Any]:
    """The images of ``job``'s calls on one device, no pcpp."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(job.spec, Path(tmp))
        if job.lora is not Lora.NONE:
            _apply_lora(pipe, job.lora, job.lora_path)
        return [_images(pipe(**call.kwargs(job.spec))) for call in job.calls]


def parallel(rank: int, world: int, jobs: list[Job]) -> list[list[Any]]:
    """The images of each job's calls on this rank after ``pcpp.parallelize(pipe, exact=True, **options)``; many
    jobs per spawn, as starting the processes costs more than these tiny pipelines."""
    results = []
    for job in jobs:
        with tempfile.TemporaryDirectory() as tmp:
            pipe = build_pipeline(job.spec, Path(tmp))
            if job.lora is Lora.BEFORE:
                _apply_lora(pipe, job.lora, job.lora_path)
            assert pcpp.parallelize(pipe, **{"exact": True, **job.options}) is pipe
            if job.lora in (Lora.AFTER, Lora.AFTER_FUSED):
                _apply_lora(pipe, job.lora, job.lora_path)
            results.append([_images(pipe(**call.kwargs(job.spec))) for call in job.calls])
    return results


def output_placement(rank: int, world: int, spec: Spec, return_dict: bool) -> dict[str, Any]:
    """With ``OutputPlacement.FIRST_RANK``: what each rank gets, and whether its VAE decoded."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(spec, Path(tmp))
        decodes = []
        original_decode = pipe.vae.decode

        def counting_decode(*args: Any, **kwargs: Any) -> Any:
            decodes.append(1)
            return original_decode(*args, **kwargs)

        pipe.vae.decode = counting_decode
        # WHOLE: the other ranks skip the decode (a parallel decode needs every rank)
        pcpp.parallelize(pipe, exact=True, vae=pcpp.VAEPlacement.WHOLE, output=pcpp.OutputPlacement.FIRST_RANK)
        out = pipe(**Call().kwargs(spec), return_dict=return_dict)
        images = out.images if return_dict else out[0]
        rest = list(vars(out).values())[1:] if return_dict else list(out[1:])
        return {"images": images, "rest": rest, "decodes": len(decodes), "type": type(out).__name__}


def state_of(pipe: Any, cls: type) -> dict[str, Any]:
    """What parallelize may change, as plain values: the class, the UNet's modules, the progress bar setting."""
    return {
        "class_is_original": type(pipe) is cls,
        "is_instance": isinstance(pipe, cls),
        "class_name": type(pipe).__name__,
        "converted": pcpp.is_converted(pipe.unet),
        "modules": [type(m) for m in pipe.unet.modules()],
    }


def revert_round_trip(rank: int, world: int, spec: Spec) -> dict[str, Any]:
    """State before, after parallelize, after revert; the image after revert; the refusal of a second call."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(spec, Path(tmp))
        cls = type(pipe)
        before = state_of(pipe, cls)
        pcpp.parallelize(pipe, exact=True)
        during = state_of(pipe, cls)
        try:
            pcpp.parallelize(pipe, exact=True)
            again = ""
        except pcpp.ConversionError as error:
            again = str(error)
        unchanged_by_refusal = state_of(pipe, cls) == during
        assert revert_pipeline(pipe) is pipe
        after = state_of(pipe, cls)
        image = pipe(**Call().kwargs(spec)).images
        return {
            "before": before,
            "during": during,
            "after": after,
            "again": again,
            "unchanged_by_refusal": unchanged_by_refusal,
            "image": image,
        }


def errors_then_recovers(rank: int, world: int, spec: Spec, bad: Call, good: Call) -> dict[str, Any]:
    """A call that must fail on every rank, then a good one on the same pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(spec, Path(tmp))
        pcpp.parallelize(pipe, exact=True)
        try:
            pipe(**bad.kwargs(spec))
            error: tuple[str, str] | None = None
        except Exception as caught:
            error = (type(caught).__name__, str(caught))
        return {"error": error, "image": pipe(**good.kwargs(spec)).images}


def ranks_disagree(rank: int, world: int, spec: Spec, what: str) -> str | None:
    """Each rank calls with its own seed or prompt; returns the ``pcpp.PCPPError`` message raised, if any."""
    call = Call(seed=1 + rank) if what == "seed" else Call(prompt=f"fox number {rank}")
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(spec, Path(tmp))
        pcpp.parallelize(pipe, exact=True)
        try:
            pipe(**call.kwargs(spec))
        except pcpp.PCPPError as error:
            return f"{type(error).__name__}: {error}"
        return None


def progress_bars(rank: int, world: int, spec: Spec) -> list[bool]:
    """Whether this rank drew a progress bar: before parallelize (bars on), after it, and after revert."""
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(spec, Path(tmp))
        pipe.set_progress_bar_config(disable=False, mininterval=0)
        drawn = []
        for stage in ("before", "during", "after"):
            if stage == "during":
                pcpp.parallelize(pipe, exact=True)
            if stage == "after":
                revert_pipeline(pipe)
            text = io.StringIO()
            with contextlib.redirect_stderr(text):
                pipe(**Call().kwargs(spec))
            drawn.append("it/s" in text.getvalue() or "s/it" in text.getvalue())
        return drawn


__all__ = [
    "Call",
    "Family",
    "Lora",
    "errors_then_recovers",
    "make_lora",
    "output_placement",
    "parallel",
    "progress_bars",
    "ranks_disagree",
    "reference",
    "revert_round_trip",
]
