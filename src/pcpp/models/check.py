"""Simple measurements of generated shapes images: which colours and shapes they show, and how smooth they are.

Used by the tests and by the training script's evaluation to tell a picture that matches its prompt from noise
or from a picture of the wrong colours, without any learned classifier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch
from torch import Tensor

from pcpp.models.shapes import COLORS, SHAPES, shape_sdf

__all__ = [
    "UNIT_AREAS",
    "ColorReading",
    "ShapeReading",
    "nearest_colors",
    "read_colors",
    "read_shape",
    "total_variation",
]

_NAMES = tuple(COLORS)

UNIT_AREAS: Final = (
    math.pi,  # circle of radius 1
    1.7**2,  # square of half-side 0.85
    math.sqrt(3) / 4 * 2.2**2,  # equilateral triangle of side 2.2
    1.56**2,  # diamond: square of half-side 0.78, turned
    math.pi * (1 - 0.4**2),  # ring: radii 1 and 0.4
    2 * (2 * 0.64) - 0.64**2,  # cross: two 2 x 0.64 bars
)
"""Area of each shape of :data:`~pcpp.models.shapes.SHAPES` drawn with radius 1 (as ``render_scenes`` draws it)."""


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


@dataclass(frozen=True)
class ShapeReading:
    """The shape read off an object mask.

    Attributes:
        shape: Name from :data:`~pcpp.models.shapes.SHAPES` whose template overlaps the mask best (None for an
            empty mask).
        iou: Intersection over union of the mask with that template.
    """

    shape: str | None
    iou: float


def read_shape(mask: Tensor) -> ShapeReading:
    """Tells which of the shapes a binary object mask looks most like.

    Each shape of :data:`~pcpp.models.shapes.SHAPES` is drawn as a template centred on the mask's bounding box,
    its size chosen so that its area equals the mask's; the template with the highest intersection over union
    wins. A crude but model-free check: on rendered training images it reads the right shape for most objects
    (see the tests), and a shapeless blob scores a low IoU with every template.

    Args:
        mask: ``(H, W)`` bool, the object's pixels.

    Returns:
        The best-matching shape and its IoU.
    """
    m = mask.detach().cpu().bool()
    area = int(m.sum())
    if area == 0:
        return ShapeReading(None, 0.0)
    rows = torch.nonzero(m.any(1)).flatten()
    cols = torch.nonzero(m.any(0)).flatten()
    cy = (float(rows[0]) + float(rows[-1]) + 1) / 2
    cx = (float(cols[0]) + float(cols[-1]) + 1) / 2
    h, w = m.shape
    py = (torch.arange(h, dtype=torch.float32) + 0.5 - cy).view(h, 1).expand(h, w)
    px = (torch.arange(w, dtype=torch.float32) + 0.5 - cx).view(1, w).expand(h, w)
    best = ShapeReading(None, 0.0)
    for index, (name, unit_area) in enumerate(zip(SHAPES, UNIT_AREAS, strict=True)):
        shape = torch.tensor([index])
        r = torch.tensor(math.sqrt(area / unit_area)).view(1, 1, 1)
        template = shape_sdf(shape, px[None], py[None], r)[0] < 0
        inter = int((template & m).sum())
        union = int((template | m).sum())
        iou = inter / union if union else 0.0
        if iou > best.iou:
            best = ShapeReading(name, iou)
    return best
