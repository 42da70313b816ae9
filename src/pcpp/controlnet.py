"""The patch-parallel ControlNet: a diffusers ``ControlNetModel`` run on this rank's strip, as the UNet is.

A ControlNet is a copy of the UNet's down path plus a small conditioning embedding that brings the control image
(``controlnet_cond``, at pixel resolution) down to latent resolution. Converted, each rank runs it on its strip of
the latent and on the matching strip of the control image, and returns *its own rows* of every residual; the
converted UNet keeps residuals that already are its rows (:mod:`pcpp.hooks`), so nothing runs twice and nothing is
gathered. Unconverted, every rank would run the whole ControlNet and keep 1/N of its output.

* The body (``conv_in``, down blocks, mid block) is converted with the UNet's layers and plan, in its own
  :class:`~pcpp.context.PatchContext` with the same settings as the UNet: synchronous warmup, then asynchronous
  PCPP exchanges (or ``exact``). Its strips must be the UNet's: same number of stride-2 stages, so the same unit
  (:func:`pcpp.parallelize` checks it).
* The conditioning embedding (``controlnet_cond_embedding``: 3x3 convs, ``k`` of them stride 2) has a second
  context at pixel scale: strips of ``2**k`` times the latent strip's rows (unit ``2**k`` times the body's), with
  ``k`` halving levels down to latent scale. Its ``conv_in`` is an entry conv that cuts this rank's pixel rows (and
  halo rows) from the whole control image. It follows the body's clock: a new image of the body is a new image of
  the embedding. In asynchronous steps its convs read the previous step's halo rows; the control image is the
  same at every step of an image, so those equal this step's (``exact`` is exact regardless: every step syncs).
* CFG: the ControlNet runs on the patch group only. Each rank of a ``("cfg", "patch")`` mesh runs its strip for
  the whole batch it is given (diffusers passes the full CFG batch, or in guess mode the conditional half and pads
  zeros); the UNet's CFG split then halves the residual batch as for any other input.
* The forward pre-hook checks that ``controlnet_cond`` is ``2**k`` times the latent in height and width (else a
  :class:`~pcpp.errors.PCPPError`, before any state changes) and compares the ranks' inputs at the start of an
  image (:func:`pcpp.agreement.check_ranks_agree`); the post-hook gathers nothing.
* Refused: ``global_pool_conditions`` (its residuals are whole-image means), and any module the UNet's plan
  cannot split.

Use it through :func:`pcpp.convert`, :func:`pcpp.revert`, :func:`pcpp.reset`, :func:`pcpp.configure` and
:func:`pcpp.is_converted`; :func:`pcpp.parallelize` converts a pipeline's ControlNet(s) with its UNet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .audit import audit_conversion
from .comm.groups import CommLike, ParallelGroups, resolve_groups
from .config import PCPPConfig
from .context import PatchContext
from .errors import ConversionError, PCPPError
from .hooks import UNetHooks
from .plan import Replacement, plan_conversion, unet_levels

__all__ = [
    "ControlNetConversion",
    "controlnet_conversion",
    "controlnet_nets",
    "convert_controlnet",
    "embedding_factor",
    "is_controlnet",
    "revert_controlnet",
]

logger = logging.getLogger(__name__)

_ATTR = "_pcpp_controlnet"
_EMBEDDING = "controlnet_cond_embedding"


def is_controlnet(model: Any) -> bool:
    """Whether ``model`` is a diffusers ``ControlNetModel`` (exactly: a subclass may run differently)."""
    from diffusers import ControlNetModel

    return type(model) is ControlNetModel


def controlnet_nets(controlnet: Any) -> list[Any]:
    """The ControlNets inside a pipeline's ``controlnet`` component: one, a ``MultiControlNetModel``'s ``nets``,
    or a list or tuple of them; ``[]`` for ``None``.

    Example:
        >>> controlnet_nets(None)
        []
    """
    if controlnet is None:
        return []
    if isinstance(controlnet, (list, tuple)):
        return list(controlnet)
    nets = getattr(controlnet, "nets", None)
    return list(nets) if isinstance(nets, nn.ModuleList) else [controlnet]


def embedding_factor(controlnet: nn.Module) -> int:
    """How many pixel rows the conditioning embedding turns into one latent row: ``2**k`` for ``k`` stride-2 convs.

    Raises:
        ConversionError: the embedding is missing, or has a conv whose stride is neither 1 nor 2.
    """
    embedding = getattr(controlnet, _EMBEDDING, None)
    if not isinstance(embedding, nn.Module):
        raise ConversionError(f"{type(controlnet).__name__} has no {_EMBEDDING}; pcpp converts ControlNetModel.")
    factor = 1
    for name, module in embedding.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.stride not in ((1, 1), (2, 2)):
                raise ConversionError(
                    f"{_EMBEDDING}.{name} (Conv2d) has stride {module.stride}; pcpp splits conditioning embeddings "
                    "whose convs have stride 1 or 2."
                )
            factor *= module.stride[0]
    return factor


class _ControlNetHooks(UNetHooks):
    """The UNet's pre-hook (clock, agreement check, no CFG split) plus the control image's checks and clock; a
    post-hook that closes both steps and returns this rank's rows."""

    def __init__(
        self, controlnet: nn.Module, context: PatchContext, embedding: PatchContext, groups: ParallelGroups, factor: int
    ) -> None:
        self.embedding = embedding
        self.factor = factor
        super().__init__(controlnet, context, groups)

    @torch.compiler.disable
    def _pre(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[()], dict[str, Any]]:
        arguments = self.bind(args, kwargs)
        sample, cond = arguments.get("sample"), arguments.get("controlnet_cond")
        if isinstance(sample, Tensor) and sample.ndim == 4:  # else the UNet's check below names the problem
            want = (self.factor * sample.shape[2], self.factor * sample.shape[3])
            if not isinstance(cond, Tensor) or cond.ndim != 4 or tuple(cond.shape[2:]) != want:
                got = tuple(cond.shape) if isinstance(cond, Tensor) else type(cond).__name__
                raise PCPPError(
                    f"this converted {type(module).__name__} needs controlnet_cond of {want[0]}x{want[1]} pixels "
                    f"({self.factor} x the {sample.shape[2]}x{sample.shape[3]} latent, as its {_EMBEDDING} brings "
                    f"it down {self.factor}x), got {got}; nothing was run. Resize the control image to the latent "
                    "size times the factor (diffusers' pipelines do)."
                )
        result = super()._pre(module, args, kwargs)
        assert isinstance(cond, Tensor)
        if self.context.step == 0:  # the body started an image: so does the embedding
            self.embedding.request_reset()
        self.embedding.begin_step(cond.shape[2], cond.shape[3], None)
        self.embedding.exchange.order_token(cond.device)
        return result

    @torch.compiler.disable
    def _post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        try:
            self.embedding.end_step()
        finally:
            self.context.end_step()
        return output  # this rank's rows of every residual: the converted UNet keeps them as they are


