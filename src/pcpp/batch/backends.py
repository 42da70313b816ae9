"""The models that make one image per record: pcpp's tiny model or any diffusers pipeline.

Used by :class:`~pcpp.lightning.DiffusionModule` and by ``pcpp generate --prompts``. A backend is built on each rank
by a *factory* ``(device) -> backend`` (under Lightning inside ``configure_model``, so the weights are loaded after
Lightning has set the device up), converted once with pcpp, then asked for one image per record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from pcpp import PCPPConfig, VAEPlacement, convert, reset

from .records import PromptRecord

__all__ = ["BackendFactory", "DiffusionBackend", "PipelineBackend", "TinyBackend", "pipeline_backend", "tiny_backend"]


class DiffusionBackend(Protocol):
    """What :class:`~pcpp.lightning.DiffusionModule` and ``pcpp generate --prompts`` need from a model."""

    def parallelize(self, comm: Any, config: PCPPConfig) -> None:
        """Convert the model's UNet for patch parallelism over ``comm`` (a ``DeviceMesh``) with ``config``."""

    def generate(self, record: PromptRecord) -> Tensor:
        """One ``(3, height, width)`` float image in [0, 1], on the CPU, made from ``record`` alone."""

    def describe(self) -> str:
        """A short name of the model, saved in each PNG's metadata."""


BackendFactory = Callable[[torch.device], DiffusionBackend]
"""Builds a backend on the given device; called once per rank in ``configure_model``."""


def _convert_kwargs(config: PCPPConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _new_image(unet: nn.Module) -> None:
    # Each record is a new image: warm up again even if the timesteps of two images happen not to go up.
    reset(unet)


@dataclass(frozen=True)
class TinyBackend:
    """pcpp's shipped tiny model, run exactly as ``pcpp generate`` runs it (same sampler, same noise)."""

    model: Any  # pcpp.models.TinyModel

    def parallelize(self, comm: Any, config: PCPPConfig) -> None:
        """Convert ``model.unet`` with :func:`pcpp.convert`."""
        convert(self.model.unet, comm=comm, **_convert_kwargs(config))

    def generate(self, record: PromptRecord) -> Tensor:
        """:func:`pcpp.models.sample` on ``[record.prompt]`` with the noise of ``record.seed``."""
        from ..models import DEFAULT_GUIDANCE, sample

        _new_image(self.model.unet)
        generator = torch.Generator().manual_seed(record.seed)
        images = sample(
            self.model,
            [record.prompt],
            height=record.height,
            width=record.width,
            steps=record.steps,
            guidance=DEFAULT_GUIDANCE if record.guidance is None else record.guidance,
            generator=generator,
        )
        return images[0].float().cpu()

    def describe(self) -> str:
        """``"tiny"``."""
        return "tiny"


def tiny_backend(device: torch.device) -> TinyBackend:
    """The factory of :class:`TinyBackend`: loads the shipped weights onto ``device``.

    Example:
        >>> module = DiffusionModule(tiny_backend, GroupLayout(patch=2))  # doctest: +SKIP
    """
    from ..models import load_tiny

    return TinyBackend(load_tiny(device=device))


def parallelize_pipeline(pipe: Any, comm: Any, config: PCPPConfig, vae: VAEPlacement = VAEPlacement.PARALLEL) -> None:
    """Make a diffusers pipeline patch-parallel with :func:`pcpp.parallelize` (its UNet, and its VAE unless
    ``vae`` is ``VAEPlacement.WHOLE``; a pipeline pcpp does not support is refused there, before anything changes).

    This is the one place the pipeline path converts a model (``pcpp generate``, with or without ``--prompts``,
    and :mod:`pcpp.lightning`).
    """
    from ..pipeline import parallelize  # lazily: pcpp.pipeline imports diffusers' pipelines

    parallelize(pipe, comm=comm, vae=vae, **_convert_kwargs(config))


@dataclass(frozen=True)
class PipelineBackend:
    """A diffusers pipeline, called as ``pcpp generate --model`` calls it.

    ``pipe(prompt, height=, width=, num_inference_steps=, guidance_scale=, generator=, output_type="pt")`` with
    ``generator = torch.Generator("cpu").manual_seed(record.seed)``; ``guidance_scale`` is left out when the
    record's guidance is ``None`` (the pipeline's default).
    """

    pipe: Any
    vae: VAEPlacement = VAEPlacement.PARALLEL
    """Where the VAE runs (see :class:`pcpp.VAEPlacement`)."""

    def parallelize(self, comm: Any, config: PCPPConfig) -> None:
        """See :func:`parallelize_pipeline`."""
        parallelize_pipeline(self.pipe, comm, config, self.vae)

    def generate(self, record: PromptRecord) -> Tensor:
        """One image of the pipeline for ``record``."""
        _new_image(self.pipe.unet)
        kwargs: dict[str, Any] = {
            "height": record.height,
            "width": record.width,
            "num_inference_steps": record.steps,
        }
        if record.guidance is not None:
            kwargs["guidance_scale"] = record.guidance
        generator = torch.Generator(device="cpu").manual_seed(record.seed)
        out = self.pipe(record.prompt, generator=generator, output_type="pt", **kwargs)
        return out.images[0].float().cpu()

    def describe(self) -> str:
        """The pipeline's class and, where known, the model it was loaded from."""
        source = getattr(getattr(self.pipe, "config", None), "_name_or_path", None) or ""
        return f"{type(self.pipe).__name__}({source})" if source else type(self.pipe).__name__


def pipeline_backend(
    factory: Callable[[torch.device], Any], vae: VAEPlacement = VAEPlacement.PARALLEL
) -> BackendFactory:
    """A backend factory from a pipeline factory ``(device) -> pipeline``.

    Args:
        factory: builds the pipeline on the device, e.g.
            ``lambda device: StableDiffusionPipeline.from_pretrained(ID, torch_dtype=torch.float16).to(device)``.
        vae: where the VAE runs (see :class:`pcpp.VAEPlacement`).

    Returns:
        The factory (for :class:`~pcpp.lightning.DiffusionModule`); it also turns the pipeline's progress bar off.
    """

    def build(device: torch.device) -> PipelineBackend:
        pipe = factory(device)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return PipelineBackend(pipe, vae)

    return build
