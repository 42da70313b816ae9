"""Helpers for testing parallel code on a CPU: real ``torch.distributed`` processes on gloo, tiny UNets.

These are part of the public API so that users can test their own integrations the way pcpp tests itself.
"""

from __future__ import annotations

import io
import os
import queue
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import PeerTimeoutError

__all__ = ["run_distributed", "tiny_unet_config"]


def _worker(
    rank: int,
    world_size: int,
    init_file: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
    timeout_s: float,
    backend: str,
) -> None:
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Tensors go through torch.save bytes: the queue's shared-memory handles die with this process.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        results.put((rank, True, buffer.getvalue()))
    except BaseException:  # report every failure, including KeyboardInterrupt, to the parent
        results.put((rank, False, traceback.format_exc()))


# What every rank imports anyway: loaded once by the fork server, so a rank starts in a fraction of a second
# instead of importing torch and diffusers again (several seconds each).
_PRELOAD = ["torch", "torch.distributed", "diffusers", "pcpp"]


def _process_context(backend: str) -> Any:
    """Fresh processes for the ranks: on gloo, forked from a server that has imported torch, diffusers and pcpp;
    spawned for NCCL (importing them can initialise CUDA in the server, and CUDA does not survive a fork) and where
    fork servers do not exist."""
    import multiprocessing

    if backend == "nccl" or "forkserver" not in multiprocessing.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    group_timeout: float = 60.0,
    backend: str = "gloo",
    expect_exit: Collection[int] = (),
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` fresh processes joined by a process group.

    The processes meet through a ``file://`` rendezvous (no ports). ``fn`` must be importable (defined at module
    level) and return picklable values (CPU tensors are fine).

    Args:
        fn: the per-rank function.
        world_size: number of processes.
        *args: extra arguments for ``fn``, picklable.
        timeout: seconds to wait for all ranks before giving up.
        group_timeout: the process group's own timeout, in seconds.
        backend: ``"gloo"`` (CPU) or ``"nccl"`` (rank ``r`` uses ``cuda:r``).
        expect_exit: ranks that may die or stop without a result (fault-injection tests): the others' results
            are awaited alone, these ranks' values are ``None`` unless they reported one, and any of them still
            running at the end is killed.

    Returns:
        ``fn``'s return values, indexed by rank.

    Raises:
        RuntimeError: a rank raised; the message holds every failing rank's traceback.
        PeerTimeoutError: not every rank finished within ``timeout``.

    Example:
        >>> from pcpp.testing import run_distributed  # doctest: +SKIP
        >>> run_distributed(my_check, 2)  # doctest: +SKIP
    """
    ctx = _process_context(backend)
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, init_file, fn, args, results, group_timeout, backend),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        values: dict[int, Any] = {}
        failures: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        dead_since: dict[int, float] = {}
        needed = set(range(world_size)) - set(expect_exit)
        try:
            while not needed <= values.keys() | failures.keys() and not failures:
                try:
                    rank, ok, value = results.get(timeout=1.0)
                except queue.Empty:
                    now = time.monotonic()
                    reported = values.keys() | failures.keys()
                    for rank, proc in enumerate(procs):
                        # A dead process gets a moment for the queue's feeder to deliver a result sent before exit.
                        dead = rank not in reported and rank in needed and proc.exitcode is not None
                        if dead and now - dead_since.setdefault(rank, now) > 10:
                            failures[rank] = f"process exited with code {proc.exitcode} without a result"
                    if now > deadline:
                        missing = sorted(needed - reported)
                        raise PeerTimeoutError(
                            f"ranks {missing} of {world_size} did not finish within {timeout:g} s"
                        ) from None
                    continue
                if ok:
                    values[rank] = torch.load(io.BytesIO(value), weights_only=False)
                else:
                    failures[rank] = value
        finally:
            for proc in procs:
                proc.join(timeout=5 if not failures else 1)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    if failures:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
        raise RuntimeError(f"{len(failures)} rank(s) failed:\n{text}")
    return [values.get(r) for r in range(world_size)]


def tiny_unet_config(family: str = "tiny", *, width: int = 8) -> dict[str, Any]:
    """A small UNet configuration with the block structure of a real model family, for CPU tests.

    Args:
        family: ``"tiny"`` (diffusers' test UNet), ``"sd15"`` (SD 1.5's four levels), ``"sdxl"`` (SDXL's three
            levels, 1/2/10 transformer layers, text-time embedding) or ``"unet2d"`` (an unconditional
            ``UNet2DModel`` with attention blocks).
        width: channels of the first level; later levels double as in the real model.

    Returns:
        Keyword arguments for ``UNet2DConditionModel`` (or ``UNet2DModel`` for ``"unet2d"``).

    Raises:
        ValueError: unknown family.
    """
    if family == "tiny":
        return {
            "block_out_channels": (width, 2 * width),
            "norm_num_groups": 4,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 8,
            "attention_head_dim": 2,
            "layers_per_block": 1,
            "sample_size": 16,
            "in_channels": 4,
            "out_channels": 4,
        }
    if family == "sd15":
        return {
            "block_out_channels": (width, 2 * width, 4 * width, 4 * width),
            "norm_num_groups": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 16,
            "attention_head_dim": 2,
            "layers_per_block": 2,
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
        }
    if family == "sdxl":
        return {
            "block_out_channels": (width, 2 * width, 4 * width),
            "norm_num_groups": 4,
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": (1, 2, 10),
            "attention_head_dim": (1, 2, 4),
            "cross_attention_dim": 16,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 4,
            "projection_class_embeddings_input_dim": 6 * 4 + 8,
            "layers_per_block": 2,
            "sample_size": 32,
            "in_channels": 4,
            "out_channels": 4,
        }
    if family == "unet2d":
        return {
            "block_out_channels": (width, 2 * width, 2 * width),
            "norm_num_groups": 4,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": 4,
            "layers_per_block": 1,
            "sample_size": 16,
            "in_channels": 3,
            "out_channels": 3,
            "downsample_padding": 0,
        }
    raise ValueError(f"family={family!r} is unknown; use 'tiny', 'sd15', 'sdxl' or 'unet2d'.")
