"""The driver: every resolution, every mode, the report rewritten after each finished mode."""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

import torch

from pcpp.functional import partition_rows

from .arguments import ModeKind
from .common import VAE_FACTOR, make_inputs, write_report
from .floor import run_floor
from .pcpp_modes import run_pcpp
from .report import add_speedups, markdown_table
from .session import Session
from .single import run_single

__all__ = ["check_geometry", "run_all"]

LOG = logging.getLogger(__name__)


def check_geometry(session: Session) -> None:
    """Reject sizes the strips cannot split, before anything runs.

    Raises:
        pcpp.SplitError: a latent height the strips cannot split.
        ValueError: a latent width that is not a multiple of the UNet's unit.
    """
    unit = session.model.unit
    for height, width in session.args.resolutions:
        partition_rows(height // VAE_FACTOR, session.layout.patch_size, unit)
        if (width // VAE_FACTOR) % unit:
            raise ValueError(f"latent width {width // VAE_FACTOR} is not a multiple of {unit}")


def run_all(session: Session, report: dict[str, Any]) -> dict[str, Any]:
    """Run every resolution and mode into ``report["results"]``; rank 0 rewrites ``--out`` after each mode.

    Returns:
        ``report``, filled in.
    """
    args, lay, device = session.args, session.layout, session.device
    check_geometry(session)
    with torch.no_grad():
        for height, width in args.resolutions:
            label = f"{height}x{width}"
            inputs = make_inputs(session.model.config, height, width, args.seed, device, session.dtype)
            rows = partition_rows(height // VAE_FACTOR, lay.patch_size, session.model.unit)
            res: dict[str, Any] = {
                "height": height,
                "width": width,
                "latent": [height // VAE_FACTOR, width // VAE_FACTOR],
                "strip_rows": list(rows),
                "modes": {},
            }
            report["results"][label] = res
            for mode in args.modes:
                tick = time.perf_counter()
                if mode.kind is ModeKind.SINGLE:
                    res["modes"]["single"] = run_single(session, inputs, label, report["environment"]["device"])
                elif mode.kind is ModeKind.FLOOR:
                    res["modes"]["floor"] = run_floor(session, inputs, rows, label)
                else:  # on one rank this measures what pcpp costs where nothing is split
                    res["modes"][mode.name] = run_pcpp(session, mode, inputs, label)
                res["modes"][mode.name]["wall_s"] = time.perf_counter() - tick
                add_speedups(res)
                if lay.rank == 0 and args.out is not None:  # so that a cut-short run keeps its results
                    write_report(report, args.out)
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
    for line in markdown_table(report).splitlines():
        LOG.info("%s", line)
    return report
