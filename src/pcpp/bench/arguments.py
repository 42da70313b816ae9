"""The command line of ``pcpp bench``: modes, sizes, every option and its checks."""

from __future__ import annotations

import argparse
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .common import DTYPES, VAE_FACTOR, add_loop_arguments, add_run_arguments
from .tasks import IMAGE_MODES, UNET_MODES, Task, add_task_arguments, check_task

__all__ = ["DEFAULT_CONFIG", "ModeKind", "ModeSpec", "build_parser", "parse_args", "parse_mode", "parse_resolution"]

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sdxl-base-unet.json"
"""SDXL-base's ``unet/config.json``, shipped with the package (the DistriFusion runner reads it by path too)."""


class ModeKind(enum.Enum):
    """What a ``--modes`` entry measures."""

    SINGLE = "single"  # the plain UNet on one GPU
    FLOOR = "floor"  # each rank's strip alone, without communication
    PCPP = "pcpp"  # the converted UNet


@dataclass(frozen=True)
class ModeSpec:
    """One entry of ``--modes``.

    Attributes:
        name: as given on the command line, normalised (``partial:0.3``).
        kind: what the mode measures.
        partial: share of neighbour rows read by asynchronous attention (``partial`` modes).
        full: DistriFusion's attention (every strip) after warmup.
        exact: every step synchronous.
    """

    name: str
    kind: ModeKind
    partial: float = 0.3
    full: bool = False
    exact: bool = False


def parse_mode(text: str) -> ModeSpec:
    """Parse one ``--modes`` entry: ``single``, ``floor``, ``exact``, ``full``, ``partial`` or ``partial:P``.

    Raises:
        argparse.ArgumentTypeError: unknown mode or a partial ratio outside ``[0, 1]``.
    """
    name = text.strip().lower()
    if name in ("single", "floor"):
        return ModeSpec(name=name, kind=ModeKind(name))
    if name == "exact":
        return ModeSpec(name=name, kind=ModeKind.PCPP, exact=True)
    if name == "full":
        return ModeSpec(name=name, kind=ModeKind.PCPP, full=True)
    if name == "partial" or name.startswith("partial:"):
        value = name.partition(":")[2] or "0.3"
        try:
            partial = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: the partial ratio {value!r} is not a number") from None
        if not 0.0 <= partial <= 1.0:
            raise argparse.ArgumentTypeError(f"{text!r}: the partial ratio must be in [0, 1]")
        return ModeSpec(name=f"partial:{partial:g}", kind=ModeKind.PCPP, partial=partial)
    raise argparse.ArgumentTypeError(
        f"unknown mode {text!r}; use single, floor, exact, full or partial:P (e.g. partial:0.3)"
    )


