"""Per-rank functions of the fault-injection tests (spawned processes, so module level)."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

import pcpp
from dist_workers import Case, build_unet, inputs


def stricken_loop(rank: int, world: int, case: Case, victim: int, sig: str, at_step: int, pid_dir: str) -> Any:
    """Run ``case``'s UNet calls; rank ``victim`` sends itself ``sig`` at step ``at_step``.

    Returns, on every other rank, the pcpp error its UNet call raised: type, message, how long that call took.
    """
    Path(pid_dir, f"rank{rank}.pid").write_text(str(os.getpid()))
    unet = build_unet(case)
    pcpp.convert(unet, **case.convert)
    x, kwargs = inputs(case, unet)
    batch_in = torch.cat([x, x])
    with torch.no_grad():
        for step in range(case.steps):
            if rank == victim and step == at_step:
                os.kill(os.getpid(), getattr(signal, sig))
            started = time.monotonic()
            try:
                unet(batch_in, 999 - step, **kwargs)
            except pcpp.PCPPError as err:
                return {"type": type(err).__name__, "message": str(err), "seconds": time.monotonic() - started}
    return {"type": None, "message": "no error", "seconds": 0.0}


def timeout_of(seconds: float) -> dict[str, Any]:
    return {"warmup_steps": 2, "partial": 0.3, "timeout": timedelta(seconds=seconds)}
