"""``fashion-pairs``: a captioned colour dataset made offline from real Fashion-MNIST items.

Each image is 32x64 RGB: two Fashion-MNIST items side by side, each padded from 28x28 to 32x32 and tinted
with one of the named ``COLOURS`` (the grey level g of a pixel becomes g/255 * colour on black). Every image
carries its attributes (left class, left colour, right class, right colour) and a caption drawn uniformly from
the ``PHRASINGS``, e.g. "a red sneaker on the left and a blue bag on the right" or "a blue bag to the right
of a red sneaker".

Splits. The train split draws its items from Fashion-MNIST's train files, the test split from its test (t10k)
files, so no item of a test image was ever seen in training. The left/right class combinations in
``HELD_OUT`` (right class = left class + 7 mod 10: each class once on each side) never occur in the
train split; the test split has every combination, and ``held_out`` marks the unseen ones, so composition
can be measured on seen and held-out combinations apart.

Determinism. ``make_pairs(split, n, seed)`` draws classes, items, colours and phrasings from one NumPy
generator seeded with (seed, split): the same arguments give the same bytes on any machine."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 210, 40),
    "purple": (160, 60, 220),
    "white": (235, 235, 235),
}
NOUNS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
HELD_OUT: tuple[tuple[int, int], ...] = tuple((k, (k + 7) % 10) for k in range(10))  # (left class, right class)
PHRASINGS = (
    "{L} on the left and {R} on the right",
    "{R} on the right and {L} on the left",
    "{R} to the right of {L}",
    "{L} to the left of {R}",
    "on the left {L}, on the right {R}",
)
ATTRIBUTES = ("left class", "left colour", "right class", "right colour")
DEFAULT_N = {"train": 20000, "test": 4000}
PAD = 2  # 28 + 2 * 2 = 32


@dataclass
class Pairs:
    images: Tensor  # uint8 (N, 3, 32, 64)
    attributes: Tensor  # long (N, 4): left class, left colour, right class, right colour
    captions: list[str]
    held_out: Tensor  # bool (N,): the left/right class combination is one of HELD_OUT


def article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def caption(attributes, phrasing: int = 0) -> str:
    """The caption of one image's attributes (left class, left colour, right class, right colour)."""
    lk, lc, rk, rc = (int(a) for a in attributes)
    names = list(COLOURS)
    left, right = article(f"{names[lc]} {NOUNS[lk]}"), article(f"{names[rc]} {NOUNS[rk]}")
    return PHRASINGS[phrasing].format(L=left, R=right)


def is_held_out(left_class, right_class) -> bool:
    """Whether the left/right class combination is one of HELD_OUT (never in the train split)."""
    return (int(left_class), int(right_class)) in HELD_OUT


def parse_caption(text: str) -> tuple[tuple[int, int, int, int], int] | None:
    """(attributes, phrasing) of a caption in one of the PHRASINGS (case and surrounding blanks aside), or
    None for any other text: the inverse of ``caption``."""
    items = {article(f"{c} {noun}"): (k, i) for i, c in enumerate(COLOURS) for k, noun in enumerate(NOUNS)}
    text = " ".join(text.lower().split())
    for index, phrasing in enumerate(PHRASINGS):
        pattern = re.escape(phrasing).replace(r"\{L\}", "(?P<L>.+?)").replace(r"\{R\}", "(?P<R>.+?)")
        m = re.fullmatch(pattern, text)
        if m and m["L"] in items and m["R"] in items:
            (lk, lc), (rk, rc) = items[m["L"]], items[m["R"]]
            return (lk, lc, rk, rc), index
    return None


def swapped(attributes) -> tuple[int, int, int, int]:
    """The attributes with the two halves exchanged (the caption-swap check of attribute binding)."""
    lk, lc, rk, rc = (int(a) for a in attributes)
    return rk, rc, lk, lc


def tint(grey: np.ndarray, colour) -> np.ndarray:
    """uint8 (N, 28, 28) grey items -> uint8 (N, 3, 32, 32): g/255 * colour, padded with black."""
    rgb = np.asarray(colour, dtype=np.float64)  # (N, 3) or (3,)
    out = np.rint(grey[:, None].astype(np.float64) / 255.0 * rgb.reshape(-1, 3, 1, 1)).astype(np.uint8)  # (N, 3, 28, 28)
    return np.pad(out, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))


def make_pairs(split: str, n: int | None = None, seed: int = 0, data_dir: str | None = None) -> Pairs:
    """``n`` fashion-pairs images of ``split`` ("train" or "test"), deterministic in (split, n, seed)."""
    from .images import DataError, load_images

    if split not in DEFAULT_N:
        raise DataError(f"fashion-pairs: unknown split {split!r}; choose train or test")
    n = DEFAULT_N[split] if n is None else n
    if n <= 0:
        raise DataError(f"fashion-pairs: n must be positive, got {n}")
    items = load_images("fashion-mnist", split=split, data_dir=data_dir)
    grey, labels = items.images[:, 0].numpy(), items.labels.numpy()
    by_class = [np.flatnonzero(labels == k) for k in range(10)]
    combos = [(a, b) for a in range(10) for b in range(10) if split == "test" or (a, b) not in HELD_OUT]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    pick = rng.integers(len(combos), size=n)
    left_k, right_k = np.array(combos)[pick].T  # (n,), (n,)

    def items_of(classes):  # one item drawn uniformly from its class, per image
        u = rng.random(n)
        return np.array([by_class[k][int(v * len(by_class[k]))] for k, v in zip(classes, u)])

    left_i, right_i = items_of(left_k), items_of(right_k)
    colours = np.array(list(COLOURS.values()))
    left_c, right_c = rng.integers(len(COLOURS), size=n), rng.integers(len(COLOURS), size=n)
    phrasing = rng.integers(len(PHRASINGS), size=n)
    images = np.concatenate([tint(grey[left_i], colours[left_c]), tint(grey[right_i], colours[right_c])], axis=3)  # (n, 3, 32, 64)
    attributes = torch.from_numpy(np.stack([left_k, left_c, right_k, right_c], axis=1).astype(np.int64))
    held = torch.tensor([is_held_out(a, b) for a, b in zip(left_k, right_k)])
    return Pairs(torch.from_numpy(images), attributes, [caption(a, p) for a, p in zip(attributes, phrasing)], held)
