"""One run of the benchmark: its arguments, layout, model and denoisers, as every mode's runner receives them."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from .common import DTYPES
from .denoisers import Denoisers
from .layout import Layout
from .model import Model

__all__ = ["Session"]


@dataclass(frozen=True)
class Session:
    """What the single, floor and pcpp runners share.

    Attributes:
        args: the parsed command line (:func:`pcpp.bench.arguments.parse_args`).
        layout: this rank and the mesh.
        model: the UNet, identical on every rank.
        denoisers: the denoisers made and not yet released.
    """

    args: argparse.Namespace
    layout: Layout
    model: Model
    denoisers: Denoisers

    @property
    def device(self) -> torch.device:
        """This rank's device."""
        return self.layout.device

    @property
    def dtype(self) -> torch.dtype:
        """Weights and activations."""
        return DTYPES[self.args.dtype]
