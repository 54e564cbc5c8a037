"""Built-in 2-D datasets, scaled to roughly unit variance. Each is a pure function of (n, generator)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def swissroll(n: int, generator: torch.Generator | None = None) -> Tensor:
    """The 2-D swiss roll (Sohl-Dickstein et al. 2015's figure): r = theta, theta in [1.5 pi, 4.5 pi], plus small
    noise."""
    theta = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
    x = torch.stack([theta * torch.cos(theta), theta * torch.sin(theta)], dim=1)
    x = x + 0.25 * torch.randn(n, 2, generator=generator)
    return x / 8.0


def moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Two interleaving half circles (scikit-learn's make_moons), with noise 0.05."""
    n_up = n // 2
    angle = math.pi * torch.rand(n, generator=generator)
    up = torch.arange(n) < n_up
    x = torch.where(up, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(up, torch.sin(angle), 0.5 - torch.sin(angle))
    pts = torch.stack([x, y], dim=1) + 0.05 * torch.randn(n, 2, generator=generator)
    pts = pts[torch.randperm(n, generator=generator)]
    return (pts - torch.tensor([0.5, 0.25])) * 1.5


def gaussians8(n: int, generator: torch.Generator | None = None) -> Tensor:
    """Eight Gaussians (std 0.1) on a circle of radius 2 (the classic GAN mode-collapse set)."""
    k = torch.randint(0, 8, (n,), generator=generator)
    centers = torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], dim=1) * 2.0
    return centers + 0.1 * torch.randn(n, 2, generator=generator)


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A 4x4 checkerboard on [-2, 2]^2, uniform on the dark squares."""
    x1 = torch.rand(n, generator=generator) * 4 - 2
    x2_ = torch.rand(n, generator=generator) - torch.randint(0, 2, (n,), generator=generator) * 2.0
    x2 = x2_ + (torch.floor(x1) % 2)
    return torch.stack([x1, x2], dim=1)


TOY_DATASETS = {"swissroll": swissroll, "moons": moons, "8gaussians": gaussians8, "checkerboard": checkerboard}


def make_toy(name: str, n: int, seed: int = 0) -> Tensor:
    """n points of a built-in 2-D set, reproducible from the seed. (n, 2) float32."""
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown 2-D dataset {name!r}; choose one of: {', '.join(TOY_DATASETS)}")
    if n <= 0:
        raise ValueError(f"--n must be positive, got {n}")
    return TOY_DATASETS[name](n, torch.Generator().manual_seed(seed)).float()
