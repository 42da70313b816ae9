"""Running the study: :func:`run` (parse, compute or load, write the outputs) and the entry point :func:`main`."""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .arguments import build_parser, make_study
from .job import config_sizes, record_path, reference_path
from .markdown import markdown_tables, write_table
from .report import document, environment, json_safe, write_figures
from .study import run_study

logger = logging.getLogger("pcpp.fidelity")


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the study described by ``argv`` and write its outputs.

    With ``--figures-only`` nothing is computed: the table and figures are drawn again from the records cached in
    ``--work-dir``, and the JSON file is left as it is.

    Args:
        argv: the command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The JSON document (written unless ``--figures-only``).

    Raises:
        SystemExit: an option is out of range, or ``--figures-only`` lacks cached configurations.
    """
    argv = list(argv) if argv is not None else sys.argv[1:]
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
            missing = [c for c in job.configs if not record_path(job, c).is_file()]
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
        references = {s: torch.load(reference_path(job, s), weights_only=True) for s in config_sizes(job.configs)}
    wall = time.perf_counter() - start
    result = document(argv, wall, before, plan, job, args.seed, records)
    if not args.figures_only:
        json_path = Path(args.json)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(json_safe(result), indent=1) + "\n")
        logger.info("wrote %s (%.1f min in all)", json_path, wall / 60)
    table = markdown_tables(records, plan["warmup"])
    if args.table:
        write_table(Path(args.table), table)
        logger.info("wrote the tables into %s", args.table)
    else:
        logger.info("tables:\n%s", table)
    if args.img_dir:
        write_figures(Path(args.img_dir), records, grids, references, job, study.grid_ranks, plan["warmup"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run the study, log progress, return the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    run(argv)
    return 0
