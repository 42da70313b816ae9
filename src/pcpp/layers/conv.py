"""PartialPatchConv2d: a Conv2d whose input rows near the strip boundaries come from the neighbouring ranks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..context import PatchContext
from ..errors import ConversionError, PCPPError
from ..exchange import Transfer
from ..functional import ConvHalo, conv_halo, top_padding_problem
from ..geometry import Geometry
from ..stats import LayerKind
from ._common import PatchLayer, share_module

__all__ = ["PartialPatchConv2d", "split_padding"]


def split_padding(conv: nn.Conv2d, row_padding: tuple[int, int], where: str) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero rows and columns around what ``conv`` convolves, or why pcpp cannot
    split it: the one place of the padding rules, used by :func:`pcpp.plan.plan_conversion` and the layer.

    Args:
        conv: the convolution.
        row_padding: ``(top, bottom)`` zero rows its parent block pads on before calling it (counted in).
        where: the conv's qualified name, for the error.

    Returns:
        The padding, ``'same'`` and ``'valid'`` resolved.

    Raises:
        ConversionError: its padding mode reads rows of other strips (only ``'zeros'`` does not), or its top
            padding exceeds the kernel's reach.
    """
    if conv.padding_mode != "zeros":
        raise ConversionError(
            f"{where} (Conv2d): padding_mode={conv.padding_mode!r} pads with rows of other strips; only 'zeros' can "
            "be split"
        )
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            top = bottom = left = right = 0
        else:
            total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
            top, bottom, left, right = total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2
    else:
        (top, left), (bottom, right) = conv.padding, conv.padding
    top, bottom = top + int(row_padding[0]), bottom + int(row_padding[1])
    problem = top_padding_problem(top, conv.dilation[0] * (conv.kernel_size[0] - 1))
    if problem is not None:
        raise ConversionError(f"{where} (Conv2d): {problem}")
    return top, bottom, left, right


def _attach(
    strip: Tensor,
    mine: ConvHalo,
    from_above: Tensor | None,
    from_below: Tensor | None,
    zeros: Callable[[str, int], Tensor],
) -> Tensor:
    """``strip``, cropped as ``mine`` says, between its halo rows and image-edge zeros, along the height.

    Args:
        strip: ``(B, C, h, W)`` rows of this rank.
        mine: this rank's halo plan.
        from_above: the rows read from the strip above, or ``None``.
        from_below: the rows read from the strip below, or ``None``.
        zeros: ``zeros(key, rows)`` gives ``rows`` rows of zeros (key ``"zt"`` at the top, ``"zb"`` at the bottom).

    Returns:
        What the height-unpadded conv convolves.
    """
    h = strip.shape[2]
    parts: list[Tensor] = []
    if mine.zeros_top:
        parts.append(zeros("zt", mine.zeros_top))
    if from_above is not None:
        parts.append(from_above)
    parts.append(strip[:, :, mine.crop_top : h - mine.crop_bottom])
    if from_below is not None:
        parts.append(from_below)
    if mine.zeros_bottom:
        parts.append(zeros("zb", mine.zeros_bottom))
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]


