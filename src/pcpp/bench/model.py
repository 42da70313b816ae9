"""The benchmarked UNet and its scheduler, built with this environment's diffusers."""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import common

__all__ = ["Model", "build_unet", "load_model", "make_scheduler"]

LOG = logging.getLogger(__name__)


def build_unet(
    config: dict[str, Any], seed: int, device: torch.device, dtype: torch.dtype, on_device: bool
) -> nn.Module:
    """Seeded random weights with diffusers' default initialisation in fp32, cast to ``dtype``, in eval mode.

    Example:
        >>> from pcpp.testing import tiny_unet_config  # doctest: +SKIP
        >>> unet = build_unet(tiny_unet_config("sdxl"), 0, torch.device("cpu"), torch.float32, False)  # doctest: +SKIP
    """
    from diffusers import UNet2DConditionModel

    return common.build_unet(UNet2DConditionModel, config, seed, device, dtype, on_device)


def make_scheduler() -> Any:
    """DDIM with SDXL-base's scheduler settings, as the DistriFusion runner uses."""
    from diffusers import DDIMScheduler

    return common.make_scheduler(DDIMScheduler)


@dataclass(frozen=True)
class Model:
    """The UNet every mode runs, identical on every rank.

    Attributes:
        config: its diffusers config.
        unet: the UNet (converted and reverted in place by the pcpp modes).
        levels: its downsampling levels (:func:`pcpp.plan.unet_levels`).
        parameters: its parameter count.
        build_s: seconds spent building (and loading) it.
    """

    config: dict[str, Any]
    unet: nn.Module
    levels: int
    parameters: int
    build_s: float

    @property
    def unit(self) -> int:
        """Latent rows and columns that every strip's size must be a multiple of (``2 ** levels``)."""
        return int(2**self.levels)


def load_model(args: argparse.Namespace, device: torch.device) -> Model:
    """Build the UNet as the command line says (``--config``, ``--seed``, ``--weights``, ``--fuse-qkv``, ...).

    Raises:
        RuntimeError: the ranks built different weights.
    """
    config = common.load_unet_config(args.config)
    tick = time.perf_counter()
    unet = build_unet(config, args.seed, device, common.DTYPES[args.dtype], args.init_device == "device")
    if args.weights is not None:
        # e.g. the weights DistriFusion's runner drew (its --save-weights), so fidelity numbers pair up.
        state = torch.load(args.weights, map_location=device, weights_only=True)
        unet.load_state_dict(state, strict=True)
        del state
    if args.fuse_qkv:
        # Before anything is timed or converted, so that every path (and the fidelity reference) uses it.
        unet.fuse_qkv_projections()  # type: ignore[operator]  # diffusers' UNet method, nn.Module typed
    build_s = time.perf_counter() - tick
    common.check_same_weights(unet, device, "device")
    from pcpp.plan import unet_levels

    levels = unet_levels(unet)
    n_params = sum(p.numel() for p in unet.parameters())
    LOG.info("UNet built in %.1f s: %.3fe9 parameters, %s, levels %d", build_s, n_params / 1e9, args.dtype, levels)
    return Model(config=config, unet=unet, levels=levels, parameters=n_params, build_s=build_s)
