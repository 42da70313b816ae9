"""The bench's torch-only shared modules (``src/pcpp/bench/common.py`` and ``fidelity.py``), loaded by their paths
in the repository.

The DistriFusion runner runs beside diffusers 0.24 and cannot import pcpp (its ``__init__`` imports the
diffusers 0.42 API), so it loads those two files, which import only the standard library and torch, without the
package around them. For type checkers they are the modules ``pcpp.bench.common`` and ``pcpp.bench.fidelity``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["COMMON_PATH", "DEFAULT_CONFIG", "FIDELITY_PATH", "common", "fidelity"]

COMMON_PATH = Path(__file__).resolve().parents[1] / "src" / "pcpp" / "bench" / "common.py"
FIDELITY_PATH = COMMON_PATH.parent / "fidelity.py"

DEFAULT_CONFIG = COMMON_PATH.parent / "configs" / "sdxl-base-unet.json"
"""SDXL-base's UNet config: the copy that ships with pcpp's bench (``pcpp.bench.arguments.DEFAULT_CONFIG``)."""


def load_file(path: Path, name: str) -> ModuleType:
    """Load ``path`` as the module ``name`` (once per process).

    Raises:
        FileNotFoundError: the repository does not have the file where this runner expects it.
    """
    if name in sys.modules:
        return sys.modules[name]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the benchmarks from a checkout of the pcpp repository")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up in sys.modules while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


if TYPE_CHECKING:
    from pcpp.bench import common, fidelity
else:
    common = load_file(COMMON_PATH, "pcpp_bench_common")
    fidelity = load_file(FIDELITY_PATH, "pcpp_bench_fidelity")
