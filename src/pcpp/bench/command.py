"""``pcpp bench``'s entry point: bounded set-up, the run, and a teardown that cannot hang."""

from __future__ import annotations

import faulthandler
import logging
import os

import torch
import torch.distributed as dist

from .arguments import parse_args
from .common import report_text, setup_logging, teardown, write_report
from .denoisers import Denoisers
from .image import run_images
from .layout import Layout, init_layout
from .model import load_model
from .report import new_report
from .run import run_all
from .session import Session
from .tasks import Task
from .vae_floor import run_vae_floor

__all__ = ["main"]

LOG = logging.getLogger("pcpp.bench")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the exit code (``python -m pcpp.bench`` then ends with ``os._exit``).

    Works under ``torchrun`` (it initialises the process group itself) and inside an already initialised group
    (tests under :func:`pcpp.testing.run_distributed`), which it then leaves for its owner to destroy.

    Args:
        argv: the options (``sys.argv[1:]`` if None); see ``pcpp bench --help``.

    Returns:
        0 on success, 1 if the run failed on this rank (usage errors exit with status 2).
    """
    args = parse_args(argv)
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    setup_logging(rank, args.verbose)
    if getattr(args, "cuda_graph_note", None):
        LOG.info("%s", args.cuda_graph_note)
    # A hard bound on everything, graphs and NCCL kernels included: dump every thread's stack and exit.
    faulthandler.dump_traceback_later(args.deadline_s, exit=True)
    layout: Layout | None = None
    denoisers = Denoisers(torch.device(args.device))
    code = 0
    try:
        layout = init_layout(args)
        denoisers = Denoisers(layout.device)
        LOG.info(
            "pcpp.bench %s: %d rank(s) on %s, mesh cfg %d x patch %d; modes %s; resolutions %s",
            args.task.value,
            layout.world,
            layout.device.type,
            2 if layout.cfg_split else 1,
            layout.patch_size,
            " ".join(m.name for m in args.modes),
            " ".join(f"{h}x{w}" for h, w in args.resolutions),
        )
        if args.task is Task.VAE_FLOOR:
            report = run_vae_floor(args, layout)
        else:
            model = load_model(args, layout.device)
            report = new_report(args, layout, model)
            session = Session(args=args, layout=layout, model=model, denoisers=denoisers)
            (run_images if args.task is Task.WHOLE_IMAGE else run_all)(session, report)
        if rank == 0 and args.out is None:
            LOG.info("report:\n%s", report_text(report))
        elif rank == 0:
            write_report(report, args.out)
            LOG.info("report written to %s", args.out)
        denoisers.release_all()
        dist.barrier(group=layout.wait_group)
    except Exception:
        LOG.exception("pcpp.bench failed on rank %d", rank)
        code = 1
    finally:
        denoisers.release_all()
    teardown(args.teardown_timeout_s, destroy=layout is not None and layout.owns_group)
    faulthandler.cancel_dump_traceback_later()
    return code
