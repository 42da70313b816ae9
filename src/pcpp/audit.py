"""The rule of what pcpp must split, and the audit that refuses a conversion breaking it.

Each rank runs the UNet on one horizontal strip of the latent. A module that reads rows other than its own output
rows (a conv taller than one row, a GroupNorm, an attention over image tokens) gives a wrong strip unless pcpp
replaces it by a parallel layer; a module that does not run on the latent at all (the timestep, class, text and
hint embeddings) must stay whole, or it would split something that is not the latent. :func:`audit_conversion`
checks a plan against both halves of that rule before anything is replaced, so a UNet pcpp cannot split is
refused with the module's name instead of giving a silently wrong image. FreeU, which is not a module but runs
inside the up blocks' forward, is split by converting those blocks (:mod:`pcpp.layers.freeu`): the audit requires
them converted, and :func:`check_call` (cheaply, at each call) that FreeU switched on later is still applied by them.
"""

from __future__ import annotations

from collections.abc import Iterable

from diffusers.models.attention_processor import Attention
from torch import nn

from .errors import PCPPError, UnsupportedModuleError
from .layers.freeu import FREEU_KEYS, applies_freeu, is_exact_freeu

__all__ = ["SIDE_PATHS", "audit_conversion", "check_call", "freeu_enabled", "runs_on_latent", "split_reason"]

# Children of diffusers' UNet2DConditionModel / UNet2DModel that embed the timestep, class labels, text, image
# embeddings or a hint image. None of them sees the latent: ``add_embedding.input_hint_block`` (Kandinsky 2.2
# ControlNet, ``addition_embed_type="image_hint"``) runs 3x3 convs on the full-resolution hint image, whose
# result is concatenated to the whole latent before ``conv_in`` (which takes each rank's rows).
SIDE_PATHS = frozenset(
    {
        "time_proj",
        "time_embedding",
        "time_embed_act",
        "class_embedding",
        "add_time_proj",
        "add_embedding",
        "encoder_hid_proj",
        "position_net",
    }
)


def runs_on_latent(unet: nn.Module, name: str) -> bool:
    """Whether submodule ``name`` of ``unet`` runs on the latent (or an activation computed from it).

    Modules that do not must be left unconverted: splitting them would cut an image that is not the latent into
    the latent's strips. They are the embedding paths (:data:`SIDE_PATHS`) and the ``norm_cross`` GroupNorm of an
    ``Attention`` (``cross_attention_norm="group_norm"``), which normalises the text tokens.

    Args:
        unet: the UNet.
        name: a qualified submodule name, as from ``unet.named_modules()``.

    Returns:
        ``False`` for a module on an embedding path or a cross-attention norm, ``True`` otherwise (the UNet
        itself, ``name == ""``, included).

    Example:
        >>> from diffusers import UNet2DModel
        >>> blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        >>> unet = UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, sample_size=8, **blocks)
        >>> runs_on_latent(unet, "time_embedding.linear_1"), runs_on_latent(unet, "conv_in")
        (False, True)
    """
    if not name:
        return True
    if name.split(".", 1)[0] in SIDE_PATHS:
        return False
    parent_name, _, child = name.rpartition(".")
    if child == "norm_cross":
        parent = unet.get_submodule(parent_name) if parent_name else unet
        return not isinstance(parent, Attention)
    return True


def _first(value: int | tuple[int, ...] | str) -> int:
    if isinstance(value, str):  # padding="same" / "valid"
        return 0 if value == "valid" else 1
    return value if isinstance(value, int) else value[0]


