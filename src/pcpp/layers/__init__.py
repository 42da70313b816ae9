"""Parallel layers: each subclasses the module it replaces, shares its parameters, and takes a context."""

from .added_kv import AddedKVAttention
from .attention import PartialPatchAttention
from .conv import PartialPatchConv2d
from .groupnorm import AsyncGroupNorm

__all__ = ["AddedKVAttention", "AsyncGroupNorm", "PartialPatchAttention", "PartialPatchConv2d"]
