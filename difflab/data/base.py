"""An image set in memory and the two scalings: uint8 (N, C, H, W) as stored, floats in [-1, 1] as modelled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class DataError(ValueError):
    """Anything wrong with a data source: missing, unreadable, corrupt, or of the wrong shape."""


@dataclass
class ImageSet:
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor | None  # long (N,)
    num_classes: int | None
    name: str
    class_names: tuple[str, ...] | None = None
    split: str = "all"
    captions: list[str] | None = None  # one caption per image (its first, where it has several)
    attributes: Tensor | None = None  # long (N, A): fashion-pairs' left class, left colour, right class, right colour
    held_out: Tensor | None = None  # bool (N,): fashion-pairs' combinations absent from its train split
    caption_sets: list[tuple[str, ...]] | None = None  # every caption of each image, where some image has several

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (len(self.images),):
            raise DataError(f"{self.name}: {len(self.images)} images but labels of shape {tuple(self.labels.shape)}")
        if self.captions is not None and len(self.captions) != len(self.images):
            raise DataError(f"{self.name}: {len(self.images)} images but {len(self.captions)} captions")
        if self.caption_sets is not None and (
            self.captions is None
            or len(self.caption_sets) != len(self.images)
            or any(not s or s[0] != c for s, c in zip(self.caption_sets, self.captions))
        ):
            raise DataError(f"{self.name}: each image's caption set must start with its caption")

    def subset(self, keep: Tensor) -> ImageSet:
        """The images where ``keep`` (a bool mask or indices) holds, with their labels, captions and attributes."""
        idx = keep.nonzero().squeeze(1) if keep.dtype == torch.bool else keep
        pick = lambda v: None if v is None else v[idx]  # noqa: E731
        captions = None if self.captions is None else [self.captions[i] for i in idx.tolist()]
        sets = None if self.caption_sets is None else [self.caption_sets[i] for i in idx.tolist()]
        return ImageSet(
            self.images[idx],
            pick(self.labels),
            self.num_classes,
            self.name,
            self.class_names,
            self.split,
            captions,
            pick(self.attributes),
            pick(self.held_out),
            sets,
        )

    def every_caption(self) -> list[str] | None:
        """Every caption of every image (what a text vocabulary or length is fitted to)."""
        if self.caption_sets is None:
            return self.captions
        return [c for s in self.caption_sets for c in s]

    def caption_pairs(self) -> tuple[Tensor, list[str]]:
        """The (image, caption) pairs a text model trains on: indices into the images and a caption for each.
        One caption per image: each image once. Several: each image K times (K the most captions any image has),
        with its captions in turn, so every image is seen alike however many captions it has."""
        if self.captions is None:
            raise DataError(f"{self.name} has no captions")
        if self.caption_sets is None:
            return torch.arange(len(self.images)), list(self.captions)
        k = max(map(len, self.caption_sets))
        index = torch.arange(len(self.images)).repeat(k)  # pair j * N + i is image i with its (j mod k_i)-th caption
        return index, [s[j % len(s)] for j in range(k) for s in self.caption_sets]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def size(self) -> int:
        return self.images.shape[-1]


def to_model(x: Tensor) -> Tensor:
    """uint8 in 0..255 -> float32 in [-1, 1]."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model expects uint8 images, got {x.dtype}")
    return x.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float in [-1, 1] -> uint8 (clamped, rounded to the nearest level)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
