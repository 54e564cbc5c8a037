"""A CLIP-style pair of towers (Radford et al. 2021): an image tower (strided convolutions, average or attention
pooling) and a text tower (a small transformer on fitted words, nets/text.py, or a pretrained language model,
nets/pretrained_text.py), each projected to one embedding. Trained by `difflab train-clip` (text/clip.py)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch import Tensor, nn

from ..data.pairs import CAPTION_PHRASINGS, CAPTION_WORDS, MAX_CAPTION_VARIANTS  # ClipConfig's caption variants
from .pretrained_text import PretrainedText, PretrainedTextConfig
from .text import TextConfig, TextTransformer

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
    pretrained: dict | None = None  # PretrainedTextConfig: a pretrained text tower (then ``text`` is unused)
    text_lr_scale: float = 1.0  # the pretrained text tower's tuned weights learn at this times the run's lr
    caption_variants: int = 0  # fashion-pairs: each training image also seen with this many rephrased captions
    caption_words: str = "dataset"  # the variants' colour and item words: "dataset" or "synonyms" (data.pairs)
    caption_phrasings: str = "sides"  # the phrasings the variants take turns in: data.pairs.CAPTION_PHRASINGS

    def __post_init__(self):
        TextConfig.from_dict(self.text or {})  # raises on a bad text config
        if self.pretrained is not None:
            PretrainedTextConfig.from_dict(self.pretrained)
        if not isinstance(self.caption_variants, int) or not 0 <= self.caption_variants <= MAX_CAPTION_VARIANTS:
            raise ValueError(
                f"ClipConfig.caption_variants must be an integer from 0 to {MAX_CAPTION_VARIANTS}, "
                f"got {self.caption_variants!r}"
            )
        if self.caption_words not in CAPTION_WORDS:
            raise ValueError(f"unknown caption words {self.caption_words!r}; choose one of {', '.join(CAPTION_WORDS)}")
        if self.caption_phrasings not in CAPTION_PHRASINGS:
            raise ValueError(
                f"unknown caption phrasings {self.caption_phrasings!r}; choose one of {', '.join(CAPTION_PHRASINGS)}"
            )
        if not self.text_lr_scale > 0:
            raise ValueError(f"ClipConfig.text_lr_scale must be positive, got {self.text_lr_scale!r}")
        if self.pool not in POOLS:
            raise ValueError(f"unknown image pooling {self.pool!r}; choose one of {', '.join(POOLS)}")

    @property
    def text_config(self) -> TextConfig:
        return TextConfig.from_dict(self.text or {})

    def to_dict(self) -> dict:
        return {**asdict(self), "text": self.text_config.to_dict() if self.pretrained is None else None}

    @property
    def pretrained_config(self) -> PretrainedTextConfig | None:
        return None if self.pretrained is None else PretrainedTextConfig.from_dict(self.pretrained)

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
        pretrained = cfg.pretrained_config
        self.text = TextTransformer(cfg.text_config) if pretrained is None else PretrainedText(pretrained)
        self.text_projection = nn.Linear(self.text.width, cfg.embed_dim, bias=False)
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

    def trains(self, name: str) -> bool:
        """Whether the parameter ``name`` trains (a pretrained text tower keeps its frozen part frozen)."""
        return not name.startswith("text.") or not hasattr(self.text, "trains") or self.text.trains(name[5:])

    def lr_scale(self, name: str) -> float:
        """The parameter's learning rate as a multiple of the run's (a pretrained text tower's: text_lr_scale)."""
        pretrained = self.config.pretrained is not None and name.startswith("text.model.")
        return self.config.text_lr_scale if pretrained else 1.0

    def embed_text(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.text_projection(self.text.pooled(ids, mask))

    def forward(self, x: Tensor, *unused, tokens: Tensor, token_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.image(x), self.embed_text(tokens, token_mask), self.logit_scale
