"""Communicators: how pcpp's layers reach the ranks that own the other strips."""

from .base import Handle, PatchCommunicator
from .groups import ParallelGroups, resolve_groups
from .local import LocalCommunicator
from .torch_dist import TorchCommunicator

__all__ = [
    "Handle",
    "LocalCommunicator",
    "ParallelGroups",
    "PatchCommunicator",
    "TorchCommunicator",
    "resolve_groups",
]
