"""Fidelity study of PCPP: how close patch-parallel images are to the single-device images, per setting.

For every number of ranks, image size and mode (exact; full conditioning; partial ratios; warmup lengths) the
script generates the same prompt/seed pairs on ``ranks`` processes (gloo on the CPU, or NCCL) and compares them
with the single-device images of the unconverted UNet:

* **PSNR and SSIM** of the final images, per image, on float images in ``[0, 1]`` (``data_range=1.0``;
  torchmetrics), summarised by mean, std, min, 5/50/95 percentiles and max;
* **noise-prediction error** at each step after warmup: a forward hook on the converted UNet records the input
  ``x_t`` and the output of every call for a subset of prompts; afterwards the unconverted UNet is run on the same
  inputs and the relative L2 error of the guided noise prediction (``eps``; v-predictions are converted with the
  scheduler's ``alpha_bar``) is computed per image and step;
* LPIPS (torchmetrics, AlexNet) for real pipelines when its weights are on disk; skipped otherwise.

One process group is spawned per rank count, and inside it the UNet is converted and reverted once per
(resolution, mode); all prompts of one configuration run as one batch (``2 * prompts`` images with CFG). The
single-device reference images are computed once per resolution in a separate spawn (prompts split over the
processes) and cached on disk.

Outputs: a JSON file with every number (per-image values included), a markdown table (written into the block
between ``<!-- fidelity-table:begin -->`` and ``<!-- fidelity-table:end -->`` of the ``--table`` file if it has
one, else as the whole file), and PNG figures: a latency/fidelity plot, PSNR against the partial ratio, the
per-step noise error, and image grids with amplified difference maps.

Examples::

    # the small CPU plan: pcpp's tiny model, 22 configurations, ~28 min on 2 CPU cores (docs/fidelity.md)
    python scripts/fidelity_study.py --json docs/fidelity_results.json --table docs/fidelity.md \
        --img-dir docs/img

    # any other set of configurations: RANKSxSIZES:MODES (modes exact, full, pX, with @wN for the warmup)
    python scripts/fidelity_study.py --run 2,4x32:exact,p0.3,full@w2 --prompts 16

    # a real pipeline on GPUs (untested: no weights or GPU were available when this was written)
    python scripts/fidelity_study.py --model stabilityai/stable-diffusion-xl-base-1.0 --device cuda \
        --captions prompts.txt --run 2,4x1024:exact,p0.3,full --steps 50 --batch-size 8
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import torch
from torch import Tensor, nn

from pcpp.hooks import map_tensors

logger = logging.getLogger("pcpp.fidelity")

TABLE_BEGIN: Final = "<!-- fidelity-table:begin -->"
TABLE_END: Final = "<!-- fidelity-table:end -->"

BENCHMARK_LATENCY_MS: Final[dict[str, dict[str, float]]] = {
    "partial 0.3 / w4": {"median": 2782.0, "floor": 2576.0},
    "full / w4": {"median": 3074.0, "floor": 2819.0},
}
"""Latency of one SDXL image (2048 px, 50 DDIM steps, cfg 2 x patch 2 on 4x H200), from ``docs/benchmarks.md``.

Only these two modes were timed on the GPUs; the single GPU took 9826 ms. Latency and fidelity come from
different models: the fidelity axis of the plot is measured on pcpp's tiny model.
"""

SINGLE_GPU_LATENCY_MS: Final = 9826.0

PLANS: Final[dict[str, dict[str, Any]]] = {
    # What fits about 25 minutes on a 2-core CPU (measured: one configuration of 64 prompts x 20 steps at 32 px
    # costs ~80 CPU-seconds, at 48 px ~2.2x that). Runs: "CELLS:MODES", see parse_runs.
    "small": {
        "prompts": 64,
        "steps": 20,
        "warmup": 4,
        "eps_prompts": 8,
        "runs": (
            "4x32:exact,p0,p0.1,p0.3,p0.5,p1,full,p0.3@w1,p0.3@w2,full@w1,full@w2",
            "3x32:exact,p0,p0.3,p1,full",
            "2x32:exact,p0,p0.3,full",
            "4x48:p0.3,full",
        ),
    },
    # The plan of the issue: every mode at every rank count and at 64 and 96 px (many CPU hours; fine on a GPU).
    "full": {
        "prompts": 64,
        "steps": 20,
        "warmup": 4,
        "eps_prompts": 16,
        "runs": ("2,3,4x64,96:exact,p0,p0.1,p0.3,p0.5,p1,full,p0.3@w1,p0.3@w2,full@w1,full@w2",),
    },
}


# ---------------------------------------------------------------------------------------------------------------
# Modes and plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One PCPP setting.

    Attributes:
        partial: share of each adjacent strip's rows that attention reads after warmup (PARTIAL conditioning).
        warmup: synchronous steps at the start of each image.
        full: ``Conditioning.FULL`` (DistriFusion's attention) instead of PARTIAL.
        exact: every step synchronous (the sanity row: should equal one device up to float rounding).
    """

    partial: float = 0.3
    warmup: int = 4
    full: bool = False
    exact: bool = False

    @property
    def label(self) -> str:
        """A short unique name, e.g. ``"partial 0.3 / w4"``, ``"full / w2"`` or ``"exact"``."""
        if self.exact:
            return "exact"
        if self.full:
            return f"full / w{self.warmup}"
        return f"partial {self.partial:g} / w{self.warmup}"

    def convert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`pcpp.convert` for this mode."""
        from pcpp import Conditioning

        return {
            "partial": self.partial,
            "warmup_steps": self.warmup,
            "conditioning": Conditioning.FULL if self.full else Conditioning.PARTIAL,
            "exact": self.exact,
        }

    def to_json(self) -> dict[str, Any]:
        """The mode as a JSON object."""
        return {"label": self.label, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Config:
    """One cell of the study: a mode at a rank count and image size."""

    ranks: int
    resolution: int
    mode: Mode


def parse_mode(token: str, warmup: int) -> Mode:
    """A mode from its short name: ``exact``, ``full``, ``full@w2``, ``p0.3`` or ``p0.3@w1``.

    Args:
        token: the short name.
        warmup: warmup steps when the name gives none.

    Raises:
        ValueError: the name is not of that form.
    """
    match = re.fullmatch(r"(exact|full|p(\d*\.?\d+))(?:@w(\d+))?", token.strip())
    if match is None:
        raise ValueError(f"mode {token!r} is not one of exact, full, full@wN, pX, pX@wN (e.g. p0.3@w2)")
    w = int(match.group(3)) if match.group(3) else warmup
    if match.group(1) == "exact":
        return Mode(exact=True)
    if match.group(1) == "full":
        return Mode(full=True, warmup=w)
    return Mode(partial=float(match.group(2)), warmup=w)


def parse_runs(runs: Sequence[str], warmup: int) -> list[Config]:
    """Configurations from run specifications ``"RANKSxSIZES:MODES"``.

    ``RANKS`` and ``SIZES`` are comma-separated lists, ``MODES`` a comma-separated list of :func:`parse_mode`
    names; e.g. ``"2,3,4x32,48:exact,p0.3,full@w2"``. Duplicates are dropped; the result is grouped by rank
    count, then size, modes in the order given.

    Raises:
        ValueError: a specification is malformed.
    """
    configs: dict[tuple[int, int, str], Config] = {}
    for spec in runs:
        cells, sep, modes = spec.partition(":")
        ranks_text, x, sizes_text = cells.partition("x")
        if not sep or not x:
            raise ValueError(f"run {spec!r} is not of the form RANKSxSIZES:MODES, e.g. 4x32:exact,p0.3,full")
        ranks = [int(v) for v in ranks_text.split(",")]
        sizes = [int(v) for v in sizes_text.split(",")]
        parsed = [parse_mode(m, warmup) for m in modes.split(",") if m.strip()]
        for n in ranks:
            for size in sizes:
                for mode in parsed:
                    configs.setdefault((n, size, mode.label), Config(n, size, mode))
    order = {key: k for k, key in enumerate(configs)}
    return sorted(configs.values(), key=lambda c: (c.ranks, c.resolution, order[(c.ranks, c.resolution, c.mode.label)]))


def study_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic captions in the tiny model's vocabulary (random scenes of :mod:`pcpp.models.shapes`).

    Args:
        n: number of captions.
        seed: seed of the scene generator.

    Returns:
        The captions.
    """
    from pcpp.models import sample_scenes, scene_captions

    return scene_captions(sample_scenes(n, torch.Generator().manual_seed(seed)))


