"""Single-device references for the parallel semantics: partially conditioned attention as a masked attention."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor

from pcpp.functional import partial_rows


def partial_mask(rows: tuple[int, ...], width: int, partial: float) -> Tensor:
    """``(L, L)`` boolean mask: query token q may attend to key token k under PCPP with ``partial``.

    A query in strip s sees strip s, the last ``ceil(partial * rows[s-1])`` rows of strip s-1 and the first
    ``ceil(partial * rows[s+1])`` rows of strip s+1.
    """
    starts = [sum(rows[:i]) for i in range(len(rows))]
    strip_of_row = torch.cat([torch.full((r,), i) for i, r in enumerate(rows)])
    allowed_rows = torch.zeros(sum(rows), sum(rows), dtype=torch.bool)
    for s, (start, count) in enumerate(zip(starts, rows, strict=True)):
        allowed = strip_of_row == s
        if s > 0:
            n_up = partial_rows(partial, rows[s - 1])
            allowed[start - n_up : start] = True
        if s + 1 < len(rows):
            n_down = partial_rows(partial, rows[s + 1])
            allowed[start + count : start + count + n_down] = True
        allowed_rows[start : start + count] = allowed
    # expand rows to row-major tokens
    return allowed_rows.repeat_interleave(width, 0).repeat_interleave(width, 1)


class MaskedSelfAttention(AttnProcessor2_0):
    """Diffusers' SDPA processor with PCPP's key mask on self-attention calls."""

    def __init__(self, height: int, width: int, rows: tuple[int, ...], partial: float, levels: int) -> None:
        super().__init__()
        self.masks: dict[int, Tensor] = {}
        for level in range(levels + 1):
            w = width >> level
            self.masks[(height >> level) * w] = partial_mask(tuple(r >> level for r in rows), w, partial)

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Tensor:
        if encoder_hidden_states is not None or attn.is_cross_attention:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        ndim = hidden_states.ndim
        if ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        b, tokens, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        hd = k.shape[-1] // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, hd).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.masks[tokens])
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * hd)
        out = attn.to_out[1](attn.to_out[0](out))
        if ndim == 4:
            out = out.transpose(-1, -2).reshape(residual.shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
