"""What to generate: one :class:`PromptRecord` per image, and the dataset Lightning shards over data-parallel groups."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch.utils.data import Dataset

__all__ = ["PromptDataset", "PromptRecord", "collate_records"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class PromptRecord:
    """One image to generate: its prompt, seed and settings, and the file name it is saved under.

    Every rank of a patch group gets the same record and so draws the same initial noise from ``seed``.

    Args:
        prompt: what to draw.
        seed: seed of the initial noise (``torch.Generator().manual_seed(seed)`` on the CPU, as ``pcpp generate``).
        height: image height in pixels.
        width: image width in pixels.
        steps: denoising steps.
        guidance: classifier-free guidance scale; ``None`` for the model's default.
        name: file name without extension; ``None`` for one derived from everything above (so the same request
            always maps to the same file, which is what makes a run resumable).

    Raises:
        ValueError: a field is of the wrong type or out of range, or ``name`` is not a plain file name.

    Example:
        >>> PromptRecord("a red circle", seed=1, height=32, width=32, steps=4).file_stem[:13]
        'a-red-circle-'
    """

    prompt: str
    seed: int = 0
    height: int = 128
    width: int = 128
    steps: int = 20
    guidance: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt={self.prompt!r} must be a string")
        for field_name in ("seed", "height", "width", "steps"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{field_name}={value!r} must be an int")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed} must be in [0, 2**63)")
        if self.height < 1 or self.width < 1 or self.steps < 1:
            raise ValueError(f"height, width and steps must be >= 1, got {self.height}, {self.width}, {self.steps}")
        if self.guidance is not None and (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
        ):
            raise ValueError(f"guidance={self.guidance!r} must be a finite number or None")
        if self.name is not None and (not isinstance(self.name, str) or not _NAME.match(self.name)):
            raise ValueError(
                f"name={self.name!r} must be a plain file name (letters, digits, '.', '_', '-'; at most 128 "
                "characters; no folder), or None for a derived one"
            )

    @property
    def file_stem(self) -> str:
        """The file name without extension: ``name``, or the prompt's first words plus a hash of the whole record."""
        if self.name is not None:
            return self.name
        slug = re.sub(r"[^a-z0-9]+", "-", self.prompt.lower()).strip("-")[:40].strip("-") or "image"
        digest = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode()).hexdigest()[:12]
        return f"{slug}-{digest}"

    def metadata(self) -> dict[str, object]:
        """The record as a JSON-able dict (what the image writer stores in the PNG), ``name`` left out."""
        fields = asdict(self)
        del fields["name"]
        return fields


class PromptDataset(Dataset[PromptRecord]):
    """A map-style dataset of records, for a ``DataLoader`` that Lightning shards over the data-parallel groups.

    Args:
        records: the images to make, in order.

    Raises:
        ValueError: two records would be saved under the same file name.
    """

    def __init__(self, records: Sequence[PromptRecord]) -> None:
        self._records = list(records)
        seen: dict[str, int] = {}
        for index, record in enumerate(self._records):
            if not isinstance(record, PromptRecord):
                raise ValueError(f"record {index} is a {type(record).__name__}, not a PromptRecord")
            first = seen.setdefault(record.file_stem, index)
            if first != index:
                raise ValueError(
                    f"records {first} and {index} would both be saved as {record.file_stem!r}; give them "
                    "distinct names (or drop the duplicate: the same record makes the same image)"
                )

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> PromptRecord:
        return self._records[index]


def collate_records(batch: list[PromptRecord]) -> list[PromptRecord]:
    """``DataLoader(collate_fn=...)`` for records: keeps the batch a list (the default collate cannot stack them)."""
    return list(batch)
