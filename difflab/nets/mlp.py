"""A residual MLP denoiser for low-dimensional data (the 2-D toy sets)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from ..core.conditions import check_accepted
from .embeddings import TimeEmbedding


@dataclass
class MLPConfig:
    dim: int = 2
    hidden: int = 128
    depth: int = 4
    time_dim: int = 64
    out_dim: int | None = None  # None: dim (a learned variance doubles it)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.out_dim is None:  # the layout of every earlier difflab
            del d["out_dim"]
        return d


class ResidualLayer(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1, self.fc2 = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.act(self.fc1(self.act(self.norm(h) + emb))))


class MLP(nn.Module):
    """net(x_in, c_noise) -> prediction (B, out_dim), by default x's shape; the time enters every layer additively.

    It takes no conditions: passing any raises (rather than silently ignoring it)."""

    accepts: frozenset[str] = frozenset()

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.time = TimeEmbedding(config.time_dim, config.hidden)
        self.inp = nn.Linear(config.dim, config.hidden)
        self.layers = nn.ModuleList(ResidualLayer(config.hidden) for _ in range(config.depth))
        self.out = nn.Sequential(
            nn.LayerNorm(config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.out_dim or config.dim)
        )

    def forward(self, x: Tensor, c_noise: Tensor, **cond) -> Tensor:
        check_accepted(cond, self.accepts, "the MLP")
        emb = self.time(c_noise)  # (B, hidden)
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h, emb)
        return self.out(h)
