"""The study's plots (matplotlib, when installed): latency against fidelity, PSNR against the partial ratio, and
the noise-prediction error per step."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

logger = logging.getLogger("pcpp.fidelity")

BENCHMARK_LATENCY_MS: Final[dict[str, dict[str, float]]] = {
    "partial 0.3 / w4": {"median": 2782.0, "floor": 2576.0},
    "full / w4": {"median": 3074.0, "floor": 2819.0},
}
"""Latency of one SDXL image (2048 px, 50 DDIM steps, cfg 2 x patch 2 on 4x H200), from ``docs/benchmarks.md``.

Only these two modes were timed on the GPUs; the single GPU took 9826 ms. Latency and fidelity come from
different models: the fidelity axis of the plot is measured on pcpp's tiny model.
"""

SINGLE_GPU_LATENCY_MS: Final = 9826.0


@contextmanager
def figure(path: Path, **kwargs: Any) -> Iterator[Any]:
    """A matplotlib figure (Agg backend, ``plt.figure(**kwargs)``) saved to ``path`` when the block ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(**kwargs)
    try:
        yield fig
        fig.savefig(path, dpi=110, bbox_inches="tight")
        logger.info("wrote %s", path)
    finally:
        plt.close(fig)


def has_matplotlib() -> bool:
    """Whether matplotlib can be imported (the plots are skipped and the grids untitled without it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_pareto(records: Sequence[dict[str, Any]], ranks: int, path: Path) -> None:
    """Latency (SDXL on 4x H200, docs/benchmarks.md) against PSNR (tiny model at ``ranks`` ranks)."""
    with figure(path, figsize=(6.4, 4.4)) as fig:
        ax = fig.add_subplot(1, 1, 1)
        sizes = sorted({r["resolution"] for r in records if r["ranks"] == ranks})
        markers = "osD^v"
        for k, size in enumerate(sizes):
            for label, color in (("partial 0.3 / w4", "tab:blue"), ("full / w4", "tab:orange")):
                rec = next(
                    (
                        r
                        for r in records
                        if r["ranks"] == ranks and r["resolution"] == size and r["mode"]["label"] == label
                    ),
                    None,
                )
                if rec is None or rec["psnr"].get("mean") is None:
                    continue
                lat = BENCHMARK_LATENCY_MS[label]
                y, err = rec["psnr"]["mean"], rec["psnr"]["std"]
                name = label.replace(" / w4", "")
                ax.errorbar(
                    lat["median"],
                    y,
                    yerr=err,
                    fmt=markers[k % 5],
                    color=color,
                    capsize=3,
                    label=f"{name}, fidelity at {size} px",
                )
                ax.plot(lat["floor"], y, markers[k % 5], mfc="none", color=color)
                ax.annotate(
                    "",
                    xy=(lat["floor"], y),
                    xytext=(lat["median"], y),
                    arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.5},
                )
        ax.set_xlabel("latency of one SDXL 2048 px image, 4x H200 (ms)\nfilled: measured median; hollow: floor")
        ax.set_ylabel(f"PSNR vs one device (dB), tiny model, {ranks} ranks")
        ax.set_title("Latency (SDXL, GPU) vs fidelity (tiny model, CPU): different models", fontsize=10)
        ax.text(
            0.02,
            0.02,
            f"1 GPU: {SINGLE_GPU_LATENCY_MS:.0f} ms (the reference, PSNR = inf)\n"
            "only partial 0.3 and full were timed on GPU",
            transform=ax.transAxes,
            fontsize=8,
            va="bottom",
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper right")


def plot_psnr_vs_partial(records: Sequence[dict[str, Any]], warmup: int, path: Path) -> None:
    """Mean PSNR (± std) against the partial ratio per rank count and size; full conditioning as a dashed line."""
    with figure(path, figsize=(6.4, 4.4)) as fig:
        ax = fig.add_subplot(1, 1, 1)
        colors = {2: "tab:green", 3: "tab:purple", 4: "tab:blue", 8: "tab:red"}
        styles = ["-", "--", ":", "-."]
        sizes = sorted({r["resolution"] for r in records})
        for n in sorted({r["ranks"] for r in records}):
            for k, size in enumerate(sizes):
                rows = sorted(
                    (
                        r
                        for r in records
                        if r["ranks"] == n
                        and r["resolution"] == size
                        and r["mode"]["warmup"] == warmup
                        and not r["mode"]["full"]
                        and not r["mode"]["exact"]
                    ),
                    key=lambda r: r["mode"]["partial"],
                )
                if not rows:
                    continue
                color = colors.get(n, "black")
                ax.errorbar(
                    [r["mode"]["partial"] for r in rows],
                    [r["psnr"]["mean"] for r in rows],
                    yerr=[r["psnr"]["std"] for r in rows],
                    ls=styles[k % 4],
                    marker="o",
                    color=color,
                    capsize=2,
                    label=f"{n} ranks, {size} px",
                )
                full = next(
                    (
                        r
                        for r in records
                        if r["ranks"] == n and r["resolution"] == size and r["mode"]["label"] == f"full / w{warmup}"
                    ),
                    None,
                )
                if full is not None:
                    ax.axhline(full["psnr"]["mean"], color=color, ls=styles[k % 4], alpha=0.4, lw=1)
        ax.set_xlabel("partial ratio (share of each neighbour strip attention reads)")
        ax.set_ylabel("PSNR vs one device (dB), mean ± std")
        ax.set_title(f"Tiny model, warmup {warmup}; faint horizontal lines: full conditioning", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)


def plot_eps_per_step(records: Sequence[dict[str, Any]], ranks: int, size: int, path: Path) -> None:
    """Mean relative L2 error of the guided eps at each step after warmup, one line per mode."""
    with figure(path, figsize=(6.4, 4.4)) as fig:
        ax = fig.add_subplot(1, 1, 1)
        for r in records:
            if r["ranks"] != ranks or r["resolution"] != size or r["mode"]["exact"]:
                continue
            values = r["eps"]["per_step_mean"]
            steps = [s for s, v in enumerate(values) if v is not None]
            ax.semilogy(steps, [values[s] for s in steps], marker=".", label=r["mode"]["label"])
        ax.set_xlabel("denoising step (0-based; the first ones are the synchronous warmup)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel("relative L2 error of guided eps (mean over images)")
        ax.set_title(f"Tiny model, {ranks} ranks, {size} px: noise-prediction error after warmup", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
