"""Exceptions raised by pcpp.

Every error names the offending value, what was expected, and how to fix it. They all derive from
:class:`PCPPError` so callers can catch pcpp's own failures without catching unrelated ones.
"""

from __future__ import annotations

__all__ = [
    "ConversionError",
    "PCPPError",
    "PeerFailedError",
    "PeerTimeoutError",
    "RanksDisagreeError",
    "SplitError",
    "UnsupportedModuleError",
]


class PCPPError(Exception):
    """Base class of every exception pcpp raises on purpose."""


class ConversionError(PCPPError, ValueError):
    """The model or the arguments of :func:`pcpp.convert` cannot be used; nothing was changed."""


class UnsupportedModuleError(ConversionError):
    """The model contains a module that mixes rows and that pcpp does not know how to split."""


class SplitError(PCPPError, ValueError):
    """The input cannot be cut into one horizontal strip per rank."""


class PeerTimeoutError(PCPPError, TimeoutError):
    """A peer did not answer within the configured timeout (it crashed, hangs, or made a different call)."""


class RanksDisagreeError(PCPPError, ValueError):
    """The ranks of one image were called with different inputs or settings (seed, prompt, size, steps, config)."""


class PeerFailedError(PCPPError, ConnectionError):
    """An exchange with a peer failed before the timeout: the peer died, left the group, or sent data of another
    size (it made a different sequence of UNet calls)."""
