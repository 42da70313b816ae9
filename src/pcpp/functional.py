"""Pure tensor maths behind the parallel layers: partitioning, halos, partial rows, GroupNorm statistics.

Nothing here communicates or keeps state, so every function is tested on its own (Hypothesis) against a plain
single-device computation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SplitError

__all__ = [
    "ConvHalo",
    "conv_halo",
    "corrected_group_stats",
    "group_norm_from_stats",
    "local_group_stats",
    "merge_group_stats",
    "partial_rows",
    "partition_rows",
    "smallest_splittable_height",
    "top_padding_problem",
]


def smallest_splittable_height(height: int, parts: int, unit: int) -> int:
    """The smallest height ``>= height`` that :func:`partition_rows` accepts for ``parts`` strips.

    Args:
        height: the height that was asked for.
        parts: number of strips.
        unit: every strip's height must be a multiple of ``unit``.

    Returns:
        ``max(parts * unit, height rounded up to a multiple of unit)``.
    """
    return max(parts * unit, -(-height // unit) * unit)


def partition_rows(height: int, parts: int, unit: int = 1) -> tuple[int, ...]:
    """Cut ``height`` rows into ``parts`` horizontal strips, as evenly as multiples of ``unit`` allow.

    Strips hold whole multiples of ``unit`` rows so that every downsampling level of the UNet splits exactly (a
    UNet with ``k`` stride-2 stages needs ``unit = 2**k``). The first ``(height // unit) % parts`` strips get one
    unit more than the others.

    Args:
        height: rows to split (a latent height, at the UNet's input resolution).
        parts: number of strips (the patch-group size); any positive integer.
        unit: granularity of a strip, a positive integer.

    Returns:
        The row count of each strip, top to bottom; they sum to ``height``.

    Raises:
        SplitError: ``height`` is not a multiple of ``unit``, or there are fewer units than strips.

    Example:
        >>> partition_rows(24, 3, unit=4)
        (8, 8, 8)
        >>> partition_rows(20, 3, unit=4)
        (8, 8, 4)
    """
    if parts < 1 or unit < 1:
        raise SplitError(f"parts={parts} and unit={unit} must both be >= 1.")
    units, rest = divmod(height, unit)
    if rest or units < parts:
        smallest = smallest_splittable_height(height, parts, unit)
        raise SplitError(
            f"cannot split a latent of height {height} into {parts} strips: each strip must be a positive "
            f"multiple of {unit} rows (the UNet downsamples by {unit}). The smallest height that works is "
            f"{smallest} latent rows ({smallest * 8} pixels for an 8x VAE); use a multiple of {unit} that is at "
            f"least {parts * unit}, or fewer ranks."
        )
    base, extra = divmod(units, parts)
    return tuple((base + (1 if i < extra else 0)) * unit for i in range(parts))


def partial_rows(partial: float, rows: int) -> int:
    """Rows of a neighbour strip that partially conditioned attention reads: ``ceil(partial * rows)``.

    The product is rounded to 9 decimals first so that, e.g., ``0.3 * 10`` gives 3 rows, not 4.

    Args:
        partial: the partial ratio, in ``[0, 1]``.
        rows: the neighbour strip's height at this UNet level.

    Returns:
        A row count in ``[0, rows]``.
    """
    return min(rows, math.ceil(round(partial * rows, 9)))


def top_padding_problem(pad_top: int, reach: int) -> str | None:
    """Why a conv with ``pad_top`` zero rows above the image cannot be split, or ``None`` if it can.

    With more top padding than the kernel's reach (``dilation * (kernel - 1)`` rows), the first output rows read
    nothing but padding, and a strip can need rows of a strip that is not its neighbour.

    Example:
        >>> top_padding_problem(1, 2) is None
        True
    """
    if pad_top <= reach:
        return None
    return (
        f"top padding of {pad_top} rows exceeds the kernel's reach of {reach} rows: the first output rows would read "
        "nothing but padding, which pcpp does not split; remove the extra padding"
    )


@dataclass(frozen=True)
class ConvHalo:
    """Where the input rows of one strip's convolution come from, for a conv whose height padding is removed.

    Attributes:
        zeros_top: zero rows to put above (the image's top padding).
        from_above: rows to take from the bottom of the strip above.
        crop_top: own rows at the top that the conv does not read.
        crop_bottom: own rows at the bottom that the conv does not read.
        from_below: rows to take from the top of the strip below.
        zeros_bottom: zero rows to put below (the image's bottom padding).
    """

    zeros_top: int
    from_above: int
    crop_top: int
    crop_bottom: int
    from_below: int
    zeros_bottom: int


def conv_halo(
    *,
    start: int,
    stop: int,
    height: int,
    kernel: int,
    stride: int,
    dilation: int,
    pad_top: int,
    pad_bottom: int,
    last: bool,
) -> ConvHalo:
    """Rows the strip ``[start, stop)`` of a ``height``-row input needs so that its conv output is exact.

    Output row ``o`` reads input rows ``o*stride - pad_top + dilation*j`` for ``j < kernel``. A strip owns the
    output rows whose first tap row ``o*stride`` lies in ``[start, stop)``; the last strip also owns any output
    rows past that (when the bottom padding produces them).

    Args:
        start: first input row of the strip (a multiple of ``stride``).
        stop: one past the strip's last input row.
        height: global input height.
        kernel: kernel height.
        stride: stride along the height.
        dilation: dilation along the height.
        pad_top: zero rows above the image (conv padding plus any padding the block applies itself).
        pad_bottom: zero rows below the image.
        last: whether this is the bottom strip.

    Returns:
        The halo description.

    Raises:
        SplitError: ``start`` is not a multiple of ``stride``.
    """
    span = dilation * (kernel - 1) + 1
    if start % stride:
        raise SplitError(f"strip start row {start} is not a multiple of the conv stride {stride}.")
    problem = top_padding_problem(pad_top, span - 1)
    if problem is not None:
        raise SplitError(problem + ".")
    total = (height + pad_top + pad_bottom - span) // stride + 1
    out_start = min(start // stride, total)
    out_stop = total if last else min(-(-stop // stride), total)
    if out_stop <= out_start:
        raise SplitError(
            f"the strip of rows [{start}, {stop}) owns no output row of this conv ({total} rows in all); use fewer "
            "ranks or a larger image."
        )
    need_start = out_start * stride - pad_top
    need_stop = (out_stop - 1) * stride - pad_top + span
    return ConvHalo(
        zeros_top=max(0, min(need_stop, 0) - need_start),
        from_above=max(0, min(need_stop, start) - max(need_start, 0)),
        crop_top=min(stop - start, max(0, need_start - start)),
        crop_bottom=min(stop - start, max(0, stop - need_stop)),
        from_below=max(0, min(need_stop, height) - max(need_start, stop)),
        zeros_bottom=max(0, need_stop - max(need_start, height)),
    )


def local_group_stats(x: Tensor, groups: int) -> Tensor:
    """Per-sample, per-group element count, mean and biased variance of ``x``, in float32.

    Args:
        x: activations of shape ``(B, C, *)``.
        groups: number of GroupNorm groups; divides ``C``.

    Returns:
        Tensor of shape ``(B, groups, 3)``: ``[count, mean, variance]``.
    """
    xg = x.reshape(x.shape[0], groups, -1)
    if xg.dtype not in (torch.float32, torch.float64):
        # fp16 moments overflow and cancel (DistriFusion's black-image bug), and a one-pass E[x^2] - E[x]^2 in fp32
        # still cancels when |mean| >> std: take the two-pass statistics of an fp32 copy.
        xg = xg.float()
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    count = torch.full_like(mean, float(xg.shape[-1]))
    return torch.stack([count, mean, var], dim=-1).float()


def merge_group_stats(stats: Tensor) -> tuple[Tensor, Tensor]:
    """Merge per-strip statistics into the statistics of the whole image (Chan's parallel formula).

    Args:
        stats: ``(S, B, G, 3)`` of ``[count, mean, variance]`` for ``S`` strips, as from :func:`local_group_stats`.

    Returns:
        ``(mean, variance)``, each ``(B, G)``: the biased variance over all elements, as ``torch.nn.GroupNorm``.
    """
    count, mean, var = stats.unbind(-1)
    total = count.sum(0)
    weights = count / total
    merged_mean = (weights * mean).sum(0)
    merged_var = (weights * (var + (mean - merged_mean) ** 2)).sum(0)
    return merged_mean, merged_var


def corrected_group_stats(stale: Tensor, own: int, fresh: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DistriFusion's corrected asynchronous GroupNorm statistics, in float32.

    With previous-step statistics of every strip ``stale`` and this step's own ``fresh`` ones, each raw moment is
    ``M_k = merged_stale_k + (fresh_k - stale_own_k)``: the rank assumes every strip shifted as its own did. The
    difference is formed first, so when fresh equals stale the result equals the merged stale statistics exactly.

    Args:
        stale: ``(S, B, G, 3)`` previous-step statistics of all strips.
        own: index of this rank's strip in ``stale``.
        fresh: ``(B, G, 3)`` this step's statistics of the own strip.

    Returns:
        ``(mean, variance, fell_back)``: ``(B, G)`` statistics, and a boolean tensor marking the entries whose
        corrected variance was negative and fell back to the fresh local variance.
    """
    g_mean, g_var = merge_group_stats(stale)
    _, s_mean, s_var = stale[own].unbind(-1)
    _, f_mean, f_var = fresh.unbind(-1)
    d_mean = f_mean - s_mean
    # E[x^2] = var + mean^2, so the change of the second raw moment is written without large cancelling terms.
    d_m2 = (f_var - s_var) + d_mean * (f_mean + s_mean)
    mean = g_mean + d_mean
    var = g_var + d_m2 - d_mean * (mean + g_mean)
    fell_back = var < 0
    var = torch.where(fell_back, f_var, var)
    return mean, var, fell_back


def group_norm_from_stats(
    x: Tensor, groups: int, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> Tensor:
    """Normalise ``x`` with given per-group statistics and apply the affine transform, as ``F.group_norm`` does.

    Args:
        x: activations ``(B, C, *)``.
        groups: number of groups.
        mean: ``(B, groups)`` float32 means.
        var: ``(B, groups)`` float32 biased variances.
        eps: added to the variance.
        weight: per-channel scale or ``None``.
        bias: per-channel shift or ``None``.

    Returns:
        Tensor shaped and typed like ``x``.
    """
    batch, channels = x.shape[0], x.shape[1]
    rstd = torch.rsqrt(var + eps)
    per_group = channels // groups
    # Fold normalisation and affine into one per-channel scale and shift, computed in fp32 and applied once.
    scale = rstd.repeat_interleave(per_group, dim=1)
    shift = -mean.repeat_interleave(per_group, dim=1) * scale
    if weight is not None:
        scale = scale * weight.float()
        shift = shift * weight.float()
    if bias is not None:
        shift = shift + bias.float()
    view = (batch, channels) + (1,) * (x.ndim - 2)
    if x.dtype in (torch.float32, torch.float64):
        return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))
    # Half precision: fp32 scale and shift promote the product to fp32, so the output is rounded once, as in
    # F.group_norm (rounding scale or mean to half first costs up to 4 output ulps when |mean| >> std).
    return torch.addcmul(shift.view(view), x, scale.view(view)).to(x.dtype)
