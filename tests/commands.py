"""What the tests that start real commands (torchrun, ``python -m pcpp``, Lightning scripts) share."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or MASTER_PORT)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def command_env(**extra: str) -> dict[str, str]:
    """The environment of a command under test: this checkout's ``src`` first on ``PYTHONPATH``, one OpenMP thread
    per process (several processes on few cores would otherwise fight for them), gloo on loopback only; ``extra``
    on top."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def pixels(path: Path) -> np.ndarray:
    """The RGB pixels of an image file, ``(H, W, 3)`` uint8."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
