"""The per-layer arithmetic of the parallel GroupNorm, as plain PyTorch ops or as fused kernels.

``AsyncGroupNorm`` replaces one fused native kernel pair (statistics, normalisation) with about 25 small ops:
an fp32 copy, the reduction, the merge or correction of the gathered statistics, the per-channel scale and shift,
and the normalisation. On a GPU at moderate resolutions those ops are launch-bound; 46 GroupNorms x 25 ops is
more than the whole plain UNet launches per step. On CUDA :class:`NormOps` therefore runs the same functions
through ``torch.compile`` (Triton), which fuses each into one or two kernels; on other devices, or when
``PCPPConfig.fused_norm`` is off, the plain functions run. Both compute the same float32 arithmetic.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .functional import corrected_group_stats, group_norm_from_stats, local_group_stats, merge_group_stats

__all__ = ["NormOps", "fusion_available"]

logger = logging.getLogger(__name__)


def fusion_available(device: torch.device) -> bool:
    """Whether fused kernels can be generated for ``device`` (CUDA with Triton installed).

    Args:
        device: where the activations live.

    Returns:
        ``True`` on CUDA devices of compute capability 7.0 or newer (what Triton supports) when ``triton`` can
        be imported.
    """
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.get_device_capability(device) >= (7, 0)


@dataclass(frozen=True)
class NormOps:
    """The four steps of a GroupNorm over strips (see :mod:`pcpp.functional` for their maths).

    Attributes:
        local_stats: ``(x, groups) -> (B, G, 3)`` count, mean and biased variance of this strip, fp32.
        merged_stats: ``(S, B, G, 3) -> (mean, var)`` of the whole image.
        corrected_stats: ``(stale, own, fresh) -> (mean, var, fell_back)`` DistriFusion's corrected statistics.
        normalize: ``(x, groups, mean, var, eps, weight, bias) -> y`` the normalised, affine-transformed strip.

    Example:
        >>> import torch
        >>> ops = NormOps.plain()
        >>> stats = ops.local_stats(torch.randn(1, 4, 2, 2), 2)
        >>> tuple(stats.shape)
        (1, 2, 3)
    """

    local_stats: Callable[[Tensor, int], Tensor]
    merged_stats: Callable[[Tensor], tuple[Tensor, Tensor]]
    corrected_stats: Callable[[Tensor, int, Tensor], tuple[Tensor, Tensor, Tensor]]
    normalize: Callable[..., Tensor]

    @classmethod
    def plain(cls) -> NormOps:
        """The functions as written: eager PyTorch ops, any device.

        Returns:
            The plain :class:`NormOps`.
        """
        return cls(local_group_stats, merge_group_stats, corrected_group_stats, group_norm_from_stats)

    @classmethod
    def fused(cls) -> NormOps:
        """The same functions compiled by ``torch.compile`` (dynamic shapes, no graph breaks).

        Compilation happens at each function's first call per input signature, which must not be inside a
        CUDA-graph capture: run one eager step per phase first (:class:`pcpp.cuda_graph.CUDAGraphUNet` does).

        Returns:
            The compiled :class:`NormOps` (nothing is compiled until a function is first called).
        """
        options: dict[str, Any] = {"dynamic": True, "fullgraph": True}
        logger.debug("pcpp: GroupNorm arithmetic runs as fused kernels (torch.compile)")
        return cls(
            torch.compile(local_group_stats, **options),
            torch.compile(merge_group_stats, **options),
            torch.compile(corrected_group_stats, **options),
            torch.compile(group_norm_from_stats, **options),
        )
