"""pcpp's command line: ``pcpp generate`` (one image over a torchrun job, compared with one device).

Modules: :mod:`~pcpp.cli.options` (arguments and every check made before a model loads), :mod:`~pcpp.cli.sizes`
(which sizes a model splits at, from its config files), :mod:`~pcpp.cli.generate` (the run) and
:mod:`~pcpp.cli.failures` (one line and an exit status per failure).
"""

from .generate import generate_main
from .options import UsageError, build_parser

__all__ = ["UsageError", "build_parser", "generate_main"]
