"""Time embeddings shared by every network."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style embedding of a (B,) scalar: [cos(c w_k), sin(c w_k)], w_k = max_period^(-k/half). (B, dim)"""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimeEmbedding(nn.Module):
    """Sinusoidal features followed by a two-layer MLP (Ho et al. 2020): (B,) -> (B, out_dim)."""

    def __init__(self, freq_dim: int, out_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, c_noise: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(c_noise, self.freq_dim))