def read_captions(path: str | Path, n: int | None = None) -> list[str]:
    """Non-empty lines of a text file, the first ``n`` of them if ``n`` is given.

    Raises:
        ValueError: the file has no caption.
    """
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path} holds no caption (one per line expected)")
    return lines[:n] if n else lines


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def image_metrics(images: Tensor, reference: Tensor) -> dict[str, list[float]]:
    """Per-image PSNR (dB) and SSIM of ``images`` against ``reference``, both float ``(N, 3, H, W)`` in [0, 1].

    PSNR is infinite for bit-identical images.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    images = images.detach().double().clamp(0, 1)
    reference = reference.detach().double().clamp(0, 1)
    psnr = peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none", dim=(1, 2, 3))
    ssim = structural_similarity_index_measure(images, reference, data_range=1.0, reduction="none")
    assert isinstance(ssim, Tensor)  # a tuple only with return_full_image / return_contrast_sensitivity
    return {"psnr": [float(v) for v in psnr.reshape(-1)], "ssim": [float(v) for v in ssim.reshape(-1)]}


def relative_l2(prediction: Tensor, reference: Tensor) -> Tensor:
    """``||prediction - reference|| / ||reference||`` per leading index, in float64."""
    diff = (prediction.double() - reference.double()).flatten(1).norm(dim=1)
    return diff / reference.double().flatten(1).norm(dim=1).clamp_min(1e-30)


def to_eps(output: Tensor, sample: Tensor, alpha_bar: float, prediction_type: str) -> Tensor:
    """The noise prediction ``eps`` from a model output of the given prediction type.

    Args:
        output: the (guided) model output.
        sample: the noisy input ``x_t`` it was computed from.
        alpha_bar: the scheduler's cumulative alpha at this timestep.
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.

    Raises:
        ValueError: unknown prediction type.
    """
    a, s = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return a * output + s * sample
    if prediction_type == "sample":
        return (sample - a * output) / max(s, 1e-12)
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Mean, std, min, 5/50/95 percentiles and max of the finite values; ``n_inf`` counts infinite ones.

    Returns:
        The summary (statistics are None when no value is finite).
    """
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    finite = t[torch.isfinite(t)]
    out: dict[str, Any] = {"n": int(t.numel()), "n_inf": int(torch.isinf(t).sum())}
    if finite.numel() == 0:
        return out | dict.fromkeys(("mean", "std", "min", "p5", "p50", "p95", "max"))
    q = torch.quantile(finite, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
    return out | {
        "mean": float(finite.mean()),
        "std": float(finite.std()) if finite.numel() > 1 else 0.0,
        "min": float(finite.min()),
        "p5": float(q[0]),
        "p50": float(q[1]),
        "p95": float(q[2]),
        "max": float(finite.max()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Recording the UNet's calls
# ---------------------------------------------------------------------------------------------------------------


def _unet_output(output: Any) -> Tensor:
    if isinstance(output, tuple):
        return output[0]
    sample: Tensor = output.sample if hasattr(output, "sample") else output["sample"]
    return sample


class Recorder:
    """A forward hook that keeps the inputs and guided outputs of some images' UNet calls after warmup.

    Register it after :func:`pcpp.convert`, so that it sees the gathered (full) output. The UNet batch is
    ``[unconditional x n, conditional x n]``; before each batch of images the sampler calls :meth:`begin_batch`
    with the prompt ids of the batch, and the hook keeps the rows of the ``wanted`` ids among them.

    Args:
        unet: the UNet.
        guidance: classifier-free guidance scale.
        first_step: first step (0-based, per image) to record.
    """

    def __init__(self, unet: nn.Module, guidance: float, first_step: int) -> None:
        self.guidance = guidance
        self.first_step = first_step
        self.wanted: frozenset[int] = frozenset()
        self._select = torch.zeros(0, dtype=torch.long)
        self._select_ids: list[int] = []
        self.calls: list[dict[str, Any]] = []
        self._signature = inspect.signature(unet.forward)
        self._step = 0
        self._last_t: float | None = None
        self._handle = unet.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        """Detach the hook."""
        self._handle.remove()

    def begin_batch(self, batch_ids: Sequence[int]) -> None:
        """Declare the prompt ids of the next batch of images (in batch order)."""
        positions = [k for k, i in enumerate(batch_ids) if i in self.wanted]
        self._select = torch.tensor(positions, dtype=torch.long)
        self._select_ids = [int(batch_ids[k]) for k in positions]

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        arguments = dict(self._signature.bind(*args, **kwargs).arguments)
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
                arguments.update(arguments.pop(name))
        timestep = arguments["timestep"]
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, Tensor) else float(timestep)
        if self._last_t is not None and t > self._last_t:
            self._step = 0  # a new image
        self._last_t = t
        step, self._step = self._step, self._step + 1
        if self._select.numel() == 0 or step < self.first_step:
            return
        sample: Tensor = arguments["sample"]
        batch = sample.shape[0]
        if batch % 2:
            raise ValueError(f"expected a CFG batch [uncond, cond], got batch {batch}")
        n = batch // 2
        rows = torch.cat([self._select, self._select + n]).to(sample.device)

        def take(x: Tensor) -> Tensor:
            return x.index_select(0, rows).detach().cpu() if x.ndim > 0 and x.shape[0] == batch else x.detach().cpu()

        out = _unet_output(output).index_select(0, rows).detach().float().cpu()
        uncond, cond = out.chunk(2)
        self.calls.append(
            {
                "step": step,
                "t": t,
                "arguments": map_tensors(arguments, take),
                "guided": uncond + self.guidance * (cond - uncond),
                "ids": list(self._select_ids),
            }
        )

    @torch.no_grad()
    def errors(self, unet: nn.Module, alphas_cumprod: Tensor, prediction_type: str) -> dict[int, dict[int, float]]:
        """Relative L2 error of the recorded guided eps against ``unet`` (unconverted) on the same inputs.

        Args:
            unet: the single-device UNet.
            alphas_cumprod: the scheduler's cumulative alphas.
            prediction_type: the scheduler's prediction type.

        Returns:
            ``{image id: {step: error}}``.
        """
        device = next(unet.parameters()).device
        result: dict[int, dict[int, float]] = {}
        for call in self.calls:
            arguments = map_tensors(call["arguments"], lambda x: x.to(device))
            out = _unet_output(unet(**arguments)).float().cpu()
            uncond, cond = out.chunk(2)
            guided_ref = uncond + self.guidance * (cond - uncond)
            x_t = call["arguments"]["sample"].float().chunk(2)[0]
            alpha_bar = float(alphas_cumprod[round(call["t"])])
            eps = to_eps(call["guided"], x_t, alpha_bar, prediction_type)
            eps_ref = to_eps(guided_ref, x_t, alpha_bar, prediction_type)
            for image_id, err in zip(call["ids"], relative_l2(eps, eps_ref).tolist(), strict=True):
                result.setdefault(int(image_id), {})[call["step"]] = float(err)
        return result


# ---------------------------------------------------------------------------------------------------------------
# Samplers: pcpp's tiny model, or a diffusers pipeline
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """Everything a rank needs; picklable.

    Attributes:
        model: ``"tiny"`` or a diffusers pipeline id or folder.
        prompts: the captions.
        seeds: the seed of each caption's initial noise.
        steps: DDIM steps.
        guidance: CFG scale (None: the model's default).
        configs: the configurations this rank count runs (all with the same ``ranks``).
        eps_ids: prompts whose noise-prediction error is measured.
        grid_ids: prompts whose images are returned for the grids (by rank 0), empty for none.
        reference_dir: the work folder: cached single-device images and finished configurations.
        device: ``"cpu"`` or ``"cuda"`` (rank r on ``cuda:r``).
        batch_size: prompts per pipeline call (None: all at once).
        lpips: also compute LPIPS (AlexNet) against the reference.
        cache_key: names the cached references and records in ``reference_dir`` (see :func:`cache_key`).
    """

    model: str
    prompts: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: int
    guidance: float | None
    configs: tuple[Config, ...]
    eps_ids: tuple[int, ...]
    grid_ids: tuple[int, ...]
    reference_dir: str
    device: str = "cpu"
    batch_size: int | None = None
    lpips: bool = False
    cache_key: str = "nocache"


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


def _sampler(job: Job, device: torch.device) -> Sampler:
    return TinySampler(job, device) if job.model == "tiny" else PipelineSampler(job, device)


def _device(job: Job, rank: int) -> torch.device:
    return torch.device("cuda", rank) if job.device == "cuda" else torch.device("cpu")


def cache_key(job: Job) -> str:
    """A short hash of everything that determines the images and metrics (model and its weights, prompts, seeds,
    steps, guidance, measured subsets), so that a work folder is reused only for the same study."""
    fields = {
        "model": job.model,
        "prompts": job.prompts,
        "seeds": job.seeds,
        "steps": job.steps,
        "guidance": job.guidance,
        "eps_ids": job.eps_ids,
        "lpips": job.lpips,
    }
    if job.model == "tiny":
        from pcpp.models import weights_dir

        fields["weights"] = _file_sha256(weights_dir() / "unet" / "diffusion_pytorch_model.safetensors")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _reference_path(job: Job, size: int) -> Path:
    return Path(job.reference_dir) / f"reference_{size}px_{job.cache_key}.pt"


def _record_path(job: Job, config: Config) -> Path:
    slug = re.sub(r"[^a-z0-9.]+", "-", config.mode.label)
    return Path(job.reference_dir) / f"record_{config.ranks}x{config.resolution}px_{slug}_{job.cache_key}.pt"


def _lpips_metric(device: torch.device) -> Callable[[Tensor, Tensor], list[float]]:
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True, reduction="none").to(device)

    def compute(images: Tensor, reference: Tensor) -> list[float]:
        with torch.no_grad():
            values = metric(images.to(device).clamp(0, 1), reference.to(device).clamp(0, 1))
        return [float(v) for v in values.reshape(-1)]

    return compute


def lpips_available() -> tuple[bool, str]:
    """Whether torchmetrics' LPIPS can run without a download: torchvision installed, AlexNet weights cached.

    Returns:
        ``(available, reason)``.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False, "torchvision is not installed"
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    if not any(hub.glob("alexnet-*.pth")):
        return False, f"AlexNet weights are not in {hub} (torchmetrics would download them)"
    return True, "AlexNet weights found"


# ---------------------------------------------------------------------------------------------------------------
# Per-rank work
# ---------------------------------------------------------------------------------------------------------------


def _worker_logging(rank: int) -> None:
    """Rank 0 of a spawned group logs at INFO to stderr (the others only warnings)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO if rank == 0 else logging.WARNING,
            format=f"%(asctime)s [rank {rank}] %(message)s",
            datefmt="%H:%M:%S",
        )


