"""``pcpp generate --prompts FILE``: many images over data-parallel groups of patch-parallel processes.

The world of ``W`` processes is cut into ``W / N`` groups of ``N = --group-size`` consecutive ranks (ranks
``g*N .. g*N+N-1`` form group ``g``), laid out as the rows of a ``("data_parallel", "tensor_parallel")`` device
mesh, the same layout :mod:`pcpp.lightning` gets from Lightning (:class:`~pcpp.batch.GroupLayout` cuts a row into
cfg and patch groups). Order of work, and why:

1. Every argument and every line of the file is checked before a process group exists (malformed lines are named
   and skipped).
2. The first rank of each group (the one that saves its images) proves it can write ``--out-dir`` and removes
   half-written files left by a killed run; every rank stops if one cannot (a usage error, before any model).
3. The ranks check that they read the same records, and agree which images are already in the folder (any saving
   rank that sees one counts it as done): those are skipped, so a rerun resumes.
4. The remaining images are dealt out round-robin (static: image ``i`` of the pending list goes to group
   ``i mod groups``), so the groups' shares differ by at most one image and every group is busy until the last
   round. Every rank of a group makes the same images in the same order, each from its own record and seed; the
   group's first rank writes each PNG once (atomically).
5. A tally over the world gives the summary that the first rank logs (and writes with ``--report``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from pcpp.batch import (
    DATA_PARALLEL,
    TENSOR_PARALLEL,
    DiffusionBackend,
    ImageFolder,
    OutputError,
    PromptRecord,
    agree_written,
    check_writable_everywhere,
    patch_mesh,
    pipeline_backend,
    tiny_backend,
)

from .job import init_distributed, load_pipeline, pcpp_config, settings_text
from .options import GenerateOptions, UsageError

__all__ = ["run_prompts"]

logger = logging.getLogger("pcpp.generate")

# The final tally waits for the slowest group, which may finish long after --timeout-s; torchrun ends every process
# of the job when one fails, so this long wait cannot outlive a failed run.
_TALLY_TIMEOUT = timedelta(hours=24)


def _check_same_records(records: tuple[PromptRecord, ...], device: torch.device) -> None:
    """Refuse to start when the ranks read different records (e.g. different files on different machines)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    stems = "\n".join(r.file_stem for r in records).encode()
    digest = int.from_bytes(hashlib.sha256(stems).digest()[:7], "big")
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if int(both[0]) != digest or int(both[1]) != -digest:  # max == min: every rank has the same digest
        raise UsageError("the processes read different prompts from --prompts; give every machine the same file")


def _backend(options: GenerateOptions, device: torch.device) -> DiffusionBackend:
    if options.model == "tiny":
        return tiny_backend(device)
    return pipeline_backend(lambda d: load_pipeline(options.model, d), options.vae)(device)


def _comm(options: GenerateOptions, device: torch.device, groups: int) -> Any:
    """This rank's group as ``pcpp.convert``'s ``comm``: a slice of the ``(groups, group_size)`` mesh."""
    from pcpp.comm import LocalCommunicator

    if options.group_size == 1:
        return LocalCommunicator()  # one process per image: plain data parallelism, nothing to exchange
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (groups, options.group_size), mesh_dim_names=(DATA_PARALLEL, TENSOR_PARALLEL))
    return patch_mesh(mesh, options.layout)


def _make(
    options: GenerateOptions, share: list[PromptRecord], folder: ImageFolder, writes: bool, device: torch.device
) -> int:
    """Make (and on the saving rank write) this group's share; returns the number of images made."""
    groups = options.world // options.group_size
    comm = _comm(options, device, groups)  # a collective over the world: before a group with no share returns
    if not share:
        return 0
    backend = _backend(options, device)
    backend.parallelize(comm, pcpp_config(options))
    # tqdm's own rule (disable=None) shows the bar only when stderr is a terminal; only the world's first rank.
    bar = tqdm(total=len(share), unit="img", desc=f"group 1 of {groups}", disable=None if options.rank == 0 else True)
    start = time.perf_counter()
    for made, record in enumerate(share, start=1):
        image = backend.generate(record)
        if writes:
            path = folder.write(record, image)
            logger.debug("saved %s", path)
        per_minute = made * groups * 60 / max(time.perf_counter() - start, 1e-9)
        bar.set_postfix_str(f"~{per_minute:.1f} img/min over {groups} group(s)", refresh=False)
        bar.update(1)
    bar.close()
    return len(share)


