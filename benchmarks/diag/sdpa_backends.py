"""Diagnostic: which scaled-dot-product-attention kernel is fastest for the self-attention a pcpp rank runs.

``torch._C._get_sdp_priority_order()`` lists FlashAttention-2 first and cuDNN last, yet on an H100 PyTorch 2.11 ran
the SDXL UNet's attention on cuDNN's fused kernel (the UNet check below found it). This times each backend on the
exact shapes one rank of SDXL attends with (queries = the strip's tokens, keys = the strip plus ``ceil(partial *
rows)`` rows of one neighbour, as a rank of cfg 2 x patch 2 reads after warmup; and twice the strip for full
conditioning), in pcpp's memory layout (keys and values as two halves of one projected tensor). Then it times the
whole plain UNet on a half-height strip under one CUDA graph with PyTorch's own choice and with flash and cuDNN
forced, which tells which kernel the default picks and what the choice is worth per denoising step; and it checks
the backends against a float32 reference.

Run on one GPU, from the repository root::

    OUT=results PYTHONPATH=src python benchmarks/diag/sdpa_backends.py   # writes results/sdpa_backends.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pcpp.bench.arguments import DEFAULT_CONFIG
from pcpp.bench.common import load_unet_config, make_inputs
from pcpp.bench.model import build_unet

LOG = logging.getLogger("sdpa_backends")
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
}
# SDXL self-attention: (level, layers per UNet call, heads); head_dim 64 at both levels.
SDXL_LEVELS = ((1, 10, 10), (2, 60, 20))


def time_ms(fn: Callable[[], Any], iters: int, repeats: int = 5) -> float:
    """Median over ``repeats`` of the mean time of ``iters`` calls, from CUDA events (no host sync inside)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / iters)
    return statistics.median(out)


def pcpp_layout(batch: int, heads: int, q_len: int, k_len: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Query, key and value shaped and strided as ``pcpp.layers.attention.attend_heads`` passes them."""
    dim = heads * 64
    query = torch.randn(batch, q_len, dim, generator=gen, device="cuda", dtype=torch.float16)
    kv = torch.randn(batch, k_len, 2 * dim, generator=gen, device="cuda", dtype=torch.float16)
    key, value = kv.split([dim, dim], dim=-1)
    return (
        query.view(batch, q_len, heads, 64).transpose(1, 2),
        key.reshape(batch, k_len, heads, 64).transpose(1, 2),
        value.reshape(batch, k_len, heads, 64).transpose(1, 2),
    )


def kernels(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows_out = []
    gen = torch.Generator("cuda").manual_seed(0)
    for res in args.resolutions:
        latent = res // 8
        for level, layers, heads in SDXL_LEVELS:
            side = latent >> level
            strip = side // 2  # one of two strips (patch 2)
            for label, extra in (("partial0.3", math.ceil(0.3 * strip)), ("full", strip)):
                for batch in (1, 2):  # 1: a rank of cfg 2 x patch 2; 2: a rank of patch 2 alone
                    q, k, v = pcpp_layout(batch, heads, strip * side, (strip + extra) * side, gen)
                    row: dict[str, Any] = {
                        "resolution": res,
                        "level": level,
                        "layers": layers,
                        "mode": label,
                        "batch": batch,
                        "q_tokens": strip * side,
                        "k_tokens": (strip + extra) * side,
                        "heads": heads,
                    }
                    ref = None
                    for name, backend in BACKENDS.items():
                        try:
                            with sdpa_kernel(backend):
                                out = F.scaled_dot_product_attention(q, k, v)
                                row[f"{name}_ms"] = time_ms(
                                    functools.partial(F.scaled_dot_product_attention, q, k, v), args.iters
                                )
                        except RuntimeError as err:  # the backend rejects these shapes or strides
                            row[f"{name}_ms"] = None
                            row[f"{name}_error"] = str(err).splitlines()[0][:200]
                            continue
                        if ref is None:
                            ref = out.float()
                        else:
                            row[f"{name}_vs_first_rel_l2"] = float((out.float() - ref).norm() / ref.norm())
                    LOG.info("%s", row)
                    rows_out.append(row)
    return rows_out


def accuracy() -> dict[str, float]:
    """Relative L2 of each backend against float32 math attention, on a level-1 1024 strip."""
    gen = torch.Generator("cuda").manual_seed(1)
    q, k, v = pcpp_layout(1, 10, 2048, 2688, gen)
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = {}
    for name, backend in BACKENDS.items():
        with sdpa_kernel(backend):
            got = F.scaled_dot_product_attention(q, k, v).float()
        out[name] = float((got - ref).norm() / ref.norm())
    return out


def unet_strip(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The plain UNet on a half-height strip, batch 1, under one CUDA graph: PyTorch's own choice of attention
    kernel, then flash and cuDNN forced. Bitwise equal outputs tell which kernel the default chose."""
    dev = torch.device("cuda")
    cfg = load_unet_config(Path(args.config))
    unet = build_unet(cfg, 0, dev, torch.float16, True)
    choices: dict[str, Callable[[], Any]] = {
        "default": contextlib.nullcontext,
        "flash": lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION),
        "cudnn": lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
    }
    rows_out = []
    for res in args.resolutions:
        inputs = make_inputs(cfg, res // 2, res, 0, dev, torch.float16)
        t = torch.tensor(500.0, device=dev)
        kwargs = inputs.cond(slice(0, 1))
        row: dict[str, Any] = {"resolution": res, "strip": list(inputs.latents.shape)}
        outs = {}
        for name, choice in choices.items():
            with choice(), torch.no_grad():
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        unet(inputs.latents, t, **kwargs)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static = unet(inputs.latents, t, **kwargs).sample
            row[f"{name}_ms"] = time_ms(graph.replay, args.unet_iters, repeats=3)
            outs[name] = static.clone()
            del graph
        row["default_is"] = [name for name in ("flash", "cudnn") if torch.equal(outs["default"], outs[name])]
        LOG.info("%s", row)
        rows_out.append(row)
        torch.cuda.empty_cache()
    return rows_out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[1024, 2048, 3072])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--unet-iters", type=int, default=10)
    parser.add_argument("--skip-unet", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "priority_order": torch._C._get_sdp_priority_order(),
        "accuracy_vs_fp32_math": accuracy(),
        "kernels": kernels(args),
    }
    if not args.skip_unet:
        report["unet_strip"] = unet_strip(args)
    path = Path(os.environ.get("OUT", ".")) / "sdpa_backends.json"
    path.write_text(json.dumps(report, indent=1))
    LOG.info("wrote %s", path)


if __name__ == "__main__":
    main()
