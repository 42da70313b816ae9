"""The public verbs: convert, revert, reset, configure, is_converted, get_context."""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from torch import nn

from .audit import audit_conversion
from .comm.groups import CommLike, ParallelGroups, resolve_groups
from .config import Conditioning, PCPPConfig
from .context import PatchContext
from .controlnet import (
    ControlNetConversion,
    controlnet_conversion,
    convert_controlnet,
    is_controlnet,
    revert_controlnet,
)
from .errors import ConversionError
from .hooks import UNetHooks
from .layers import AsyncGroupNorm, PartialPatchAttention, PartialPatchConv2d
from .plan import plan_conversion, unet_levels
from .stats import CommStats
from .vae import convert_vae, is_vae, is_vae_converted, revert_vae

__all__ = ["comm_stats", "configure", "convert", "get_context", "is_converted", "reset", "revert"]

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=nn.Module)

_ATTR = "_pcpp_conversion"


@dataclass
class _Conversion:
    context: PatchContext
    groups: ParallelGroups
    hooks: UNetHooks
    originals: list[tuple[str, nn.Module]]

    @property
    def contexts(self) -> tuple[PatchContext, ...]:
        """Every context of the conversion (one for a UNet)."""
        return (self.context,)


def _supported_unet_types() -> tuple[type, ...]:
    from diffusers import UNet2DConditionModel, UNet2DModel

    return (UNet2DConditionModel, UNet2DModel)


def _convert_vae(vae: M, comm: CommLike, timeout: timedelta, fused_norm: bool, given: dict[str, Any]) -> M:
    """:func:`convert` for an ``AutoencoderKL``: exact, so the step-schedule options are refused if changed."""
    defaults = {name: p.default for name, p in inspect.signature(convert).parameters.items()}
    changed = sorted(name for name in _STEP_OPTIONS if given[name] != defaults[name])
    if changed:
        raise ConversionError(
            f"pcpp.convert: {', '.join(changed)} do(es) not apply to a VAE: a decode is one pass, so every exchange "
            "is synchronous (exact); pass only comm, timeout and fused_norm."
        )
    return convert_vae(vae, comm=comm, timeout=timeout, fused_norm=fused_norm)


# exact is forced for a VAE (passing either value is fine); convert's options that schedule the denoising steps
# (asynchronous exchanges) mean nothing for a one-pass VAE.
_STEP_OPTIONS = ("partial", "warmup_steps", "conditioning", "detect_new_image", "exchange_batch")


