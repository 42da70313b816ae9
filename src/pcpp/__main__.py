"""``python -m pcpp`` / ``pcpp``: the command line (``generate``, ``bench``)."""

from __future__ import annotations

import sys

__all__ = ["main"]

_USAGE = """usage: pcpp {generate,bench} [options]

  generate   one image over every process of a torchrun job, compared with one device
  bench      latency, fidelity, traffic and memory against one GPU and DistriFusion's floor

Run `pcpp COMMAND --help` for the options of each."""


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand.

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` if None).

    Returns:
        The exit status.
    """
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        sys.stdout.write(_USAGE + "\n")
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "generate":
        from .cli import generate_main

        return generate_main(rest)
    if command == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    sys.stderr.write(f"pcpp: unknown command {command!r}\n{_USAGE}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
