"""Text encoders and a tokenizer for the whole-image benchmark, built offline with random weights.

The tokenizer is a real ``CLIPTokenizer`` over a byte-level vocabulary with no merges (every character a token),
written to a folder the caller gives: prompts go through the whole text path without a download. The text
encoders' widths follow the UNet config (SDXL: two encoders whose hidden states, concatenated, are the UNet's
``cross_attention_dim``, the second one's projection its pooled embedding; SD: one encoder). Widths of the real
models get their real depth (CLIP ViT-L/14's text tower for 768, OpenCLIP ViT-bigG/14's for 1280); other widths
(tiny test UNets) get two layers. The vocabulary has 514 tokens instead of 49,408: the embedding table is
smaller, the computation per token the same.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .common import embedding_dims

__all__ = ["encoder_configs", "write_tokenizer"]

PROMPT_TOKENS = 77
"""CLIP's context length: every prompt is padded to it."""

# hidden size -> (layers, attention heads, MLP width, activation) of the real text towers.
_KNOWN = {768: (12, 12, 3072, "quick_gelu"), 1280: (32, 20, 5120, "gelu")}


def write_tokenizer(folder: Path, max_length: int = PROMPT_TOKENS) -> Any:
    """A CLIP tokenizer over every byte (as a word-inner and as a word-final symbol) and no merges.

    Args:
        folder: where ``vocab.json`` and ``merges.txt`` are written.
        max_length: tokens every prompt is padded and truncated to.

    Returns:
        The ``transformers.CLIPTokenizer``.

    Example:
        >>> import tempfile  # doctest: +SKIP
        >>> tok = write_tokenizer(Path(tempfile.mkdtemp()), 16)  # doctest: +SKIP
        >>> len(tok)  # doctest: +SKIP
        514
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes, as byte-level BPE tokenizers (CLIP's) use them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def encoder_configs(unet_config: dict[str, Any], tokenizer: Any) -> list[Any]:
    """``transformers.CLIPTextConfig`` of each text encoder the UNet's conditioning implies.

    Args:
        unet_config: the UNet's diffusers config.
        tokenizer: from :func:`write_tokenizer` (its vocabulary, special tokens and length).

    Returns:
        One config (SD) or two (SDXL: the second with ``projection_dim`` = the pooled embedding's width).

    Raises:
        ValueError: an SDXL-style UNet whose cross-attention width is not larger than its pooled width.
    """
    cross_dim, pooled = embedding_dims(unet_config)
    if pooled is None:
        return [_config(cross_dim, tokenizer)]
    if cross_dim <= pooled:
        raise ValueError(
            f"cross_attention_dim {cross_dim} must exceed the pooled text width {pooled} (two encoders' widths)"
        )
    return [_config(cross_dim - pooled, tokenizer), _config(pooled, tokenizer, projection_dim=pooled)]


def _config(hidden: int, tokenizer: Any, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    layers, heads, mlp, act = _KNOWN.get(hidden, (2, 2 if hidden % 2 == 0 else 1, 2 * hidden, "quick_gelu"))
    return CLIPTextConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output looks for the real end token
        pad_token_id=tokenizer.pad_token_id,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        hidden_act=act,
        max_position_embeddings=tokenizer.model_max_length,
        vocab_size=len(tokenizer),
        **extra,
    )