def convert(
    unet: M,
    *,
    comm: CommLike = None,
    partial: float = 0.3,
    warmup_steps: int = 4,
    conditioning: Conditioning = Conditioning.PARTIAL,
    exact: bool = False,
    timeout: timedelta = timedelta(minutes=5),
    detect_new_image: bool = True,
    fused_norm: bool = True,
    exchange_batch: int = 1,
) -> M:
    """Convert a diffusers UNet in place to Partially Conditioned Patch Parallelism, and return it.

    Every rank of the patch group must call this on an identical UNet and then call the UNet with identical
    inputs; each rank computes one horizontal strip of the latent and returns the full output, exactly like the
    unconverted UNet. Every module that mixes rows is replaced by a parallel layer that shares its parameters
    (3x3 and strided convs by :class:`~pcpp.layers.PartialPatchConv2d`, GroupNorms by
    :class:`~pcpp.layers.AsyncGroupNorm`, self-attention by :class:`~pcpp.layers.PartialPatchAttention`), so
    state-dict keys do not change. Cross-attention stays local.

    Args:
        unet: a ``UNet2DConditionModel`` (SD 1.x, 2.x, SDXL and fine-tunes) or ``UNet2DModel``; or a
            ``ControlNetModel`` (SD or SDXL), which then runs on this rank's strip of the latent and of the control
            image and returns this rank's rows of its residuals, for the converted UNet (see
            :mod:`pcpp.controlnet`: pass the UNet's options and ``comm``; only the patch group is used); or an
            ``AutoencoderKL``, whose encoder and decoder then run on strips, always exact (see :mod:`pcpp.vae`:
            only ``comm``, ``timeout`` and ``fused_norm`` apply; ``partial``, ``warmup_steps``, ``conditioning``,
            ``detect_new_image`` and ``exchange_batch`` are refused if changed).
        comm: who splits the image. ``None``: the default process group. A ``ProcessGroup``; a ``DeviceMesh``, 1-D
            (patch ranks) or 2-D with dimensions ``("cfg", "patch")`` to also split the classifier-free-guidance
            batch in halves; a :class:`pcpp.comm.PatchCommunicator`; or :class:`pcpp.comm.ParallelGroups`.
        partial: share of each adjacent strip's rows that self-attention reads after warmup, in ``[0, 1]``.
        warmup_steps: synchronous steps at the start of each image (see :class:`pcpp.PCPPConfig`).
        conditioning: ``Conditioning.PARTIAL`` (PCPP) or ``Conditioning.FULL`` (DistriFusion's attention).
        exact: synchronous every step: reproduces the single-device UNet up to float rounding.
        timeout: longest wait on a peer before :class:`pcpp.PeerTimeoutError` (host-side waits; see
            :class:`pcpp.PCPPConfig`).
        detect_new_image: start a new image when the timestep goes up between calls.
        fused_norm: on CUDA, fuse GroupNorm's arithmetic into Triton kernels (see :class:`pcpp.PCPPConfig`).
        exchange_batch: layers whose asynchronous exchanges are posted together (see :class:`pcpp.PCPPConfig`).

    Returns:
        ``unet`` itself, converted.

    Raises:
        ConversionError: a setting is out of range, ``unet`` is not a supported model or is already converted,
            or ``comm`` does not describe a usable layout. Nothing is changed.
        UnsupportedModuleError: ``unet`` contains row-mixing modules pcpp cannot split (all are listed).

    Example:
        >>> import torch.distributed as dist, pcpp  # doctest: +SKIP
        >>> dist.init_process_group("nccl")  # doctest: +SKIP
        >>> unet = pcpp.convert(pipe.unet, partial=0.3, warmup_steps=4)  # doctest: +SKIP
        >>> image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]  # doctest: +SKIP
    """
    if is_vae(unet):
        return _convert_vae(unet, comm, timeout, fused_norm, locals())
    config = PCPPConfig(
        partial=partial,
        warmup_steps=warmup_steps,
        conditioning=conditioning,
        exact=exact,
        timeout=timeout,
        detect_new_image=detect_new_image,
        fused_norm=fused_norm,
        exchange_batch=exchange_batch,
    )
    if is_controlnet(unet):
        return convert_controlnet(unet, config=config, comm=comm)
    supported = _supported_unet_types()
    if not isinstance(unet, supported):
        raise ConversionError(
            f"pcpp.convert expects a diffusers UNet ({', '.join(t.__name__ for t in supported)}), ControlNetModel or "
            f"AutoencoderKL, got {type(unet).__name__}; pass the pipeline's UNet, e.g. pcpp.convert(pipe.unet)."
        )
    if is_converted(unet):
        raise ConversionError(
            f"this {type(unet).__name__} is already converted; call pcpp.configure(unet, ...) to change settings, "
            "or pcpp.revert(unet) first to convert it again with another communicator."
        )
    plan = plan_conversion(unet)
    audit_conversion(unet, [r.name for r in plan])  # refuse a plan that would give a wrong image, before any change
    groups = resolve_groups(comm)
    groups.apply_timeout(config.timeout)
    levels = unet_levels(unet)
    context = PatchContext(config, groups.patch, unit=2**levels, levels=levels)
    originals: list[tuple[str, nn.Module]] = []
    for replacement in plan:
        original = unet.get_submodule(replacement.name)
        unet.set_submodule(replacement.name, replacement.build(original, context))
        originals.append((replacement.name, original))
    hooks = UNetHooks(unet, context, groups)
    setattr(unet, _ATTR, _Conversion(context, groups, hooks, originals))
    counts = {
        kind.__name__: sum(isinstance(m, kind) for m in unet.modules())
        for kind in (PartialPatchConv2d, PartialPatchAttention, AsyncGroupNorm)
    }
    logger.info(
        "pcpp: converted %s (%s); patch=%d, cfg split=%s, partial=%s, warmup_steps=%d, conditioning=%s%s",
        type(unet).__name__,
        ", ".join(f"{n} {c}" for n, c in counts.items()),
        groups.patch.world_size,
        groups.cfg_split,
        config.partial,
        config.warmup_steps,
        config.conditioning.name,
        ", exact" if config.exact else "",
    )
    return unet


