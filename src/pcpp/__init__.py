"""pcpp: Partially Conditioned Patch Parallelism for diffusers UNets.

One image, several GPUs: each rank computes one horizontal strip of the latent with the whole UNet, using its
neighbours' activations from the previous step where a layer reads across the strip boundary.

Example:
    >>> import pcpp  # doctest: +SKIP
    >>> unet = pcpp.convert(pipe.unet, partial=0.3, warmup_steps=4)  # doctest: +SKIP
"""

import logging

from . import comm, layers
from ._version import __version__
from .agreement import check_ranks_agree
from .api import comm_stats, configure, convert, get_context, is_converted, reset, revert
from .config import Conditioning, PCPPConfig, Phase
from .context import PatchContext
from .errors import (
    ConversionError,
    PCPPError,
    PeerFailedError,
    PeerTimeoutError,
    RanksDisagreeError,
    SplitError,
    UnsupportedModuleError,
)
from .pipeline import OutputPlacement, VAEPlacement, parallelize
from .stats import CommStats, LayerKind

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CommStats",
    "Conditioning",
    "ConversionError",
    "LayerKind",
    "OutputPlacement",
    "PCPPConfig",
    "PCPPError",
    "PatchContext",
    "PeerFailedError",
    "PeerTimeoutError",
    "Phase",
    "RanksDisagreeError",
    "SplitError",
    "UnsupportedModuleError",
    "VAEPlacement",
    "__version__",
    "check_ranks_agree",
    "comm",
    "comm_stats",
    "configure",
    "convert",
    "get_context",
    "is_converted",
    "layers",
    "parallelize",
    "reset",
    "revert",
]
