"""PartialPatchConv2d: a Conv2d whose input rows near the strip boundaries come from the neighbouring ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..comm.base import Handle
from ..config import Phase
from ..context import Geometry, PatchContext
from ..errors import ConversionError, PCPPError
from ..functional import ConvHalo, conv_halo
from ..stats import LayerKind
from ._common import PatchLayerState, require_geometry, share_module

__all__ = ["PartialPatchConv2d"]


def _resolve_padding(conv: nn.Conv2d, where: str) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` zero padding of ``conv``, resolving ``'same'`` and ``'valid'``."""
    if conv.padding_mode != "zeros":
        raise ConversionError(
            f"{where}: Conv2d with padding_mode={conv.padding_mode!r} cannot be split into strips (its padding "
            "reads rows of other strips); only padding_mode='zeros' is supported."
        )
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return 0, 0, 0, 0
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        return total[0] // 2, total[0] - total[0] // 2, total[1] // 2, total[1] - total[1] // 2
    ph, pw = conv.padding
    return ph, ph, pw, pw


class PartialPatchConv2d(PatchLayerState, nn.Conv2d):
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
        ConversionError: the conv's padding mode reads across strips (only ``'zeros'`` works).

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
            ConversionError: the conv's padding mode reads across strips.
        """
        new = share_module(conv, cls)
        new._setup(context, entry=entry, row_padding=row_padding, name=name)
        return new

    def _setup(self, context: PatchContext, *, entry: bool, row_padding: tuple[int, int], name: str) -> None:
        pad_top, pad_bottom, pad_left, pad_right = _resolve_padding(self, name or type(self).__name__)
        self.entry = entry
        self.row_padding = (int(row_padding[0]), int(row_padding[1]))
        self._pads = (pad_top + self.row_padding[0], pad_bottom + self.row_padding[1])
        self._width_pad = (pad_left, pad_right)
        self._plans: dict[tuple[int, int], list[ConvHalo]] = {}
        self._attach(context, name)

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
        comm = self.context.patch
        if comm.world_size == 1:
            return super().forward(x)
        require_geometry(self.context, self.pcpp_name)
        geo = self.context.geometry
        assert geo is not None  # for mypy; require_geometry raised otherwise
        return self._entry_forward(x, geo) if self.entry else self._strip_forward(x, geo)

    def _entry_forward(self, x: Tensor, geo: Geometry) -> Tensor:
        rank = self.context.patch.rank
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
            # One opaque operator instead of a graph break; see pcpp.layers._ops.
            token = self.context.order_token(strip.device)
            return self._conv(torch.ops.pcpp.conv_halo(strip, token, self._handle))
        return self._conv(self._with_halo(strip, geo))

    def padded_rows(self, height: int) -> int:
        """Rows of this rank's strip of ``height`` rows once its halo and edge zeros are attached.

        Args:
            height: rows of the strip as this conv receives it (without ``row_padding``).

        Returns:
            The height of what the conv then convolves (the shape of ``pcpp::conv_halo``'s output).

        Raises:
            PCPPError: no step is open, or ``height`` matches no level of the strip.
        """
        require_geometry(self.context, self.pcpp_name)
        geo = self.context.geometry
        assert geo is not None  # for mypy
        rank = self.context.patch.rank
        level = geo.level_of(rank, height)
        mine = self._halos(geo, level, geo.level_height(level))[rank]
        halo = mine.zeros_top + mine.from_above + mine.from_below + mine.zeros_bottom
        return height - mine.crop_top - mine.crop_bottom + halo

    # Every phase-dependent branch and all communication sit in this one method. Under torch.compile it runs
    # inside the pcpp::conv_halo operator (the decorator only matters where it is called directly while compiling).
    @torch.compiler.disable
    def _with_halo(self, strip: Tensor, geo: Geometry) -> Tensor:
        """The strip with its halo rows (and image-edge zeros) attached, ready for a height-unpadded conv.

        In asynchronous steps this step's boundary rows are posted for the neighbours' next step right after the
        halo was assembled (so before the conv runs): the assembly has read the receive buffers by then, in
        stream order on a GPU and in program order on a CPU, and the exchange overlaps with the conv itself.
        """
        ctx, state = self.context, self._state
        rank = ctx.patch.rank
        level = geo.level_of(rank, strip.shape[2])
        plans = self._halos(geo, level, geo.level_height(level))
        mine = plans[rank]
        h = strip.shape[2]
        batch, channels, width = strip.shape[0], strip.shape[1], strip.shape[3]
        recv_up = state.get("up", (batch, channels, mine.from_above, width), strip) if mine.from_above else None
        recv_down = state.get("down", (batch, channels, mine.from_below, width), strip) if mine.from_below else None
        state.wait()
        sync = ctx.phase is Phase.SYNC
        if sync:
            self._post(strip, plans, recv_up, recv_down).wait()
        else:
            state.require_previous_step(ctx, self.pcpp_name)
        parts: list[Tensor] = []
        if mine.zeros_top:
            parts.append(state.get("zt", (batch, channels, mine.zeros_top, width), strip, zeros=True))
        if recv_up is not None:
            parts.append(recv_up)
        parts.append(strip[:, :, mine.crop_top : h - mine.crop_bottom])
        if recv_down is not None:
            parts.append(recv_down)
        if mine.zeros_bottom:
            parts.append(state.get("zb", (batch, channels, mine.zeros_bottom, width), strip, zeros=True))
        padded = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        if not sync:
            state.pending = self._post(strip, plans, recv_up, recv_down)
        state.tag = (ctx.image, ctx.step)
        return padded

    def _post(self, strip: Tensor, plans: list[ConvHalo], recv_up: Tensor | None, recv_down: Tensor | None) -> Handle:
        comm = self.context.patch
        rank, world, h = comm.rank, comm.world_size, strip.shape[2]
        send_up = send_down = None
        if rank > 0 and plans[rank - 1].from_below:
            send_up = strip[:, :, : plans[rank - 1].from_below]
        if rank + 1 < world and plans[rank + 1].from_above:
            send_down = strip[:, :, h - plans[rank + 1].from_above :]
        send_up, send_down = self._send_pair(send_up, send_down)
        itemsize = strip.element_size()
        sent = sum(t.numel() for t in (send_up, send_down) if t is not None) * itemsize
        received = sum(t.numel() for t in (recv_up, recv_down) if t is not None) * itemsize
        self.context.stats.record(LayerKind.CONV, sent=sent, received=received)
        return comm.exchange(
            send_up=send_up,
            send_down=send_down,
            recv_up=recv_up,
            recv_down=recv_down,
            tag=self._tag,
            what=f"{self.pcpp_name} (conv halo, step {self.context.step})",
        )

    def extra_repr(self) -> str:
        extra = ", entry=True" if self.entry else ""
        if self.row_padding != (0, 0):
            extra += f", row_padding={self.row_padding}"
        return super().extra_repr() + extra
