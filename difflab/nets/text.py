"""Text networks: a word tokenizer fitted on captions, a small text transformer, and a CLIP-style pair of
towers (Radford et al. 2021). The condition encoders that use them are in difflab/text.py.

Word tokenizer: lower case, runs of letters and digits are words ("t-shirt" -> "t", "shirt"); the vocabulary
is fitted on the training captions and saved in the network's config (id 0 pads, id 1 is any word outside
it). A caption longer than the encoder reads is refused with one line, never truncated silently.
"""

from __future__ import annotations

import math
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


# --------------------------------------------------------------------------- CLIP (Radford et al. 2021)


MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the inverse temperature at 100
POOLS = ("mean", "attention")


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (its ResNet image towers): the feature map's positions, with a learned
    positional embedding each, are the keys and values of one attention whose query is their mean (plus its
    own embedding). Unlike a global average it knows where a feature was: (B, C, h, w) -> (B, C)."""

    def __init__(self, channels: int, h: int, w: int, heads: int = 4):
        super().__init__()
        self.positions = nn.Parameter(torch.randn(h * w + 1, channels) / channels**0.5)
        self.attention = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + self.positions.to(tokens.dtype)
        out, _ = self.attention(tokens[:, :1], tokens, tokens, need_weights=False)
        return out[:, 0]


@dataclass
class ClipConfig:
    in_channels: int = 3
    image_size: int = 32
    image_width: int | None = None
    base_channels: int = 32
    embed_dim: int = 64
    text: dict | None = None  # TextConfig
    pool: str = "mean"  # how the image tower pools its last feature map: "mean" (global average) or "attention"

    def __post_init__(self):
        TextConfig.from_dict(self.text or {})  # raises on a bad text config
        if self.pool not in POOLS:
            raise ValueError(f"unknown image pooling {self.pool!r}; choose one of {', '.join(POOLS)}")

    @property
    def text_config(self) -> TextConfig:
        return TextConfig.from_dict(self.text or {})

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text_config.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> ClipConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown ClipConfig fields {sorted(unknown)}")
        return cls(**d)


class Clip(nn.Module):
    """An image tower (strided convs, global average or attention pool) and a text tower (TextTransformer, mean-pooled),
    each projected to ``embed_dim``; a learned logit scale initialised at log(1/0.07) and read clipped to
    [0, log 100] (CLIP clips it at 100): the clip is straight-through, so a parameter that overshoots still
    gets the gradient that brings it back (a plain clamp would cut it off above the bound for good). ``net(x, tokens=,
    token_mask=)`` -> (image_emb, text_emb, logit_scale)."""

    accepts = frozenset({"tokens", "token_mask"})

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.config = cfg
        c = cfg.base_channels
        self.image = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * c),
            nn.SiLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * c),
            nn.SiLU(),
            nn.Conv2d(4 * c, 4 * c, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * c),
            nn.SiLU(),
            *self._pool(cfg, 4 * c),
            nn.Linear(4 * c, cfg.embed_dim),
        )
        self.text = TextTransformer(cfg.text_config)
        self.text_projection = nn.Linear(cfg.text_config.width, cfg.embed_dim, bias=False)
        self.raw_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @staticmethod
    def _pool(cfg: ClipConfig, channels: int) -> tuple[nn.Module, nn.Module]:
        """Two modules (so that the projection keeps its place in the state dict whatever the pooling)."""
        if cfg.pool == "mean":
            return nn.AdaptiveAvgPool2d(1), nn.Flatten()
        h, w = -(-cfg.image_size // 8), -(-(cfg.image_width or cfg.image_size) // 8)  # three stride-2 convs
        return AttentionPool2d(channels, h, w), nn.Identity()

    @property
    def logit_scale(self) -> Tensor:
        raw = self.raw_logit_scale
        return raw + (raw.clamp(0.0, MAX_LOGIT_SCALE) - raw).detach()  # the clipped value, the identity's gradient

    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text_projection(self.text.pooled(ids, mask))

    def forward(self, x: Tensor, *unused, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.image(x), self.embed_text(tokens, token_mask), self.logit_scale
