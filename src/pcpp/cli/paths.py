"""Checks of the paths ``pcpp generate`` writes, made before any process group or model exists."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError

__all__ = ["check_writable_file", "check_writable_folder"]


def check_writable_file(flag: str, path: Path) -> None:
    """Refuse an output file that cannot be written, without creating anything (every rank checks it at once).

    Raises:
        UsageError: it is a folder, is read-only, or its folder cannot be created or written.
    """
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name, e.g. {path / 'pcpp.png'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path} exists and is not writable")
        return
    parent = path.parent
    while not parent.exists():  # the missing folders are created when the file is written
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be created: folder {parent} is not writable")


def check_writable_folder(flag: str, path: Path) -> None:
    """Refuse an output folder that cannot be written, without creating anything (every rank checks it at once).

    Raises:
        UsageError: it is a file, is not writable, or cannot be created.
    """
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{flag} {path} is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{flag} {path} is not writable")
        return
    parent = path.parent
    while not parent.exists():  # the missing folders are created before the first image
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{flag} {path} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path} cannot be created: folder {parent} is not writable")