def reference_worker(rank: int, world: int, job: Job, sizes: tuple[int, ...]) -> dict[int, Tensor]:
    """Single-device images (unconverted UNet) of prompts ``rank::world`` at every size. Runs in a spawned rank.

    Returns:
        ``{size: images}`` of this rank's prompts.
    """
    _worker_logging(rank)
    sampler = _sampler(job, _device(job, rank))
    ids = list(range(rank, len(job.prompts), world))
    return {size: sampler.generate(ids, size) for size in sizes} if ids else {}


def study_worker(rank: int, world: int, job: Job) -> list[dict[str, Any]]:
    """Run every configuration of ``job`` on this rank (patch-parallel, all prompts in one batch) and measure it.

    Each rank measures its own share of the prompts (``rank::world``) against the cached reference images and
    its own share of ``eps_ids``; the parent merges the shares. Runs in a spawned rank.

    Returns:
        One record per configuration: ids, per-image PSNR/SSIM(/LPIPS), eps errors, seconds, grid images.
    """
    import pcpp

    _worker_logging(rank)
    device = _device(job, rank)
    sampler = _sampler(job, device)
    ids = list(range(len(job.prompts)))
    mine = ids[rank::world]
    eps_mine = tuple(job.eps_ids[rank::world])
    lpips = _lpips_metric(device) if job.lpips else None
    references: dict[int, Tensor] = {}
    records = []
    for config in job.configs:
        size = config.resolution
        if size not in references:
            references[size] = torch.load(_reference_path(job, size), weights_only=True)
        mode = config.mode
        pcpp.convert(sampler.unet, **mode.convert_kwargs())
        # Steps 0 .. warmup-1 are synchronous (step 0 always is); exact mode is measured from step 1 on.
        recorder = Recorder(sampler.unet, sampler.guidance, first_step=1 if mode.exact else max(mode.warmup, 1))
        recorder.wanted = frozenset(eps_mine)
        start = time.perf_counter()
        try:
            images = sampler.generate(ids, size, recorder)
        finally:
            recorder.remove()
            pcpp.revert(sampler.unet)
        seconds = time.perf_counter() - start
        errors = recorder.errors(sampler.unet, sampler.alphas_cumprod, sampler.prediction_type)
        recorder.calls.clear()
        record: dict[str, Any] = {
            "config": config,
            "ids": mine,
            "seconds": seconds,
            "eps": {i: errors.get(i, {}) for i in eps_mine},
            **image_metrics(images[mine], references[size][mine]),
        }
        if lpips is not None:
            record["lpips"] = lpips(images[mine], references[size][mine])
        if rank == 0 and job.grid_ids:
            record["grid"] = images[list(job.grid_ids)].clone()
        records.append(record)
        logger.info(
            "rank %d/%d, %d px, %s: %.1f s, mean PSNR of my %d images %.2f dB",
            rank,
            world,
            size,
            mode.label,
            seconds,
            len(mine),
            _finite_mean(record["psnr"]),
        )
    return records


