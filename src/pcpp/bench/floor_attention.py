"""The floor's self-attention: diffusers' processor with its keys and values widened to the token count that a
pcpp mode reads, so that the strip alone costs what it would cost with free communication."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FloorState", "install_floor_processors", "restore_processors", "widened"]


class FloorState:
    """Which key widening the floor processors apply now: ``tables[spec][tokens] = extra tokens``.

    The floor's step function sets ``spec`` before each UNet call; the processors read it.
    """

    def __init__(self) -> None:
        self.tables: dict[str, dict[int, int]] = {}
        self.spec = ""

    def extra(self, tokens: int) -> int:
        """Extra key tokens for a self-attention over ``tokens`` tokens under the current ``spec``."""
        table = self.tables.get(self.spec, {})
        if tokens not in table:
            raise RuntimeError(f"floor: self-attention over {tokens} tokens matches no level of the strip ({table})")
        return table[tokens]


def widened(x: Tensor, extra: int) -> Tensor:
    """``x`` (B, L, C) followed by ``extra`` tokens taken from its start, repeated as needed (one concatenation,
    like the real layer's concatenation of received rows; the values do not matter, only the cost)."""
    tokens = x.shape[1]
    pieces = [x] + [x] * (extra // tokens)
    if extra % tokens:
        pieces.append(x[:, : extra % tokens])
    return torch.cat(pieces, dim=1)


def make_floor_processor(state: FloorState) -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    from pcpp.layers.attention import attend_heads  # the same attention core as pcpp's own layer

    class WidenedSelfAttention(AttnProcessor2_0):
        """Diffusers' SDPA processor whose self-attention keys/values are padded to the widened token count."""

        def __call__(
            self,
            attn: Any,
            hidden_states: Tensor,
            encoder_hidden_states: Tensor | None = None,
            attention_mask: Tensor | None = None,
            temb: Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Tensor:
            if encoder_hidden_states is not None or attn.is_cross_attention or attention_mask is not None:
                out: Tensor = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
                return out
            residual = hidden_states
            if attn.spatial_norm is not None:
                hidden_states = attn.spatial_norm(hidden_states, temb)
            ndim = hidden_states.ndim
            if ndim == 4:
                b, c, h, w = hidden_states.shape
                hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
            batch, tokens, _ = hidden_states.shape
            extra = state.extra(tokens)
            if attn.group_norm is not None:
                hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
            if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
                # --fuse-qkv: one projection, as pcpp's layer and diffusers' FusedAttnProcessor2_0 compute it.
                query, key, value = attn.to_qkv(hidden_states).split(
                    [attn.to_q.out_features, attn.to_k.out_features, attn.to_v.out_features], dim=-1
                )
            else:
                query = attn.to_q(hidden_states)
                key = attn.to_k(hidden_states)
                value = attn.to_v(hidden_states)
            if extra:
                key, value = widened(key, extra), widened(value, extra)
            out = attend_heads(attn, query, key, value)
            out = attn.to_out[1](attn.to_out[0](out))
            if ndim == 4:
                out = out.transpose(-1, -2).reshape(residual.shape)
            if attn.residual_connection:
                out = out + residual
            result: Tensor = out / attn.rescale_output_factor
            return result

    return WidenedSelfAttention()


def install_floor_processors(unet: nn.Module, state: FloorState) -> list[tuple[Any, Any]]:
    """Put the widening processor on every self-attention module; returns ``(module, old processor)`` pairs."""
    from diffusers.models.attention_processor import Attention

    processor = make_floor_processor(state)
    saved = []
    for module in unet.modules():
        if isinstance(module, Attention) and not module.is_cross_attention:
            saved.append((module, module.processor))
            module.set_processor(processor)
    return saved


def restore_processors(saved: list[tuple[Any, Any]]) -> None:
    """Undo :func:`install_floor_processors`."""
    for module, processor in saved:
        module.set_processor(processor)
