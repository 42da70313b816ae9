"""The denoising loops the study runs: pcpp's tiny model, or a diffusers text-to-image pipeline."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .job import Job
from .recorder import Recorder


class Sampler:
    """Generates images for chosen prompts, one UNet call per step on the CFG batch."""

    unet: nn.Module
    guidance: float
    alphas_cumprod: Tensor
    prediction_type: str

    def generate(self, ids: Sequence[int], size: int, recorder: Recorder | None = None) -> Tensor:
        """Images ``(len(ids), 3, size, size)`` in [0, 1] for prompts ``ids``, on the CPU."""
        raise NotImplementedError


class TinySampler(Sampler):
    """pcpp's tiny model with the DDIM + CFG loop of :func:`pcpp.models.sample`, with per-prompt noise seeds."""

    def __init__(self, job: Job, device: torch.device) -> None:
        from pcpp.models import DEFAULT_GUIDANCE, encode_prompts, load_tiny

        self.job = job
        self.model = load_tiny(device=device)
        self.unet = self.model.unet
        self.device = device
        self.guidance = DEFAULT_GUIDANCE if job.guidance is None else job.guidance
        config: Any = self.model.scheduler
        self.scheduler_config = config.config
        self.alphas_cumprod = config.alphas_cumprod
        self.prediction_type = str(self.scheduler_config.prediction_type)
        self.uncond = encode_prompts(self.model, [""])
        self.cond = encode_prompts(self.model, list(job.prompts))

    @torch.no_grad()
    def generate(self, ids: Sequence[int], size: int, recorder: Recorder | None = None) -> Tensor:
        """Images for prompts ``ids`` (one batch), on the CPU."""
        from diffusers import DDIMScheduler

        if recorder is not None:
            recorder.begin_batch(ids)
        index = torch.tensor(list(ids), dtype=torch.long)
        noise = initial_noise([self.job.seeds[i] for i in ids], 3, size, size).to(self.device)
        context = torch.cat([self.uncond.expand(len(ids), -1, -1), self.cond[index.to(self.device)]])
        scheduler: Any = DDIMScheduler.from_config(self.scheduler_config)
        scheduler.set_timesteps(self.job.steps, device=self.device)
        x = noise * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
            out: Tensor = self.unet(x_in, t, encoder_hidden_states=context).sample
            uncond, cond = out.float().chunk(2)
            x = scheduler.step(uncond + self.guidance * (cond - uncond), t, x).prev_sample
        return ((x.clamp(-1, 1) + 1) / 2).cpu()


class PipelineSampler(Sampler):
    """A diffusers text-to-image pipeline (SD 1.x/2.x, SDXL) with a DDIM scheduler. Untested here (no weights)."""

    def __init__(self, job: Job, device: torch.device) -> None:
        from diffusers import DDIMScheduler, DiffusionPipeline

        self.job = job
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        pipe: Any = DiffusionPipeline.from_pretrained(job.model, torch_dtype=dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.pipe = pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.unet = self.pipe.unet
        default = inspect.signature(self.pipe.__call__).parameters["guidance_scale"].default
        self.guidance = float(default if job.guidance is None else job.guidance)
        self.alphas_cumprod = self.pipe.scheduler.alphas_cumprod
        self.prediction_type = str(self.pipe.scheduler.config.prediction_type)

    @torch.no_grad()
    def generate(self, ids: Sequence[int], size: int, recorder: Recorder | None = None) -> Tensor:
        """Images for prompts ``ids``, ``batch_size`` prompts per pipeline call, on the CPU."""
        chunk = self.job.batch_size or len(ids)
        outputs = []
        for start in range(0, len(ids), chunk):
            part = list(ids[start : start + chunk])
            if recorder is not None:
                recorder.begin_batch(part)
            images = self.pipe(
                [self.job.prompts[i] for i in part],
                height=size,
                width=size,
                num_inference_steps=self.job.steps,
                guidance_scale=self.guidance,
                generator=[torch.Generator().manual_seed(self.job.seeds[i]) for i in part],
                output_type="pt",
            ).images
            outputs.append(images.float().cpu())
        return torch.cat(outputs)


def initial_noise(seeds: Sequence[int], channels: int, height: int, width: int) -> Tensor:
    """One ``(channels, height, width)`` standard normal draw per seed, stacked (on the CPU)."""
    return torch.stack(
        [torch.randn((channels, height, width), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def make_sampler(job: Job, device: torch.device) -> Sampler:
    """The sampler of ``job``'s model (pcpp's tiny model, or a diffusers pipeline) on ``device``."""
    return TinySampler(job, device) if job.model == "tiny" else PipelineSampler(job, device)