def _conversion(unet: nn.Module, verb: str) -> _Conversion | ControlNetConversion:
    conversion = getattr(unet, _ATTR, None) or controlnet_conversion(unet)
    if not isinstance(conversion, (_Conversion, ControlNetConversion)):
        raise ConversionError(
            f"pcpp.{verb}: this {type(unet).__name__} is not converted; call pcpp.convert(unet, ...) first."
        )
    return conversion


def is_converted(module: nn.Module) -> bool:
    """Whether ``module`` was converted by :func:`convert` and not reverted.

    Example:
        >>> import torch, pcpp
        >>> pcpp.is_converted(torch.nn.Linear(1, 1))
        False
    """
    return (
        isinstance(getattr(module, _ATTR, None), _Conversion)
        or controlnet_conversion(module) is not None
        or is_vae_converted(module)
    )


def get_context(unet: nn.Module) -> PatchContext:
    """The shared context of a converted UNet: ``config``, ``image``, ``step``, ``phase``, ``geometry``, ``stats``.

    For a converted ControlNet: the context of its body (its conditioning embedding has a second one at pixel
    scale, which follows the body's clock; see :mod:`pcpp.controlnet`).

    Raises:
        ConversionError: ``unet`` is not converted.
    """
    return _conversion(unet, "get_context").context


def comm_stats(unet: nn.Module) -> CommStats:
    """Bytes sent and received by this rank, per step and layer kind (see :class:`pcpp.stats.CommStats`).

    For a converted ControlNet, those of its body (not of its conditioning embedding's halo rows).

    Raises:
        ConversionError: ``unet`` is not converted.
    """
    return _conversion(unet, "comm_stats").context.stats


def reset(unet: nn.Module) -> None:
    """Make the next call of ``unet`` start a new image: synchronous warmup again, nothing kept from before.

    A new image is also detected on its own when the timestep goes up (``detect_new_image``).

    Raises:
        ConversionError: ``unet`` is not converted.
    """
    for context in _conversion(unet, "reset").contexts:
        context.request_reset()


def configure(unet: nn.Module, **changes: Any) -> PCPPConfig:
    """Change settings of a converted UNet between images (``partial``, ``warmup_steps``, ``conditioning``, ...).

    The new settings are validated first; the next call starts a new image with them.

    Args:
        unet: a converted UNet.
        **changes: fields of :class:`pcpp.PCPPConfig`.

    Returns:
        The new configuration.

    Raises:
        ConversionError: ``unet`` is not converted, a field is unknown, or a value is invalid (nothing changed).

    Example:
        >>> pcpp.configure(unet, partial=0.5)  # doctest: +SKIP
    """
    conversion = _conversion(unet, "configure")
    known = {f.name for f in dataclasses.fields(PCPPConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ConversionError(f"pcpp.configure: unknown setting(s) {unknown}; known: {sorted(known)}.")
    config = dataclasses.replace(conversion.context.config, **changes)
    for context in conversion.contexts:
        context.reconfigure(config)
    conversion.groups.apply_timeout(config.timeout)
    return config


def revert(unet: M) -> M:
    """Undo :func:`convert` (of a UNet, a ControlNet or a VAE; or :func:`pcpp.parallelize` for a pipeline): put
    the original modules back and remove the hooks. Returns ``unet`` (or the pipeline).

    Waits for any exchange still in flight first.

    Raises:
        ConversionError: ``unet`` is not converted.
    """
    from .pipeline import is_parallelized, revert_pipeline  # lazily: pcpp.pipeline imports this module

    if is_parallelized(unet):
        return revert_pipeline(unet)
    if is_vae(unet):
        return revert_vae(unet)
    if is_controlnet(unet):
        return revert_controlnet(unet)
    conversion = _conversion(unet, "revert")
    assert isinstance(conversion, _Conversion)
    conversion.context.drain()
    conversion.hooks.remove()
    for name, original in reversed(conversion.originals):
        unet.set_submodule(name, original)
    delattr(unet, _ATTR)
    return unet
