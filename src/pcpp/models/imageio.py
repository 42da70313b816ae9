"""Save images and image grids as PNG (through Pillow), with text metadata such as the prompt and seed."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

__all__ = ["encode_png", "image_grid", "quantize", "read_png_text", "save_png", "to_pil"]


def quantize(image: Tensor) -> Tensor:
    """An image in [0, 1] as the 8-bit pixels every PNG pcpp writes holds: ``round(clamp(x, 0, 1) * 255)``.

    Args:
        image: ``(3, H, W)`` float tensor (values outside [0, 1] are clamped).

    Returns:
        ``(H, W, 3)`` uint8 tensor on the CPU.

    Raises:
        ValueError: If ``image`` is not ``(3, H, W)``.

    Example:
        >>> quantize(torch.full((3, 1, 1), 0.5)).flatten().tolist()
        [128, 128, 128]
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def to_pil(image: Tensor) -> Image.Image:
    """Converts one RGB image tensor to an 8-bit Pillow image (pixels from :func:`quantize`).

    Args:
        image: ``(3, H, W)`` float tensor in [0, 1] (values outside are clamped).

    Returns:
        The ``RGB`` Pillow image.

    Raises:
        ValueError: If ``image`` is not ``(3, H, W)``.
    """
    return Image.fromarray(quantize(image).numpy())  # (H, W, 3) uint8: RGB


def _png_info(text: Mapping[str, str] | None) -> PngInfo | None:
    if not text:
        return None
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))  # Pillow writes iTXt for text outside Latin-1, tEXt otherwise
    return info


def encode_png(image: Tensor, text: Mapping[str, str] | None = None) -> bytes:
    """Encodes one RGB image as an 8-bit PNG.

    Args:
        image: ``(3, H, W)`` float tensor in [0, 1] (values outside are clamped).
        text: Key/value pairs stored as PNG text chunks (e.g. ``{"prompt": ..., "seed": "0"}``).

    Returns:
        The PNG file's bytes.

    Raises:
        ValueError: If ``image`` is not ``(3, H, W)``.

    Example:
        >>> data = encode_png(torch.zeros(3, 4, 4), {"prompt": "a red circle"})
        >>> data[:4]
        b'\\x89PNG'
    """
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG", pnginfo=_png_info(text))
    return buffer.getvalue()


def save_png(image: Tensor, path: str | Path, text: Mapping[str, str] | None = None) -> None:
    """Saves one RGB image as PNG.

    Args:
        image: ``(3, H, W)`` float tensor in [0, 1].
        path: Output file.
        text: Key/value pairs stored as PNG text chunks (see :func:`encode_png`).

    Raises:
        ValueError: If ``image`` is not ``(3, H, W)``.
        OSError: If the file cannot be written.
    """
    Path(path).write_bytes(encode_png(image, text))


def read_png_text(path: str | Path) -> dict[str, str]:
    """Reads the text chunks of a PNG file (what :func:`save_png` stored as ``text``).

    Args:
        path: A PNG file.

    Returns:
        The text chunks, key to value.
    """
    with Image.open(path) as image:
        image.load()  # text chunks after the image data are read only with it
        return {str(k): str(v) for k, v in getattr(image, "text", {}).items()}


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
