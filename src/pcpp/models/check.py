"""Simple measurements of generated shapes images: which colours they show, and how smooth they are.

Used by the tests and by the training script's evaluation to tell a picture that matches its prompt from noise
or from a picture of the wrong colours, without any learned classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pcpp.models.shapes import COLORS

__all__ = ["ColorReading", "nearest_colors", "read_colors", "total_variation"]

_NAMES = tuple(COLORS)


@dataclass(frozen=True)
class ColorReading:
    """The colours read off one image.

    Attributes:
        background: Palette name nearest to the median colour of the image's border.
        foreground: Most frequent palette name among the pixels whose nearest palette colour is not the
            background's (None if there are none).
        foreground_fraction: Share of the image's pixels whose nearest colour is ``foreground``.
    """

    background: str
    foreground: str | None
    foreground_fraction: float


def nearest_colors(pixels: Tensor) -> Tensor:
    """Index into :data:`~pcpp.models.shapes.COLORS` of the nearest palette colour (RGB distance) of each pixel.

    Args:
        pixels: ``(..., 3)`` RGB in [0, 1].

    Returns:
        ``(...)`` int64 palette indices.
    """
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32, device=pixels.device)
    dist = ((pixels.float()[..., None, :] - palette) ** 2).sum(-1)
    return dist.argmin(-1)


def read_colors(image: Tensor) -> ColorReading:
    """Reads the background and (dominant) object colour of a shapes image.

    The background is the palette colour nearest to the per-channel median of the border pixels (a frame
    ``max(1, H // 16)`` pixels wide). Every pixel is then mapped to its nearest palette colour; the most frequent
    one other than the background is the foreground.

    Args:
        image: ``(3, H, W)`` RGB in [0, 1].

    Returns:
        The reading.
    """
    img = image.detach().float().cpu()
    h, w = img.shape[-2:]
    b = max(1, h // 16)
    mask = torch.ones(h, w, dtype=torch.bool)
    mask[b : h - b, b : w - b] = False
    border = img[:, mask].T
    bg_index = int(nearest_colors(border.median(0).values).item())
    labels = nearest_colors(img.permute(1, 2, 0)).flatten()
    counts = torch.bincount(labels, minlength=len(_NAMES))
    counts[bg_index] = 0
    if int(counts.sum()) == 0:
        return ColorReading(_NAMES[bg_index], None, 0.0)
    fg_index = int(counts.argmax())
    return ColorReading(_NAMES[bg_index], _NAMES[fg_index], float(counts[fg_index]) / labels.numel())


def total_variation(image: Tensor) -> float:
    """Mean absolute difference between horizontally and vertically neighbouring pixel values.

    About 0.45 for clamped Gaussian noise mapped to [0, 1]; a few hundredths for flat shapes on a plain
    background.

    Args:
        image: ``(C, H, W)`` in [0, 1].

    Returns:
        The mean absolute neighbour difference.
    """
    img = image.detach().float()
    dx = (img[:, :, 1:] - img[:, :, :-1]).abs().mean()
    dy = (img[:, 1:, :] - img[:, :-1, :]).abs().mean()
    return float((dx + dy) / 2)
