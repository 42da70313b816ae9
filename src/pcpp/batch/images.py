"""Where generated images go: one PNG per record, with its prompt, seed and settings in the PNG's text chunks."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from ..errors import PCPPError
from ..models.imageio import encode_png, quantize, read_png_text
from .records import PromptRecord

__all__ = ["ImageFolder", "OutputError", "quantize", "read_metadata"]

# A file being written is named ".<final name>.<random>.tmp" until it is renamed into place.
_PARTIAL_GLOB = ".*.png.*.tmp"


class OutputError(PCPPError, OSError):
    """The output folder cannot be written; raised before any image is made."""


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
        """Create the folder, prove a file can be written and renamed in it, and remove half-written files.

        A run killed while writing an image leaves its temporary file (never a PNG under the final name); they are
        removed here, which every run does before it makes any image.

        Raises:
            OutputError: it cannot (a file in the way, no permission, read-only file system).
        """
        probe = self.path / f".pcpp-probe-{uuid.uuid4().hex}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            os.replace(probe, probe.with_suffix(".done"))
            probe.with_suffix(".done").unlink()
            for partial in self.path.glob(_PARTIAL_GLOB):
                partial.unlink(missing_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot write images to {str(self.path)!r}: {exc.strerror or exc}") from exc

    def write(self, record: PromptRecord, image: Tensor) -> Path:
        """Save ``image`` as ``record``'s PNG, with the record's fields as text chunks.

        The chunks are ``prompt``, ``seed``, ``height``, ``width``, ``steps``, ``guidance`` (empty for the model's
        default), ``pcpp`` (the whole record as JSON) and :attr:`extra_metadata` (keys the record has are kept
        from the record).

        Args:
            record: what the image is of.
            image: ``(3, H, W)`` float tensor in [0, 1].

        Returns:
            The file written.

        Raises:
            OutputError: the file cannot be written.
            ValueError: ``image`` is not ``(3, H, W)``.
        """
        text = {key: "" if value is None else str(value) for key, value in record.metadata().items()}
        text["pcpp"] = json.dumps(record.metadata(), sort_keys=True)
        for key, value in self.extra_metadata.items():
            text.setdefault(key, value)  # the record's own fields always describe the image
        data = encode_png(image, text)  # pcpp's one PNG writer: the pixels of quantize(image)
        target = self.file_of(record)
        partial = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            partial.write_bytes(data)
            os.replace(partial, target)  # atomic: the final name only ever holds a whole PNG
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise OutputError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from exc
        return target


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The record saved in a PNG written by :class:`ImageFolder` (its ``pcpp`` text chunk).

    Raises:
        KeyError: the PNG has no ``pcpp`` chunk.
    """
    return dict(json.loads(read_png_text(path)["pcpp"]))
