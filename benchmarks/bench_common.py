"""The bench's torch-only shared module (``src/pcpp/bench/common.py``), loaded by its path in the repository.

The DistriFusion runner runs beside diffusers 0.24 and cannot import pcpp (its ``__init__`` imports the
diffusers 0.42 API), so it loads that one file, which imports only the standard library and torch, without the
package around it. For type checkers it is the module ``pcpp.bench.common`` itself.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["COMMON_PATH", "DEFAULT_CONFIG", "common"]

COMMON_PATH = Path(__file__).resolve().parents[1] / "src" / "pcpp" / "bench" / "common.py"

DEFAULT_CONFIG = COMMON_PATH.parent / "configs" / "sdxl-base-unet.json"
"""SDXL-base's UNet config: the copy that ships with pcpp's bench (``pcpp.bench.arguments.DEFAULT_CONFIG``)."""

_NAME = "pcpp_bench_common"


def load_common(path: Path = COMMON_PATH) -> ModuleType:
    """Load ``path`` as the module ``pcpp_bench_common`` (once per process).

    Raises:
        FileNotFoundError: the repository does not have the file where this runner expects it.
    """
    if _NAME in sys.modules:
        return sys.modules[_NAME]
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the benchmarks from a checkout of the pcpp repository")
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path} as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_NAME] = module  # dataclasses look their module up in sys.modules while the file executes
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_NAME]
        raise
    return module


if TYPE_CHECKING:
    from pcpp.bench import common
else:
    common = load_common()
