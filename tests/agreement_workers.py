"""Per-rank functions for tests/test_agreement.py: ranks called with different inputs. They run in spawned processes,
so they live at module level."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from torch import Tensor

import pcpp
from pcpp.testing import tiny_unet_config


@dataclass(frozen=True)
class Run:
    """One DDIM loop of a converted UNet; ``per_rank`` names the setting that each rank changes by its rank."""

    family: str = "tiny"
    height: int = 16
    width: int = 12
    steps: int = 3
    spacing: str = "leading"
    seed: int = 0
    prompt: int = 0
    text_embeds: int = 0
    partial: float = 0.3
    cfg_split: bool = False
    per_rank: str | None = None


def _for_rank(run: Run, rank: int) -> Run:
    """What ``rank`` is given: ``run`` with its ``per_rank`` setting moved by the rank (all ranks equal if None)."""
    if run.per_rank is None:
        return run
    if run.per_rank == "height":
        return replace(run, height=run.height + 8 * rank)
    if run.per_rank == "partial":
        return replace(run, partial=run.partial + 0.1 * rank)
    return replace(run, **{run.per_rank: getattr(run, run.per_rank) + rank})


def _unet(family: str) -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config(family)).eval()


def _loop(unet: UNet2DConditionModel, run: Run) -> Tensor:
    """A DDIM loop with classifier-free guidance (batch 2): the initial latent from ``seed``, prompt embeddings
    from ``prompt``, SDXL's text embeddings from ``text_embeds``. Returns the final latent."""
    config = unet.config
    x = torch.randn(1, 4, run.height, run.width, generator=torch.Generator().manual_seed(run.seed))
    ehs = torch.randn(2, 5, config.cross_attention_dim, generator=torch.Generator().manual_seed(100 + run.prompt))
    kwargs: dict[str, Any] = {"encoder_hidden_states": ehs}
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        gen = torch.Generator().manual_seed(200 + run.text_embeds)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, text_dim, generator=gen),
            "time_ids": ehs[:, 0, :6],
        }
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, timestep_spacing=run.spacing
    )
    scheduler.set_timesteps(run.steps)
    with torch.no_grad():
        for t in scheduler.timesteps:
            uncond, cond = unet(torch.cat([x, x]), t, **kwargs).sample.chunk(2)
            x = scheduler.step(uncond + 5.0 * (cond - uncond), t, x).prev_sample
    return x


def _comm(run: Run, world: int) -> Any:
    if not run.cfg_split:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("cfg", "patch"))


def loops(rank: int, world: int, runs: list[Run]) -> list[dict[str, Any]]:
    """Each run on a freshly converted exact UNet. A run whose ranks disagree reports the error (type, message);
    one whose ranks agree reports its output and the single-device output of this rank's inputs."""
    results: list[dict[str, Any]] = []
    for run in runs:
        mine = _for_rank(run, rank)
        unet = _unet(run.family)
        reference = _loop(unet, mine) if run.per_rank is None else None
        pcpp.convert(unet, comm=_comm(run, world), exact=True, partial=mine.partial, timeout=timedelta(seconds=20))
        try:
            out = _loop(unet, mine)
        except pcpp.PCPPError as error:
            results.append({"error": type(error).__name__, "message": str(error)})
            continue
        results.append({"error": None, "out": out, "reference": reference})
    return results


def check_cost(rank: int, world: int, family: str, height: int, width: int, reps: int) -> dict[str, float]:
    """Median seconds of one agreement check and of one converted UNet call (exact mode, CFG batch 2)."""
    unet = _unet(family)
    pcpp.convert(unet, exact=True)
    config = unet.config
    x = torch.randn(2, 4, height, width, generator=torch.Generator().manual_seed(0))
    arguments: dict[str, Any] = {
        "sample": x,
        "timestep": torch.tensor(981),
        "encoder_hidden_states": torch.randn(2, 77, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        arguments["added_cond_kwargs"] = {"text_embeds": torch.randn(2, text_dim), "time_ids": torch.randn(2, 6)}
    checks, calls = [], []
    group = pcpp.comm.TorchCommunicator(None)
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            pcpp.check_ranks_agree(group, arguments, pcpp.get_context(unet).config, image=0, step=0)
            checks.append(time.perf_counter() - start)
        for _ in range(reps + 2):
            start = time.perf_counter()
            unet(**arguments)
            calls.append(time.perf_counter() - start)
    # Steps 0 and 1 of the image run the check themselves; the later calls are the UNet alone.
    return {"check_s": statistics.median(checks), "unet_call_s": statistics.median(calls[2:])}


class Loopback:
    """Two ranks in one process that sent the same vector: the check's own work without a transport."""

    rank = 0
    world_size = 2

    def send_recv(self, messages: object, *, what: str) -> Any:
        raise AssertionError("the check only gathers")

    def all_gather(self, output: Tensor, tensor: Tensor, *, what: str) -> Any:
        output.copy_(tensor.repeat(2))
        return pcpp.comm.base.DONE


def sdxl_arguments(device: str, dtype: torch.dtype, size: int, controlnet: bool) -> dict[str, Any]:
    """The UNet arguments of one SDXL call with guidance at ``size`` pixels, optionally with ControlNet residuals
    (the nine down-block residuals and the middle one of an SDXL ControlNet)."""
    side = size // 8
    arguments: dict[str, Any] = {
        "sample": torch.randn(2, 4, side, side, device=device, dtype=dtype),
        "timestep": torch.tensor(981, device=device),
        "encoder_hidden_states": torch.randn(2, 77, 2048, device=device, dtype=dtype),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.randn(2, 6, device=device, dtype=dtype),
        },
    }
    if controlnet:
        levels = [(320, 1)] * 3 + [(320, 2), (640, 2), (640, 2), (640, 4), (1280, 4), (1280, 4)]
        arguments["down_block_additional_residuals"] = tuple(
            torch.randn(2, c, side // f, side // f, device=device, dtype=dtype) for c, f in levels
        )
        arguments["mid_block_additional_residual"] = torch.randn(
            2, 1280, side // 4, side // 4, device=device, dtype=dtype
        )
    return arguments


def fingerprint_cost(device: str, size: int, controlnet: bool, reps: int = 20) -> float:
    """Median seconds of one agreement check's local work (checksums, one device-to-host copy) on SDXL inputs."""
    arguments = sdxl_arguments(device, torch.float16 if device != "cpu" else torch.float32, size, controlnet)
    times = []
    for _ in range(reps + 1):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pcpp.check_ranks_agree(Loopback(), arguments, pcpp.PCPPConfig(), image=0, step=0)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])
