"""Property tests of :mod:`pcpp.functional` against plain single-device computations.

Every strategy builds legal inputs by construction (no ``assume``/filtering), and every tensor comes from a drawn
integer seed through a ``torch.Generator`` so that a failing example replays exactly. Each test's docstring states
the property; every tolerance is written next to the reason for it.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from pcpp.errors import SplitError
from pcpp.functional import (
    ConvHalo,
    conv_halo,
    corrected_group_stats,
    group_norm_from_stats,
    local_group_stats,
    merge_group_stats,
    partial_rows,
    partition_rows,
    smallest_splittable_height,
)

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------------------------
# partition_rows / smallest_splittable_height
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def splittable(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(height, parts, unit)`` that partition_rows must accept: a multiple of unit with at least one unit per part."""
    parts = draw(st.integers(1, 12))
    unit = draw(st.integers(1, 16))
    units = draw(st.integers(parts, parts + 40))
    return units * unit, parts, unit


@st.composite
def unsplittable(draw: st.DrawFn) -> tuple[int, int, int]:
    """``(height, parts, unit)`` that partition_rows must reject: not a multiple of unit, or fewer units than parts."""
    if draw(st.booleans()):
        # Not a multiple of unit (any number of whole units, so both failure reasons may hold together).
        unit = draw(st.integers(2, 16))
        parts = draw(st.integers(1, 12))
        height = draw(st.integers(0, 40)) * unit + draw(st.integers(1, unit - 1))
    else:
        # A multiple of unit, but fewer units than parts.
        unit = draw(st.integers(1, 16))
        parts = draw(st.integers(2, 12))
        height = draw(st.integers(0, parts - 1)) * unit
    return height, parts, unit


