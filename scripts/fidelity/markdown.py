"""The study's markdown tables, and writing them into the marked block of a page."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from .plan import Mode

TABLE_BEGIN: Final = "<!-- fidelity-table:begin -->"
TABLE_END: Final = "<!-- fidelity-table:end -->"


def _fmt(summary: dict[str, Any] | None, digits: int = 2, spread: bool = True) -> str:
    if summary is None:
        return "-"
    if summary.get("mean") is None:
        return "inf" if summary.get("n_inf") else "-"
    text = f"{summary['mean']:.{digits}f}"
    if spread:
        text += f" ± {summary['std']:.{digits}f}"
    if summary.get("n_inf"):
        text += f" ({summary['n_inf']}/{summary['n']} identical: inf)"
    return text


def _fmt_eps(summary: dict[str, Any]) -> str:
    if summary.get("mean") is None:
        return "-"
    return f"{summary['mean']:.2e} ({summary['p95']:.1e} / {summary['max']:.1e})"


def _main_labels(records: Sequence[dict[str, Any]], warmup: int) -> list[str]:
    labels = ["exact", f"full / w{warmup}"]
    partials = sorted(
        {
            r["mode"]["partial"]
            for r in records
            if r["mode"]["warmup"] == warmup and not (r["mode"]["full"] or r["mode"]["exact"])
        }
    )
    return labels + [Mode(partial=p, warmup=warmup).label for p in partials]


def markdown_tables(records: Sequence[dict[str, Any]], warmup: int = 4) -> str:
    """Markdown tables of the study: PSNR, SSIM and eps error by mode (main sweep), the warmup sweep, and every
    configuration with its full spread."""
    index = {(r["resolution"], r["ranks"], r["mode"]["label"]): r for r in records}
    cells = sorted({(r["resolution"], r["ranks"]) for r in records})
    labels = [lab for lab in _main_labels(records, warmup) if any(k[2] == lab for k in index)]
    heads = [lab.replace(f" / w{warmup}", "") for lab in labels]
    lines: list[str] = []

    def pivot(title: str, cell: Callable[[dict[str, Any]], str]) -> None:
        lines.extend([f"**{title}**", "", "| size | ranks | " + " | ".join(heads) + " |"])
        lines.append("|---|---|" + "---|" * len(heads))
        for res, n in cells:
            row = [cell(index[(res, n, lab)]) if (res, n, lab) in index else "" for lab in labels]
            lines.append(f"| {res} px | {n} | " + " | ".join(row) + " |")
        lines.append("")

    pivot(f"PSNR (dB) against one device, mean ± std over images; warmup {warmup}", lambda r: _fmt(r["psnr"]))
    pivot(f"SSIM against one device, mean ± std over images; warmup {warmup}", lambda r: _fmt(r["ssim"], 4))
    pivot(
        f"Relative L2 error of the guided eps after warmup, mean over (image, step); warmup {warmup}",
        lambda r: f"{r['eps']['mean']:.2e}" if r["eps"].get("mean") is not None else "-",
    )
    swept = [r for r in records if r["mode"]["warmup"] != warmup and not r["mode"]["exact"]]
    sweep = sorted({(r["resolution"], r["ranks"]) for r in swept})
    warmups = sorted({r["mode"]["warmup"] for r in records if not r["mode"]["exact"]})
    if sweep:
        lines.extend(
            [
                "**Warmup sweep: PSNR (dB) mean ± std / eps error mean**",
                "",
                "| size | ranks | mode | " + " | ".join(f"warmup {w}" for w in warmups) + " |",
                "|---|---|---|" + "---|" * len(warmups),
            ]
        )
        for res, n in sweep:
            for base in sorted({r["mode"]["label"].split(" / ")[0] for r in swept}, reverse=True):
                row = []
                for w in warmups:
                    r = index.get((res, n, f"{base} / w{w}"))
                    row.append(f"{_fmt(r['psnr'])} / {r['eps']['mean']:.1e}" if r else "")
                lines.append(f"| {res} px | {n} | {base} | " + " | ".join(row) + " |")
        lines.append("")
    lines.extend(
        [
            "**Every configuration** (PSNR and SSIM over images; eps error over (image, step) after warmup: "
            "mean (p95 / max); seconds: wall time of the parallel run of all prompts)",
            "",
            "| size | ranks | mode | PSNR mean ± std | PSNR min / p5 / p95 / max | SSIM mean ± std | SSIM min "
            "| eps rel. L2 mean (p95 / max) | s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
    )
    for r in records:
        p = r["psnr"]
        spread = (
            f"{p['min']:.2f} / {p['p5']:.2f} / {p['p95']:.2f} / {p['max']:.2f}" if p.get("mean") is not None else "inf"
        )
        ssim_min = f"{r['ssim']['min']:.4f}" if r["ssim"].get("min") is not None else "-"
        lines.append(
            f"| {r['resolution']} px | {r['ranks']} | {r['mode']['label']} | {_fmt(p)} | {spread} | "
            f"{_fmt(r['ssim'], 4)} | {ssim_min} | {_fmt_eps(r['eps'])} | {r['seconds']:.0f} |"
        )
    if any(r.get("lpips") for r in records):
        lines.extend(["", "| size | ranks | mode | LPIPS mean ± std |", "|---|---|---|---|"])
        for r in records:
            lines.append(f"| {r['resolution']} px | {r['ranks']} | {r['mode']['label']} | {_fmt(r['lpips'], 4)} |")
    return "\n".join(lines) + "\n"


def write_table(path: Path, table: str) -> None:
    """Write ``table`` between the markers of ``path`` if it has them, else as the whole file."""
    if path.is_file():
        text = path.read_text()
        pattern = re.compile(re.escape(TABLE_BEGIN) + r".*?" + re.escape(TABLE_END), re.DOTALL)
        if pattern.search(text):
            path.write_text(pattern.sub(lambda _: f"{TABLE_BEGIN}\n{table}{TABLE_END}", text))
            return
    path.write_text(table)
