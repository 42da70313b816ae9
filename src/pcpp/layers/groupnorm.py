"""AsyncGroupNorm: GroupNorm whose statistics cover the whole image, not just this rank's strip."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from ..context import PatchContext
from ..exchange import Transfer
from ..stats import LayerKind
from ._common import PatchLayer, share_module

__all__ = ["AsyncGroupNorm"]

logger = logging.getLogger(__name__)


class AsyncGroupNorm(PatchLayer, nn.GroupNorm):
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
        self.attach(context, name, LayerKind.GROUPNORM)

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
        new.attach(context, name, LayerKind.GROUPNORM)
        return new

    def forward(self, x: Tensor) -> Tensor:
        """Normalise this rank's strip with whole-image statistics.

        Args:
            x: ``(B, C, *)`` activations of this rank's strip (any trailing layout, e.g. ``(B, C, h, W)`` maps or
                ``(B, C, tokens)``).

        Returns:
            The normalised strip, shaped and typed like ``x``.
        """
        if self.port.world_size == 1:
            return super().forward(x)
        ops = self.context.norm_ops(x.device)
        fresh = ops.local_stats(x, self.num_groups)
        if torch.compiler.is_compiling():
            # One opaque operator instead of a graph break; see pcpp.layers._ops.
            token = self.port.order_token(x.device)
            mean, var = torch.ops.pcpp.image_group_stats(fresh, token, self.handle)
        else:
            mean, var = self.image_stats(fresh)
        return ops.normalize(x, self.num_groups, mean, var, self.eps, self.weight, self.bias)

    @torch.compiler.disable  # phase branches and communication stay out of compiled graphs
    def image_stats(self, fresh: Tensor) -> tuple[Tensor, Tensor]:
        """Whole-image mean and variance for this step, from this strip's fresh statistics (what
        ``pcpp::image_group_stats`` runs).

        Synchronous steps gather every strip's statistics and merge them. Asynchronous steps correct the previous
        step's merged statistics by the own strip's change, then keep this step's statistics in the own slot (the
        next correction reads them) and send them to every other rank.

        Args:
            fresh: ``(B, G, 3)`` count, mean and biased variance of this strip, float32.

        Returns:
            ``(mean, var)``, each ``(B, G)`` float32.
        """
        port = self.port
        ops = self.context.norm_ops(fresh.device)
        rank, world = port.rank, port.world_size
        gathered = port.buffer("stats", (world * fresh.shape[0],) + tuple(fresh.shape[1:]), fresh)
        slots = gathered.view(world, *fresh.shape)
        if port.synchronous:
            return port.run(
                lambda: Transfer("GroupNorm statistics", gather=(gathered, fresh)), lambda: ops.merged_stats(slots)
            )
        own = gathered[rank * fresh.shape[0] : (rank + 1) * fresh.shape[0]]

        def corrected() -> tuple[Tensor, Tensor]:
            mean, var, fell_back = ops.corrected_stats(slots, rank, fresh)
            if logger.isEnabledFor(logging.DEBUG) and bool(fell_back.any()):
                logger.debug(
                    "%s: corrected variance < 0 in %d groups; used the local variance",
                    self.pcpp_name,
                    int(fell_back.sum()),
                )
            return mean, var

        def send_own() -> Transfer:
            # After ``corrected`` read the slots. The own slot keeps this step's statistics (the next correction
            # reads them) and is what the other ranks receive, point to point.
            own.copy_(fresh)
            return Transfer("GroupNorm statistics", port.gather(own, gathered))

        return port.run(send_own, corrected)
