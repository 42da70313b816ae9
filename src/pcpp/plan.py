"""Which modules of a UNet pcpp replaces, decided before anything is changed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from diffusers.models.attention_processor import Attention
from torch import nn

from .audit import runs_on_latent
from .context import PatchContext
from .errors import ConversionError, UnsupportedModuleError
from .layers import AddedKVAttention, AsyncGroupNorm, PartialPatchAttention, PartialPatchConv2d
from .layers.added_kv import check_added_kv_supported
from .layers.attention import check_supported
from .layers.conv import split_padding
from .layers.freeu import applies_freeu, exact_freeu_block

__all__ = ["Replacement", "plan_conversion", "unet_levels"]

ENTRY_CONV = "conv_in"


@dataclass(frozen=True)
class Replacement:
    """One module to swap: its qualified name and how to build the parallel version.

    Attributes:
        name: the module's qualified name.
        build: ``build(original, context)`` returns the parallel module (a layer's ``from_*`` factory with the
            options the plan chose).
    """

    name: str
    build: Callable[[nn.Module, PatchContext], nn.Module]


def _diffusers_class(name: str) -> type | None:
    import diffusers.models.downsampling as down
    import diffusers.models.upsampling as up

    return getattr(down, name, None) or getattr(up, name, None)


def _row_mixing_reason(module: nn.Module) -> str | None:
    """Why ``module`` mixes rows in a way pcpp cannot split, or ``None`` if it is row-local or handled."""
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed convolutions are not split by pcpp"
    if isinstance(module, (nn.Conv1d, nn.Conv3d)):
        return "only 2-D convolutions are split"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return "batch and instance norms need whole-image statistics that pcpp does not exchange"
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        kernel = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        stride = module.stride if isinstance(module.stride, int) else module.stride[0]
        padding = module.padding if isinstance(module.padding, int) else module.padding[0]
        if kernel != stride or padding:
            return f"pooling with kernel {kernel}, stride {stride}, padding {padding} reads across strips"
        return None
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MultiheadAttention)):
        return "it reads the whole image"
    if isinstance(module, nn.Upsample) and module.mode != "nearest":
        return f"{module.mode!r} upsampling interpolates across strips"
    for cls_name in ("FirDownsample2D", "FirUpsample2D", "KDownsample2D", "KUpsample2D"):
        cls = _diffusers_class(cls_name)
        if cls is not None and isinstance(module, cls):
            return "FIR and k-diffusion resampling filters read across strips"
    if (
        type(module).__name__ == "ResnetBlock2D"
        and getattr(module, "kernel", None) == "fir"
        and (getattr(module, "up", False) or getattr(module, "down", False))
    ):
        return "FIR resampling inside the ResNet block reads across strips"
    return None


def unet_levels(unet: nn.Module) -> int:
    """Number of stride-2 stages: down blocks that have downsamplers."""
    blocks = getattr(unet, "down_blocks", None)
    if blocks is None:
        return 0
    return sum(1 for block in blocks if getattr(block, "downsamplers", None))


def _row_padding(parent: nn.Module | None, child_name: str) -> tuple[int, int]:
    """Rows the parent pads onto its conv's input itself (diffusers' ``Downsample2D`` with ``padding=0``)."""
    down = _diffusers_class("Downsample2D")
    if (
        down is not None
        and isinstance(parent, down)
        and child_name == "conv"
        and getattr(parent, "use_conv", False)
        and getattr(parent, "padding", 1) == 0
    ):
        return (0, 1)
    return (0, 0)


def plan_conversion(unet: nn.Module) -> list[Replacement]:
    """Decide every replacement for ``unet``, or raise before anything changes.

    Args:
        unet: a diffusers UNet.

    Returns:
        Replacements, parents before children.

    Raises:
        UnsupportedModuleError: some modules mix rows in ways pcpp cannot split; all of them are listed.
        ConversionError: the UNet has no ``conv_in``.
    """
    modules = dict(unet.named_modules())
    if not isinstance(modules.get(ENTRY_CONV), nn.Conv2d):
        raise ConversionError(
            f"{type(unet).__name__} has no Conv2d named {ENTRY_CONV!r}; pcpp converts diffusers UNets, whose first "
            "layer is that conv."
        )
    plan: list[Replacement] = []
    problems: list[str] = []
    for name, module in modules.items():
        if not name or not runs_on_latent(unet, name):
            continue  # embedding and hint paths, text norms: they never see the latent, so they stay whole
        parent_name, _, child_name = name.rpartition(".")
        if applies_freeu(module):
            # FreeU's Fourier filter runs inside the block's forward, on the whole skip map (whether or not FreeU is
            # on now: it may be switched on after conversion).
            plan.append(Replacement(name, partial(exact_freeu_block, name=name)))
            continue
        if isinstance(module, nn.Conv2d):
            entry = name == ENTRY_CONV
            if entry or module.kernel_size[0] > 1 or module.stride[0] > 1:
                pad = _row_padding(modules.get(parent_name), child_name)
                try:
                    split_padding(module, pad, name)
                except ConversionError as err:
                    problems.append(str(err))
                    continue
                build = partial(PartialPatchConv2d.from_conv, entry=entry, row_padding=pad, name=name)
                plan.append(Replacement(name, build))
            continue
        if isinstance(module, nn.GroupNorm):
            plan.append(Replacement(name, partial(AsyncGroupNorm.from_group_norm, name=name)))
            continue
        if isinstance(module, Attention):
            added_kv = getattr(module, "added_kv_proj_dim", None) is not None and not module.only_cross_attention
            if module.is_cross_attention and not added_kv:
                continue  # cross-attention reads text tokens only: row-local, no communication
            # diffusers marks added-K/V attention (IF, Kandinsky, unCLIP) as cross-attention, yet unless
            # only_cross_attention it attends over the image tokens too.
            check, layer = (
                (check_added_kv_supported, AddedKVAttention) if added_kv else (check_supported, PartialPatchAttention)
            )
            try:
                check(module, name)
            except ConversionError as err:
                problems.append(str(err))
                continue
            plan.append(Replacement(name, partial(layer.from_attention, name=name)))
            continue
        reason = _row_mixing_reason(module)
        if reason is not None:
            problems.append(f"{name} ({type(module).__name__}): {reason}")
    if problems:
        raise UnsupportedModuleError(
            f"{type(unet).__name__} has {len(problems)} module(s) that mix rows in a way pcpp cannot split; nothing "
            "was changed:\n  " + "\n  ".join(problems)
        )
    plan.sort(key=lambda r: r.name.count("."))
    return plan
