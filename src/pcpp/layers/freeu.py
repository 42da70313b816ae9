"""Exact FreeU on strips: the up blocks whose FreeU Fourier filter must see the whole skip feature map."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_blocks import CrossAttnUpBlock2D, UpBlock2D
from diffusers.utils.torch_utils import fourier_filter
from torch import Tensor, nn

from ..context import PatchContext
from ..errors import PCPPError
from ..exchange import Transfer
from ..stats import LayerKind
from ._common import PatchLayer, share_module

__all__ = [
    "FREEU_BLOCKS",
    "FREEU_KEYS",
    "FreeUCrossAttnUpBlock2D",
    "FreeUUpBlock2D",
    "applies_freeu",
    "exact_freeu_block",
    "freeu_multiplier",
    "is_exact_freeu",
    "strip_prefilter",
]

FREEU_BLOCKS: tuple[type[nn.Module], ...] = (UpBlock2D, CrossAttnUpBlock2D)
"""diffusers' 2-D up blocks whose forward runs FreeU (``apply_freeu``)."""

FREEU_KEYS = ("s1", "s2", "b1", "b2")

# The strip's own filter divides by the prefilter's multiplier; below this the round trip loses more than about
# 1e-5 of the skip features' size in fp32 (rounding grows as 1 / |multiplier|).
_SMALLEST_MULTIPLIER = 1e-2


def applies_freeu(module: nn.Module) -> bool:
    """Whether ``module`` is an up block in which diffusers applies FreeU's Fourier filter (``resolution_idx`` 0
    or 1 of ``UpBlock2D`` / ``CrossAttnUpBlock2D``) when FreeU is on."""
    return isinstance(module, FREEU_BLOCKS) and getattr(module, "resolution_idx", None) in (0, 1)


def freeu_multiplier(height: int, width: int, scale: float, where: str) -> Tensor:
    """The factor by which diffusers' ``fourier_filter(x, threshold=1, scale=scale)`` multiplies each frequency of
    a ``height x width`` map (complex64, on the CPU).

    The filter is linear and shift-invariant (a mask on the centred spectrum, then the real part of the inverse
    transform), so it multiplies each frequency by a fixed factor: the transform of its response to a unit impulse.
    (Its inverse is therefore not the filter with scale ``1 / scale``: taking the real part spreads the mask over the
    conjugate frequencies, whose factor is ``(1 + scale) / 2``.)

    Args:
        height: the map's height.
        width: the map's width.
        scale: the filter's scale (FreeU's ``s1`` or ``s2``).
        where: the block, for the error message.

    Returns:
        ``(1, 1, height, width)`` factors.

    Raises:
        PCPPError: a factor is below 0.01 in size (``scale`` or ``(1 + scale) / 2`` near 0), so the filter cannot
            be undone precisely.
    """
    impulse = torch.zeros((1, 1, height, width), dtype=torch.float32)
    impulse[..., 0, 0] = 1.0
    multiplier = torch.fft.fft2(fourier_filter(impulse, threshold=1, scale=scale))
    if float(multiplier.abs().min()) < _SMALLEST_MULTIPLIER:
        raise PCPPError(
            f"{where}: FreeU scale {scale} scales some frequencies of the skip features by less than "
            f"{_SMALLEST_MULTIPLIER}, which pcpp cannot undo precisely on a strip; use a scale further from 0 and -1, "
            "or disable FreeU."
        )
    return multiplier


def strip_prefilter(target: Tensor, multiplier: Tensor) -> Tensor:
    """The tensor ``r`` with ``fourier_filter(r, threshold=1, scale=s) == target`` (up to rounding), given the
    filter's :func:`freeu_multiplier`: ``target``'s spectrum divided by it.

    Args:
        target: ``(B, C, h, w)`` what the filter must output.
        multiplier: ``freeu_multiplier(h, w, s, ...)`` on ``target``'s device.

    Returns:
        ``r``, of ``target``'s shape and dtype (computed in fp32, as ``fourier_filter`` computes).

    Example:
        >>> t = torch.randn(1, 2, 3, 5)
        >>> r = strip_prefilter(t, freeu_multiplier(3, 5, 0.2, "up_blocks.0"))
        >>> torch.allclose(fourier_filter(r, threshold=1, scale=0.2), t, atol=1e-5)
        True
    """
    spectrum = torch.fft.fft2(target.to(torch.float32)) / multiplier
    return torch.fft.ifft2(spectrum).real.to(target.dtype)


def _freeu_setting(key: str) -> property:
    """A FreeU setting kept on the original block, so that it survives :func:`pcpp.revert` either way."""

    def get(self: _ExactFreeU) -> Any:
        return getattr(self.__dict__["_pcpp_original"], key, None)

    def set_(self: _ExactFreeU, value: Any) -> None:
        setattr(self.__dict__["_pcpp_original"], key, value)

    return property(get, set_)


