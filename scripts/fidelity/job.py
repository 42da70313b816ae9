"""What every rank is given (:class:`Job`), the whole study (:class:`Study`), and the work folder's cache names."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .plan import Config


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


def config_sizes(configs: Sequence[Config]) -> list[int]:
    """The image sizes of ``configs``, ascending, each once."""
    return sorted({c.resolution for c in configs})


def rank_device(job: Job, rank: int) -> torch.device:
    """The device of ``rank``: ``cuda:rank`` for a CUDA job, else the CPU."""
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
        fields["weights"] = tiny_unet_sha256()
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def reference_path(job: Job, size: int) -> Path:
    """Where the single-device images of ``job``'s prompts at ``size`` px are cached."""
    return Path(job.reference_dir) / f"reference_{size}px_{job.cache_key}.pt"


def record_path(job: Job, config: Config) -> Path:
    """Where the merged record of ``config`` (and its grid images) is cached."""
    slug = re.sub(r"[^a-z0-9.]+", "-", config.mode.label)
    return Path(job.reference_dir) / f"record_{config.ranks}x{config.resolution}px_{slug}_{job.cache_key}.pt"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tiny_unet_sha256() -> str:
    """The SHA-256 of the tiny model's UNet weights (the study's numbers hold for these weights only)."""
    from pcpp.models import weights_dir

    return file_sha256(weights_dir() / "unet" / "diffusion_pytorch_model.safetensors")


def study_guidance(job: Job) -> float | None:
    """The CFG scale the study uses (the model's default unless given); None for pipelines (read when loaded)."""
    if job.guidance is not None:
        return job.guidance
    if job.model == "tiny":
        from pcpp.models import DEFAULT_GUIDANCE

        return float(DEFAULT_GUIDANCE)
    return None
