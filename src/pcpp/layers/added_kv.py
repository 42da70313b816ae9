"""AddedKVAttention: diffusers' added-K/V attention (DeepFloyd IF, Kandinsky, unCLIP) over one strip of the image."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor, AttnAddedKVProcessor2_0
from torch import Tensor

from ..errors import ConversionError, PCPPError
from .attention import PartialPatchAttention, attend_heads

__all__ = ["ADDED_KV_PROCESSORS", "AddedKVAttention", "check_added_kv_supported"]

ADDED_KV_PROCESSORS: tuple[type, ...] = (AttnAddedKVProcessor, AttnAddedKVProcessor2_0)
"""Processors whose maths :class:`AddedKVAttention` reproduces."""


class AddedKVAttention(PartialPatchAttention):
    """A diffusers ``Attention`` with ``added_kv_proj_dim`` (processor ``AttnAddedKVProcessor(2_0)``, the
    ``SimpleCrossAttn`` blocks of DeepFloyd IF, Kandinsky 2.x and the unCLIP decoder) over one horizontal strip.

    diffusers' processor attends from the image tokens over the text tokens' ``add_k_proj``/``add_v_proj``
    followed by the image tokens' ``to_k``/``to_v`` (unless ``only_cross_attention``, which pcpp leaves as it is:
    then it reads the text only). Here queries are the strip's tokens; the text keys and values are projected on
    every rank (the text is the same everywhere, no communication); the image keys and values are exactly those
    :class:`PartialPatchAttention` reads in the step's phase and conditioning (its gathering, not a copy of it):
    every strip's in synchronous steps (exact), the PARTIAL or FULL key set in asynchronous ones. The input is a
    ``(B, C, h, W)`` map; ``group_norm`` (converted to ``AsyncGroupNorm`` by the plan) normalises the image tokens,
    ``norm_cross`` (left whole) the text; the residual is added and, as in diffusers' processor,
    ``rescale_output_factor`` is not applied.

    Under ``torch.compile`` the key gathering is a graph break (it is ``torch.compiler.disable``-d and this layer
    has no custom operator of its own).

    Args:
        *args: as diffusers' ``Attention``.
        context: the shared step state.
        name: qualified name, for error messages.
        **kwargs: as diffusers' ``Attention``.

    Raises:
        ConversionError: see :func:`check_added_kv_supported`.

    Example:
        >>> import torch, pcpp
        >>> from pcpp.context import PatchContext
        >>> ctx = PatchContext(pcpp.PCPPConfig(), pcpp.comm.LocalCommunicator(), unit=1, levels=0)
        >>> attn = AddedKVAttention(8, cross_attention_dim=8, heads=2, dim_head=4, added_kv_proj_dim=6,
        ...                         norm_num_groups=2, processor=AttnAddedKVProcessor2_0(), context=ctx)
        >>> attn(torch.randn(1, 8, 4, 4), encoder_hidden_states=torch.randn(1, 3, 6)).shape
        torch.Size([1, 8, 4, 4])
    """

    def _check_supported(self, name: str) -> None:
        check_added_kv_supported(self, name)

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **cross_attention_kwargs: Any,
    ) -> Tensor:
        """Attend from this rank's strip over the text and the image tokens; see the class docstring.

        Args:
            hidden_states: the strip's map ``(B, C, h, W)``.
            encoder_hidden_states: the text tokens ``(B, T, added_kv_proj_dim)``.
            attention_mask: must be ``None`` on more than one rank.
            **cross_attention_kwargs: passed on as diffusers does (on one rank).

        Returns:
            The attention output for the strip plus the residual, shaped like ``hidden_states``.

        Raises:
            PCPPError: on more than one rank, a mask was given, ``encoder_hidden_states`` is missing (diffusers
                would then project the image tokens through ``add_k_proj``, which pcpp does not split), or the
                input is not a map.
        """
        if self.port.world_size == 1:
            return Attention.forward(
                self, hidden_states, encoder_hidden_states, attention_mask, **cross_attention_kwargs
            )
        if attention_mask is not None or encoder_hidden_states is None or hidden_states.ndim != 4:
            raise PCPPError(
                f"{self.pcpp_name}: added-K/V attention on strips needs a (B, C, H, W) map, text tokens "
                "(encoder_hidden_states) and no attention mask; got "
                f"{tuple(hidden_states.shape)}, encoder_hidden_states "
                f"{'None' if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}, mask "
                f"{'None' if attention_mask is None else tuple(attention_mask.shape)}."
            )
        residual = hidden_states
        batch, channel, height, width = hidden_states.shape
        level = self.port.geometry().level_of(self.port.rank, height)
        tokens = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if self.norm_cross:
            encoder_hidden_states = self.norm_encoder_hidden_states(encoder_hidden_states)
        assert self.group_norm is not None  # check_added_kv_supported
        tokens = self.group_norm(tokens.transpose(1, 2)).transpose(1, 2)

        query = self.to_q(tokens)
        text = torch.cat([self.add_k_proj(encoder_hidden_states), self.add_v_proj(encoder_hidden_states)], dim=-1)
        image = torch.cat([self.to_k(tokens), self.to_v(tokens)], dim=-1)
        # The image keys and values this phase reads, gathered as PartialPatchAttention gathers them.
        image = self._context_kv(image, self.port.geometry().strip_rows(level), width)
        kv = torch.cat([text, image], dim=1)  # diffusers' order: text tokens first
        inner = query.shape[-1]
        key, value = kv.split([inner, kv.shape[-1] - inner], dim=-1)
        out = attend_heads(self, query, key, value)
        out = self.to_out[0](out)
        out = self.to_out[1](out)
        return out.transpose(-1, -2).reshape(residual.shape) + residual


def check_added_kv_supported(attn: Attention, name: str) -> None:
    """Raise unless ``attn`` is an added-K/V attention that :class:`AddedKVAttention` reproduces on strips.

    Raises:
        ConversionError: naming the module and what makes it unsupported: no ``added_kv_proj_dim``,
            ``only_cross_attention`` (pure cross-attention: it needs no splitting), no ``group_norm``, q/k norms
            (the processor ignores them), ``scale_qk=False``, or a processor other than ``AttnAddedKVProcessor`` /
            ``AttnAddedKVProcessor2_0``.
    """
    if getattr(attn, "added_kv_proj_dim", None) is None:
        raise ConversionError(f"{name} has no added key/value projections (added_kv_proj_dim).")
    if attn.only_cross_attention:
        raise ConversionError(f"{name} is pure cross-attention (only_cross_attention=True); it must stay as it is.")
    processor = attn.processor
    if type(processor) not in ADDED_KV_PROCESSORS:
        raise ConversionError(
            f"{name} has added key/value projections and uses attention processor {type(processor).__name__}, whose "
            f"maths pcpp cannot reproduce on strips; supported: {', '.join(p.__name__ for p in ADDED_KV_PROCESSORS)}."
        )
    if attn.group_norm is None or attn.spatial_norm is not None or attn.norm_q is not None or attn.norm_k is not None:
        raise ConversionError(
            f"{name}: added-K/V attention without a group_norm, or with a spatial norm or q/k norms, is not a layout "
            "diffusers builds; pcpp does not split it."
        )
    if not attn.scale_qk:
        raise ConversionError(f"{name}: added-K/V attention with scale_qk=False is not split by pcpp.")
