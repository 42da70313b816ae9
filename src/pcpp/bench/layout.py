"""Who this process is: the process group, the GPU it binds and the device mesh pcpp is converted with."""

from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .common import FORCED_ENV

__all__ = ["Layout", "all_gather_objects", "init_layout"]


@dataclass(frozen=True)
class Layout:
    """Who this process is, and how the ranks split the work.

    Attributes:
        rank: global rank.
        world: number of ranks.
        device: this rank's device.
        mesh: the DeviceMesh passed to :func:`pcpp.convert` (``None`` with one rank).
        cfg_split: whether the CFG batch is split over a ``cfg`` mesh dimension of size 2.
        patch_size: ranks splitting one image.
        patch_index: this rank's strip (0 = top).
        cfg_index: this rank's CFG half (0 = unconditional) with the split, else 0.
        owns_group: whether this module initialised the default process group (and must destroy it).
        wait_group: gloo group for long host-side waits (rank 0's single-GPU runs).
    """

    rank: int
    world: int
    device: torch.device
    mesh: Any
    cfg_split: bool
    patch_size: int
    patch_index: int
    cfg_index: int
    owns_group: bool
    wait_group: Any


def init_layout(args: argparse.Namespace) -> Layout:
    """Initialise the process group (unless it is already), bind the GPU and build the mesh.

    ``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; without them a single-process group is made
    on an in-memory store.
    """
    timeout = datetime.timedelta(seconds=args.pg_timeout_s)
    owns = not dist.is_initialized()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda but CUDA is not available; use --device cpu")
        if torch.cuda.device_count() <= local_rank:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        for name, value in FORCED_ENV.items():
            os.environ[name] = value
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if owns:
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if device.type == "cuda":
            kwargs["device_id"] = device
        if "WORLD_SIZE" not in os.environ:
            kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(**kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    # Host-side waits longer than the NCCL timeout (rank 0 alone on a 3072 px single-GPU run) go through gloo.
    wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.deadline_s))

    from torch.distributed.device_mesh import init_device_mesh

    mesh: Any = None
    cfg_split = False
    patch_size, patch_index, cfg_index = 1, 0, 0
    if world > 1:
        if args.cfg_split and world % 2 == 0:
            mesh = init_device_mesh(device.type, (2, world // 2), mesh_dim_names=("cfg", "patch"))
            cfg_split = True
            patch_size = world // 2
            patch_index = mesh.get_local_rank("patch")
            cfg_index = mesh.get_local_rank("cfg")
        else:
            mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("patch",))
            patch_size = world
            patch_index = mesh.get_local_rank()
    return Layout(
        rank=rank,
        world=world,
        device=device,
        mesh=mesh,
        cfg_split=cfg_split,
        patch_size=patch_size,
        patch_index=patch_index,
        cfg_index=cfg_index,
        owns_group=owns,
        wait_group=wait_group,
    )


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's picklable ``value``."""
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out