def split_reason(module: nn.Module) -> str | None:
    """Why ``module``, run on a strip of the latent, reads rows outside its own strip; ``None`` if it does not.

    This is the one rule of what pcpp must replace by a parallel layer. It covers the module kinds pcpp splits
    (2-D convs, GroupNorm, attention); other row-mixing module types are refused by the plan itself.

    Args:
        module: a submodule that runs on the latent (see :func:`runs_on_latent`).

    Returns:
        The reason, phrased to follow the module's name, or ``None`` for a row-local module.

    Example:
        >>> from torch import nn
        >>> split_reason(nn.Conv2d(4, 4, 1)) is None, split_reason(nn.GroupNorm(2, 4))
        (True, 'GroupNorm statistics span every row of the image')
    """
    if isinstance(module, nn.Conv2d):
        kernel, stride, padding = _first(module.kernel_size), _first(module.stride), _first(module.padding)
        if kernel > 1 or stride > 1 or padding > 0:
            return f"a conv with {kernel} kernel rows, stride {stride} and padding {padding} reads neighbouring rows"
        return None
    if isinstance(module, nn.GroupNorm):
        return "GroupNorm statistics span every row of the image"
    if isinstance(module, Attention):
        processor = type(getattr(module, "processor", None)).__name__
        if not module.is_cross_attention:
            return f"self-attention (processor {processor}) attends over every image token"
        if getattr(module, "added_kv_proj_dim", None) is not None and not module.only_cross_attention:
            # diffusers' AttnAddedKVProcessor(2_0) concatenates the text keys/values (add_k_proj, add_v_proj) with
            # to_k/to_v of the image tokens unless only_cross_attention=True; is_cross_attention is True all the same.
            return (
                f"attention with added key/value projections (added_kv_proj_dim, processor {processor}) attends over "
                "the image tokens as well as the text ones although diffusers marks it as cross-attention"
            )
    return None


def freeu_enabled(unet: nn.Module) -> bool:
    """Whether FreeU is on, exactly as diffusers' up blocks decide it (all of ``s1, s2, b1, b2`` set and nonzero).

    Example:
        >>> from diffusers import UNet2DModel
        >>> blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
        >>> freeu_enabled(UNet2DModel(block_out_channels=(8, 8), norm_num_groups=4, sample_size=8, **blocks))
        False
    """
    blocks = getattr(unet, "up_blocks", None) or ()
    return any(all(getattr(block, key, None) for key in FREEU_KEYS) for block in blocks)


_FREEU_WHY = (
    "it applies FreeU's Fourier filter to the skip features (when FreeU is on), which on a strip would filter the "
    "strip instead of the whole feature map"
)


def _self_and_ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def audit_conversion(unet: nn.Module, converted: Iterable[str]) -> None:
    """Refuse a conversion plan that would give a wrong image, before any module is replaced.

    Args:
        unet: the UNet about to be converted, unchanged.
        converted: qualified names of the modules the plan replaces by parallel layers.

    Raises:
        UnsupportedModuleError: an up block that applies FreeU is not converted; or a module on the latent that
            mixes rows (:func:`split_reason`) is neither converted nor inside a converted module; or a module that
            does not run on the latent
            (:func:`runs_on_latent`) is converted. Every such module is listed with the reason.

    Example:
        >>> audit_conversion(unet, [r.name for r in plan_conversion(unet)])  # doctest: +SKIP
    """
    names = set(converted)
    problems: list[str] = []
    for name, module in unet.named_modules():
        if not name:
            continue
        kind = type(module).__name__
        if applies_freeu(module) and name not in names:
            problems.append(f"{name} ({kind}): {_FREEU_WHY}; left as it is it would see only this rank's strip")
        if not runs_on_latent(unet, name):
            if name in names:
                problems.append(
                    f"{name} ({kind}) does not run on the latent (an embedding or hint path), yet the plan splits it "
                    "into the latent's strips"
                )
            continue
        reason = split_reason(module)
        if reason is None or any(prefix in names for prefix in _self_and_ancestors(name)):
            continue
        problems.append(f"{name} ({kind}): {reason}; left as it is it would see only this rank's strip")
    if problems:
        raise UnsupportedModuleError(
            f"pcpp cannot split this {type(unet).__name__} exactly ({len(problems)} problem(s)); nothing was "
            "changed:\n  " + "\n  ".join(problems)
        )


def check_call(unet: nn.Module) -> None:
    """Raise if FreeU is on and one of the up blocks that apply it is not pcpp's (a block swapped in after
    conversion).

    Cheap (a few attribute reads per up block), meant for every call of a converted UNet, before its first layer.

    Args:
        unet: the converted UNet.

    Raises:
        PCPPError: FreeU is on and an up block applying it was not converted.
    """
    if not freeu_enabled(unet):
        return
    for i, block in enumerate(getattr(unet, "up_blocks", None) or ()):
        if applies_freeu(block) and not is_exact_freeu(block):
            raise PCPPError(
                f"this converted {type(unet).__name__} cannot run: up_blocks.{i} ({type(block).__name__}) was not "
                f"converted by pcpp and {_FREEU_WHY}; convert the UNet again, or call unet.disable_freeu()."
            )
