"""Communicators: how pcpp's layers reach the ranks that own the other strips."""

from .base import Handle, Message, PatchCommunicator
from .groups import ParallelGroups, resolve_groups
from .local import LocalCommunicator
from .torch_dist import TorchCommunicator

__all__ = [
    "Handle",
    "LocalCommunicator",
    "Message",
    "ParallelGroups",
    "PatchCommunicator",
    "TorchCommunicator",
    "resolve_groups",
]
