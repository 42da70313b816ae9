"""AsyncGroupNorm: GroupNorm whose statistics cover the whole image, not just this rank's strip."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..comm.base import Handle, gather_messages
from ..config import Phase
from ..context import PatchContext
from ..kernels import NormOps
from ..stats import LayerKind
from ._common import PatchLayerState, share_module

__all__ = ["AsyncGroupNorm"]

logger = logging.getLogger(__name__)


class AsyncGroupNorm(PatchLayerState, nn.GroupNorm):
    """``GroupNorm`` over an image split into strips, one per rank.

    Each rank computes per-group count, mean and biased variance of its strip in float32. In synchronous steps
    the statistics of all strips are gathered and merged exactly (Chan's formula over the global element count,
    biased variance, as ``torch.nn.GroupNorm``). In asynchronous steps DistriFusion's corrected statistics are
    used: the previous step's merged statistics plus this strip's own change since then; this step's statistics
    are gathered in the background for the next step.

    Args:
        *args: as ``torch.nn.GroupNorm``.
        context: the shared step state.
        name: qualified name, for error messages.
        **kwargs: as ``torch.nn.GroupNorm``.

    Example:
        >>> import torch, pcpp
        >>> from pcpp.context import PatchContext
        >>> ctx = PatchContext(pcpp.PCPPConfig(), pcpp.comm.LocalCommunicator(), unit=1, levels=0)
        >>> AsyncGroupNorm(2, 4, context=ctx)(torch.randn(1, 4, 8, 8)).shape
        torch.Size([1, 4, 8, 8])
    """

    def __init__(self, *args: Any, context: PatchContext, name: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._attach(context, name)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, context: PatchContext, *, name: str = "") -> AsyncGroupNorm:
        """Wrap an existing ``GroupNorm``, sharing its weight and bias.

        Args:
            norm: the norm to replace.
            context: the shared step state.
            name: qualified name, for error messages.

        Returns:
            The parallel norm; ``norm`` itself is left unchanged.
        """
        new = share_module(norm, cls)
        new._attach(context, name)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """Normalise this rank's strip with whole-image statistics.

        Args:
            x: ``(B, C, *)`` activations of this rank's strip (any trailing layout, e.g. ``(B, C, h, W)`` maps or
                ``(B, C, tokens)``).

        Returns:
            The normalised strip, shaped and typed like ``x``.
        """
        ctx = self.context
        comm = ctx.patch
        if comm.world_size == 1:
            return super().forward(x)
        ops = ctx.norm_ops(x.device)
        fresh = ops.local_stats(x, self.num_groups)
        if torch.compiler.is_compiling():
            # One opaque operator instead of a graph break; see pcpp.layers._ops.
            token = ctx.order_token(x.device)
            mean, var = torch.ops.pcpp.image_group_stats(fresh, token, self._handle)
        else:
            mean, var = self._image_stats(fresh, ops)
        return ops.normalize(x, self.num_groups, mean, var, self.eps, self.weight, self.bias)

    @torch.compiler.disable  # phase branches and communication stay out of compiled graphs
    def _image_stats(self, fresh: Tensor, ops: NormOps) -> tuple[Tensor, Tensor]:
        """Whole-image mean and variance for this step, from this strip's fresh statistics."""
        ctx, state = self.context, self._state
        comm = ctx.patch
        gathered = state.get("stats", (comm.world_size * fresh.shape[0],) + tuple(fresh.shape[1:]), fresh)
        state.wait()
        if ctx.phase is Phase.SYNC:
            self._post(gathered, fresh).wait()
            mean, var = ops.merged_stats(gathered.view(comm.world_size, *fresh.shape))
        else:
            state.require_previous_step(ctx, self.pcpp_name)
            mean, var, fell_back = ops.corrected_stats(gathered.view(comm.world_size, *fresh.shape), comm.rank, fresh)
            if logger.isEnabledFor(logging.DEBUG) and bool(fell_back.any()):
                logger.debug(
                    "%s: corrected variance < 0 in %d groups; used the local variance",
                    self.pcpp_name,
                    int(fell_back.sum()),
                )
            # Reading ``gathered`` above is ordered before it is overwritten below (same stream, or CPU). The own
            # slot keeps this step's statistics (the next step's correction reads them) and is what the other
            # ranks receive, point to point, with the next layers' exchanges.
            own = gathered[comm.rank * fresh.shape[0] : (comm.rank + 1) * fresh.shape[0]]
            own.copy_(fresh)
            self._record(fresh)
            state.pending = ctx.defer(
                gather_messages(comm.rank, comm.world_size, own, gathered, self._tag), self._what()
            )
        state.tag = (ctx.image, ctx.step)
        return mean, var

    def _what(self) -> str:
        return f"{self.pcpp_name} (GroupNorm statistics, step {self.context.step})"

    def _record(self, fresh: Tensor) -> None:
        others = self.context.patch.world_size - 1
        nbytes = fresh.numel() * fresh.element_size()
        self.context.stats.record(LayerKind.GROUPNORM, sent=nbytes * others, received=nbytes * others)

    def _post(self, gathered: Tensor, fresh: Tensor) -> Handle:
        self._record(fresh)
        return self.context.patch.all_gather(gathered, fresh, what=self._what())
