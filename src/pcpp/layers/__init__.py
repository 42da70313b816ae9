"""Parallel layers: each subclasses the module it replaces, shares its parameters, and takes a context."""

from .attention import PartialPatchAttention
from .conv import PartialPatchConv2d
from .groupnorm import AsyncGroupNorm

__all__ = ["AsyncGroupNorm", "PartialPatchAttention", "PartialPatchConv2d"]
