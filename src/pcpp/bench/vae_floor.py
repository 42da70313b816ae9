"""``--vae-floor``: the VAE decode of a whole image against rank 0's strip of it, the floor of a parallel decode.

An exact N-way decode (:func:`pcpp.convert` on an ``AutoencoderKL``) can at best take the time and memory of one
rank's share decoded alone: this times, on one process, the VAE of ``--vae-config`` (SDXL's by default) with
seeded random weights decoding the whole latent and rank 0's strip of N: its rows as the parallel decoder splits
them (:func:`pcpp.functional.partition_rows`, the first strips one row longer) plus the halo rows its first
convolution reads from the strip below (``decoder.conv_in``'s padding; none for N = 1). That leaves out the halo
exchanges of the later convolutions and the mid-block attention's reads of the other strips: a floor, not a
forecast. Per ``--vae-dtypes`` (SDXL's pipeline decodes in fp32: ``force_upcast``) and, with ``--compile`` or
``--compile-only``, under ``torch.compile(dynamic=False)`` too. With ``--vae-converted`` the VAE converted by
pcpp on this one-process group decodes the whole latent beside the plain one, decodes interleaved A B B A so that
a drifting clock weighs on both alike (both compiled in the compiled rows).

Each row: median of ``--repeats`` decodes after ``--warmup-images`` (at least one) untimed ones, each between two
device synchronisations; on CUDA the peak memory above what was allocated before (``None`` on the CPU). Decodes
whose activations are estimated above ``--max-gib`` are skipped (fp32 4096 px, about 75 GiB, on an 80 GB card).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from pcpp.functional import partition_rows

from .common import DTYPES, free_memory, sync_device, time_summary, write_report
from .denoisers import compiled
from .image_pipeline import load_vae_config, seeded, vae_factor
from .layout import Layout
from .report import environment, fmt, table_start

__all__ = ["decoder_halo", "estimate_gib", "floor_table", "run_vae_floor", "strip_rows"]

LOG = logging.getLogger(__name__)

Decode = Callable[[Tensor], Tensor]

# Activations at the decode's peak per output pixel: about 4.7 KiB in fp32 for SDXL's VAE (128 channels at full
# resolution; measured 42.8 GiB at 3072 px, docs/benchmarks.md table 12), scaled by width and element size.
_KIB_PER_PIXEL_FP32_128 = 4.7

TIMING_NOTE = (
    "one vae.decode(z) between two device synchronisations, batch 1; median of the timed decodes after the warm-up; "
    "peak memory above what was allocated before (CUDA only); strip of N = rank 0's latent rows plus the halo "
    "rows its first convolution reads"
)


def decoder_halo(vae: nn.Module) -> int:
    """Latent rows the decoder's first convolution reads beyond a strip's edge (``conv_in``'s padding)."""
    conv = vae.get_submodule("decoder.conv_in")
    padding = getattr(conv, "padding", (0, 0))
    return int(padding[0]) if isinstance(padding, tuple) else 0


def strip_rows(latent_rows: int, strips: int, halo: int) -> tuple[int, int]:
    """(rank 0's own latent rows, the rows it decodes with its halo) when ``strips`` ranks split ``latent_rows``.

    Raises:
        pcpp.SplitError: fewer rows than strips.

    Example:
        >>> strip_rows(128, 4, 1)
        (32, 33)
        >>> strip_rows(128, 1, 1)
        (128, 128)
    """
    own = partition_rows(latent_rows, strips)[0]
    return own, own + (min(halo, latent_rows - own) if strips > 1 else 0)


def estimate_gib(config: dict[str, Any], pixel_rows: int, pixel_cols: int, dtype: torch.dtype) -> float:
    """Estimated GiB of the decode's activations (SDXL's VAE measured, scaled by width and element size)."""
    width = int(config.get("block_out_channels", [128])[0])
    kib = _KIB_PER_PIXEL_FP32_128 * width / 128 * torch.finfo(dtype).bits / 32
    return pixel_rows * pixel_cols * kib / 2**20


def time_decodes(decode: Decode, z: Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up decodes, then ``--repeats`` timed ones: times, median, min, max, warm-up and peak memory."""
    device = z.device
    warm = [_once(decode, z) for _ in range(max(1, args.warmup_images))]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    result = time_summary([_once(decode, z) for _ in range(args.repeats)])
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    result.update(warmup_ms=warm, peak_mem_bytes=peak)
    return result


def interleaved(plain: Decode, converted: Decode, z: Tensor, repeats: int) -> dict[str, Any]:
    """Plain and converted decodes alternated A B B A, so drift weighs on both alike.

    Two untimed rounds first: compiled, the two decoders share one code object, and Dynamo compiles the code after
    the converted decoder's graph breaks for each decoder at its first call after the other's.
    """
    for _ in range(2):
        _once(plain, z), _once(converted, z)
    pairs = []
    for _ in range(repeats):
        a, b, b2, a2 = _once(plain, z), _once(converted, z), _once(converted, z), _once(plain, z)
        pairs.append(((a + a2) / 2, (b + b2) / 2))
    plain_ms = statistics.median(p[0] for p in pairs)
    pcpp_ms = statistics.median(p[1] for p in pairs)
    return {"plain_interleaved_ms": plain_ms, "pcpp_one_rank_ms": pcpp_ms, "pcpp_over_plain": pcpp_ms / plain_ms}


def _once(decode: Decode, z: Tensor) -> float:
    sync_device(z.device)
    start = time.perf_counter()
    decode(z)
    sync_device(z.device)
    return 1e3 * (time.perf_counter() - start)


def _decoder(vae: nn.Module) -> Decode:
    def decode(z: Tensor) -> Tensor:
        out: Tensor = vae.decode(z).sample  # type: ignore[operator]  # diffusers' AutoencoderKL, nn.Module typed
        return out

    return decode


def run_vae_floor(args: argparse.Namespace, layout: Layout) -> dict[str, Any]:
    """Every dtype, resolution, strip count and variant; rank 0 rewrites ``--out`` after each row.

    Raises:
        ValueError: more than one process.
        pcpp.SplitError: a latent with fewer rows than strips.
    """
    import pcpp

    if layout.world != 1:
        raise ValueError(f"--vae-floor runs on one process, not {layout.world}")
    config = {k: v for k, v in load_vae_config(args.vae_config).items() if not k.startswith("_")}
    factor = vae_factor(config)
    for height, _ in args.resolutions:
        for strips in args.strips:
            partition_rows(height // factor, strips)  # refuse before anything runs
    variants = ([] if args.compile_only else ["eager"]) + (["compile"] if args.compile or args.compile_only else [])
    report: dict[str, Any] = {"benchmark": "pcpp", "task": args.task.value, "environment": environment(layout)}
    report["settings"] = {
        "vae_config": str(args.vae_config),
        "resolutions": [list(r) for r in args.resolutions],
        "strips": args.strips,
        "dtypes": args.vae_dtypes,
        "variants": variants,
        "compile_backend": args.compile_backend if "compile" in variants else None,
        "converted": args.vae_converted,
        "repeats": args.repeats,
        "warmup": max(1, args.warmup_images),
        "max_gib": args.max_gib,
        "seed": args.seed,
    }
    report.update(timing=TIMING_NOTE, results={})
    from diffusers import AutoencoderKL

    for dtype_name in args.vae_dtypes:
        dtype = DTYPES[dtype_name]
        on_device = args.init_device == "device"
        plain = seeded(lambda: AutoencoderKL.from_config(config), args.seed, layout.device, on_device).to(dtype=dtype)
        halo = decoder_halo(plain)
        converted = pcpp.convert(copy.deepcopy(plain), comm=layout.mesh) if args.vae_converted else None
        report["vae"] = {"parameters": sum(p.numel() for p in plain.parameters()), "halo_rows": halo}
        for height, width in args.resolutions:
            label = f"{height}x{width}"
            res = report["results"].setdefault(label, {"height": height, "width": width, "rows": []})
            res["latent"] = [height // factor, width // factor]
            for strips in args.strips:
                for variant in variants:
                    row = _row(args, plain, converted, config, dtype, (height, width, factor), strips, halo, variant)
                    row["dtype"] = dtype_name
                    LOG.info("%s: %s", label, {k: v for k, v in row.items() if k not in ("times_ms", "warmup_ms")})
                    res["rows"].append(row)
                    if args.out is not None:
                        write_report(report, args.out)
        del plain, converted
        free_memory(layout.device)
    for line in floor_table(report).splitlines():
        LOG.info("%s", line)
    return report


def _row(
    args: argparse.Namespace,
    plain: nn.Module,
    converted: nn.Module | None,
    config: dict[str, Any],
    dtype: torch.dtype,
    size: tuple[int, int, int],
    strips: int,
    halo: int,
    variant: str,
) -> dict[str, Any]:
    """One strip count of one size in one variant; a failure (out of memory, compile error) is recorded."""
    height, width, factor = size
    own, decoded = strip_rows(height // factor, strips, halo)
    gib = estimate_gib(config, decoded * factor, width, dtype)
    row: dict[str, Any] = {"strips": strips, "variant": variant, "strip_rows": own, "decoded_rows": decoded}
    row.update(halo_rows=decoded - own, estimated_gib=gib)
    if gib > args.max_gib:
        row["skipped"] = f"about {gib:.0f} GiB of activations, above --max-gib {args.max_gib:g}"
        return row
    device = next(plain.parameters()).device
    gen = torch.Generator("cpu").manual_seed(args.seed)
    channels = int(config.get("latent_channels", 4))
    z = torch.randn((1, channels, decoded, width // factor), generator=gen).to(device=device, dtype=dtype)
    plain_fn, conv_fn = _decoder(plain), _decoder(converted) if converted is not None else None
    if variant == "compile":
        plain_fn = compiled(plain_fn, reset_dynamo=True, backend=args.compile_backend)
        if conv_fn is not None:
            conv_fn = compiled(conv_fn, reset_dynamo=False, backend=args.compile_backend)
    try:
        with torch.no_grad():
            row.update(time_decodes(plain_fn, z, args))
            if conv_fn is not None and strips == 1:
                row.update(interleaved(plain_fn, conv_fn, z, args.repeats))
    except Exception as err:  # one failed row must not end the run
        LOG.exception("decode of %d rows (%s, %s) failed", decoded, dtype, variant)
        row["error"] = f"{type(err).__name__}: {err}"
    finally:
        del z
        free_memory(device)
    return row


def floor_table(report: dict[str, Any]) -> str:
    """One row per size, dtype, variant and strip count: time, peak memory and the whole decode over this one."""
    head = "| size | dtype | variant | strips | rows (+halo) | median ms | peak GiB | whole / strip time | pcpp/plain |"
    lines = table_start(f"pcpp VAE decode floor, {report['environment']['device']}; {TIMING_NOTE}.", head)
    for size, res in report.get("results", {}).items():
        whole = {(r["dtype"], r["variant"]): r.get("median_ms") for r in res["rows"] if r["strips"] == 1}
        for r in res["rows"]:
            ms, base = r.get("median_ms"), whole.get((r["dtype"], r["variant"]))
            ratio = base / ms if isinstance(base, float) and isinstance(ms, float) else None
            peak = r.get("peak_mem_bytes")
            note = f" {r['skipped']}" if "skipped" in r else f" error: {r['error']}" if "error" in r else ""
            lines.append(
                f"| {size} | {r['dtype']} | {r['variant']} | {r['strips']} | {r['strip_rows']} (+{r['halo_rows']}) | "
                f"{fmt(ms)} | {fmt(peak / 2**30 if peak is not None else None, '.2f')} | {fmt(ratio, '.2f')} | "
                f"{fmt(r.get('pcpp_over_plain'), '.4f')} |{note}"
            )
    return "\n".join(lines)