def _tally(made: int, writes: bool, device: torch.device, group: Any) -> int:
    """Images written by the whole world (each counted once, by its group's saving rank)."""
    if group is None:
        return made
    count = torch.tensor([made if writes else 0], dtype=torch.int64)
    dist.all_reduce(count, group=group)
    return int(count.item())


def _summary(options: GenerateOptions, made: int, skipped: int, wall_s: float) -> dict[str, Any]:
    assert options.prompts is not None
    assert options.out_dir is not None
    prompts = options.prompts
    return {
        "prompts": str(prompts.path),
        "out_dir": str(options.out_dir),
        "world": options.world,
        "group_size": options.group_size,
        "groups": options.world // options.group_size,
        "images": len(prompts.records),
        "made": made,
        "skipped": skipped,
        "failed_lines": [{"line": s.line, "reason": s.reason} for s in prompts.skipped],
        "wall_s": wall_s,
        "images_per_minute": made * 60 / wall_s if wall_s > 0 else 0.0,
    }


def run_prompts(options: GenerateOptions) -> int:
    """Make the image of every record of ``options.prompts`` not already in ``options.out_dir``.

    Args:
        options: Validated options with ``prompts`` and ``out_dir`` set.

    Returns:
        0 once every image is in the folder (malformed lines are warned about, not failed on).

    Raises:
        UsageError: the folder cannot be written, or the ranks read different prompts (before any model loads).
    """
    prompts, out_dir = options.prompts, options.out_dir
    assert prompts is not None, "run_prompts needs --prompts"
    assert out_dir is not None
    start = time.perf_counter()
    for line in prompts.skipped if options.rank == 0 else ():  # every rank read the file; one names its lines
        logger.warning("%s line %d: %s; skipped", prompts.path, line.line, line.reason)
    device, own_group = init_distributed(options)
    try:
        groups = options.world // options.group_size
        group_index, group_rank = divmod(options.rank, options.group_size)
        writes = group_rank == 0
        folder = ImageFolder(out_dir, extra_metadata=settings_text(options))
        try:
            check_writable_everywhere(folder, writes, device)
        except OutputError as exc:
            raise UsageError(f"--out-dir: {exc}") from exc
        _check_same_records(prompts.records, device)
        written = agree_written(folder, prompts.records, writes, device)
        pending = [r for r, done in zip(prompts.records, written, strict=True) if not done]
        skipped = len(prompts.records) - len(pending)
        logger.info(
            "%d image(s) to make, %d already in %s; %d group(s) of %d process(es) (%s)",
            len(pending),
            skipped,
            out_dir,
            groups,
            options.group_size,
            f"cfg 2 x patch {options.layout.patch}" if options.cfg_split else f"patch {options.layout.patch}",
        )
        tally_group = dist.new_group(backend="gloo", timeout=_TALLY_TIMEOUT) if options.world > 1 else None
        made = _make(options, pending[group_index::groups], folder, writes, device) if pending else 0
        made = _tally(made, writes, device, tally_group)
    finally:
        if own_group:
            dist.destroy_process_group()
    summary = _summary(options, made, skipped, time.perf_counter() - start)
    logger.info(
        "made %d image(s), skipped %d already there, %d malformed line(s); %.1f s, %.2f images per minute",
        made,
        skipped,
        len(prompts.skipped),
        summary["wall_s"],
        summary["images_per_minute"],
    )
    if options.rank == 0 and options.report is not None:
        options.report.parent.mkdir(parents=True, exist_ok=True)
        options.report.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return 0
