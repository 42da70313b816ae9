"""Dependency-free helpers to save images and image grids as PNG (zlib only, no Pillow needed)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["encode_png", "image_grid", "save_png"]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def encode_png(image: Tensor) -> bytes:
    """Encodes one RGB image as an 8-bit PNG.

    Args:
        image: ``(3, H, W)`` float tensor in [0, 1] (values outside are clamped).

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: If ``image`` is not ``(3, H, W)``.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
    height, width = pixels.shape[:2]
    rows = torch.cat([torch.zeros(height, 1, dtype=torch.uint8), pixels.reshape(height, width * 3)], 1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def save_png(image: Tensor, path: str | Path) -> None:
    """Saves one RGB image as PNG.

    Args:
        image: ``(3, H, W)`` float tensor in [0, 1].
        path: Output file.
    """
    Path(path).write_bytes(encode_png(image))


def image_grid(rows: Sequence[Sequence[Tensor]], cell: int, pad: int = 4, background: float = 1.0) -> Tensor:
    """Lays images out in a grid, each scaled (nearest neighbour, aspect kept) to fit a ``cell x cell`` square.

    Args:
        rows: Rows of ``(3, H, W)`` images in [0, 1]; rows may differ in length.
        cell: Side of each cell in pixels.
        pad: Gap between cells in pixels.
        background: Grey level of the gaps.

    Returns:
        ``(3, H, W)`` grid image.

    Raises:
        ValueError: If there are no images.
    """
    n_cols = max((len(r) for r in rows), default=0)
    if n_cols == 0:
        raise ValueError("no images to lay out")
    height = len(rows) * cell + (len(rows) + 1) * pad
    width = n_cols * cell + (n_cols + 1) * pad
    grid = torch.full((3, height, width), background)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            h, w = image.shape[-2:]
            scale = cell / max(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
            scaled = F.interpolate(image.detach().float().cpu()[None], size=size, mode="nearest")[0]
            top = pad + i * (cell + pad) + (cell - size[0]) // 2
            left = pad + j * (cell + pad) + (cell - size[1]) // 2
            grid[:, top : top + size[0], left : left + size[1]] = scaled
    return grid
