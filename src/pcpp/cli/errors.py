"""The error of ``pcpp generate``'s own checks."""

__all__ = ["UsageError"]


class UsageError(Exception):
    """An argument or input ``pcpp generate`` refuses: reported as one line, exit status 2."""
