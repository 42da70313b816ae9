"""The patch-parallel VAE: a diffusers ``AutoencoderKL`` whose encoder and decoder run on horizontal strips.

A decode is one pass, so every exchange is synchronous (``exact``): the decoder's convolutions (upsamplers'
included) read halo rows from the neighbouring strips, its GroupNorms use whole-image statistics, and the mid-block
self-attention reads every strip's keys and values. Each rank decodes the rows of its latent strip (``r`` latent
rows become ``8r`` pixel rows) and the output rows are gathered, so every rank returns the whole image, as the
unconverted VAE. The encoder likewise, downward, with the moments gathered. ``post_quant_conv`` and
``quant_conv`` (1x1) run whole. The same layers as the UNet's are used (:mod:`pcpp.plan` decides them), each with
its own :class:`~pcpp.context.PatchContext` whose geometry doubles upward for the decoder
(:class:`~pcpp.geometry.Geometry` with negative ``levels``) and halves for the encoder.

Use it through :func:`pcpp.convert`, :func:`pcpp.revert` and :func:`pcpp.is_converted`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .audit import audit_conversion
from .comm.groups import CommLike, ParallelGroups, resolve_groups
from .config import PCPPConfig
from .context import PatchContext
from .errors import ConversionError, PCPPError
from .hooks import gather_rows
from .plan import plan_conversion, unet_levels

__all__ = ["convert_vae", "is_vae", "is_vae_converted", "revert_vae"]

logger = logging.getLogger(__name__)

_ATTR = "_pcpp_vae"

_TILING = (
    "pcpp's parallel VAE does not tile: tiles are decoded one after another and blended, which the strips replace "
    "(each rank holds about 1/N of the activations). Call vae.disable_tiling(), or decode whole (revert the VAE)."
)


def is_vae(model: Any) -> bool:
    """Whether ``model`` is a diffusers ``AutoencoderKL`` (what :func:`convert_vae` accepts)."""
    from diffusers import AutoencoderKL

    return isinstance(model, AutoencoderKL)


class _Half:
    """One converted half of the VAE (``encoder`` or ``decoder``): its context, its replaced modules, its hooks.

    The pre-hook starts a new one-step image on the input's size (a ``SplitError`` there changes nothing); the
    hook gathers the output rows at the last level so every rank returns the whole output.
    """

    def __init__(self, vae: nn.Module, name: str, config: PCPPConfig, groups: ParallelGroups) -> None:
        self.vae = vae
        self.name = name
        module: nn.Module = getattr(vae, name)
        plan = plan_conversion(module)
        audit_conversion(module, [r.name for r in plan])
        if name == "decoder":
            blocks: nn.ModuleList = module.get_submodule("up_blocks")  # type: ignore[assignment]
            stages = sum(1 for block in blocks if getattr(block, "upsamplers", None))
            self.levels, unit = -stages, 1  # strips hold whole latent rows and double at each upsampler
        else:
            self.levels = unet_levels(module)
            unit = 2**self.levels  # halved at each downsampler, as the UNet's
        self.plan = plan
        self.context = PatchContext(config, groups.patch, unit=unit, levels=self.levels)
        self.originals: list[tuple[str, nn.Module]] = []
        self.handles: list[RemovableHandle] = []

    def apply(self) -> None:
        """Swap the planned layers in and attach the hooks (cannot fail: the plan was checked)."""
        module: nn.Module = getattr(self.vae, self.name)
        for replacement in self.plan:
            original = module.get_submodule(replacement.name)
            module.set_submodule(replacement.name, replacement.build(original, self.context))
            self.originals.append((replacement.name, original))
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.register_forward_hook(self._post, with_kwargs=True),
        ]

    def remove(self) -> None:
        """Wait for anything in flight, detach the hooks and put the original modules back."""
        self.context.drain()
        for handle in self.handles:
            handle.remove()
        module: nn.Module = getattr(self.vae, self.name)
        for name, original in reversed(self.originals):
            module.set_submodule(name, original)

    # Host bookkeeping (the new image, the strip geometry, logging) and the output gather (an asynchronous
    # all-gather and a host-side wait) stay out of compiled graphs, as the UNet's hooks (pcpp.hooks): traced, each
    # is a graph break, and the geometry would be guarded on. The layers' exchanges inside the half are pcpp's
    # custom operators (pcpp.layers._ops), so a compiled decoder is one graph (tests/test_vae_compile.py).
    @torch.compiler.disable
    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if getattr(self.vae, "use_tiling", False):
            raise PCPPError(f"the VAE's {self.name} is converted by pcpp and tiling was switched on: {_TILING}")
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, Tensor) or sample.ndim != 4:
            raise PCPPError(f"a converted VAE {self.name} expects a (B, C, H, W) tensor as its sample.")
        self.context.request_reset()  # every call is one whole, synchronous pass: a new image
        self.context.begin_step(sample.shape[2], sample.shape[3], None)
        self.context.exchange.order_token(sample.device)  # made here, outside any compiled graph, as the UNet's

    @torch.compiler.disable
    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Tensor) -> Tensor:
        ctx = self.context
        try:
            if ctx.patch.world_size == 1:
                return output
            geo = ctx.geometry
            assert geo is not None
            return gather_rows(output, ctx.patch, geo.strip_rows(self.levels), ctx)
        finally:
            ctx.end_step()


@dataclass
class _VAEConversion:
    groups: ParallelGroups
    halves: list[_Half]


def convert_vae(
    vae: Any, *, comm: CommLike = None, timeout: timedelta = timedelta(minutes=5), fused_norm: bool = True
) -> Any:
    """Convert a diffusers ``AutoencoderKL`` in place so that its encoder and decoder run on strips (exact).

    Called by :func:`pcpp.convert` for a VAE; see the module docstring.

    Args:
        vae: the ``AutoencoderKL``.
        comm: who splits the image, as for :func:`pcpp.convert`; a CFG split is not used by the VAE (both CFG
            ranks decode the same latent, so only the patch group splits it).
        timeout: longest wait on a peer (see :class:`pcpp.PCPPConfig`).
        fused_norm: on CUDA, fuse GroupNorm's arithmetic (see :class:`pcpp.PCPPConfig`).

    Returns:
        ``vae`` itself.

    Raises:
        ConversionError: ``vae`` is already converted, tiling is on, or ``comm`` is unusable. Nothing is changed.
        UnsupportedModuleError: the VAE has modules that pcpp cannot split (all are listed). Nothing is changed.
    """
    if is_vae_converted(vae):
        raise ConversionError("this AutoencoderKL is already converted; call pcpp.revert(vae) first.")
    if getattr(vae, "use_tiling", False):
        raise ConversionError(f"cannot convert a tiled AutoencoderKL: {_TILING}")
    config = PCPPConfig(exact=True, timeout=timeout, fused_norm=fused_norm)
    groups = resolve_groups(comm)
    groups = ParallelGroups(patch=groups.patch)
    groups.apply_timeout(config.timeout)
    halves = [_Half(vae, name, config, groups) for name in ("encoder", "decoder") if hasattr(vae, name)]
    for half in halves:  # every plan and audit passed: nothing below can fail
        half.apply()
    setattr(vae, _ATTR, _VAEConversion(groups, halves))
    logger.info(
        "pcpp: converted %s (%s) on %d ranks, exact",
        type(vae).__name__,
        ", ".join(f"{h.name} {len(h.plan)} layers" for h in halves),
        groups.patch.world_size,
    )
    return vae


def is_vae_converted(vae: Any) -> bool:
    """Whether ``vae`` was converted by :func:`convert_vae` and not reverted."""
    return isinstance(getattr(vae, _ATTR, None), _VAEConversion)


def revert_vae(vae: Any) -> Any:
    """Undo :func:`convert_vae`: the original modules back, the hooks removed. Returns ``vae``.

    Raises:
        ConversionError: ``vae`` is not converted.
    """
    conversion = getattr(vae, _ATTR, None)
    if not isinstance(conversion, _VAEConversion):
        raise ConversionError("pcpp.revert: this AutoencoderKL is not converted; call pcpp.convert(vae) first.")
    for half in conversion.halves:
        half.remove()
    delattr(vae, _ATTR)
    return vae
