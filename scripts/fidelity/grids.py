"""Image grids: each mode's images beside the single-device image, with amplified difference maps."""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .plots import figure, has_matplotlib

logger = logging.getLogger("pcpp.fidelity")


def grid_columns(labels: Sequence[str], warmup: int) -> list[str]:
    """The modes shown in an image grid, in order: exact, full conditioning, then partial ratios ascending."""
    partials = sorted(
        (lab for lab in labels if lab.startswith("partial ") and lab.endswith(f" / w{warmup}")),
        key=lambda lab: float(lab.split()[1]),
    )
    return [lab for lab in ("exact", f"full / w{warmup}") if lab in labels] + partials


def save_grid(
    reference: Tensor,
    images: dict[str, Tensor],
    columns: Sequence[str],
    path: Path,
    amplify: float = 5.0,
    captions: Sequence[str] = (),
) -> None:
    """Grid of images (one row per prompt) and their amplified difference maps ``amplify * |image - reference|``.

    Uses matplotlib (titled, rows labelled with ``captions``) when installed, else
    :func:`pcpp.models.imageio.image_grid` (no text).
    """
    rows_img = [[reference[i]] + [images[c][i] for c in columns] for i in range(reference.shape[0])]
    diffs = [
        [torch.zeros_like(reference[i])]
        + [(amplify * (images[c][i] - reference[i]).abs()).clamp(0, 1) for c in columns]
        for i in range(reference.shape[0])
    ]
    if not has_matplotlib():
        from pcpp.models.imageio import image_grid, save_png

        interleaved = [row for pair in zip(rows_img, diffs, strict=True) for row in pair]
        save_png(image_grid(interleaved, cell=96), path)
        logger.info("wrote %s (no matplotlib: untitled grid)", path)
        return
    titles = ["1 device"] + [c.replace(" / w", "\nwarmup ") for c in columns]
    n_rows, n_cols = 2 * reference.shape[0], len(titles)
    with figure(path, figsize=(1.3 * n_cols, 1.35 * n_rows)) as fig:
        for i in range(reference.shape[0]):
            for j in range(n_cols):
                for k, row in enumerate((rows_img, diffs)):
                    ax = fig.add_subplot(n_rows, n_cols, (2 * i + k) * n_cols + j + 1)
                    ax.imshow(row[i][j].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0 and k == 0:
                        ax.set_title(titles[j], fontsize=7)
                    if j == 0:
                        text = captions[i] if k == 0 and i < len(captions) else ("image" if k == 0 else "")
                        label = textwrap.fill(text, 22) if k == 0 else f"|diff| x{amplify:g}"
                        ax.set_ylabel(label, fontsize=6 if k == 0 else 7)
        fig.subplots_adjust(wspace=0.05, hspace=0.08)
