"""PartialPatchAttention: self-attention of one strip over its own tokens plus some of its neighbours'."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from torch import Tensor

from ..comm.base import other_slot
from ..config import Conditioning
from ..context import PatchContext
from ..errors import ConversionError, PCPPError
from ..exchange import Transfer
from ..functional import partial_rows
from ..stats import LayerKind
from ._common import PatchLayer, share_module

__all__ = ["SUPPORTED_PROCESSORS", "PartialPatchAttention", "attend_heads"]

SUPPORTED_PROCESSORS: tuple[type, ...] = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)
"""Processors whose maths :class:`PartialPatchAttention` reproduces (plain softmax attention; with
``FusedAttnProcessor2_0``, set by diffusers' ``fuse_qkv_projections()``, one ``to_qkv`` projection)."""


class PartialPatchAttention(PatchLayer, Attention):
    """A diffusers self-``Attention`` over one horizontal strip of the image.

    Queries are the strip's own tokens. Keys and values (projected, so each rank projects only its own tokens)
    depend on the step's phase and the context's :class:`pcpp.Conditioning`:

    * synchronous steps: every strip's keys and values of this step, in image order (exact);
    * asynchronous, ``PARTIAL``: the own strip (fresh) plus ``ceil(partial * rows)`` rows of each adjacent
      strip, the rows nearest the shared boundary, from the previous step; only those rows are sent, point to
      point (``partial=0`` sends nothing);
    * asynchronous, ``FULL`` (DistriFusion): the own strip (fresh) plus every other strip from the previous step.

    After diffusers' ``unet.fuse_qkv_projections()`` (processor ``FusedAttnProcessor2_0``), queries, keys and
    values come from the one ``to_qkv`` projection, as diffusers computes them: one matrix multiplication instead
    of three, and the keys and values a view of its output rather than a concatenated copy.

    The partial ratio is read from ``context.config`` at every call, so it is a runtime setting
    (:func:`pcpp.configure`). Cross-attention calls (``encoder_hidden_states`` given) run unchanged.

    Args:
        *args: as diffusers' ``Attention``.
        context: the shared step state.
        name: qualified name, for error messages.
        **kwargs: as diffusers' ``Attention``.

    Raises:
        ConversionError: the module is cross-attention, has added K/V projections, or uses a processor other
            than diffusers' ``AttnProcessor``, ``AttnProcessor2_0`` or ``FusedAttnProcessor2_0`` (the latter with its
            ``to_qkv`` projection).

    Example:
        >>> import torch, pcpp
        >>> from pcpp.context import PatchContext
        >>> ctx = PatchContext(pcpp.PCPPConfig(), pcpp.comm.LocalCommunicator(), unit=1, levels=0)
        >>> attn = PartialPatchAttention(8, heads=2, dim_head=4, context=ctx)
        >>> attn(torch.randn(1, 16, 8)).shape
        torch.Size([1, 16, 8])
    """

    def __init__(self, *args: Any, context: PatchContext, name: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup(context, name)

    @classmethod
    def from_attention(cls, attn: Attention, context: PatchContext, *, name: str = "") -> PartialPatchAttention:
        """Wrap an existing self-attention module, sharing all of its submodules and weights.

        Args:
            attn: the diffusers ``Attention`` to replace.
            context: the shared step state.
            name: qualified name, for error messages.

        Returns:
            The parallel attention; ``attn`` itself is left unchanged.

        Raises:
            ConversionError: ``attn`` cannot be split (see the class docstring).
        """
        new = share_module(attn, cls)  # attn itself is not touched, whether or not the check below passes
        new._setup(context, name)
        return new

    def _setup(self, context: PatchContext, name: str) -> None:
        self._check_supported(name or type(self).__name__)
        self.attach(context, name, LayerKind.ATTENTION)

    def _check_supported(self, name: str) -> None:
        """Raise ``ConversionError`` unless this module's maths can be split (a subclass states its own rule)."""
        check_supported(self, name)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> Tensor:
        """Attend from this rank's strip; see the class docstring.

        Args:
            hidden_states: the strip's tokens ``(B, L, C)`` in row-major order, or a map ``(B, C, h, W)``.
            encoder_hidden_states: if given, this is a cross-attention call and runs unchanged.
            attention_mask: must be ``None`` for split self-attention.
            **cross_attention_kwargs: ``temb`` for spatial norms; others are passed on as diffusers does.

        Returns:
            The attention output for the strip, shaped like ``hidden_states``.

        Raises:
            PCPPError: an attention mask was given for split self-attention.
        """
        if self.port.world_size == 1 or encoder_hidden_states is not None:
            return super().forward(hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs)
        if attention_mask is not None:
            raise PCPPError(
                f"{self.pcpp_name}: self-attention masks cannot be split into strips; call the UNet without "
                "an attention_mask, or use one rank."
            )
        return self._strip_forward(hidden_states, cross_attention_kwargs.get("temb"))

    def _strip_forward(self, hidden_states: Tensor, temb: Tensor | None) -> Tensor:
        geo = self.port.geometry()
        rank = self.port.rank
        residual = hidden_states
        if self.spatial_norm is not None:
            hidden_states = self.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            level = geo.level_of(rank, height)
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        else:
            batch = hidden_states.shape[0]
            level, width = geo.level_of_tokens(rank, hidden_states.shape[1])
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, kv = self._project(hidden_states)
        if torch.compiler.is_compiling():
            # One opaque operator: no graph break, and its output shape is the same in every phase.
            token = self.port.order_token(kv.device)
            out = torch.ops.pcpp.strip_attention(query, kv, token, self.handle, level, width)
        else:
            out = self.attend(query, kv, level, width)
        out = self.to_out[0](out)
        out = self.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def _project(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """The strip's queries, and its keys and values concatenated on the last dimension.

        Keys and values travel together: one exchange per layer instead of two.
        """
        if isinstance(self.processor, FusedAttnProcessor2_0):
            # diffusers' fused projections: one matrix multiplication; keys and values are a view of its output
            # (no concatenation). The exchanges copy what they send where a view will not do.
            qkv = self.to_qkv(hidden_states)
            inner = self.to_q.out_features
            return qkv[..., :inner], qkv[..., inner:]
        query = self.to_q(hidden_states)
        return query, torch.cat([self.to_k(hidden_states), self.to_v(hidden_states)], dim=-1)

    def attend(self, query: Tensor, kv: Tensor, level: int, width: int) -> Tensor:
        """Scaled dot-product attention of the strip's queries over the keys and values this step reads (what
        ``pcpp::strip_attention`` runs).

        Args:
            query: ``(B, L, heads * head_dim)`` projected queries of the strip.
            kv: ``(B, L, 2 * inner)`` the strip's keys and values, concatenated on the last dimension.
            level: the resolution level of the strip.
            width: the activation width at that level.

        Returns:
            ``(B, L, heads * value_head_dim)``, before the output projection.
        """
        inner = query.shape[-1]
        kv = self._context_kv(kv, self.port.geometry().strip_rows(level), width)
        key, value = kv.split([inner, kv.shape[-1] - inner], dim=-1)
        return attend_heads(self, query, key, value)

    @torch.compiler.disable  # phase branches and communication stay out of compiled graphs
    def _context_kv(self, kv: Tensor, rows: tuple[int, ...], width: int) -> Tensor:
        """The keys and values (concatenated on the last dim) that this strip's queries attend to."""
        port = self.port
        if port.config.conditioning is Conditioning.FULL:
            return self._full(kv, rows, width)
        if port.synchronous:
            return self._partial_sync(kv, rows, width)
        return self._partial_async(kv, rows, width)

    def _padded(self, kv: Tensor, tokens: int, *, kept: bool) -> Tensor:
        """This strip's K/V as a gather sends it, padded to ``tokens`` (the tallest strip's). ``kept``: the send
        outlives this call (see :meth:`pcpp.exchange.ExchangePort.send_copy`)."""
        if kv.shape[1] < tokens:
            return F.pad(kv, (0, 0, 0, tokens - kv.shape[1]))
        # A view of fused projections is not contiguous, as the gather needs.
        return self.port.send_copy(kv) if kept else kv.contiguous()

    def _full(self, kv: Tensor, rows: tuple[int, ...], width: int) -> Tensor:
        """DistriFusion's key set: every other strip's K/V, gathered point to point into the layer's buffer (this
        step's in synchronous steps, the previous step's after), around the own strip's fresh K/V.

        The buffer has ``world - 1`` slots padded to the tallest strip, in rank order, and none for the own strip:
        every step reads that fresh, so keeping it would only cost memory (a ``1 / world`` share of the buffer).
        """
        port = self.port
        batch, world = kv.shape[0], port.world_size
        others = port.buffer("others", ((world - 1) * batch, max(rows) * width, kv.shape[2]), kv)
        synchronous = port.synchronous

        def gather() -> Transfer:
            # Asynchronous steps send after ``others`` was read: the gather overwrites it for the next step.
            mine = self._padded(kv, max(rows) * width, kept=not synchronous)
            purpose = "K/V gather" if synchronous else "K/V all-gather"
            return Transfer(purpose, port.gather(mine, others, own_slot=False))

        def in_image_order() -> Tensor:
            parts = []
            for j in range(world):
                slot = other_slot(port.rank, j)
                parts.append(kv if j == port.rank else others[slot * batch : (slot + 1) * batch, : rows[j] * width])
            return torch.cat(parts, dim=1)

        return port.run(gather, in_image_order)

    def _partial_sync(self, kv: Tensor, rows: tuple[int, ...], width: int) -> Tensor:
        """Every strip's K/V of this step, by an all-gather into the context's scratch buffer (nothing of it
        outlives this call); the neighbour rows the first asynchronous step reads are copied out."""
        port = self.port
        batch, world = kv.shape[0], port.world_size
        tokens = max(rows) * width
        gathered = port.scratch((world * batch, tokens, kv.shape[2]), kv)

        def strips() -> Tensor:
            parts = [gathered[j * batch : (j + 1) * batch, : rows[j] * width] for j in range(world)]
            self._keep_neighbour_rows(parts, rows, width, kv)
            return torch.cat(parts, dim=1)

        return port.run(
            lambda: Transfer("K/V all-gather", gather=(gathered, self._padded(kv, tokens, kept=False))), strips
        )

    def _keep_neighbour_rows(self, strips: list[Tensor], rows: tuple[int, ...], width: int, like: Tensor) -> None:
        """After a synchronous step, store what the first asynchronous step reads from the neighbours."""
        port = self.port
        rank, world = port.rank, port.world_size
        partial = port.config.partial
        if rank > 0:
            n_up = partial_rows(partial, rows[rank - 1])
            if n_up:
                buf = port.buffer("up", (like.shape[0], n_up * width, like.shape[2]), like)
                buf.copy_(strips[rank - 1][:, (rows[rank - 1] - n_up) * width :])
        if rank + 1 < world:
            n_down = partial_rows(partial, rows[rank + 1])
            if n_down:
                buf = port.buffer("down", (like.shape[0], n_down * width, like.shape[2]), like)
                buf.copy_(strips[rank + 1][:, : n_down * width])

    def _partial_async(self, kv: Tensor, rows: tuple[int, ...], width: int) -> Tensor:
        """The own strip's fresh K/V between the previous step's ``ceil(partial * rows)`` nearest rows of each
        adjacent strip; this step's boundary rows go out for the neighbours' next step."""
        port = self.port
        rank, world = port.rank, port.world_size
        partial = port.config.partial
        batch, channels = kv.shape[0], kv.shape[2]
        n_up = partial_rows(partial, rows[rank - 1]) if rank > 0 else 0
        n_down = partial_rows(partial, rows[rank + 1]) if rank + 1 < world else 0
        recv_up = port.buffer("up", (batch, n_up * width, channels), kv) if n_up else None
        recv_down = port.buffer("down", (batch, n_down * width, channels), kv) if n_down else None
        n_me = partial_rows(partial, rows[rank])

        def with_neighbours() -> Tensor:
            parts = [t for t in (recv_up, kv, recv_down) if t is not None]
            return torch.cat(parts, dim=1) if len(parts) > 1 else kv

        def boundary_rows() -> Transfer:
            # partial=0 sends nothing, but the layer still joins its batch (see ExchangeService.post).
            return Transfer(
                "partial K/V exchange",
                port.neighbours(
                    send_up=kv[:, : n_me * width] if rank > 0 and n_me else None,
                    send_down=kv[:, (rows[rank] - n_me) * width :] if rank + 1 < world and n_me else None,
                    recv_up=recv_up,
                    recv_down=recv_down,
                ),
            )

        return port.run(boundary_rows, with_neighbours)


def attend_heads(attn: Attention, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """The core of diffusers' ``AttnProcessor2_0``: split heads, q/k norms, scaled dot-product attention, merge.

    Args:
        attn: the module whose heads, norms and scale apply.
        query: ``(B, Lq, heads * head_dim)`` projected queries.
        key: ``(B, Lk, heads * head_dim)`` projected keys (any number of tokens).
        value: ``(B, Lk, heads * value_head_dim)`` projected values.

    Returns:
        ``(B, Lq, heads * value_head_dim)``, before the output projection.
    """
    batch, heads = query.shape[0], attn.heads
    head_dim = query.shape[-1] // heads
    query = query.view(batch, -1, heads, head_dim).transpose(1, 2)
    key = key.reshape(batch, -1, heads, head_dim).transpose(1, 2)
    value = value.reshape(batch, -1, heads, value.shape[-1] // heads).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scale = None if attn.scale_qk else attn.scale
    out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False, scale=scale)
    return out.transpose(1, 2).reshape(batch, -1, heads * out.shape[-1]).to(query.dtype)


def check_supported(attn: Attention, name: str) -> None:
    """Raise unless ``attn`` is a self-attention that :class:`PartialPatchAttention` can split.

    Raises:
        ConversionError: naming the module and what makes it unsupported.
    """
    if getattr(attn, "added_kv_proj_dim", None) is not None:
        raise ConversionError(
            f"{name} ({type(attn).__name__}) has added key/value projections (added_kv_proj_dim): it is split by "
            "pcpp.layers.added_kv.AddedKVAttention, not by PartialPatchAttention."
        )
    if attn.is_cross_attention:
        raise ConversionError(f"{name} is cross-attention; it needs no splitting and must stay as it is.")
    processor = attn.processor
    if type(processor) not in SUPPORTED_PROCESSORS:
        raise ConversionError(
            f"{name} uses attention processor {type(processor).__name__}, whose maths pcpp cannot reproduce on "
            f"strips; supported: {', '.join(p.__name__ for p in SUPPORTED_PROCESSORS)}. Call "
            "unet.set_default_attn_processor() (or fuse LoRA) before pcpp.convert."
        )
    if isinstance(processor, FusedAttnProcessor2_0) and getattr(attn, "to_qkv", None) is None:
        raise ConversionError(
            f"{name} uses FusedAttnProcessor2_0 but has no fused to_qkv projection; call "
            "unet.fuse_qkv_projections() (which builds it) or unet.set_default_attn_processor() before pcpp.convert."
        )
