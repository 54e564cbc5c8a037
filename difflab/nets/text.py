"""Text networks: a word tokenizer fitted on captions and a small text transformer. The condition encoders that use
them are in difflab/text/encoders.py.

The CLIP pair of towers is in nets/clip.py, a pretrained text tower in nets/pretrained_text.py.

Word tokenizer: lower case, runs of letters and digits are words ("t-shirt" -> "t", "shirt"); the vocabulary
is fitted on the training captions and saved in the network's config (id 0 pads, id 1 is any word outside
it). A caption longer than the encoder reads is refused with one line, never truncated silently.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")


class TextError(ValueError):
    """A caption the encoder cannot read, an unknown encoder, or a missing package."""


# --------------------------------------------------------------------------- the word tokenizer (pure)


def words(caption: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", caption.lower())


def fit_vocabulary(captions: Sequence[str]) -> tuple[str, ...]:
    """The specials, then every word of the captions, most frequent first (ties alphabetical)."""
    counts = Counter(w for c in captions for w in words(c))
    return SPECIALS + tuple(sorted(counts, key=lambda w: (-counts[w], w)))


def tokenize(captions: Sequence[str], vocabulary: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Word ids (B, max_len) long and mask (B, max_len) bool; unknown words become UNK, padding PAD."""
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = torch.full((len(captions), max_len), PAD, dtype=torch.long)
    for row, c in enumerate(captions):
        ws = words(c)
        if len(ws) > max_len:
            raise TextError(f"the caption {c!r} has {len(ws)} words; this encoder reads at most {max_len}")
        ids[row, : len(ws)] = torch.tensor([index.get(w, UNK) for w in ws], dtype=torch.long)
    return ids, ids != PAD


# --------------------------------------------------------------------------- a small text transformer


@dataclass
class TextConfig:
    """A text transformer: word embeddings plus learned positions, ``layers`` pre-norm encoder layers."""

    vocabulary: tuple[str, ...] = SPECIALS
    max_len: int = 16
    width: int = 128
    layers: int = 2
    heads: int = 4

    def __post_init__(self):
        self.vocabulary = tuple(self.vocabulary)
        if self.vocabulary[: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"a vocabulary starts with {SPECIALS}")
        for name in ("max_len", "width", "layers", "heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"TextConfig.{name} must be a positive integer, got {v!r}")
        if self.width % self.heads:
            raise ValueError(f"TextConfig.width {self.width} must be divisible by heads {self.heads}")

    @classmethod
    def fitted(cls, captions: Sequence[str], **kw) -> TextConfig:
        """The vocabulary and max_len (the longest caption) of the training captions."""
        return cls(vocabulary=fit_vocabulary(captions), max_len=max(len(words(c)) for c in captions), **kw)

    def tokenize(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        return tokenize(captions, self.vocabulary, self.max_len)

    def to_dict(self) -> dict:
        return {**asdict(self), "vocabulary": list(self.vocabulary)}

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown TextConfig fields {sorted(unknown)}")
        return cls(**d)


class TextTransformer(nn.Module):
    """(ids (B, L), mask (B, L)) -> token states (B, L, width); masked tokens are neither attended to nor
    (through the caller's mask) read. ``pooled`` is the mean of the valid tokens' states."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(len(cfg.vocabulary), cfg.width, padding_idx=PAD)
        # CLIP's initialisation: words N(0, 0.02^2), positions N(0, 0.01^2), so that a word's place weighs as much
        # as the word (with torch's default N(0, 1) words the positions were 50x weaker and never caught up: a
        # caption and its sides-swapped twin came out at cosine 1.000, word order unread)
        nn.init.normal_(self.embed.weight, std=0.02)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()
        self.position = nn.Parameter(torch.randn(cfg.max_len, cfg.width) * 0.01)
        layer = nn.TransformerEncoderLayer(
            cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    @property
    def width(self) -> int:
        return self.config.width

    @property
    def limit(self) -> int:
        return self.config.max_len

    def tokenize(self, captions: Sequence[str], length: int | None = None) -> tuple[Tensor, Tensor]:
        """Word ids and mask (B, max_len): this tower reads its learned positions only (``length`` is ignored)."""
        return self.config.tokenize(captions)

    def count(self, caption: str) -> int:
        return len(words(caption))

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        L = ids.shape[1]
        if L > self.config.max_len:
            raise TextError(f"{L} tokens given; this encoder reads at most {self.config.max_len}")
        h = self.embed(ids) + self.position[:L]  # (B, L, width)
        # a row with no valid token (the empty caption) attends to everything; the caller's mask discards it
        pad = ~(mask | ~mask.any(dim=1, keepdim=True))  # (B, L), True = ignore
        return self.norm(self.layers(h, src_key_padding_mask=pad))  # (B, L, width)

    def pooled(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self(ids, mask)  # (B, L, width)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B, width)
