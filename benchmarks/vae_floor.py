"""1 GPU: the VAE decode of a whole image against one strip of it, the floor of a patch-parallel decode.

An exact N-way split of the decoder can at best take the time and memory of one rank's strip decoded alone (it
leaves out the halo exchanges and the mid-block attention's reads of the other strips). This times, on one GPU,
SDXL's ``AutoencoderKL`` architecture with random weights decoding the whole latent and the top strip of 2 and 4
(``ceil(H / N)`` latent rows), in fp32 (SDXL's default: ``force_upcast``) and fp16, and with
``--pcpp`` also the decoder converted by ``pcpp.convert`` on a one-process group beside the plain one (images
interleaved, so drift cancels). Median of ``--repeats`` decodes after one warm-up; peak memory from the
allocator. From the repository root, pcpp and diffusers importable::

    python benchmarks/vae_floor.py --sizes 2048 3072 4096 --strips 1 2 4 --dtypes float16 float32 --out vae.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

LOG = logging.getLogger("vae_floor")

# SDXL's VAE (stabilityai/sdxl-vae config.json), for random weights: no download.
SDXL_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` over ``repeats`` calls after one warm-up, and the peak GiB of one call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def _decoder(vae: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: vae.decode(z).sample


def _rows_for(dtype: torch.dtype, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every size and strip count of one dtype."""
    from diffusers import AutoencoderKL

    device = torch.device("cuda")
    plain = _decoder(AutoencoderKL(**SDXL_VAE).to(device, dtype).eval())
    converted = None
    if args.pcpp:
        import copy

        import torch.distributed as dist

        import pcpp

        if not dist.is_initialized():
            dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        converted = _decoder(pcpp.convert(copy.deepcopy(AutoencoderKL(**SDXL_VAE).to(device, dtype).eval())))
    rows = []
    for size in args.sizes:
        latent = size // 8
        # About 4.7 KiB of fp32 activations per output pixel at the decode's peak (43 GiB at 3072, issue 15).
        whole_gib = size * size * (4.7 if dtype == torch.float32 else 2.35) / 2**20
        for strips in args.strips:
            rows_n = math.ceil(latent / strips)
            if whole_gib / strips > args.max_gib:
                LOG.info("skip %s %d/%d: about %.0f GiB", dtype, size, strips, whole_gib / strips)
                continue
            z = torch.randn(1, 4, rows_n, latent, device=device, dtype=dtype)
            with torch.no_grad():
                ms, gib = _time(partial(plain, z), args.repeats)
                row: dict[str, Any] = {
                    "dtype": str(dtype).removeprefix("torch."),
                    "size": size,
                    "strips": strips,
                    "latent_rows": rows_n,
                    "ms": ms,
                    "peak_gib": gib,
                }
                if converted is not None and strips == 1:
                    row.update(_interleaved(plain, converted, z, args.repeats))
            LOG.info("%s", row)
            rows.append(row)
            del z
            torch.cuda.empty_cache()
    return rows


def _interleaved(
    plain: Callable[[torch.Tensor], torch.Tensor],
    converted: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    repeats: int,
) -> dict[str, float]:
    """Plain and converted decodes alternated A B B A, so a drifting clock weighs on both alike."""
    pairs = []
    for _ in range(repeats):
        a = _time(lambda: plain(z), 1)[0]
        b = _time(lambda: converted(z), 1)[0]
        b2 = _time(lambda: converted(z), 1)[0]
        a2 = _time(lambda: plain(z), 1)[0]
        pairs.append(((a + a2) / 2, (b + b2) / 2))
    plain_ms = statistics.median(p[0] for p in pairs)
    pcpp_ms = statistics.median(p[1] for p in pairs)
    return {"plain_interleaved_ms": plain_ms, "pcpp_one_rank_ms": pcpp_ms, "pcpp_over_plain": pcpp_ms / plain_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 3072, 4096], help="image sizes in pixels")
    parser.add_argument("--strips", type=int, nargs="+", default=[1, 2, 4], help="N: decode the top 1/N")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "float32"], choices=["float16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-gib", type=float, default=70.0, help="skip a decode estimated above this")
    parser.add_argument("--pcpp", action="store_true", help="also time the pcpp-converted decoder on one rank")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for dtype_name in args.dtypes:
        rows += _rows_for(getattr(torch, dtype_name), args)
        torch.cuda.empty_cache()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "rows": rows,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    args.out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