def _finite_mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.inf


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """A whole study.

    Attributes:
        job: the shared per-rank settings (its ``configs`` are all configurations, of every rank count).
        grid_ranks: rank count whose images go into the grids.
        reference_procs: processes that compute the single-device references.
        timeout_s: longest time one spawn (one rank count) may take.
    """

    job: Job
    grid_ranks: int | None
    reference_procs: int
    timeout_s: float = 6 * 3600.0


def _sizes(configs: Sequence[Config]) -> list[int]:
    return sorted({c.resolution for c in configs})


def compute_references(study: Study) -> None:
    """Compute the single-device images of every size not cached in ``reference_dir`` (prompts split over
    ``reference_procs`` spawned processes; in this process if 1) and save them there."""
    from pcpp.testing import run_distributed

    job = study.job
    missing = tuple(s for s in _sizes(job.configs) if not _reference_path(job, s).is_file())
    if not missing:
        return
    procs = max(1, min(study.reference_procs, len(job.prompts)))
    start = time.perf_counter()
    if procs == 1:  # in this process: no spawn
        parts = [reference_worker(0, 1, job, missing)]
    else:
        parts = run_distributed(
            reference_worker,
            procs,
            job,
            missing,
            timeout=study.timeout_s,
            group_timeout=study.timeout_s,
            backend="nccl" if job.device == "cuda" else "gloo",
        )
    for size in missing:
        first = parts[0][size]
        full = torch.empty((len(job.prompts), *first.shape[1:]), dtype=first.dtype)
        for rank, part in enumerate(parts):
            if size in part:
                full[rank::procs] = part[size]
        torch.save(full, _reference_path(job, size))
    logger.info("single-device references at %s px: %.1f s", list(missing), time.perf_counter() - start)


def run_study(study: Study) -> tuple[list[dict[str, Any]], dict[tuple[int, str], Tensor]]:
    """Run every configuration not cached in the work folder: one spawn of ``ranks`` processes per rank count.

    Each configuration's merged record is saved in the work folder as soon as its rank count finishes, so a run
    that stops can be resumed with the same ``--work-dir``.

    Returns:
        The merged records (one per configuration, JSON-ready except for ``config``) and the grid images
        ``{(size, mode label): images}`` of ``grid_ranks``.
    """
    from pcpp.testing import run_distributed

    job = study.job
    compute_references(study)
    for ranks in sorted({c.ranks for c in job.configs}):
        todo = tuple(c for c in job.configs if c.ranks == ranks and not _record_path(job, c).is_file())
        if not todo:
            continue
        grid_ids = job.grid_ids if ranks == study.grid_ranks else ()
        sub = dataclasses.replace(job, configs=todo, grid_ids=grid_ids)
        start = time.perf_counter()
        per_rank = run_distributed(
            study_worker,
            ranks,
            sub,
            timeout=study.timeout_s,
            group_timeout=study.timeout_s,
            backend="nccl" if job.device == "cuda" else "gloo",
        )
        logger.info("%d ranks: %d configurations in %.1f s", ranks, len(todo), time.perf_counter() - start)
        for k, config in enumerate(todo):
            parts = [rank_records[k] for rank_records in per_rank]
            cached = {"record": merge_records(config, parts, len(job.prompts), job.steps), "grid": parts[0].get("grid")}
            torch.save(cached, _record_path(job, config))
    records: list[dict[str, Any]] = []
    grids: dict[tuple[int, str], Tensor] = {}
    for config in job.configs:
        cached = torch.load(_record_path(job, config), weights_only=False)
        records.append(cached["record"])
        if cached["grid"] is not None and config.ranks == study.grid_ranks:
            grids[(config.resolution, config.mode.label)] = cached["grid"]
    return records, grids


