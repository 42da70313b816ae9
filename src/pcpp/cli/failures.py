"""How ``pcpp generate`` reports a failure: one line on stderr and an exit status, a traceback only on request.

* A usage or input error (:class:`~pcpp.cli.options.UsageError`, or pcpp's :class:`~pcpp.errors.ConversionError`
  and :class:`~pcpp.errors.SplitError`) is the same on every rank: rank 0 prints one line, every rank returns 2.
* Any other failure (a peer that times out or dies, a model that fails to load) may differ between ranks: each
  failing rank prints one line naming itself and returns 1.

Under torchrun every failing rank also writes torchrun's error file (``TORCHELASTIC_ERROR_FILE``), so torchrun's
own failure report, which it prints whenever a process exits non-zero, shows that line instead of "<N/A>".
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from pcpp.errors import ConversionError, SplitError

from .options import UsageError

__all__ = ["USAGE_STATUS", "FAULT_STATUS", "report_failure"]

USAGE_STATUS = 2
FAULT_STATUS = 1

# A usage error is printed by rank 0 alone. The other ranks wait this long before they exit: torchrun stops every
# worker (SIGTERM) as soon as one exits non-zero, so a rank that exited first could kill rank 0 before it printed.
# Rank 0's exit ends the wait early (torchrun stops the others then); run without torchrun, rank 0 is alone.
_USAGE_GRACE_S = 10.0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (UsageError, ConversionError, SplitError)) else f"{type(exc).__name__}: {text}"


def _write_torchrun_error_file(line: str) -> None:
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(record, handle)
    except OSError:
        pass  # the report is a courtesy to torchrun; the line on stderr is what matters


def report_failure(exc: BaseException, *, rank: int, debug: bool, usage_wait_s: float = _USAGE_GRACE_S) -> int:
    """Prints ``exc`` as one line (and its traceback with ``debug``) and returns the exit status.

    Args:
        exc: The exception that ended the run.
        rank: This process's rank.
        debug: Also print the traceback.
        usage_wait_s: How long a rank other than 0 waits before it exits on a usage error (see ``_USAGE_GRACE_S``).

    Returns:
        2 for a usage or input error, 1 otherwise.
    """
    usage = isinstance(exc, (UsageError, ConversionError, SplitError))
    line = _one_line(exc)
    if usage:
        line = f"pcpp generate: error: {line}"
    else:
        line = f"pcpp generate: rank {rank}: {line}" + ("" if debug else " (rerun with --debug for the traceback)")
    if not usage or rank == 0:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    if usage and rank != 0:
        # Before the error file too: torchrun names as root cause the failure with the earliest error-file time.
        time.sleep(usage_wait_s)
    _write_torchrun_error_file(line)
    return USAGE_STATUS if usage else FAULT_STATUS