class _ExactFreeU(PatchLayer):
    """Mixed into a diffusers up block: before the block's own forward, replace each skip tensor it consumes by the
    one whose strip-wise FreeU filter gives the whole-map filter's rows of this strip.

    FreeU's filter (``fourier_filter(skip, threshold=1, scale=s)``) rescales the lowest frequencies of the whole
    skip map; the block, run on a strip, filters the strip instead. So the skip map is gathered from every strip
    (every step, synchronous also in asynchronous steps: exact), filtered whole, cut to this strip's rows ``T``, and
    passed on as :func:`strip_prefilter`'s ``r``: the block's own filter then outputs ``T``. FreeU's backbone
    scaling (``b1``, ``b2``) is elementwise and needs nothing. The gather is an all-gather through the exchange
    service, counted as ``LayerKind.FREEU``.
    """

    resnets: nn.ModuleList
    resolution_idx: int

    s1 = _freeu_setting("s1")
    s2 = _freeu_setting("s2")
    b1 = _freeu_setting("b1")
    b2 = _freeu_setting("b2")

    def forward(
        self, hidden_states: Tensor, res_hidden_states_tuple: tuple[Tensor, ...], *args: Any, **kwargs: Any
    ) -> Any:
        """As the diffusers block, with the skip tensors prefiltered while FreeU is on (more than one rank)."""
        if self.port.world_size > 1 and all(getattr(self, key) for key in FREEU_KEYS):
            scale = float(self.s1 if self.resolution_idx == 0 else self.s2)
            consumed = len(self.resnets)
            kept, used = res_hidden_states_tuple[:-consumed], res_hidden_states_tuple[-consumed:]
            res_hidden_states_tuple = (*kept, *(self._prefiltered(r, scale) for r in used))
        return super().forward(hidden_states, res_hidden_states_tuple, *args, **kwargs)  # type: ignore[misc]

    @torch.compiler.disable  # a collective and host arithmetic on the geometry
    def _prefiltered(self, skip: Tensor, scale: float) -> Tensor:
        port = self.port
        geo = port.geometry()
        rank, world = port.rank, port.world_size
        level = geo.level_of(rank, skip.shape[2])
        rows = geo.strip_rows(level)
        tallest = max(rows)
        padded = F.pad(skip, (0, 0, 0, tallest - skip.shape[2])) if skip.shape[2] < tallest else skip
        batch = skip.shape[0]
        gathered = skip.new_empty((world * batch, *padded.shape[1:]))
        transfer = Transfer("FreeU skip gather", gather=(gathered, padded.contiguous()))
        what = f"{self.pcpp_name} ({transfer.purpose}, step {self.context.step})"
        self.context.exchange.post(LayerKind.FREEU, transfer, what).wait()
        whole = torch.cat([gathered[j * batch : (j + 1) * batch, :, : rows[j]] for j in range(world)], dim=2)
        start = geo.strip_start(rank, level)
        target = fourier_filter(whole, threshold=1, scale=scale)[:, :, start : start + rows[rank]]
        return strip_prefilter(target, self._multiplier(target.shape[2], target.shape[3], scale, target.device))

    def _multiplier(self, height: int, width: int, scale: float, device: torch.device) -> Tensor:
        # Kept per shape and scale: computed (with a host check) in an eager step, so a CUDA-graph capture of a
        # later step finds it and never synchronises.
        cache: dict[tuple[int, int, float, torch.device], Tensor] = self.__dict__["_pcpp_multipliers"]
        key = (height, width, scale, device)
        if key not in cache:
            cache[key] = freeu_multiplier(height, width, scale, self.pcpp_name).to(device)
        return cache[key]


class FreeUUpBlock2D(_ExactFreeU, UpBlock2D):
    """diffusers' ``UpBlock2D`` with exact FreeU on strips (see :func:`exact_freeu_block`)."""


class FreeUCrossAttnUpBlock2D(_ExactFreeU, CrossAttnUpBlock2D):
    """diffusers' ``CrossAttnUpBlock2D`` with exact FreeU on strips (see :func:`exact_freeu_block`)."""


def is_exact_freeu(block: nn.Module) -> bool:
    """Whether ``block`` is an up block converted by :func:`exact_freeu_block`."""
    return isinstance(block, _ExactFreeU)


def exact_freeu_block(block: nn.Module, context: PatchContext, *, name: str = "") -> nn.Module:
    """The up block ``block`` (``UpBlock2D`` or ``CrossAttnUpBlock2D``) with exact FreeU on strips, sharing all of its
    submodules and weights; ``block`` itself is left unchanged for :func:`pcpp.revert`.

    The FreeU settings (``s1, s2, b1, b2``) stay on ``block``: ``unet.enable_freeu`` / ``disable_freeu`` after
    conversion reach it through the new block, so FreeU switched on after conversion is exact and is still on after
    revert.

    Args:
        block: the diffusers up block (with ``resolution_idx`` 0 or 1: see :func:`applies_freeu`).
        context: the shared step state.
        name: qualified name, for error messages.

    Returns:
        The new block.

    Raises:
        PCPPError: ``block`` is not an up block that applies FreeU.
    """
    if not applies_freeu(block):
        raise PCPPError(f"{name or type(block).__name__} ({type(block).__name__}) is not an up block applying FreeU.")
    cls: type[_ExactFreeU] = FreeUCrossAttnUpBlock2D if isinstance(block, CrossAttnUpBlock2D) else FreeUUpBlock2D
    new = share_module(block, cls)  # type: ignore[type-var]
    for key in FREEU_KEYS:
        new.__dict__.pop(key, None)  # the settings live on the original (the properties above)
    new.__dict__["_pcpp_original"] = block  # not a child module: kept out of the module tree and the state dict
    new.__dict__["_pcpp_multipliers"] = {}
    new.attach(context, name, LayerKind.FREEU)
    return new  # type: ignore[return-value]