@given(splittable())
@example((20, 3, 4))
@example((24, 3, 4))
def test_partition_rows_is_an_even_split_in_whole_units(case: tuple[int, int, int]) -> None:
    """For an accepted (height, parts, unit): there are ``parts`` strips summing to ``height``; each is a positive
    multiple of ``unit``; max - min <= unit; sizes are non-increasing, and exactly the first
    ``(height // unit) % parts`` strips carry the extra unit. An accepted height is its own smallest splittable height.
    """
    height, parts, unit = case
    rows = partition_rows(height, parts, unit)
    assert isinstance(rows, tuple)
    assert len(rows) == parts
    assert sum(rows) == height
    assert all(r > 0 and r % unit == 0 for r in rows), rows
    assert max(rows) - min(rows) <= unit, rows
    assert all(a >= b for a, b in zip(rows[:-1], rows[1:], strict=True)), rows
    extra = (height // unit) % parts
    assert sum(r == max(rows) for r in rows) == (extra or parts), rows
    assert smallest_splittable_height(height, parts, unit) == height


@given(unsplittable())
@example((20, 3, 8))  # not a multiple of unit
@example((8, 3, 4))  # two units for three strips
def test_partition_rows_rejects_and_names_the_smallest_working_height(case: tuple[int, int, int]) -> None:
    """For a rejected (height, parts, unit): partition_rows raises SplitError whose message names
    ``smallest_splittable_height(height, parts, unit)``; that height is accepted, and it really is the smallest:
    every height in ``[height, smallest)`` is rejected too.
    """
    height, parts, unit = case
    smallest = smallest_splittable_height(height, parts, unit)
    with pytest.raises(SplitError) as info:
        partition_rows(height, parts, unit)
    assert f"{smallest} latent rows" in str(info.value), str(info.value)
    assert smallest > height
    assert sum(partition_rows(smallest, parts, unit)) == smallest
    for h in range(height, smallest):
        with pytest.raises(SplitError):
            partition_rows(h, parts, unit)


@pytest.mark.parametrize(("parts", "unit"), [(0, 1), (-1, 1), (2, 0), (2, -4)])
def test_partition_rows_rejects_nonpositive_parts_or_unit(parts: int, unit: int) -> None:
    """parts < 1 or unit < 1 is a SplitError, not a ZeroDivisionError or an empty split."""
    with pytest.raises(SplitError):
        partition_rows(16, parts, unit)


# ---------------------------------------------------------------------------------------------------------------------
# partial_rows
# ---------------------------------------------------------------------------------------------------------------------


@given(rows=st.integers(0, 4096), p=st.floats(0.0, 1.0), q=st.floats(0.0, 1.0))
def test_partial_rows_range_endpoints_monotone(rows: int, p: float, q: float) -> None:
    """partial_rows(p, rows) lies in [0, rows]; it is 0 at p=0 and rows at p=1; it is monotone in p; and it is
    ceil(p * rows) up to the 9-decimal rounding guard: ``p*rows - 1e-9 <= result < p*rows + 1`` (the 1e-9 slack is
    exactly the guard's reach, half a unit in the 9th decimal plus the float product's own error).
    """
    lo, hi = min(p, q), max(p, q)
    r_lo, r_hi = partial_rows(lo, rows), partial_rows(hi, rows)
    assert 0 <= r_lo <= r_hi <= rows
    assert partial_rows(0.0, rows) == 0
    assert partial_rows(1.0, rows) == rows
    assert p * rows - 1e-9 <= partial_rows(p, rows) < p * rows + 1


@given(rows=st.integers(0, 4096), den=st.integers(1, 1000), data=st.data())
def test_partial_rows_is_exact_ceil_for_decimal_ratios(rows: int, den: int, data: st.DataObject) -> None:
    """For a ratio n/den given as a float, partial_rows equals the exact ceil(n/den * rows), computed in rationals.
    The float product is within ~1e-12 of the true value while a non-integer true value is at least 1/den >= 1e-3
    from an integer, so the guard must neither add a spurious row (0.3 * 10 = 3.0000000000000004 -> 3, not 4) nor
    lose one.
    """
    num = data.draw(st.integers(0, den))
    assert partial_rows(num / den, rows) == math.ceil(Fraction(num, den) * rows)


def test_partial_rows_known_values() -> None:
    """Worked examples: the float products 0.3*10 and 0.7*10 are just above 3 and 7; ceil semantics otherwise."""
    assert partial_rows(0.3, 10) == 3
    assert partial_rows(0.7, 10) == 7
    assert partial_rows(0.25, 5) == 2
    assert partial_rows(0.01, 8) == 1
    assert partial_rows(0.5, 0) == 0


# ---------------------------------------------------------------------------------------------------------------------
# conv_halo
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def conv_cases(draw: st.DrawFn, regime: str) -> dict[str, int]:
    """A height-split conv (kernel 1..7, stride 1..2, dilation 1..2, pads 0..3) in one of three regimes whose union is
    that whole range; every case's halo needs at most the adjacent strips' rows and its output has >= 1 row.

    With span = dilation * (kernel - 1) + 1 and strips of a multiple of stride rows (so the output splits too):

    - ``proper``: ``pad_top <= span`` and ``pad_top + pad_bottom >= span - stride``, i.e. the output has at least
      ``ceil(H / stride)`` rows (every 'same' or wider conv, as in a UNet);
    - ``pad_top_beyond_span``: ``pad_top > span``: the first output rows read only top padding;
    - ``short_output``: ``pad_top + pad_bottom < span - stride``: fewer output rows than ``ceil(H / stride)``
      (e.g. an unpadded 3x3 conv).

    Neighbours only: with stride-aligned starts, strip i needs ``min(pad_top, start)`` rows from above and
    ``min(span - stride - pad_top, rows below it)`` from below. So the middle strips (1 .. parts-2), which are the
    "strip above" or "strip below" of a non-edge neighbour, need ``>= need = max(pad_top, span - stride - pad_top)``
    rows; the first and last strips need nothing. partition_rows gives strip parts-2 ``units // parts`` units, plus one
    if it is among the first ``units % parts``, which holds exactly when ``units >= parts * ceil(need / unit) - 1``.
    """
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    if regime == "proper":
        # Some pad_top <= min(3, span - 1) with pad_top + 3 >= span - stride must exist: span <= stride + 6.
        kernel = draw(st.integers(1, min(7, (stride + 5) // dilation + 1)))
        span = dilation * (kernel - 1) + 1
        pad_top = draw(st.integers(max(0, span - stride - 3), min(3, span - 1)))
        pad_bottom = draw(st.integers(max(0, span - stride - pad_top), 3))
    elif regime == "pad_top_beyond_span":
        # pad_top <= 3 forces span <= 2: a 1-row kernel (any dilation) or a 2-row kernel without dilation.
        kernel = draw(st.integers(1, 2)) if dilation == 1 else 1
        span = dilation * (kernel - 1) + 1
        pad_top = draw(st.integers(span, 3))
        pad_bottom = draw(st.integers(0, 3))
    else:
        assert regime == "short_output"
        # span >= stride + 1 leaves room for pad_top + pad_bottom <= span - stride - 1.
        kernel = draw(st.integers(-(-stride // dilation) + 1, 7))
        span = dilation * (kernel - 1) + 1
        pad_top = draw(st.integers(0, min(3, span - stride - 1)))
        pad_bottom = draw(st.integers(0, min(3, span - stride - 1 - pad_top)))
    parts = draw(st.integers(1, 4))
    unit = stride * draw(st.integers(1, 3))
    need = max(pad_top, span - stride - pad_top)
    min_units = parts
    if parts >= 3:
        min_units = max(min_units, parts * -(-need // unit) - 1)
    # Output height (H + pad_top + pad_bottom - span) // stride + 1 >= 1.
    min_units = max(min_units, -(-(span - pad_top - pad_bottom) // unit))
    units = draw(st.integers(min_units, min_units + 6))
    kernel_w = draw(st.integers(1, 3))
    return {
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "pad_top": pad_top,
        "pad_bottom": pad_bottom,
        "parts": parts,
        "unit": unit,
        "height": units * unit,
        "kernel_w": kernel_w,
        "width": kernel_w + draw(st.integers(0, 3)),
        "pad_w": draw(st.integers(0, 1)),
        "c_in": draw(st.integers(1, 2)),
        "c_out": draw(st.integers(1, 2)),
    }


def _conv_case(
    kernel: int, stride: int, dilation: int, pad_top: int, pad_bottom: int, parts: int, unit: int, height: int
) -> dict[str, int]:
    """A hand-written conv case (1 channel, 1 column, no width padding), for @example."""
    return {
        "kernel": kernel,
        "stride": stride,
        "dilation": dilation,
        "pad_top": pad_top,
        "pad_bottom": pad_bottom,
        "parts": parts,
        "unit": unit,
        "height": height,
        "kernel_w": 1,
        "width": 1,
        "pad_w": 0,
        "c_in": 1,
        "c_out": 1,
    }


def _assemble(strips: list[torch.Tensor], i: int, halo: ConvHalo) -> torch.Tensor:
    """Strip i's conv input: zeros, tail of the strip above, own rows cropped, head of the strip below, zeros."""
    own = strips[i]
    rows = own.shape[2]
    parts = [own.new_zeros(*own.shape[:2], halo.zeros_top, own.shape[3])]
    if halo.from_above:
        above = strips[i - 1]
        parts.append(above[:, :, above.shape[2] - halo.from_above :])
    parts.append(own[:, :, halo.crop_top : rows - halo.crop_bottom])
    if halo.from_below:
        parts.append(strips[i + 1][:, :, : halo.from_below])
    parts.append(own.new_zeros(*own.shape[:2], halo.zeros_bottom, own.shape[3]))
    return torch.cat(parts, dim=2)


def _check_strip_convs(c: dict[str, int], seed: int) -> None:
    """The property shared by the conv_halo tests (see test_conv_halo_strips_reproduce_the_full_conv)."""
    g = _gen(seed)
    x = torch.randn(1, c["c_in"], c["height"], c["width"], generator=g)
    weight = torch.randn(c["c_out"], c["c_in"], c["kernel"], c["kernel_w"], generator=g)
    bias = torch.randn(c["c_out"], generator=g)
    span = c["dilation"] * (c["kernel"] - 1) + 1

    def conv(inp: torch.Tensor) -> torch.Tensor:
        if inp.shape[2] < span:  # too few rows for one output row: this strip owns no output rows
            return inp.new_zeros(1, c["c_out"], 0, (inp.shape[3] + 2 * c["pad_w"] - c["kernel_w"]) + 1)
        return F.conv2d(
            inp, weight, bias, stride=(c["stride"], 1), padding=(0, c["pad_w"]), dilation=(c["dilation"], 1)
        )

    full = conv(F.pad(x, (0, 0, c["pad_top"], c["pad_bottom"])))
    assert full.shape[2] >= 1  # by construction

    rows = partition_rows(c["height"], c["parts"], c["unit"])
    strips = list(torch.split(x, list(rows), dim=2))
    outs = []
    start = 0
    for i, r in enumerate(rows):
        halo = conv_halo(
            start=start,
            stop=start + r,
            height=c["height"],
            kernel=c["kernel"],
            stride=c["stride"],
            dilation=c["dilation"],
            pad_top=c["pad_top"],
            pad_bottom=c["pad_bottom"],
            last=i == len(rows) - 1,
        )
        # Construction guarantees only neighbours are read (the layer refuses anything else).
        assert halo.from_above <= (rows[i - 1] if i > 0 else 0), (i, rows, halo)
        assert halo.from_below <= (rows[i + 1] if i + 1 < len(rows) else 0), (i, rows, halo)
        # A window can hold no more zero rows than the image's padding has, and no more own rows than the strip has.
        padding_msg = (
            f"conv_halo bug: strip {i} of rows {rows} asks for more zero rows than the padding "
            f"({c['pad_top']}, {c['pad_bottom']}) has: {halo}; case {c}"
        )
        assert halo.zeros_top <= c["pad_top"], padding_msg
        assert halo.zeros_bottom <= c["pad_bottom"], padding_msg
        assert halo.crop_top + halo.crop_bottom <= r, (
            f"conv_halo bug: strip {i} of rows {rows} crops {halo.crop_top} + {halo.crop_bottom} of its {r} rows: "
            f"{halo}; case {c}"
        )
        outs.append(conv(_assemble(strips, i, halo)))
        start += r
    got = torch.cat(outs, dim=2)
    assert got.shape == full.shape, f"conv_halo bug: strips give {tuple(got.shape)}, full conv {tuple(full.shape)}"
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


@given(conv_cases("proper"), SEEDS)
@example(_conv_case(3, 1, 1, 1, 1, 3, 1, 5), 0)  # a UNet 3x3 conv with a 1-row last strip
@example(_conv_case(3, 2, 1, 1, 1, 2, 2, 4), 0)  # a stride-2 downsampler on 2-row strips
@example(_conv_case(3, 2, 1, 0, 1, 2, 2, 4), 0)  # diffusers' Downsample2D: F.pad(0, 1) then an unpadded conv
def test_conv_halo_strips_reproduce_the_full_conv(case: dict[str, int], seed: int) -> None:
    """Split a (1, C, H, W) input into partition_rows strips; give each strip its halo (zeros_top zero rows, the last
    from_above rows of the strip above, its own rows less crop_top/crop_bottom, the first from_below rows of the strip
    below, zeros_bottom zero rows) and convolve with height padding 0 (width padding as drawn). The strips' outputs,
    concatenated top to bottom, equal the conv of the whole input padded by (pad_top, pad_bottom) rows; no window
    holds more zero rows than the padding or crops more rows than its strip has.

    Regime: 'proper' (pad_top <= span and pad_top + pad_bottom >= span - stride, i.e. output >= ceil(H / stride)
    rows); the other two regimes, which together with this one cover the whole drawn range, have their own tests.

    Tolerance: fp32 convs over identical windows, so the same sums, possibly blocked in a different order ->
    atol = rtol = 1e-5.
    """
    _check_strip_convs(case, seed)


@given(conv_cases("pad_top_beyond_span"), SEEDS)
@example(_conv_case(1, 1, 1, 2, 0, 2, 1, 2), 0)  # the smallest such case
def test_conv_halo_rejects_top_padding_beyond_the_kernel_reach(case: dict[str, int], seed: int) -> None:
    """pad_top >= span (top padding beyond the kernel's reach of span - 1 rows): the first output rows would read
    only padding, and a strip can need rows of a non-adjacent strip, which ConvHalo cannot express; conv_halo
    rejects it with SplitError naming the padding, before any layer is built.
    """
    rows = partition_rows(case["height"], case["parts"], case["unit"])
    with pytest.raises(SplitError, match="top padding of"):
        conv_halo(
            start=0,
            stop=rows[0],
            height=case["height"],
            kernel=case["kernel"],
            stride=case["stride"],
            dilation=case["dilation"],
            pad_top=case["pad_top"],
            pad_bottom=case["pad_bottom"],
            last=case["parts"] == 1,
        )
    del seed


@given(conv_cases("short_output"), SEEDS)
@example(_conv_case(3, 1, 1, 0, 0, 3, 1, 5), 0)  # minimal known failure: unpadded 3x3, rows (2, 2, 1)
@example(_conv_case(7, 1, 1, 0, 0, 2, 4, 8), 0)  # unpadded 7-row kernel on 8 rows: only 2 output rows
def test_conv_halo_output_shorter_than_input(case: dict[str, int], seed: int) -> None:
    """The same property as test_conv_halo_strips_reproduce_the_full_conv, for pad_top + pad_bottom < span - stride,
    where the output has fewer than ceil(H / stride) rows, so a non-last strip can own fewer rows than
    ceil(stop / stride) - start / stride (or none).

    A strip that owns no output row at all is rejected with SplitError ("owns no output row"); that is checked
    against the arithmetic here, and the property must hold for every other split. (Regression: conv_halo used to
    claim output rows past the end, e.g. rows (2, 2, 1) of an unpadded 3x3 conv on 5 rows.)

    Tolerance: as there (atol = rtol = 1e-5).
    """
    span = case["dilation"] * (case["kernel"] - 1) + 1
    total = (case["height"] + case["pad_top"] + case["pad_bottom"] - span) // case["stride"] + 1
    rows = partition_rows(case["height"], case["parts"], case["unit"])
    starts = [sum(rows[:i]) for i in range(len(rows))]
    empty = (
        any(
            min(-(-(s + r) // case["stride"]), total) <= min(s // case["stride"], total)
            for s, r in zip(starts[:-1], rows[:-1], strict=True)
        )
        or min(starts[-1] // case["stride"], total) >= total
    )
    if empty:
        with pytest.raises(SplitError, match="owns no output row"):
            _check_strip_convs(case, seed)
    else:
        _check_strip_convs(case, seed)


@given(
    stride=st.integers(2, 4),
    k=st.integers(0, 10),
    off=st.data(),
)
def test_conv_halo_rejects_misaligned_start(stride: int, k: int, off: st.DataObject) -> None:
    """A strip start that is not a multiple of the stride raises SplitError (the strip would own a fractional row)."""
    start = k * stride + off.draw(st.integers(1, stride - 1))
    with pytest.raises(SplitError):
        conv_halo(
            start=start,
            stop=start + stride,
            height=start + 2 * stride,
            kernel=3,
            stride=stride,
            dilation=1,
            pad_top=1,
            pad_bottom=1,
            last=False,
        )


# ---------------------------------------------------------------------------------------------------------------------
# GroupNorm statistics
# ---------------------------------------------------------------------------------------------------------------------


@st.composite
def group_inputs(draw: st.DrawFn, torch_reference: bool = False) -> dict:
    """A (B, C, H, W) or (B, C, L) tensor, its GroupNorm group count, and uneven row strips (sizes >= 1).

    ``torch_reference``: the case is also fed to F.group_norm, which refuses a batch holding a single value per
    channel (B * C/G * spatial == 1); the batch is then drawn from 2 up instead of 1.
    """
    groups = draw(st.integers(1, 4))
    per_group = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    three_d = draw(st.booleans())
    tail = () if three_d else (draw(st.integers(1, 3)),)
    single = per_group * sum(sizes) * math.prod(tail) == 1
    batch = draw(st.integers(2 if torch_reference and single else 1, 2))
    return {
        "shape": (batch, groups * per_group, sum(sizes), *tail),
        "groups": groups,
        "sizes": sizes,
        "scale": draw(st.sampled_from([0.5, 1.0, 3.0])),
        "offset": draw(st.sampled_from([0.0, -2.0, 4.0])),
        "eps": draw(st.sampled_from([1e-6, 1e-5, 1e-3])),
        "affine": draw(st.booleans()),
        "seed": draw(SEEDS),
    }


def _make(
    case: dict, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    g = _gen(case["seed"])
    x = torch.randn(case["shape"], generator=g) * case["scale"] + case["offset"]
    channels = case["shape"][1]
    weight = bias = None
    if case["affine"]:
        weight = torch.randn(channels, generator=g)
        bias = torch.randn(channels, generator=g)
    return x.to(dtype), weight, bias


def _strip_stats(x: torch.Tensor, sizes: list[int], groups: int) -> torch.Tensor:
    return torch.stack([local_group_stats(s, groups) for s in torch.split(x, sizes, dim=2)])


def _reference_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Biased (mean, variance) over each whole group, in fp64."""
    var, mean = torch.var_mean(x.double().reshape(x.shape[0], groups, -1), dim=-1, correction=0)
    return mean, var


@given(group_inputs())
def test_merged_strip_stats_equal_whole_group_stats(case: dict) -> None:
    """Per-strip [count, mean, biased var] from local_group_stats, merged with merge_group_stats, equal the biased
    var_mean over each whole group; strips are any uneven row split (sizes >= 1) of a 4-D input along H or a 3-D
    input along L; counts are exact element counts; everything comes back float32.

    Tolerance: fp32 two-pass/Chan merges of <= ~200 values of magnitude <= ~15 against fp64: atol = rtol = 1e-5.
    """
    x, _, _ = _make(case)
    groups = case["groups"]
    stats = _strip_stats(x, case["sizes"], groups)
    assert stats.dtype == torch.float32
    assert stats.shape == (len(case["sizes"]), x.shape[0], groups, 3)
    per_elem = x.shape[1] // groups * math.prod(x.shape[3:])
    expected_counts = torch.tensor([float(s * per_elem) for s in case["sizes"]]).view(-1, 1, 1)
    assert torch.equal(stats[..., 0], expected_counts.expand_as(stats[..., 0]))
    mean, var = merge_group_stats(stats)
    ref_mean, ref_var = _reference_stats(x, groups)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, atol=1e-5, rtol=1e-5)


@given(group_inputs(torch_reference=True))
def test_group_norm_from_merged_stats_equals_f_group_norm(case: dict) -> None:
    """group_norm_from_stats(x, G, merged mean, merged var, eps, weight, bias) equals F.group_norm(x, G, weight,
    bias, eps) on fp32 input, 3-D and 4-D, with and without affine parameters; shape and dtype are kept.

    Tolerance, per element: ``1e-5 + 1e-5 * |ref| + 2**-22 * |x| * rstd * |weight|``. The first two terms: fp32, the
    same statistics up to summation order, outputs of magnitude <= ~10. The last term: group_norm_from_stats folds the
    normalisation into ``x * a + b`` with ``a = rstd * weight`` and ``b = -mean * a``, so for ``x ~ mean`` two products
    of size ``|x| * a`` cancel, each carrying up to half an fp32 ulp (2**-24 relative; 2**-22 leaves a 2x margin).
    That term is negligible for ordinary groups (rstd ~ 1) but reaches ~3e-5 for a single-element group with
    eps = 1e-6 (rstd = 1000), where F.group_norm returns exactly 0.
    """
    x, weight, bias = _make(case)
    groups = case["groups"]
    mean, var = merge_group_stats(_strip_stats(x, case["sizes"], groups))
    out = group_norm_from_stats(x, groups, mean, var, case["eps"], weight, bias)
    ref = F.group_norm(x, groups, weight, bias, case["eps"])
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    view = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
    rstd = torch.rsqrt(var + case["eps"]).repeat_interleave(x.shape[1] // groups, dim=1).view(view)
    w = torch.ones(x.shape[1]) if weight is None else weight.abs()
    bound = 1e-5 + 1e-5 * ref.abs() + 2**-22 * x.abs() * rstd * w.view(1, -1, *(1,) * (x.ndim - 2))
    err = (out - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, worst excess {(err - bound).max().item():.3g}"


@given(group_inputs(), st.sampled_from([0.0, 100.0, -300.0]))
def test_fp16_input_gives_fp32_stats_close_to_fp64(case: dict, offset: float) -> None:
    """fp16 activations give float32 statistics that match the fp64 statistics of the same fp16 values, even with
    |x| ~ 300 where x**2 overflows fp16 (the DistriFusion black-image failure) and E[x^2]-E[x]^2 would cancel.

    Tolerance: the fp16 values are exact in fp32, so only fp32 accumulation error remains: relative ~n * 2**-24
    <= 2e-5 for n <= ~200 -> mean atol 2e-5 * max|x|, variance rtol 1e-4 plus atol 1e-5 * max|x| (the mean's error
    enters the centred sum).
    """
    x32, _, _ = _make(case)
    x = (x32 + offset).half()
    assert torch.isfinite(x).all()
    groups = case["groups"]
    stats = _strip_stats(x, case["sizes"], groups)
    assert stats.dtype == torch.float32
    assert torch.isfinite(stats).all()
    mean, var = merge_group_stats(stats)
    ref_mean, ref_var = _reference_stats(x, groups)
    mag = x.double().abs().max().item()
    torch.testing.assert_close(mean.double(), ref_mean, atol=2e-5 * mag, rtol=0)
    torch.testing.assert_close(var.double(), ref_var, atol=1e-5 * mag, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# corrected_group_stats
# ---------------------------------------------------------------------------------------------------------------------


@given(group_inputs(), st.data())
def test_corrected_stats_fixed_point_is_exact(case: dict, data: st.DataObject) -> None:
    """Fixed point (invariant 3 of the dossier): when the fresh own statistics equal the stale own ones exactly,
    corrected_group_stats returns merge_group_stats(stale) bit for bit (torch.equal) and falls back nowhere.
    """
    x, _, _ = _make(case)
    stale = _strip_stats(x, case["sizes"], case["groups"])
    own = data.draw(st.integers(0, len(case["sizes"]) - 1))
    mean, var, fell_back = corrected_group_stats(stale, own, stale[own].clone())
    g_mean, g_var = merge_group_stats(stale)
    assert torch.equal(mean, g_mean)
    assert torch.equal(var, g_var)
    assert fell_back.dtype == torch.bool
    assert not fell_back.any()


@given(group_inputs(), st.data(), st.floats(-5.0, 5.0))
def test_corrected_mean_is_exact_when_every_strip_shifts_alike(case: dict, data: st.DataObject, shift: float) -> None:
    """If the whole input shifts by a constant (x -> x + c on every strip), the corrected mean computed from the stale
    statistics and the own strip's fresh ones equals the true global mean of the shifted data: the correction assumes
    every strip moved as the own strip did, which is then true.

    Tolerance: fp32 means of values of magnitude <= ~20 against fp64: atol = rtol = 1e-5.
    """
    x, _, _ = _make(case)
    groups, sizes = case["groups"], case["sizes"]
    stale = _strip_stats(x, sizes, groups)
    own = data.draw(st.integers(0, len(sizes) - 1))
    shifted = x + shift
    fresh = local_group_stats(torch.split(shifted, sizes, dim=2)[own], groups)
    mean, _, _ = corrected_group_stats(stale, own, fresh)
    ref_mean, _ = _reference_stats(shifted, groups)
    torch.testing.assert_close(mean.double(), ref_mean, atol=1e-5, rtol=1e-5)


@given(group_inputs(), st.data(), SEEDS)
def test_corrected_stats_match_the_raw_moment_formula(case: dict, data: st.DataObject, seed: int) -> None:
    """For arbitrary stale strips and an arbitrary fresh own strip, corrected_group_stats follows the dossier's
    definition (section 1.5, with count-weighted merging): M_k = merged_stale_k + (fresh_k - stale_own_k) for the raw
    moments k = 1, 2; mean = M1; variance = M2 - M1**2, replaced by the fresh local variance (and marked) where it
    is negative. Evaluated in fp64 as the reference.

    Tolerance: the reference forms M2 - M1**2 with moments up to ~|x|**2 <= ~250 in fp64; the fp32 result carries
    ~1e-7 relative error of those moments -> atol 1e-4 on the variance, 1e-5 on the mean. Entries whose reference
    variance lies within 1e-3 of zero are not checked for the fallback decision (either side is correct there).
    """
    x, _, _ = _make(case)
    groups, sizes = case["groups"], case["sizes"]
    stale = _strip_stats(x, sizes, groups)
    own = data.draw(st.integers(0, len(sizes) - 1))
    g = _gen(seed)
    own_shape = torch.split(x, sizes, dim=2)[own].shape
    new = torch.randn(own_shape, generator=g) * data.draw(st.sampled_from([0.1, 1.0, 3.0])) + data.draw(
        st.sampled_from([0.0, 1.0, -3.0])
    )
    fresh = local_group_stats(new, groups)
    mean, var, fell_back = corrected_group_stats(stale, own, fresh)

    s = stale.double()
    count, s_mean, s_var = s.unbind(-1)
    w = count / count.sum(0)
    m1 = (w * s_mean).sum(0)
    m2 = (w * (s_var + s_mean**2)).sum(0)
    _, f_mean, f_var = fresh.double().unbind(-1)
    m1 = m1 + (f_mean - s_mean[own])
    m2 = m2 + ((f_var + f_mean**2) - (s_var[own] + s_mean[own] ** 2))
    ref_var = m2 - m1**2

    torch.testing.assert_close(mean.double(), m1, atol=1e-5, rtol=1e-5)
    clear = ref_var.abs() > 1e-3
    assert torch.equal(fell_back[clear], (ref_var < 0)[clear])
    assert torch.equal(var[fell_back], fresh[..., 2][fell_back])
    kept = ~fell_back
    torch.testing.assert_close(var[kept].double(), ref_var[kept], atol=1e-4, rtol=1e-5)
    assert (var >= 0).all()


@given(
    strips=st.integers(2, 4),
    batch=st.integers(1, 2),
    groups=st.integers(1, 3),
    data=st.data(),
    seed=SEEDS,
)
def test_corrected_stats_negative_variance_falls_back(
    strips: int, batch: int, groups: int, data: st.DataObject, seed: int
) -> None:
    """Construct stale/fresh statistics where, for a drawn mask of (B, G) entries, the corrected variance is negative
    by about 1 and elsewhere positive. With all means equal (mean mu, no mean shift), the corrected variance is
    ``g_var + f_var - V = (w - 1) V + R + f_var``, where V is the own strip's stale variance, w its weight and R the
    other strips' weighted variance. ``V = (R + f_var + 1) / (1 - w)`` makes it -1 (up to fp32 rounding); ``V = 0``
    makes it ``R + f_var > 0``. Then fell_back equals the mask, and there the variance is the fresh local variance
    exactly.

    Tolerance: off the mask the variance must be R + f_var; fp32 arithmetic on values <= ~100: atol = rtol = 1e-5.
    """
    g = _gen(seed)
    own = data.draw(st.integers(0, strips - 1))
    counts = torch.tensor(
        data.draw(st.lists(st.integers(1, 64), min_size=strips, max_size=strips)), dtype=torch.float64
    )
    mask = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=batch * groups, max_size=batch * groups)), dtype=torch.bool
    ).view(batch, groups)
    mu = torch.randn(batch, groups, generator=g, dtype=torch.float64) * 3
    others_var = torch.rand(strips, batch, groups, generator=g, dtype=torch.float64) * 0.9 + 0.1
    f_var = torch.rand(batch, groups, generator=g, dtype=torch.float64) * 0.9 + 0.1
    weights = counts / counts.sum()
    rest = (weights.view(-1, 1, 1) * others_var).sum(0) - weights[own] * others_var[own]
    big = (rest + f_var + 1.0) / (1.0 - weights[own])
    own_var = torch.where(mask, big, torch.zeros_like(big))
    variances = others_var.clone()
    variances[own] = own_var
    stale = torch.stack(
        [counts.view(-1, 1, 1).expand(strips, batch, groups), mu.expand(strips, batch, groups), variances], dim=-1
    ).float()
    fresh = torch.stack([stale[own, ..., 0], stale[own, ..., 1], f_var.float()], dim=-1)

    mean, var, fell_back = corrected_group_stats(stale, own, fresh)
    assert torch.equal(fell_back, mask), (fell_back, mask)
    assert torch.equal(var[mask], fresh[..., 2][mask])
    torch.testing.assert_close(var[~mask].double(), (rest + f_var)[~mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mean, stale[own, ..., 1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# group_norm_from_stats in low precision
# ---------------------------------------------------------------------------------------------------------------------


@given(group_inputs(torch_reference=True), st.sampled_from([torch.float16, torch.bfloat16]))
def test_group_norm_from_stats_low_precision(case: dict, dtype: torch.dtype) -> None:
    """For fp16/bf16 input, group_norm_from_stats (with the merged fp32 strip statistics) returns the input's dtype and
    shape, and matches F.group_norm computed in fp32 on the same low-precision values and then cast to the dtype.

    Tolerance: both sides are fp32 results rounded once to the dtype, so they may differ by one rounding step of the
    output: atol 1e-2 (the low-precision allowance) plus rtol of one ulp, 2**-10 for fp16 and 2**-7 for bf16 (a value
    near a rounding boundary can round either way, and bf16's ulp at |y| ~ 4 exceeds 1e-2). The fp32 fold error of
    test_group_norm_from_merged_stats_equals_f_group_norm stays below ~2e-3 for the drawn |x| <= ~15, rstd <= 1000.
    """
    x, weight, bias = _make(case, dtype)
    groups = case["groups"]
    if weight is not None:
        assert bias is not None  # _make draws both or neither
        weight, bias = weight.to(dtype), bias.to(dtype)
    mean, var = merge_group_stats(_strip_stats(x, case["sizes"], groups))
    out = group_norm_from_stats(x, groups, mean, var, case["eps"], weight, bias)
    assert out.dtype == dtype
    assert out.shape == x.shape
    ref = F.group_norm(
        x.float(),
        groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        case["eps"],
    ).to(dtype)
    rtol = 2**-10 if dtype == torch.float16 else 2**-7
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=rtol)