class PartialPatchConv2d(PatchLayer, nn.Conv2d):
    """A ``Conv2d`` applied to one horizontal strip, with halo rows from the strips above and below.

    In synchronous steps the halo rows are this step's, exchanged point-to-point before the convolution, so the
    result equals the full-image convolution. In asynchronous steps the halo rows are the neighbours' rows of the
    previous step, already received, and this step's rows are posted for the next step while compute goes on.
    Only the neighbours exchange, and only the rows the kernel reads (1 for a 3x3 conv, none below for a
    stride-2 downsampler).

    Args:
        *args: as ``torch.nn.Conv2d``.
        context: the shared step state (communicator, phase, geometry).
        entry: whether this is the UNet's first conv, which receives the full-height input and cuts its strip
            out itself (exact, no communication).
        row_padding: ``(top, bottom)`` zero rows that the enclosing block pads onto the input before calling
            this conv (diffusers' ``Downsample2D`` with ``padding=0`` pads one row at the bottom); they are
            replaced with the neighbours' real rows.
        name: qualified name, for error messages.
        **kwargs: as ``torch.nn.Conv2d``.

    Raises:
        ConversionError: the conv's padding cannot be split (see :func:`split_padding`).

    Example:
        >>> import torch, pcpp
        >>> from pcpp.context import PatchContext
        >>> ctx = PatchContext(pcpp.PCPPConfig(), pcpp.comm.LocalCommunicator(), unit=1, levels=0)
        >>> conv = PartialPatchConv2d(4, 4, 3, padding=1, context=ctx)
        >>> conv(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 4, 8, 8])
    """

    def __init__(
        self,
        *args: Any,
        context: PatchContext,
        entry: bool = False,
        row_padding: tuple[int, int] = (0, 0),
        name: str = "",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._setup(context, entry=entry, row_padding=row_padding, name=name)

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        context: PatchContext,
        *,
        entry: bool = False,
        row_padding: tuple[int, int] = (0, 0),
        name: str = "",
    ) -> PartialPatchConv2d:
        """Wrap an existing ``Conv2d``, sharing its weight and bias.

        Args:
            conv: the convolution to replace.
            context: the shared step state.
            entry: see the class docstring.
            row_padding: see the class docstring.
            name: qualified name, for error messages.

        Returns:
            The parallel conv; ``conv`` itself is left unchanged.

        Raises:
            ConversionError: the conv's padding cannot be split (see :func:`split_padding`).
        """
        new = share_module(conv, cls)
        new._setup(context, entry=entry, row_padding=row_padding, name=name)
        return new

    def _setup(self, context: PatchContext, *, entry: bool, row_padding: tuple[int, int], name: str) -> None:
        pad_top, pad_bottom, pad_left, pad_right = split_padding(self, row_padding, name or type(self).__name__)
        self.entry = entry
        self.row_padding = (int(row_padding[0]), int(row_padding[1]))
        self._pads = (pad_top, pad_bottom)
        self._width_pad = (pad_left, pad_right)
        self._plans: dict[tuple[int, int], list[ConvHalo]] = {}
        self.attach(context, name, LayerKind.CONV)

    def _halos(self, geo: Geometry, level: int, height: int) -> list[ConvHalo]:
        """Every strip's halo plan at ``level`` (``height`` rows there), cached per ``(level, height)``.

        Compiled code computes the plans afresh instead (Dynamo folds the arithmetic into constants): a cache
        filled during the first compiled call would fail Dynamo's guards and recompile on the second.
        """
        if torch.compiler.is_compiling():
            return self._plan_halos(geo, level, height)
        key = (level, height)
        plans = self._plans.get(key)
        if plans is None:
            plans = self._plans[key] = self._plan_halos(geo, level, height)
        return plans

    def _plan_halos(self, geo: Geometry, level: int, height: int) -> list[ConvHalo]:
        rows = geo.strip_rows(level)
        starts = [sum(rows[:i]) for i in range(len(rows))]
        plans = [
            conv_halo(
                start=starts[i],
                stop=starts[i] + rows[i],
                height=height,
                kernel=self.kernel_size[0],
                stride=self.stride[0],
                dilation=self.dilation[0],
                pad_top=self._pads[0],
                pad_bottom=self._pads[1],
                last=i == len(rows) - 1,
            )
            for i in range(len(rows))
        ]
        for i, plan in enumerate(plans):
            if (i > 0 and plan.from_above > rows[i - 1]) or (i + 1 < len(rows) and plan.from_below > rows[i + 1]):
                raise PCPPError(
                    f"{self.pcpp_name}: the kernel reads {max(plan.from_above, plan.from_below)} rows across a "
                    f"strip boundary but the neighbouring strips have only {rows} rows at this level; use a "
                    "larger image or fewer ranks."
                )
        return plans

    def _conv(self, x: Tensor) -> Tensor:
        left, right = self._width_pad
        if left != right:
            x = F.pad(x, (left, right))
            left = 0
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, left), self.dilation, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        """Convolve this rank's strip.

        Args:
            x: the strip ``(B, C, h, W)`` (plus ``row_padding`` rows), or the full-height input if ``entry``.

        Returns:
            This rank's strip of the output.
        """
        if self.port.world_size == 1:
            return super().forward(x)
        geo = self.port.geometry()
        return self._entry_forward(x, geo) if self.entry else self._strip_forward(x, geo)

    def _entry_forward(self, x: Tensor, geo: Geometry) -> Tensor:
        rank = self.port.rank
        if x.shape[2] != geo.height:
            raise PCPPError(
                f"{self.pcpp_name}: the entry conv expects the full-height input ({geo.height} rows), got {x.shape[2]}."
            )
        plan = self._halos(geo, 0, geo.height)[rank]
        start = geo.strip_start(rank, 0)
        stop = start + geo.rows[rank]
        piece = x[:, :, start - plan.from_above + plan.crop_top : stop + plan.from_below - plan.crop_bottom]
        if plan.zeros_top or plan.zeros_bottom:
            piece = F.pad(piece, (0, 0, plan.zeros_top, plan.zeros_bottom))
        return self._conv(piece)

    def _strip_forward(self, x: Tensor, geo: Geometry) -> Tensor:
        top_pre, bottom_pre = self.row_padding
        strip = x[:, :, top_pre : x.shape[2] - bottom_pre] if (top_pre or bottom_pre) else x
        if torch.compiler.is_compiling():
            return self._conv(self._traced_halo(strip, geo))
        return self._conv(self._with_halo(strip, geo))

    def _plan(self, geo: Geometry, height: int) -> tuple[ConvHalo, int, int]:
        """This rank's halo plan for a strip of ``height`` rows, and how many of its own rows it sends up and down
        (as many as the neighbours' plans read)."""
        rank, world = self.port.rank, self.port.world_size
        level = geo.level_of(rank, height)
        plans = self._halos(geo, level, geo.level_height(level))
        send_up = plans[rank - 1].from_below if rank > 0 else 0
        send_down = plans[rank + 1].from_above if rank + 1 < world else 0
        return plans[rank], send_up, send_down

    def _traced_halo(self, strip: Tensor, geo: Geometry) -> Tensor:
        """The strip with its halo rows attached, as traced by ``torch.compile``.

        Only the boundary rows go through the ``pcpp::conv_halo_rows`` operator; the assembly stays in the
        compiled graph, where Inductor writes the normalised strip and its halo rows straight into the layout the
        convolution wants. (Assembling inside the operator cost two full copies of the activation per conv at
        1024x1024 on an H100: the concatenation, then Inductor's conversion to channels-last.)
        """
        mine, send_up, send_down = self._plan(geo, strip.shape[2])
        batch, channels, h, width = strip.shape
        edges = [strip[:, :, :send_up].reshape(-1)] if send_up else []
        if send_down:
            edges.append(strip[:, :, h - send_down :].reshape(-1))
        sent = torch.cat(edges) if edges else strip.new_empty(0)
        token = self.port.order_token(strip.device)
        # One opaque operator instead of a graph break; see pcpp.layers._ops.
        halo = torch.ops.pcpp.conv_halo_rows(sent, token, self.handle, list(strip.shape))
        n_up = batch * channels * mine.from_above * width
        return _attach(
            strip,
            mine,
            halo[:n_up].view(batch, channels, mine.from_above, width) if mine.from_above else None,
            halo[n_up:].view(batch, channels, mine.from_below, width) if mine.from_below else None,
            lambda _key, rows: strip.new_zeros(batch, channels, rows, width),
        )

    def halo_numel(self, shape: Sequence[int]) -> int:
        """Elements of the halo rows that a strip of ``shape`` receives (``pcpp::conv_halo_rows``'s output).

        Args:
            shape: ``(B, C, h, W)`` of the strip as this conv receives it (without ``row_padding``).

        Returns:
            ``B * C * W`` times the rows taken from above and below.

        Raises:
            PCPPError: no step is open, or ``h`` matches no level of the strip.
        """
        batch, channels, height, width = shape
        mine, _, _ = self._plan(self.port.geometry(), height)
        return batch * channels * width * (mine.from_above + mine.from_below)

    # All communication goes through _exchange_rows (one call into the exchange protocol), which the eager path
    # reaches through _with_halo and the compiled path through the pcpp::conv_halo_rows operator
    # (swap_halo_rows); the decorators only matter where these methods are called directly while compiling.
    @torch.compiler.disable
    def _with_halo(self, strip: Tensor, geo: Geometry) -> Tensor:
        """The strip with its halo rows (and image-edge zeros) attached, ready for a height-unpadded conv.

        In asynchronous steps this step's boundary rows go out for the neighbours' next step after the halo was
        assembled (:meth:`pcpp.exchange.ExchangePort.run`). They leave at once with ``exchange_batch=1``
        (overlapping with the conv itself), else with the batch of the next layers.
        """
        port = self.port
        mine, send_up, send_down = self._plan(geo, strip.shape[2])
        batch, channels, h, width = strip.shape

        def attach(recv_up: Tensor | None, recv_down: Tensor | None) -> Tensor:
            # The image-edge zeros are kept per layer: eager steps would otherwise allocate them every call.
            return _attach(
                strip,
                mine,
                recv_up,
                recv_down,
                lambda key, rows: port.buffer(key, (batch, channels, rows, width), strip, zeros=True),
            )

        return self._exchange_rows(
            strip[:, :, :send_up] if send_up else None,
            strip[:, :, h - send_down :] if send_down else None,
            mine,
            (batch, channels, width),
            strip,
            attach,
        )

    @torch.compiler.disable
    def swap_halo_rows(self, sent: Tensor, shape: list[int]) -> Tensor:
        """What ``pcpp::conv_halo_rows`` runs: post the flattened boundary rows ``sent`` (rows sent up, then down)
        and return the halo rows this step reads, flattened (rows from above, then from below), as a new tensor.

        Args:
            sent: this rank's boundary rows, flattened.
            shape: ``(B, C, h, W)`` of the strip.

        Returns:
            The halo rows, flattened.
        """
        batch, channels, height, width = shape
        mine, send_up, send_down = self._plan(self.port.geometry(), height)
        n_up = batch * channels * send_up * width
        return self._exchange_rows(
            sent[:n_up].view(batch, channels, send_up, width) if send_up else None,
            sent[n_up:].view(batch, channels, send_down, width) if send_down else None,
            mine,
            (batch, channels, width),
            sent,
            lambda up, down: torch.cat([t.reshape(-1) for t in (up, down) if t is not None] or [sent.new_empty(0)]),
        )

    def _exchange_rows(
        self,
        send_up: Tensor | None,
        send_down: Tensor | None,
        mine: ConvHalo,
        bcw: tuple[int, int, int],
        like: Tensor,
        read: Callable[[Tensor | None, Tensor | None], Tensor],
    ) -> Tensor:
        """Swap boundary rows with the neighbours and return ``read(rows from above, rows from below)``: this
        step's rows in synchronous steps, the previous step's in asynchronous ones."""
        port = self.port
        batch, channels, width = bcw
        recv_up = port.buffer("up", (batch, channels, mine.from_above, width), like) if mine.from_above else None
        recv_down = port.buffer("down", (batch, channels, mine.from_below, width), like) if mine.from_below else None
        return port.run(
            lambda: Transfer(
                "conv halo",
                port.neighbours(send_up=send_up, send_down=send_down, recv_up=recv_up, recv_down=recv_down),
            ),
            lambda: read(recv_up, recv_down),
        )

    def extra_repr(self) -> str:
        extra = ", entry=True" if self.entry else ""
        if self.row_padding != (0, 0):
            extra += f", row_padding={self.row_padding}"
        return super().extra_repr() + extra
