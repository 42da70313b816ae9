"""``python -m pcpp.bench``: the benchmark under ``torchrun``, ending with ``os._exit``."""

from __future__ import annotations

from .command import main
from .common import exit_process

if __name__ == "__main__":
    exit_process(main())
