"""The report: environment and settings, speedups, and the markdown table logged at the end."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
from importlib import metadata
from typing import Any

import torch

from .common import SCHEDULER_NOTE
from .layout import Layout
from .model import Model

__all__ = ["add_speedups", "fmt", "markdown_table", "new_report", "run_line", "table_start"]

TIMING_NOTE = (
    "whole denoising loop of one image (UNet calls, CFG combine, DDIM steps) between two device synchronisations; "
    "text encoders and VAE excluded (not run)"
)
FIDELITY_NOTE = (
    "per-step relative L2 of the noise prediction against the plain single-GPU UNet on the same x_t and t; final "
    "latents are not compared: with random weights every approximate method's trajectory diverges"
)
TRAFFIC_NOTE = (
    "bytes per step of one synchronous and one asynchronous step of the warm-up image, per rank, as "
    "pcpp.comm_stats records them (eager and capture steps only; replays are not recorded)"
)


def environment(layout: Layout) -> dict[str, Any]:
    """Versions, card, layout and date."""
    import diffusers

    import pcpp

    def version_of(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "unknown"

    cuda = layout.device.type == "cuda"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "pcpp": pcpp.__version__,
        "triton": version_of("triton"),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else "n/a",
        "device": torch.cuda.get_device_name(layout.device) if cuda else "cpu",
        "world_size": layout.world,
        "mesh": {"cfg": 2 if layout.cfg_split else 1, "patch": layout.patch_size},
        "mesh_dim_names": list(layout.mesh.mesh_dim_names) if layout.mesh is not None else None,
        # NCCL's and cuBLAS's tuning variables change timings (channels, protocols, matmul backend).
        "tuning_env": {
            k: v for k, v in sorted(os.environ.items()) if k.startswith(("NCCL_", "TORCH_NCCL_", "TORCH_BLAS_"))
        },
    }


def new_report(args: argparse.Namespace, layout: Layout, model: Model) -> dict[str, Any]:
    """The report before any mode has run: environment, settings and the UNet."""
    return {
        "benchmark": "pcpp",
        "task": args.task.value,
        "environment": environment(layout),
        "settings": {
            "config": str(args.config),
            "resolutions": [list(r) for r in args.resolutions],
            "modes": [m.name for m in args.modes],
            "floor_modes": [m.name for m in args.floor_modes],
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "exchange_batch": args.exchange_batch,
            "sm_carveout": args.sm_carveout,
            "floor_sync_steps": args.floor_warmup_steps,
            "guidance": args.guidance,
            "repeats": args.repeats,
            "warmup_images": args.warmup_images,
            "seed": args.seed,
            "dtype": args.dtype,
            "init_device": args.init_device,
            "fuse_qkv": args.fuse_qkv,
            "cuda_graph": args.cuda_graph,
            "compile": args.compile,
            "single_variants": args.single_variants,
            "single_from": [str(p) for p in args.single_from] if args.single_from else None,
            "scheduler": SCHEDULER_NOTE,
        },
        "unet": {
            "parameters": model.parameters,
            "levels": model.levels,
            "unit_rows": model.unit,
            "build_s": model.build_s,
        },
        "timing": TIMING_NOTE,
        "fidelity_note": FIDELITY_NOTE,
        "traffic_note": TRAFFIC_NOTE,
        "results": {},
    }


def add_speedups(res: dict[str, Any]) -> None:
    """Speedup of every mode and variant against the best single-GPU median; floors attached to their modes."""
    modes = res["modes"]
    single = modes.get("single", {}).get("median_ms")
    floors = modes.get("floor", {})

    def ratio(ms: Any) -> float | None:
        return single / ms if isinstance(single, (int, float)) and isinstance(ms, (int, float)) and ms > 0 else None

    for floor in floors.values():
        if isinstance(floor, dict) and "median_ms" in floor:
            floor["speedup_vs_single"] = ratio(floor["median_ms"])
    for name, entry in modes.items():
        if name in ("single", "floor") or "variants" not in entry:
            continue
        entry["speedup_vs_single"] = ratio(entry.get("median_ms"))
        for variant in entry["variants"].values():
            variant["speedup_vs_single"] = ratio(variant.get("median_ms"))
        floor = floors.get(name)
        if isinstance(floor, dict) and "median_ms" in floor:
            entry["floor_ms"] = floor["median_ms"]
            entry["floor_speedup_vs_single"] = floor.get("speedup_vs_single")
            median = entry.get("median_ms")
            entry["floor_over_mode"] = floor["median_ms"] / median if isinstance(median, (int, float)) else None


def fmt(value: Any, spec: str = ".1f") -> str:
    """``value`` formatted with ``spec``, or ``-`` when it is not a number."""
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def markdown_table(report: dict[str, Any]) -> str:
    """One row per resolution, mode and variant."""
    head = (
        "| size | mode | variant | median ms | min | max | speedup | floor ms | floor speedup | eps rel L2 mean/max "
        "after warmup | attn sent/step async (max rank) | sent/step sync/async (max rank) | peak GiB (max rank) |"
    )
    lines = table_start(f"pcpp benchmark, {run_line(report)}; {TIMING_NOTE}.", head)
    for size, res in report.get("results", {}).items():
        modes = res["modes"]
        single = modes.get("single", {})
        best = single.get("median_ms")
        for variant, v in single.get("variants", {}).items():
            median = v.get("median_ms")
            speedup = best / median if isinstance(best, (int, float)) and isinstance(median, (int, float)) else None
            lines.append(
                f"| {size} | single | {variant} | {fmt(median)} | {fmt(v.get('min_ms'))} | "
                f"{fmt(v.get('max_ms'))} | {fmt(speedup, '.2f')} | - | - | - | - | - | "
                f"{fmt(v.get('peak_mem_bytes', 0) / 2**30, '.2f')} |"
                + (f" error: {v['error']}" if "error" in v else "")
            )
        for name, entry in modes.items():
            if name in ("single", "floor") or "variants" not in entry:
                continue
            floor = modes.get("floor", {}).get(name, {})
            for variant, v in entry["variants"].items():
                fid = v.get("fidelity", {}).get("rel_l2_eps_after_warmup", {})
                traffic = v.get("traffic_per_rank") or []
                attn = max(
                    (t["async"]["sent_bytes_by_kind"]["attention"] for t in traffic if t.get("async")), default=None
                )
                sync_b = max((t["sync"]["sent_bytes"] for t in traffic if t.get("sync")), default=None)
                async_b = max((t["async"]["sent_bytes"] for t in traffic if t.get("async")), default=None)
                peak = max(v.get("peak_mem_bytes_per_rank") or [0])
                lines.append(
                    f"| {size} | {name} | {variant} | {fmt(v.get('median_ms'))} | {fmt(v.get('min_ms'))} | "
                    f"{fmt(v.get('max_ms'))} | {fmt(v.get('speedup_vs_single'), '.2f')} | "
                    f"{fmt(floor.get('median_ms'))} | {fmt(floor.get('speedup_vs_single'), '.2f')} | "
                    f"{fmt(fid.get('mean'), '.2e')}/{fmt(fid.get('max'), '.2e')} | "
                    f"{mib(attn)} | {mib(sync_b)}/{mib(async_b)} | {fmt(peak / 2**30, '.2f')} |"
                    + (f" error: {v['error']}" if "error" in v else "")
                )
    return "\n".join(lines)


def run_line(report: dict[str, Any]) -> str:
    """The card, the number of ranks and the mesh, for a table's title."""
    env = report["environment"]
    return f"{env['device']}, N={env['world_size']} mesh {env['mesh']}"


def table_start(title: str, head: str) -> list[str]:
    """A markdown table's first lines: its title, its header and the separator."""
    return [title, head, "|" + "---|" * (head.count("|") - 1)]


def mib(nbytes: Any) -> str:
    """Bytes in B, KiB or MiB."""
    if not isinstance(nbytes, (int, float)):
        return "-"
    if nbytes < 2**10:
        return f"{nbytes:.0f} B"
    if nbytes < 2**20:
        return f"{nbytes / 2**10:.1f} KiB"
    return f"{nbytes / 2**20:.1f} MiB"