@dataclass
class ControlNetConversion:
    """What :func:`convert_controlnet` changed on one ControlNet.

    Attributes:
        context: the body's context (what :func:`pcpp.get_context` returns).
        embedding: the conditioning embedding's context, at pixel scale.
        groups: the patch group (no CFG split).
        hooks: the forward hooks.
        originals: ``(qualified name, original module)`` of every replaced module.
    """

    context: PatchContext
    embedding: PatchContext
    groups: ParallelGroups
    hooks: _ControlNetHooks
    originals: list[tuple[str, nn.Module]]

    @property
    def contexts(self) -> tuple[PatchContext, ...]:
        """Both contexts, body first."""
        return (self.context, self.embedding)


def _plans(controlnet: nn.Module) -> tuple[list[Replacement], list[Replacement]]:
    """The body's and the embedding's replacements (names qualified from ``controlnet``), audited together."""
    body = [r for r in plan_conversion(controlnet) if not r.name.startswith(_EMBEDDING + ".")]
    embedding = [
        Replacement(f"{_EMBEDDING}.{r.name}", r.build) for r in plan_conversion(controlnet.get_submodule(_EMBEDDING))
    ]
    audit_conversion(controlnet, [r.name for r in body + embedding])
    return body, embedding


def convert_controlnet(controlnet: Any, *, config: PCPPConfig, comm: CommLike = None) -> Any:
    """Convert a diffusers ``ControlNetModel`` in place so that each rank runs it on its strip (see the module
    docstring). Called by :func:`pcpp.convert` for a ControlNet.

    Args:
        controlnet: the ``ControlNetModel`` (SD or SDXL).
        config: the settings, normally the UNet's (the same step phases).
        comm: who splits the image, as for :func:`pcpp.convert`; only its patch group is used.

    Returns:
        ``controlnet`` itself.

    Raises:
        ConversionError: already converted, ``global_pool_conditions`` is on, the embedding cannot be split, or
            ``comm`` is unusable. Nothing is changed.
        UnsupportedModuleError: modules pcpp cannot split (all are listed). Nothing is changed.
    """
    if controlnet_conversion(controlnet) is not None:
        raise ConversionError("this ControlNetModel is already converted; call pcpp.revert(controlnet) first.")
    if getattr(controlnet.config, "global_pool_conditions", False):
        raise ConversionError(
            "cannot convert a ControlNetModel with global_pool_conditions=True: its residuals are means over the "
            "whole image, which a strip does not have; leave this ControlNet unconverted."
        )
    factor = embedding_factor(controlnet)
    body_plan, embedding_plan = _plans(controlnet)
    groups = ParallelGroups(patch=resolve_groups(comm).patch)
    groups.apply_timeout(config.timeout)
    levels = unet_levels(controlnet)
    context = PatchContext(config, groups.patch, unit=2**levels, levels=levels)
    # Pixel strips are `factor` times the latent strips: the same number of units, each `factor` times taller.
    embedding = PatchContext(config, groups.patch, unit=factor * 2**levels, levels=factor.bit_length() - 1)
    originals: list[tuple[str, nn.Module]] = []
    for plan, ctx in ((body_plan, context), (embedding_plan, embedding)):  # planned and audited: cannot fail
        for replacement in plan:
            original = controlnet.get_submodule(replacement.name)
            controlnet.set_submodule(replacement.name, replacement.build(original, ctx))
            originals.append((replacement.name, original))
    hooks = _ControlNetHooks(controlnet, context, embedding, groups, factor)
    setattr(controlnet, _ATTR, ControlNetConversion(context, embedding, groups, hooks, originals))
    logger.info(
        "pcpp: converted ControlNetModel (%d body and %d embedding layers, embedding factor %d); patch=%d%s",
        len(body_plan),
        len(embedding_plan),
        factor,
        groups.patch.world_size,
        ", exact" if config.exact else "",
    )
    return controlnet


def controlnet_conversion(model: Any) -> ControlNetConversion | None:
    """The conversion record of a ControlNet converted by :func:`convert_controlnet`, else ``None``."""
    conversion = getattr(model, _ATTR, None)
    return conversion if isinstance(conversion, ControlNetConversion) else None


def revert_controlnet(controlnet: Any) -> Any:
    """Undo :func:`convert_controlnet`: wait for exchanges in flight, remove the hooks, put the originals back.

    Raises:
        ConversionError: ``controlnet`` is not converted.
    """
    conversion = controlnet_conversion(controlnet)
    if conversion is None:
        raise ConversionError("pcpp.revert: this ControlNetModel is not converted; call pcpp.convert(controlnet).")
    for ctx in conversion.contexts:
        ctx.drain()
    conversion.hooks.remove()
    for name, original in reversed(conversion.originals):
        controlnet.set_submodule(name, original)
    delattr(controlnet, _ATTR)
    return controlnet
