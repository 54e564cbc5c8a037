"""Training-time augmentation of image data: random horizontal flips (``--augment flip``).

Each image of a training batch is mirrored left-right with probability 1/2, drawn from the step's generator (so a
resumed run sees the same flips); an image condition (super-resolution's ``low_res``) is mirrored with its image.
A flip is refused where it changes what an image means: handwritten digits (a mirrored 3 is not a digit), the
captions of fashion-pairs (its "left" and "right"), 2-D points, and latent runs (the training set is the encoded
images, and a mirrored latent is not the latent of the mirrored image)."""

from __future__ import annotations

import torch
from torch import Tensor

SPATIAL_CONDITIONS = ("low_res",)  # conditions that are images of the same scene, mirrored with it

FLIP_CHANGES_MEANING = {
    "digits": "a mirrored digit is not a digit",
    "fashion-pairs": "its captions and attributes say which item is on the left and which on the right",
}


def flip_refusal(dataset: str, data_kind: str, latent: bool) -> str | None:
    """Why ``--augment flip`` is refused for this run, or None where it is allowed."""
    if data_kind != "images":
        return f"--augment flip mirrors images; {dataset} is not an image set"
    if dataset in FLIP_CHANGES_MEANING:
        return f"--augment flip is off for {dataset}: {FLIP_CHANGES_MEANING[dataset]}"
    if latent:
        return "--augment flip is for pixel-space runs (a mirrored latent is not the latent of the mirrored image)"
    return None


def flip_mask(n: int, generator: torch.Generator) -> Tensor:
    """(n,) bool: which images of a batch are mirrored (probability 1/2 each), on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def flip(x: Tensor, mask: Tensor) -> Tensor:
    """The images (B, C, H, W) with those marked by ``mask`` (B,) mirrored left-right (the last axis)."""
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
