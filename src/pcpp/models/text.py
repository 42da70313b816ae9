"""The tiny model's text side: a word tokenizer over the closed vocabulary of the shapes captions, and a small
transformer text encoder whose output the UNet's cross-attention reads (see :mod:`pcpp.models.tiny`)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import torch
from torch import Tensor, nn

from pcpp.models.shapes import VOCABULARY

__all__ = ["BOS", "PAD", "TinyTextEncoder", "TinyTextEncoderConfig", "TinyTokenizer"]

PAD: Final = "<pad>"
BOS: Final = "<bos>"


class TinyTokenizer:
    """Word tokenizer over a closed vocabulary.

    A prompt is lower-cased, commas and full stops are dropped, and it is split on whitespace. Token ids are
    ``[BOS, words..., PAD, ...]`` of fixed length ``max_length``; the empty prompt (all padding after BOS) is the
    unconditional input used for classifier-free guidance.

    Args:
        vocabulary: The known words (without the special tokens).
        max_length: Tokens per prompt, BOS included.

    Raises:
        ValueError: If the vocabulary has duplicates or ``max_length < 2``.
    """

    def __init__(self, vocabulary: Sequence[str], max_length: int) -> None:
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("vocabulary has duplicate words")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        self.vocabulary: tuple[str, ...] = tuple(vocabulary)
        self.max_length = max_length
        self._ids: dict[str, int] = {w: i for i, w in enumerate((PAD, BOS, *self.vocabulary))}

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self._ids)

    def words(self, prompt: str) -> list[str]:
        """Splits a prompt into words, checking each against the vocabulary.

        Args:
            prompt: The prompt.

        Returns:
            The words.

        Raises:
            ValueError: If a word is not in the vocabulary (the message lists the vocabulary) or the prompt is too
                long.
        """
        words = re.sub(r"[,.]", " ", prompt.lower()).split()
        unknown = [w for w in words if w not in self._ids or w in (PAD, BOS)]
        if unknown:
            raise ValueError(
                f"unknown word(s) {unknown} in prompt {prompt!r}; the tiny model knows only: "
                + ", ".join(self.vocabulary)
            )
        if len(words) > self.max_length - 1:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; at most {self.max_length - 1} fit")
        return words

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        """Tokenizes prompts.

        Args:
            prompts: The prompts (``""`` for unconditional).

        Returns:
            ``(len(prompts), max_length)`` int64 token ids.

        Raises:
            ValueError: As :meth:`words`.
        """
        rows = []
        for prompt in prompts:
            ids = [self._ids[BOS]] + [self._ids[w] for w in self.words(prompt)]
            rows.append(ids + [self._ids[PAD]] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.max_length)


@dataclass(frozen=True)
class TinyTextEncoderConfig:
    """Shape of a :class:`TinyTextEncoder`.

    Attributes:
        vocabulary: Known words, in token-id order after the special tokens.
        max_length: Tokens per prompt.
        width: Transformer width.
        layers: Transformer layers.
        heads: Attention heads.
        output_dim: Output width (the UNet's ``cross_attention_dim``).
    """

    vocabulary: tuple[str, ...] = VOCABULARY
    max_length: int = 20
    width: int = 128
    layers: int = 2
    heads: int = 4
    output_dim: int = 128

    def to_json(self) -> str:
        """Returns the config as JSON text."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TinyTextEncoderConfig:
        """Parses :meth:`to_json` output.

        Args:
            text: The JSON text.

        Returns:
            The config.
        """
        data = json.loads(text)
        data["vocabulary"] = tuple(data["vocabulary"])
        return cls(**data)


class TinyTextEncoder(nn.Module):
    """Token embedding + learned positions + small pre-norm transformer, projected to the UNet's context width.

    Args:
        config: The encoder's shape.
    """

    def __init__(self, config: TinyTextEncoderConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = len(config.vocabulary) + 2
        self.token_embedding = nn.Embedding(vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        nn.init.normal_(self.position_embedding, std=0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                config.width,
                config.heads,
                dim_feedforward=4 * config.width,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.layers)
        )
        self.final_norm = nn.LayerNorm(config.width)
        self.proj = nn.Linear(config.width, config.output_dim)

    def tokenizer(self) -> TinyTokenizer:
        """Returns the tokenizer that matches this encoder."""
        return TinyTokenizer(self.config.vocabulary, self.config.max_length)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Encodes token ids.

        Args:
            input_ids: ``(B, T)`` int64 ids from :class:`TinyTokenizer`.

        Returns:
            ``(B, T, output_dim)`` context for the UNet's cross-attention.
        """
        h = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]
        for layer in self.layers:
            h = layer(h)
        out: Tensor = self.proj(self.final_norm(h))
        return out
