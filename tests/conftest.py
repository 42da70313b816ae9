"""Shared test settings: Hypothesis profiles (derandomised in CI), the GPU marker gate, and the ``process`` marker.

A test that starts processes (gloo ranks through ``run_distributed``, ``torchrun`` or the ``pcpp`` command through
``subprocess``), itself or through a helper or fixture of its module, is marked ``process``: the quick loop
``python -m pytest -m "not process and not slow"`` runs the rest, the in-process unit tests, in seconds.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=20)
settings.register_profile("nightly", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Child processes (torchrun, the pcpp command) get one OpenMP thread each: several of them on 2 cores otherwise
# fight over the cores (a 32x32 tiny-model image took 14 s instead of 0.3 s). Gloo ranks set it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

_STARTS_PROCESSES = frozenset({"run_distributed", "subprocess", "Popen"})


def _starts_processes(fn: Callable[..., Any], module: ModuleType, depth: int = 3) -> bool:
    """Whether ``fn``, or a function of ``module`` it calls (``depth`` calls deep), names a process starter."""
    fn = inspect.unwrap(getattr(fn, "_get_wrapped_function", lambda: fn)())
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    names = set(code.co_names)
    for const in code.co_consts:  # nested functions and lambdas
        if inspect.iscode(const):
            names |= set(const.co_names)
    if names & _STARTS_PROCESSES:
        return True
    return depth > 0 and any(
        _starts_processes(helper, module, depth - 1)
        for name in names
        if callable(helper := getattr(module, name, None)) and getattr(helper, "__module__", None) == module.__name__
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        function, module = getattr(item, "function", None), getattr(item, "module", None)
        if function is not None and module is not None:
            fixtures = [getattr(module, name, None) for name in getattr(item, "fixturenames", ())]
            if any(_starts_processes(f, module) for f in [function, *fixtures] if f is not None):
                item.add_marker(pytest.mark.process)
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 CUDA GPUs, found {gpus}"))
