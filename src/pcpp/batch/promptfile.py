"""Prompt files: one prompt per line, or one JSON object per line, read into :class:`PromptRecord` s.

The format (``pcpp generate --prompts FILE``):

* a line that is blank, or whose first non-blank character is ``#``, is skipped (a ``#`` later in a line is part
  of the prompt);
* a line starting with ``{`` is a JSON object with ``prompt`` (text) and optionally ``seed``, ``height``,
  ``width``, ``steps`` (integers), ``guidance`` (a number) and ``name`` (the file name without ``.png``);
* any other line is a prompt, its surrounding blanks removed.

What a line leaves out comes from :class:`RecordDefaults`; the seed defaults to ``defaults.seed + index``, where
``index`` counts the prompt lines from 0 (blank and comment lines not counted, malformed ones counted, so fixing
one does not change the others' seeds). A malformed line is skipped and reported with its line number; the other
lines are still read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .records import PromptRecord

__all__ = ["PromptFile", "RecordDefaults", "SkippedLine", "read_prompt_file"]

_FIELDS = ("prompt", "seed", "height", "width", "steps", "guidance", "name")


@dataclass(frozen=True)
class RecordDefaults:
    """What a prompt line that does not say otherwise gets (see :class:`PromptRecord` for the fields).

    ``seed`` is the first line's seed: line ``i`` (counting prompt lines from 0) gets ``seed + i``.
    """

    seed: int = 0
    height: int = 128
    width: int = 128
    steps: int = 20
    guidance: float | None = None


@dataclass(frozen=True)
class SkippedLine:
    """A malformed line: its number in the file (from 1) and why it was skipped."""

    line: int
    reason: str


@dataclass(frozen=True)
class PromptFile:
    """A prompt file as read: the records to make, the line of each, and the lines skipped.

    Attributes:
        path: the file.
        records: one per well-formed prompt line, in file order, with distinct file names.
        lines: the line number (from 1) of each record.
        skipped: the malformed lines.
    """

    path: Path
    records: tuple[PromptRecord, ...]
    lines: tuple[int, ...]
    skipped: tuple[SkippedLine, ...]


def _record(text: str, index: int, defaults: RecordDefaults) -> PromptRecord:
    """The record of one prompt line. Raises ValueError saying what is wrong with it."""
    fields: dict[str, object] = {
        "seed": defaults.seed + index,
        "height": defaults.height,
        "width": defaults.width,
        "steps": defaults.steps,
        "guidance": defaults.guidance,
    }
    if text.startswith("{"):
        try:
            given = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(given, dict):
            raise ValueError("a JSON line must be an object")
        unknown = sorted(set(given) - set(_FIELDS))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(_FIELDS)}")
        if not isinstance(given.get("prompt"), str) or not given["prompt"].strip():
            raise ValueError('a JSON line needs "prompt", a non-empty string')
        fields.update(given)
    else:
        fields["prompt"] = text
    return PromptRecord(**fields)  # type: ignore[arg-type]  # its __post_init__ checks every type and range


def read_prompt_file(
    path: str | Path,
    defaults: RecordDefaults,
    check: Callable[[PromptRecord], str | None] | None = None,
) -> PromptFile:
    """Reads a prompt file (format in this module's docstring).

    Args:
        path: the file, UTF-8 text.
        defaults: what lines leave out.
        check: more checks of a record (e.g. that the model can make its size): returns why the line is
            refused, or None.

    Returns:
        The records and the skipped lines. A line whose record would be saved under the same file name as an
        earlier line's (the same request twice, or a repeated ``name``) is skipped too.

    Raises:
        ValueError: the file cannot be read, is not UTF-8 text, or has no prompt line at all.

    Example:
        >>> read_prompt_file("prompts.txt", RecordDefaults(seed=10)).records[1].seed  # doctest: +SKIP
        11
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    records: list[PromptRecord] = []
    lines: list[int] = []
    skipped: list[SkippedLine] = []
    stems: dict[str, int] = {}
    index = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        index += 1
        try:
            record = _record(line, index - 1, defaults)
            problem = check(record) if check is not None else None
            if problem is None and record.file_stem in stems:
                problem = f"same image file as line {stems[record.file_stem]} ({record.file_stem}.png)"
        except ValueError as exc:
            problem = str(exc)
        if problem is not None:
            skipped.append(SkippedLine(number, " ".join(problem.split())))
            continue
        stems[record.file_stem] = number
        records.append(record)
        lines.append(number)
    if index == 0:
        raise ValueError(f"{path} has no prompt lines (only blank lines and # comments)")
    return PromptFile(path, tuple(records), tuple(lines), tuple(skipped))