def parse_resolution(text: str) -> tuple[int, int]:
    """``1024`` (square) or ``HxW``, in pixels; both multiples of 8.

    Raises:
        argparse.ArgumentTypeError: not a size, or not a multiple of 8.
    """
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r} is not N or HxW (pixels)") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or any(s <= 0 or s % VAE_FACTOR for s in sizes):
        raise argparse.ArgumentTypeError(f"resolution {text!r}: need N or HxW, positive multiples of {VAE_FACTOR}")
    return sizes[0], sizes[1]


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m pcpp.bench``."""
    parser = argparse.ArgumentParser(
        prog="python -m pcpp.bench",
        description=(
            "Time pcpp (patch parallelism with partially conditioned attention) on a diffusers UNet with random "
            "weights against the best single-GPU path, with per-step fidelity, traffic and memory. Launch with "
            "`torchrun --nproc-per-node N -m pcpp.bench ...`."
        ),
    )
    add_loop_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument(
        "--resolutions",
        type=parse_resolution,
        nargs="+",
        default=[(1024, 1024), (2048, 2048), (3072, 3072)],
        metavar="PX",
        help="image sizes in pixels, N (square) or HxW; latent = /8 (default: 1024 2048 3072)",
    )
    parser.add_argument(
        "--modes",
        type=parse_mode,
        nargs="+",
        default=None,
        metavar="MODE",
        help=f"single, floor, exact, full, partial:P (default: {' '.join(UNET_MODES)}; with --whole-image "
        f"{' '.join(IMAGE_MODES)}, where floor does not apply)",
    )
    parser.add_argument(
        "--floor-modes",
        type=parse_mode,
        nargs="+",
        default=None,
        metavar="MODE",
        help="pcpp modes whose floor `floor` measures (default: the pcpp modes of --modes, else partial:0.3 full)",
    )
    parser.add_argument("--warmup-steps", type=int, default=4, help="pcpp's synchronous steps per image")
    parser.add_argument(
        "--exchange-batch",
        type=int,
        default=1,
        help="layers whose asynchronous exchanges pcpp posts together (PCPPConfig.exchange_batch; 1: each at once)",
    )
    parser.add_argument(
        "--sm-carveout",
        type=int,
        default=None,
        metavar="N",
        help="pcpp runs only: keep cuBLASLt matmuls off N SMs (torch._C._set_sm_carveout_experimental), so that "
        "NCCL's kernels beside them do not hold up persistent GEMMs; matmuls that bypass cuBLASLt are unaffected "
        "unless TORCH_BLAS_PREFER_CUBLASLT=1",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed images per mode and variant")
    parser.add_argument("--warmup-images", type=int, default=1, help="untimed images before the timed ones")
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="load the UNet's weights from this state dict (torch.save) instead of the seeded random ones",
    )
    parser.add_argument(
        "--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu", help="device"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="weights and activations (default: float16 on cuda, float32 on cpu)",
    )
    parser.add_argument(
        "--init-device",
        choices=["device", "cpu"],
        default="device",
        help="where the seeded random weights are drawn: the rank's device (fast; checked identical across "
        "ranks) or the CPU (slow for SDXL, the same bits on any card)",
    )
    parser.add_argument(
        "--fuse-qkv",
        action="store_true",
        help="call diffusers' unet.fuse_qkv_projections() after building the UNet, for every path alike (single, "
        "floor and pcpp): one to_qkv matrix multiplication per self-attention instead of three",
    )
    parser.add_argument(
        "--no-cfg-split",
        dest="cfg_split",
        action="store_false",
        help="with an even number of ranks, split only the image (1-D patch mesh) instead of cfg 2 x patch N/2",
    )
    parser.add_argument(
        "--no-cuda-graph", dest="cuda_graph", action="store_false", help="run every path eagerly (no CUDAGraphUNet)"
    )
    parser.add_argument(
        "--single-variants",
        nargs="+",
        choices=["eager", "graph"],
        default=["eager", "graph"],
        help="single-GPU paths to time (--compile adds the compiled one; graph needs CUDA graphs)",
    )
    parser.add_argument(
        "--single-from",
        type=Path,
        nargs="+",
        default=None,
        metavar="JSON",
        help="take the single-GPU results from earlier reports (same card type!) instead of timing them: for each "
        "resolution, the first report that has it; mode `single` then costs nothing",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile variants (single, and every pcpp mode); compiling SDXL takes minutes",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="time pcpp modes only compiled (implies --compile for them; single keeps --single-variants)",
    )
    parser.add_argument(
        "--compile-floor",
        action="store_true",
        help="measure the floor with torch.compile (the compiled strip alone), to put beside compiled pcpp rows",
    )
    parser.add_argument(
        "--floor-warmup-steps",
        type=int,
        default=None,
        help="floor steps read at the synchronous (every-strip) width (default: as pcpp, max(1, --warmup-steps))",
    )
    parser.add_argument("--no-fidelity", dest="fidelity", action="store_false", help="skip the per-step check")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="after the timed images, run one more under torch.profiler per variant and write its busiest kernels "
        "(DIR/<label>.rank<r>.txt) and device time per step by kind of kernel (in the report)",
    )
    add_task_arguments(parser)
    add_run_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("steps", "repeats", "exchange_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.sm_carveout is not None:
        if args.device != "cuda":
            parser.error(f"--sm-carveout {args.sm_carveout} reserves GPU SMs; use it with --device cuda")
        if not hasattr(torch._C, "_set_sm_carveout_experimental"):
            parser.error(f"--sm-carveout needs torch._C._set_sm_carveout_experimental (torch {torch.__version__})")
    for name in ("warmup_steps", "warmup_images", "sm_carveout"):
        if (getattr(args, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.dtype is None:
        args.dtype = "float16" if args.device == "cuda" else "float32"
    if args.device == "cpu" and args.cuda_graph:
        args.cuda_graph = False  # CUDA graphs need CUDA; logged once logging is set up
        args.cuda_graph_note = "CUDA graphs disabled: --device cpu"
    if args.modes is None:
        args.modes = [parse_mode(m) for m in (IMAGE_MODES if args.task is Task.WHOLE_IMAGE else UNET_MODES)]
    check_task(parser, args)
    if args.floor_warmup_steps is None:
        args.floor_warmup_steps = max(1, args.warmup_steps)
    if args.floor_modes is None:
        pcpp_modes = [m for m in args.modes if m.kind is ModeKind.PCPP]
        args.floor_modes = pcpp_modes or [parse_mode("partial:0.3"), parse_mode("full")]
    if any(m.kind is not ModeKind.PCPP for m in args.floor_modes):
        parser.error("--floor-modes takes pcpp modes only (exact, full, partial:P)")
    missing = [str(p) for p in args.single_from or () if not p.is_file()]
    if missing:
        parser.error(f"--single-from: no such report(s): {missing}")
    names = [m.name for m in args.modes]
    if len(set(names)) != len(names):
        parser.error(f"--modes lists a mode twice: {names}")
    return args