def merge_records(config: Config, parts: Sequence[dict[str, Any]], n_prompts: int, steps: int) -> dict[str, Any]:
    """Join the ranks' shares of one configuration and summarise them.

    Args:
        config: the configuration.
        parts: each rank's record from :func:`study_worker`.
        n_prompts: number of prompts.
        steps: denoising steps.

    Returns:
        A JSON-ready record: ``ranks``, ``resolution``, ``mode``, ``seconds``, summaries of ``psnr``, ``ssim``,
        ``lpips`` (or None) and ``eps`` (per image and step, with ``per_step_mean``/``per_step_max``), and the
        per-image values.
    """
    metrics = ["psnr", "ssim"] + (["lpips"] if "lpips" in parts[0] else [])
    per_image: dict[str, list[float]] = {m: [math.nan] * n_prompts for m in metrics}
    eps: dict[int, dict[int, float]] = {}
    for part in parts:
        for m in metrics:
            for i, v in zip(part["ids"], part[m], strict=True):
                per_image[m][i] = v
        eps.update(part["eps"])
    by_step: dict[int, list[float]] = {}
    for errors in eps.values():
        for step, err in errors.items():
            by_step.setdefault(step, []).append(err)
    all_errors = [e for errors in eps.values() for e in errors.values()]
    return {
        "ranks": config.ranks,
        "resolution": config.resolution,
        "mode": config.mode.to_json(),
        "seconds": max(float(p["seconds"]) for p in parts),
        "psnr": summarize(per_image["psnr"]),
        "ssim": summarize(per_image["ssim"]),
        "lpips": summarize(per_image["lpips"]) if "lpips" in per_image else None,
        "eps": summarize(all_errors)
        | {
            "images": sorted(eps),
            "per_step_mean": [sum(by_step[s]) / len(by_step[s]) if s in by_step else None for s in range(steps)],
            "per_step_max": [max(by_step[s]) if s in by_step else None for s in range(steps)],
        },
        "per_image": per_image,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def environment(job: Job) -> dict[str, Any]:
    """Where and with what the study ran: date, host, CPU count, library versions, model weights' hash."""
    import diffusers
    import torchmetrics

    import pcpp

    env: dict[str, Any] = {
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": job.device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "torchmetrics": torchmetrics.__version__,
        "pcpp": pcpp.__version__,
        "model": job.model,
    }
    if job.model == "tiny":
        from pcpp.models import weights_dir

        env["tiny_unet_sha256"] = _file_sha256(weights_dir() / "unet" / "diffusion_pytorch_model.safetensors")
    return env


# ---------------------------------------------------------------------------------------------------------------
# Reporting: markdown, plots, grids
# ---------------------------------------------------------------------------------------------------------------


def _fmt(summary: dict[str, Any] | None, digits: int = 2, spread: bool = True) -> str:
    if summary is None:
        return "-"
    if summary.get("mean") is None:
        return "inf" if summary.get("n_inf") else "-"
    text = f"{summary['mean']:.{digits}f}"
    if spread:
        text += f" ± {summary['std']:.{digits}f}"
    if summary.get("n_inf"):
        text += f" ({summary['n_inf']}/{summary['n']} identical: inf)"
    return text


def _fmt_eps(summary: dict[str, Any]) -> str:
    if summary.get("mean") is None:
        return "-"
    return f"{summary['mean']:.2e} ({summary['p95']:.1e} / {summary['max']:.1e})"


def _main_labels(records: Sequence[dict[str, Any]], warmup: int) -> list[str]:
    labels = ["exact", f"full / w{warmup}"]
    partials = sorted(
        {
            r["mode"]["partial"]
            for r in records
            if r["mode"]["warmup"] == warmup and not (r["mode"]["full"] or r["mode"]["exact"])
        }
    )
    return labels + [Mode(partial=p, warmup=warmup).label for p in partials]


def markdown_tables(records: Sequence[dict[str, Any]], warmup: int = 4) -> str:
    """Markdown tables of the study: PSNR, SSIM and eps error by mode (main sweep), the warmup sweep, and every
    configuration with its full spread."""
    index = {(r["resolution"], r["ranks"], r["mode"]["label"]): r for r in records}
    cells = sorted({(r["resolution"], r["ranks"]) for r in records})
    labels = [lab for lab in _main_labels(records, warmup) if any(k[2] == lab for k in index)]
    heads = [lab.replace(f" / w{warmup}", "") for lab in labels]
    lines: list[str] = []

    def pivot(title: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.extend([f"**{title}**", "", "| size | ranks | " + " | ".join(heads) + " |"])
        lines.append("|---|---|" + "---|" * len(heads))
        for res, n in cells:
            row = [cell(index[(res, n, lab)]) if (res, n, lab) in index else "" for lab in labels]
            lines.append(f"| {res} px | {n} | " + " | ".join(row) + " |")
        lines.append("")

    pivot(f"PSNR (dB) against one device, mean ± std over images; warmup {warmup}", lambda r: _fmt(r["psnr"]))
    pivot(f"SSIM against one device, mean ± std over images; warmup {warmup}", lambda r: _fmt(r["ssim"], 4))
    pivot(
        f"Relative L2 error of the guided eps after warmup, mean over (image, step); warmup {warmup}",
        lambda r: f"{r['eps']['mean']:.2e}" if r["eps"].get("mean") is not None else "-",
    )
    swept = [r for r in records if r["mode"]["warmup"] != warmup and not r["mode"]["exact"]]
    sweep = sorted({(r["resolution"], r["ranks"]) for r in swept})
    warmups = sorted({r["mode"]["warmup"] for r in records if not r["mode"]["exact"]})
    if sweep:
        lines.extend(
            [
                "**Warmup sweep: PSNR (dB) mean ± std / eps error mean**",
                "",
                "| size | ranks | mode | " + " | ".join(f"warmup {w}" for w in warmups) + " |",
                "|---|---|---|" + "---|" * len(warmups),
            ]
        )
        for res, n in sweep:
            for base in sorted({r["mode"]["label"].split(" / ")[0] for r in swept}, reverse=True):
                row = []
                for w in warmups:
                    r = index.get((res, n, f"{base} / w{w}"))
                    row.append(f"{_fmt(r['psnr'])} / {r['eps']['mean']:.1e}" if r else "")
                lines.append(f"| {res} px | {n} | {base} | " + " | ".join(row) + " |")
        lines.append("")
    lines.extend(
        [
            "**Every configuration** (PSNR and SSIM over images; eps error over (image, step) after warmup: "
            "mean (p95 / max); seconds: wall time of the parallel run of all prompts)",
            "",
            "| size | ranks | mode | PSNR mean ± std | PSNR min / p5 / p95 / max | SSIM mean ± std | SSIM min "
            "| eps rel. L2 mean (p95 / max) | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for r in records:
        p = r["psnr"]
        spread = (
            f"{p['min']:.2f} / {p['p5']:.2f} / {p['p95']:.2f} / {p['max']:.2f}" if p.get("mean") is not None else "inf"
        )
        ssim_min = f"{r['ssim']['min']:.4f}" if r["ssim"].get("min") is not None else "-"
        lines.append(
            f"| {r['resolution']} px | {r['ranks']} | {r['mode']['label']} | {_fmt(p)} | {spread} | "
            f"{_fmt(r['ssim'], 4)} | {ssim_min} | {_fmt_eps(r['eps'])} | {r['seconds']:.0f} |"
        )
    if any(r.get("lpips") for r in records):
        lines.extend(["", "| size | ranks | mode | LPIPS mean ± std |", "|---|---|---|---|"])
        for r in records:
            lines.append(f"| {r['resolution']} px | {r['ranks']} | {r['mode']['label']} | {_fmt(r['lpips'], 4)} |")
    return "\n".join(lines) + "\n"


def write_table(path: Path, table: str) -> None:
    """Write ``table`` between the markers of ``path`` if it has them, else as the whole file."""
    if path.is_file():
        text = path.read_text()
        pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.DOTALL)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: f"{TABLE_BEGIN}\n{table}{TABLE_END}", text))
            return
    path.write_text(table)


@contextmanager
def _figure(path: Path, **kwargs: Any) -> Iterator[Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(**kwargs)
    try:
        yield fig
        fig.savefig(path, dpi=110, bbox_inches="tight")
        logger.info("wrote %s", path)
    finally:
        plt.close(fig)


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_pareto(records: Sequence[dict[str, Any]], ranks: int, path: Path) -> None:
    """Latency (SDXL on 4x H200, docs/benchmarks.md) against PSNR (tiny model at ``ranks`` ranks)."""
    with _figure(path, figsize=(6.4, 4.4)) as fig:
        ax = fig.add_subplot(1, 1, 1)
        sizes = sorted({r["resolution"] for r in records if r["ranks"] == ranks})
        markers = "osD^v"
        for k, size in enumerate(sizes):
            for label, color in (("partial 0.3 / w4", "tab:blue"), ("full / w4", "tab:orange")):
                rec = next(
                    (
                        r
                        for r in records
                        if r["ranks"] == ranks and r["resolution"] == size and r["mode"]["label"] == label
                    ),
                    None,
                )
                if rec is None or rec["psnr"].get("mean") is None:
                    continue
                lat = BENCHMARK_LATENCY_MS[label]
                y, err = rec["psnr"]["mean"], rec["psnr"]["std"]
                name = label.replace(" / w4", "")
                ax.errorbar(
                    lat["median"],
                    y,
                    yerr=err,
                    fmt=markers[k % 5],
                    color=color,
                    capsize=3,
                    label=f"{name}, fidelity at {size} px",
                )
                ax.plot(lat["floor"], y, markers[k % 5], mfc="none", color=color)
                ax.annotate(
                    "",
                    xy=(lat["floor"], y),
                    xytext=(lat["median"], y),
                    arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.5},
                )
        ax.set_xlabel("latency of one SDXL 2048 px image, 4x H200 (ms)\nfilled: measured median; hollow: floor")
        ax.set_ylabel(f"PSNR vs one device (dB), tiny model, {ranks} ranks")
        ax.set_title("Latency (SDXL, GPU) vs fidelity (tiny model, CPU): different models", fontsize=10)
        ax.text(
            0.02,
            0.02,
            f"1 GPU: {SINGLE_GPU_LATENCY_MS:.0f} ms (the reference, PSNR = inf)\n"
            "only partial 0.3 and full were timed on GPU",
            transform=ax.transAxes,
            fontsize=8,
            va="bottom",
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")


def plot_psnr_vs_partial(records: Sequence[dict[str, Any]], warmup: int, path: Path) -> None:
    """Mean PSNR (± std) against the partial ratio per rank count and size; full conditioning as a dashed line."""
    with _figure(path, figsize=(6.4, 4.4)) as fig:
        ax = fig.add_subplot(1, 1, 1)
        colors = {2: "tab:green", 3: "tab:purple", 4: "tab:blue", 8: "tab:red"}
        styles = ["-", "--", ":", "-."]
        sizes = sorted({r["resolution"] for r in records})
        for n in sorted({r["ranks"] for r in records}):
            for k, size in enumerate(sizes):
                rows = sorted(
                    (
                        r
                        for r in records
                        if r["ranks"] == n
                        and r["resolution"] == size
                        and r["mode"]["warmup"] == warmup
                        and not r["mode"]["full"]
                        and not r["mode"]["exact"]
                    ),
                    key=lambda r: r["mode"]["partial"],
                )
                if not rows:
                    continue
                color = colors.get(n, "black")
                ax.errorbar(
                    [r["mode"]["partial"] for r in rows],
                    [r["psnr"]["mean"] for r in rows],
                    yerr=[r["psnr"]["std"] for r in rows],
                    ls=styles[k % 4],
                    marker="o",
                    color=color,
                    capsize=2,
                    label=f"{n} ranks, {size} px",
                )
                full = next(
                    (
                        r
                        for r in records
                        if r["ranks"] == n and r["resolution"] == size and r["mode"]["label"] == f"full / w{warmup}"
                    ),
                    None,
                )
                if full is not None:
                    ax.axhline(full["psnr"]["mean"], color=color, ls=styles[k % 4], alpha=0.4, lw=1)
        ax.set_xlabel("partial ratio (share of each neighbour strip attention reads)")
        ax.set_ylabel("PSNR vs one device (dB), mean ± std")
        ax.set_title(f"Tiny model, warmup {warmup}; faint horizontal lines: full conditioning", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)


def plot_eps_per_step(records: Sequence[dict[str, Any]], ranks: int, size: int, path: Path) -> None:
    """Mean relative L2 error of the guided eps at each step after warmup, one line per mode."""
    with _figure(path, figsize=(6.4, 4.4)) as fig:
        ax = fig.add_subplot(1, 1, 1)
        for r in records:
            if r["ranks"] != ranks or r["resolution"] != size or r["mode"]["exact"]:
                continue
            values = r["eps"]["per_step_mean"]
            steps = [s for s, v in enumerate(values) if v is not None]
            ax.semilogy(steps, [values[s] for s in steps], marker=".", label=r["mode"]["label"])
        ax.set_xlabel("denoising step (0-based; the first ones are the synchronous warmup)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("relative L2 error of guided eps (mean over images)")
        ax.set_title(f"Tiny model, {ranks} ranks, {size} px: noise-prediction error after warmup", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)


def grid_columns(labels: Sequence[str], warmup: int) -> list[str]:
    """The modes shown in an image grid, in order: exact, full conditioning, then partial ratios ascending."""
    partials = sorted(
        (lab for lab in labels if lab.startswith("partial ") and lab.endswith(f" / w{warmup}")),
        key=lambda lab: float(lab.split()[1]),
    )
    return [lab for lab in ("exact", f"full / w{warmup}") if lab in labels] + partials


def save_grid(
    reference: Tensor,
    images: dict[str, Tensor],
    columns: Sequence[str],
    path: Path,
    amplify: float = 5.0,
    captions: Sequence[str] = (),
) -> None:
    """Grid of images (one row per prompt) and their amplified difference maps ``amplify * |image - reference|``.

    Uses matplotlib (titled, rows labelled with ``captions``) when installed, else
    :func:`pcpp.models.imageio.image_grid` (no text).
    """
    rows_img = [[reference[i]] + [images[c][i] for c in columns] for i in range(reference.shape[0])]
    diffs = [
        [torch.zeros_like(reference[i])]
        + [(amplify * (images[c][i] - reference[i]).abs()).clamp(0, 1) for c in columns]
        for i in range(reference.shape[0])
    ]
    if not _has_matplotlib():
        from pcpp.models.imageio import image_grid, save_png

        interleaved = [row for pair in zip(rows_img, diffs, strict=True) for row in pair]
        save_png(image_grid(interleaved, cell=96), path)
        logger.info("wrote %s (no matplotlib: untitled grid)", path)
        return
    titles = ["1 device"] + [c.replace(" / w", "\nwarmup ") for c in columns]
    n_rows, n_cols = 2 * reference.shape[0], len(titles)
    with _figure(path, figsize=(1.3 * n_cols, 1.35 * n_rows)) as fig:
        for i in range(reference.shape[0]):
            for j in range(n_cols):
                for k, row in enumerate((rows_img, diffs)):
                    ax = fig.add_subplot(n_rows, n_cols, (2 * i + k) * n_cols + j + 1)
                    ax.imshow(row[i][j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0 and k == 0:
                        ax.set_title(titles[j], fontsize=7)
                    if j == 0:
                        text = captions[i] if k == 0 and i < len(captions) else ("image" if k == 0 else "")
                        label = textwrap.fill(text, 22) if k == 0 else f"|diff| x{amplify:g}"
                        ax.set_ylabel(label, fontsize=6 if k == 0 else 7)
        fig.subplots_adjust(wspace=0.05, hspace=0.08)


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser; ``--plan`` sets the defaults that the other options override."""
    parser = argparse.ArgumentParser(
        description="PCPP fidelity study: PSNR/SSIM of patch-parallel images and per-step noise-prediction error "
        "against the single-device UNet, swept over partial ratio, full conditioning, warmup, ranks and size.",
    )
    parser.add_argument("--plan", choices=sorted(PLANS), default="small", help="preset of the options below")
    parser.add_argument("--model", default="tiny", help="'tiny' (pcpp's own model) or a diffusers pipeline id/folder")
    parser.add_argument("--captions", default=None, help="text file, one prompt per line (default: tiny captions)")
    parser.add_argument("--prompts", type=int, default=None, help="number of prompt/seed pairs")
    parser.add_argument("--caption-seed", type=int, default=0, help="seed of the generated tiny-model captions")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of prompt 0 (prompt i uses seed + i)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps of modes named without @wN")
    parser.add_argument(
        "--run",
        action="append",
        default=None,
        metavar="RANKSxSIZES:MODES",
        help="configurations to run, e.g. '2,4x32,48:exact,p0,p0.3,p1,full,p0.3@w2,full@w1' (repeatable; "
        "replaces the plan's runs)",
    )
    parser.add_argument("--eps-prompts", type=int, default=None, help="prompts whose eps error is measured")
    parser.add_argument("--grid-prompts", type=int, default=3, help="prompts shown in the image grids")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu (gloo) or cuda (nccl)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per pipeline call (pipelines only)")
    parser.add_argument(
        "--lpips", choices=("auto", "on", "off"), default="auto", help="auto: pipelines only, if weights are cached"
    )
    parser.add_argument("--reference-procs", type=int, default=None, help="processes for the references")
    parser.add_argument(
        "--work-dir", default=None, help="cache of references and finished configurations, to resume (default: temp)"
    )
    parser.add_argument("--json", default="fidelity_results.json", help="where to write every number")
    parser.add_argument("--table", default=None, help="markdown file for the tables (markers block or whole file)")
    parser.add_argument("--img-dir", default=None, help="folder for the PNG plots and grids (fidelity_*.png)")
    parser.add_argument(
        "--figures-only", action="store_true", help="redraw table and figures from --work-dir; keep the JSON"
    )
    parser.add_argument("--timeout-s", type=float, default=6 * 3600.0, help="longest time per rank count")
    return parser


def _resolve(args: argparse.Namespace) -> dict[str, Any]:
    plan = dict(PLANS[args.plan])
    for key in ("prompts", "steps", "warmup", "eps_prompts"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.run:
        plan["runs"] = tuple(args.run)
    return plan


def make_study(args: argparse.Namespace, work_dir: str) -> tuple[Study, dict[str, Any]]:
    """Build the study from parsed arguments.

    Returns:
        The study and the resolved plan.

    Raises:
        SystemExit: an option is out of range (a message says which).
    """
    plan = _resolve(args)
    if args.captions:
        prompts = read_captions(args.captions, plan["prompts"])
    else:
        if args.model != "tiny":
            raise SystemExit("--captions is needed with --model other than 'tiny'")
        prompts = study_captions(plan["prompts"], args.caption_seed)
    n = len(prompts)
    try:
        configs = parse_runs(plan["runs"], plan["warmup"])
    except ValueError as err:
        raise SystemExit(str(err)) from None
    for c in configs:
        if c.resolution % 4 or (args.model != "tiny" and c.resolution % 8):
            raise SystemExit(f"size {c.resolution} px: a multiple of 4 (tiny) or 8 (latent pipelines) is needed")
    ranks = sorted({c.ranks for c in configs})
    plan["ranks"] = ranks
    plan["resolutions"] = sorted({c.resolution for c in configs})
    use_lpips = args.lpips == "on"
    if args.lpips == "auto" and args.model != "tiny":
        use_lpips, reason = lpips_available()
        logger.info("LPIPS %s: %s", "on" if use_lpips else "skipped", reason)
    elif args.lpips == "auto":
        logger.info("LPIPS skipped: not meaningful for the tiny model's small images (use --lpips on to force)")
    eps_n = min(plan["eps_prompts"], n)
    job = Job(
        model=args.model,
        prompts=tuple(prompts),
        seeds=tuple(args.seed + i for i in range(n)),
        steps=plan["steps"],
        guidance=args.guidance,
        configs=tuple(configs),
        eps_ids=tuple(range(eps_n)),
        grid_ids=tuple(range(min(args.grid_prompts, n))),
        reference_dir=work_dir,
        device=args.device,
        batch_size=args.batch_size,
        lpips=use_lpips,
    )
    job = dataclasses.replace(job, cache_key=cache_key(job))
    if args.device == "cuda":
        procs = args.reference_procs or max(1, torch.cuda.device_count())
    else:
        procs = args.reference_procs or max(1, min(os.cpu_count() or 1, max(ranks)))
    return Study(job, grid_ranks=max(ranks), reference_procs=procs, timeout_s=args.timeout_s), plan


def study_guidance(job: Job) -> float | None:
    """The CFG scale the study uses (the model's default unless given); None for pipelines (read when loaded)."""
    if job.guidance is not None:
        return job.guidance
    if job.model == "tiny":
        from pcpp.models import DEFAULT_GUIDANCE

        return float(DEFAULT_GUIDANCE)
    return None


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study described by ``argv`` and write its outputs.

    With ``--figures-only`` nothing is computed: the table and figures are drawn again from the records cached in
    ``--work-dir``, and the JSON file is left as it is.

    Returns:
        The JSON document (written unless ``--figures-only``).
    """
    import shlex

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pcpp-fidelity-") as tmp:
        work_dir = args.work_dir or tmp
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        study, plan = make_study(args, work_dir)
        job = study.job
        logger.info(
            "%d configurations, %d prompts, sizes %s, ranks %s, %d steps",
            len(job.configs),
            len(job.prompts),
            plan["resolutions"],
            plan["ranks"],
            job.steps,
        )
        if args.figures_only:
            missing = [c for c in job.configs if not _record_path(job, c).is_file()]
            if missing:
                raise SystemExit(
                    f"--figures-only: {len(missing)} configuration(s) are not in {work_dir} (e.g. "
                    f"{missing[0].ranks} ranks, {missing[0].resolution} px, {missing[0].mode.label}); run without it"
                )
        before = environment(job)
        records, grids = run_study(study)
        after = environment(job)
        if before.get("tiny_unet_sha256") != after.get("tiny_unet_sha256"):
            logger.error("the tiny model's weights changed while the study ran: its numbers mix two models")
        references = {s: torch.load(_reference_path(job, s), weights_only=True) for s in _sizes(job.configs)}
    wall = time.perf_counter() - start
    command = "python scripts/fidelity_study.py " + shlex.join(list(argv) if argv is not None else sys.argv[1:])
    document: dict[str, Any] = {
        "command": command.strip(),
        "wall_seconds": wall,
        "environment": before,
        "plan": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in plan.items()},
            "guidance": study_guidance(job),
            "scheduler": "DDIM (eta 0)",
            "noise_seeds": f"prompt i uses seed {args.seed} + i",
            "eps_images": list(job.eps_ids),
            "metrics": "PSNR and SSIM per image on float images in [0, 1] (torchmetrics, data_range=1.0); eps: "
            "relative L2 of the guided eps (v converted with alpha_bar) vs the single-device UNet on the same x_t, "
            "at every step from the first asynchronous one",
        },
        "benchmark_latency_ms": {
            "source": "docs/benchmarks.md: SDXL, 2048 px, 50 DDIM steps, cfg 2 x patch 2 on 4x H200",
            "single_gpu": SINGLE_GPU_LATENCY_MS,
            **BENCHMARK_LATENCY_MS,
        },
        "prompts": list(job.prompts),
        "results": records,
    }
    if not args.figures_only:
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(_json_safe(document), indent=1) + "\n")
        logger.info("wrote %s (%.1f min in all)", json_path, wall / 60)
    table = markdown_tables(records, plan["warmup"])
    if args.table:
        write_table(Path(args.table), table)
        logger.info("wrote the tables into %s", args.table)
    else:
        logger.info("tables:\n%s", table)
    if args.img_dir:
        write_figures(Path(args.img_dir), records, grids, references, job, study.grid_ranks, plan["warmup"])
    return document


def write_figures(
    img_dir: Path,
    records: Sequence[dict[str, Any]],
    grids: dict[tuple[int, str], Tensor],
    references: dict[int, Tensor],
    job: Job,
    grid_ranks: int | None,
    warmup: int,
) -> None:
    """Write the plots (matplotlib, skipped without it) and the image grids into ``img_dir``."""
    img_dir.mkdir(parents=True, exist_ok=True)
    if _has_matplotlib() and grid_ranks is not None:
        plot_pareto(records, grid_ranks, img_dir / "fidelity_pareto.png")
        plot_psnr_vs_partial(records, warmup, img_dir / "fidelity_psnr_vs_partial.png")
        plot_eps_per_step(records, grid_ranks, min(_sizes(job.configs)), img_dir / "fidelity_eps_per_step.png")
    else:
        logger.warning("matplotlib is not installed: plots skipped (pip install matplotlib); grids are untitled")
    ids = list(job.grid_ids)
    for size in _sizes(job.configs):
        images = {label: grid for (s, label), grid in grids.items() if s == size}
        columns = grid_columns(list(images), warmup)
        if ids and columns:
            save_grid(
                references[size][ids],
                images,
                columns,
                img_dir / f"fidelity_grid_{size}px.png",
                captions=[job.prompts[i] for i in ids],
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the study, log progress, return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
