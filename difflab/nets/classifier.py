"""A noise-aware classifier for classifier guidance (Dhariwal & Nichol 2021, section 4): the U-Net's encoder
half with its time embedding, then the middle block and a pooled linear head.

    net(x_in, c_noise) -> logits (B, num_classes)

It sees noisy inputs exactly as the denoiser it guides does (x_t / sqrt(alpha^2 + sigma^2) and c_noise, from
the same Denoiser wrapper), so it learns p(y | x_t, t) on the same forward process."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from .embeddings import TimeEmbedding
from .unet import Block, UNetConfig, build_encoder, encode, group_norm


@dataclass
class ClassifierConfig(UNetConfig):
    """UNetConfig's encoder fields; ``num_classes`` is the number of classes it predicts (it has no class
    embedding, low-resolution input or cross-attention)."""

    def validate(self) -> None:
        super().validate()
        if self.num_classes is None or self.num_classes < 2:
            raise ValueError(f"ClassifierConfig.num_classes must be at least 2, got {self.num_classes!r}")
        if self.cond_channels or self.context_dim is not None or self.out_channels is not None:
            raise ValueError("ClassifierConfig takes no cond_channels, context_dim or out_channels")

    def encoder(self) -> UNetConfig:
        """The U-Net layout whose encoder half this classifier is."""
        return UNetConfig(**{f.name: getattr(self, f.name) for f in fields(UNetConfig) if f.name != "num_classes"})

    @classmethod
    def like(cls, unet: UNetConfig, num_classes: int) -> ClassifierConfig:
        """The encoder of a denoiser's U-Net, predicting ``num_classes`` classes."""
        keep = {
            f.name: getattr(unet, f.name)
            for f in fields(UNetConfig)
            if f.name not in ("num_classes", "cond_channels", "context_dim", "out_channels")
        }
        return cls(**keep, num_classes=num_classes)


class NoisyClassifier(nn.Module):
    """net(x_in, c_noise) -> logits (B, num_classes)."""

    accepts: frozenset[str] = frozenset()  # it predicts the labels; it is not conditioned on anything

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        cfg = config.encoder()
        emb_dim = 4 * cfg.base_channels
        self.time = TimeEmbedding(cfg.base_channels, emb_dim)
        self.conv_in, self.down, self.downsample, skip_chs = build_encoder(cfg, emb_dim)
        ch = skip_chs[-1]
        self.mid = Block(ch, ch, cfg, emb_dim, cfg.resolutions()[-1] in cfg.attention_resolutions)
        self.head = nn.Sequential(
            group_norm(ch, cfg.norm_groups),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(ch, config.num_classes),
        )

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.width):
            raise ValueError(
                f"the classifier expects x of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.width}), got "
                f"{tuple(x.shape)}"
            )
        c_noise = torch.as_tensor(c_noise, device=x.device)
        emb = self.time(c_noise.expand(x.shape[0]) if c_noise.ndim == 0 else c_noise)
        h, _ = encode(self, x, emb, None, None)
        return self.head(self.mid(h, emb, None, None))  # (B, num_classes)
