"""Where generated images go: one PNG per record, with its prompt, seed and settings in the PNG's text chunks."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import PCPPError
from .records import PromptRecord

__all__ = ["ImageFolder", "OutputError", "quantize", "read_metadata"]


class OutputError(PCPPError, OSError):
    """The output folder cannot be written; raised before any image is made."""


def quantize(image: Tensor) -> Tensor:
    """An image in [0, 1] as 8-bit pixels, rounded the way ``pcpp generate`` saves its PNG.

    Args:
        image: ``(3, H, W)`` float tensor (values outside [0, 1] are clamped).

    Returns:
        ``(H, W, 3)`` uint8 tensor on the CPU.

    Raises:
        ValueError: ``image`` is not ``(3, H, W)``.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


@dataclass(frozen=True)
class ImageFolder:
    """A folder of ``<record.file_stem>.png`` files; an image already there counts as done.

    Args:
        path: the folder (created by :meth:`check_writable`).
        extra_metadata: more ``key: value`` text chunks written into every PNG (e.g. the model and the layout).

    Example:
        >>> folder = ImageFolder("out")  # doctest: +SKIP
        >>> folder.check_writable()  # doctest: +SKIP
        >>> folder.write(record, image)  # doctest: +SKIP
    """

    path: Path
    extra_metadata: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "extra_metadata", {str(k): str(v) for k, v in dict(self.extra_metadata).items()})

    def file_of(self, record: PromptRecord) -> Path:
        """Where ``record``'s image is saved."""
        return self.path / f"{record.file_stem}.png"

    def is_written(self, record: PromptRecord) -> bool:
        """Whether ``record``'s image is already saved (a finished file: images are written under a temporary name
        and renamed, so a run killed midway leaves no partial PNG under the final name)."""
        return self.file_of(record).is_file()

    def check_writable(self) -> None:
        """Create the folder and prove a file can be written and renamed in it.

        Raises:
            OutputError: it cannot (a file in the way, no permission, read-only file system).
        """
        probe = self.path / f".pcpp-probe-{uuid.uuid4().hex}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            os.replace(probe, probe.with_suffix(".done"))
            probe.with_suffix(".done").unlink()
        except OSError as exc:
            raise OutputError(f"cannot write images to {str(self.path)!r}: {exc.strerror or exc}") from exc

    def write(self, record: PromptRecord, image: Tensor) -> Path:
        """Save ``image`` as ``record``'s PNG, with the record's fields as text chunks.

        The chunks are ``prompt``, ``seed``, ``height``, ``width``, ``steps``, ``guidance`` (empty for the model's
        default), ``pcpp`` (the whole record as JSON) and :attr:`extra_metadata`.

        Args:
            record: what the image is of.
            image: ``(3, H, W)`` float tensor in [0, 1].

        Returns:
            The file written.

        Raises:
            OutputError: the file cannot be written.
            ValueError: ``image`` is not ``(3, H, W)``.
        """
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        pixels = quantize(image).numpy()
        info = PngInfo()
        for key, value in record.metadata().items():
            info.add_text(key, "" if value is None else str(value))
        info.add_text("pcpp", json.dumps(record.metadata(), sort_keys=True))
        for key, value in self.extra_metadata.items():
            info.add_text(key, value)
        target = self.file_of(record)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            Image.fromarray(pixels).save(partial, format="PNG", pnginfo=info)
            os.replace(partial, target)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
        return target


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The record saved in a PNG written by :class:`ImageFolder` (its ``pcpp`` text chunk).

    Raises:
        KeyError: the PNG has no ``pcpp`` chunk.
    """
    from PIL import Image

    with Image.open(path) as image:
        text: dict[str, str] = dict(getattr(image, "text", {}))
    return dict(json.loads(text["pcpp"]))
