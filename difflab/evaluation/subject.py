"""Measuring a personalisation on fashion-pairs subjects: how much a generated subject half looks like the
subject, in a feature network's space and in shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.fashion_mnist import load_fashion_mnist
from ..data.pairs import RGB, half, place, tint
from .features import embed


@torch.no_grad()
def subject_similarity(net, images: Tensor, sides: Tensor, references: Tensor, center: Tensor | None = None) -> Tensor:
    """cos(f(subject half of image i) - center, f(reference i) - center) in the feature network ``net``'s
    features (N,), where f reads a half placed on its side of a black 32x64 canvas (so the other half does
    not count); ``images`` uint8 (N, 3, 32, 64), ``references`` uint8 (N, 3, 32, 32) halves, ``sides`` (N,)
    0 left / 1 right. ``center`` (feature_center) removes what every item shares: the attribute network's
    features are non-negative, and uncentred any two sneakers of one tint sit at cosine 0.99."""
    a, _ = embed(net, place(half(images, sides), sides))
    b, _ = embed(net, place(references, sides))
    if center is not None:
        a, b = a - center, b - center
    return F.cosine_similarity(a, b, dim=1)


@torch.no_grad()
def feature_center(net, n: int = 2000, seed: int = 0) -> Tensor:
    """The mean feature of n real test-split Fashion-MNIST items, each in a random tint on a random side."""
    items = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(items.images), generator=g)[:n]
    colours = RGB[torch.randint(len(RGB), (len(idx),), generator=g).numpy()]
    halves = torch.from_numpy(tint(items.images[idx, 0].numpy(), colours))
    return embed(net, place(halves, torch.randint(2, (len(idx),), generator=g)))[0].mean(0)


def shape_similarity(images: Tensor, sides: Tensor, references: Tensor) -> Tensor:
    """The Pearson correlation, over the 32x32 pixels, between the luminance of each image's ``sides`` half
    and of its reference (N,): the item's shape, blind to its tint (a tint scales the luminance) and to the
    other half. uint8 ``images`` (N, 3, 32, 64), ``references`` (N, 3, 32, 32)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def centred(x):
        lum = (x.double() * weights).sum(1).flatten(1)  # (N, 1024)
        lum = lum - lum.mean(1, keepdim=True)
        return lum / lum.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return (centred(half(images, sides)) * centred(references)).sum(1).float()
