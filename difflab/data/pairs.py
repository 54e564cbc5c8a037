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

import json
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..io import atomic_path
from .base import DataError
from .fashion_mnist import load_fashion_mnist

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (235, 210, 40),
    "purple": (160, 60, 220),
    "white": (235, 235, 235),
}
NOUNS = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
RGB = np.array(list(COLOURS.values()))  # (colours, 3): row i is the i-th named colour
HELD_OUT: tuple[tuple[int, int], ...] = tuple((k, (k + 7) % 10) for k in range(10))  # (left class, right class)
PHRASINGS = (
    "{L} on the left and {R} on the right",
    "{R} on the right and {L} on the left",
    "{R} to the right of {L}",
    "{L} to the left of {R}",
    "on the left {L}, on the right {R}",
)
NEW_PHRASINGS = (  # never in a training caption: does a model read the sentence, or memorise the template?
    "{L} at the left, {R} at the right",
    "left: {L}; right: {R}",
    "to the right {R}, to the left {L}",
    "{L} placed left of {R}",
)
REWORDED_PHRASINGS = (  # a second set, written once (2026-12-06) and never in training: --prompts reworded
    "{L} at left, {R} at right",
    "left side {L}, right side {R}",
    "at right {R}; at left {L}",
    "{R} appears right of {L}",
)
AUGMENT_PHRASINGS = (  # more ways to say the sides, for tuning a text tower (train-clip --caption-variants); never
    "{L} is on the left and {R} is on the right",  # the evaluation's (NEW_PHRASINGS, REWORDED_PHRASINGS)
    "the left shows {L} and the right shows {R}",
    "the right shows {R} and the left shows {L}",
    "in the left half {L}, in the right half {R}",
    "in the right half {R}, in the left half {L}",
    "{R} is right and {L} is left",
    "from left to right {L} then {R}",
    "from right to left {R} then {L}",
)
LABEL_PHRASINGS = (  # the sides as labels before their items, either side first (train-clip --caption-phrasings
    "left = {L}, right = {R}",  # sides+labels); never the evaluation's colon form "left: {L}; right: {R}"
    "right = {R}, left = {L}",
    "left - {L}; right - {R}",
    "right - {R}; left - {L}",
    "{L} (left); {R} (right)",
    "{R} (right); {L} (left)",
)
CAPTION_PHRASINGS = {  # the phrasings caption variants take turns in (rephrased)
    "sides": AUGMENT_PHRASINGS,
    "sides+labels": AUGMENT_PHRASINGS + LABEL_PHRASINGS,
}
# Other words for the colours and items. SYNONYMS[0][colour] and SYNONYMS[1][item] list the dataset's word first,
# then words a tower may be tuned on (train-clip --caption-words synonyms). UNSEEN_WORDS are never in a training
# caption: they measure whether a model reads words it was not tuned on (written once, 2026-12-06).
CAPTION_WORDS = ("dataset", "synonyms", "typos")  # the variants' words: the dataset's, SYNONYMS rows, or misspelt
MAX_CAPTION_VARIANTS = 8  # variants per image, at most (as many as AUGMENT_PHRASINGS)
SYNONYMS: tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]] = (
    (
        ("red", "scarlet", "cherry", "ruby"),
        ("green", "lime", "jade", "olive"),
        ("blue", "navy", "cobalt", "sapphire"),
        ("yellow", "lemon", "amber", "mustard"),
        ("purple", "lilac", "plum", "lavender"),
        ("white", "cream", "pearl", "snowy"),
    ),
    (
        ("t-shirt", "top", "tank top", "polo"),
        ("trouser", "slacks", "jeans", "chinos"),
        ("pullover", "jumper", "hoodie", "sweatshirt"),
        ("dress", "frock", "sundress", "pinafore"),
        ("coat", "overcoat", "parka", "raincoat"),
        ("sandal", "slider", "espadrille", "strappy shoe"),
        ("shirt", "button-down", "oxford", "collared shirt"),
        ("sneaker", "running shoe", "tennis shoe", "kicks"),
        ("bag", "purse", "tote", "satchel"),
        ("ankle boot", "boot", "chelsea boot", "short boot"),
    ),
)
UNSEEN_WORDS: dict[str, tuple[tuple[str, ...] | None, tuple[str, ...] | None]] = {  # per kind: (colours, items)
    "synonyms": (
        ("crimson", "emerald", "azure", "golden", "violet", "ivory"),
        ("tee", "pants", "sweater", "gown", "jacket", "flip-flop", "blouse", "trainer", "handbag", "bootie"),
    ),
    "plurals": (
        None,
        (
            "t-shirts",
            "trousers",
            "pullovers",
            "dresses",
            "coats",
            "sandals",
            "shirts",
            "sneakers",
            "bags",
            "ankle boots",
        ),
    ),
    "typos": (
        ("rde", "gren", "bleu", "yelow", "purpel", "whte"),
        ("t-shrit", "trowser", "pulover", "dres", "caot", "sandle", "shrit", "sneeker", "bga", "ankle bot"),
    ),
}
# a phrasing's index: its place here; the variants' phrasings (CAPTION_PHRASINGS) from FIRST_VARIANT on, in order
ALL_PHRASINGS = PHRASINGS + NEW_PHRASINGS + REWORDED_PHRASINGS + AUGMENT_PHRASINGS + LABEL_PHRASINGS
FIRST_VARIANT = len(PHRASINGS + NEW_PHRASINGS + REWORDED_PHRASINGS)
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


def caption(attributes, phrasing: int = 0, subject: int | None = None, token: str = "sks", words=(0, 0, 0, 0)) -> str:
    """The caption of one image's attributes (left class, left colour, right class, right colour); the
    ``subject`` half (0 left, 1 right), if any, named by the identifier ``token`` ("a red sks sneaker"). ``words``:
    which word of its SYNONYMS row says the left colour, left item, right colour and right item (0, the default:
    the dataset's own)."""
    left, right = said_items(attributes, subject, token, words)
    return ALL_PHRASINGS[phrasing].format(L=left, R=right)


def said_words(attributes, words=(0, 0, 0, 0)) -> list[str]:
    """The words a caption says ``attributes`` (left class, left colour, right class, right colour) in, in the order
    it says them: left colour, left item, right colour, right item. ``words``: which word of its SYNONYMS row says
    each (0, the default: the dataset's own)."""
    lk, lc, rk, rc = (int(a) for a in attributes)
    wlc, wlk, wrc, wrk = (int(w) for w in words)
    return [SYNONYMS[0][lc][wlc], SYNONYMS[1][lk][wlk], SYNONYMS[0][rc][wrc], SYNONYMS[1][rk][wrk]]


def said_items(attributes, subject: int | None = None, token: str = "sks", words=(0, 0, 0, 0)) -> tuple[str, str]:
    """The left and right items of ``attributes`` as a caption says them ("a red sneaker", "a blue bag"); the
    arguments as caption's. Any template with {L} and {R} can take them."""
    said = said_words(attributes, words)
    left, right = (
        article(f"{said[2 * side]} {token + ' ' if subject == side else ''}{said[2 * side + 1]}") for side in (0, 1)
    )
    return left, right


def meant_words(kind: str) -> dict[str, str]:
    """Each of UNSEEN_WORDS[kind]'s words and the dataset word it stands for (by its place in COLOURS' and NOUNS'
    order): "crimson" -> "red", "handbag" -> "bag"."""
    if kind not in UNSEEN_WORDS:
        raise DataError(f"unknown kind of unseen words {kind!r}; choose one of {', '.join(UNSEEN_WORDS)}")
    colours, items = UNSEEN_WORDS[kind]
    return dict(zip(colours or (), COLOURS)) | dict(zip(items or (), NOUNS))


def is_held_out(left_class, right_class) -> bool:
    """Whether the left/right class combination is one of HELD_OUT (never in the train split)."""
    return (int(left_class), int(right_class)) in HELD_OUT


def parse_caption(text: str) -> tuple[tuple[int, int, int, int], int] | None:
    """(attributes, phrasing) of a caption in one of the ALL_PHRASINGS (case and surrounding blanks aside), or
    None for any other text: the inverse of ``caption``."""
    items = {article(f"{c} {noun}"): (k, i) for i, c in enumerate(COLOURS) for k, noun in enumerate(NOUNS)}
    text = " ".join(text.lower().split())
    for index, phrasing in enumerate(ALL_PHRASINGS):
        pattern = re.escape(phrasing).replace(r"\{L\}", "(?P<L>.+?)").replace(r"\{R\}", "(?P<R>.+?)")
        m = re.fullmatch(pattern, text)
        if m and m["L"] in items and m["R"] in items:
            (lk, lc), (rk, rc) = items[m["L"]], items[m["R"]]
            return (lk, lc, rk, rc), index
    return None


TYPO_EDITS = ("drop", "swap", "double", "replace")  # one edit of a word's letters (typo)
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def typo(word: str, rng: random.Random) -> str:
    """``word`` with one random edit of its letters (a letter dropped, two neighbours swapped, a letter doubled or
    replaced), never one of UNSEEN_WORDS' typos (those measure words no training caption has), the word itself or
    another of the dataset's words; in a word of two words ("ankle boot") one letter of either."""
    measured = set(UNSEEN_WORDS["typos"][0]) | set(UNSEEN_WORDS["typos"][1])
    letters = [i for i, ch in enumerate(word) if ch.isalpha()]
    while True:
        i, edit = rng.choice(letters), rng.choice(TYPO_EDITS)
        if edit == "drop":
            out = word[:i] + word[i + 1 :]
        elif edit == "swap":
            j = i + 1 if i + 1 < len(word) and word[i + 1].isalpha() else i - 1
            if j < 0 or not word[j].isalpha():
                continue
            a, b = sorted((i, j))
            out = word[:a] + word[b] + word[a] + word[b + 1 :]
        elif edit == "double":
            out = word[: i + 1] + word[i] + word[i + 1 :]
        else:
            out = word[:i] + rng.choice(_LETTERS.replace(word[i], "")) + word[i + 1 :]
        if out != word and out not in measured and out not in COLOURS and out not in NOUNS:
            return out


def rephrased(
    captions, attributes: Tensor | None, variants: int, words: str = "dataset", phrasings: str = "sides"
) -> list[str]:
    """``variants`` more captions of each image, its attributes said in the CAPTION_PHRASINGS[phrasings] (in turn, so
    every phrasing is used alike): image i's v-th is row v * N + i. ``words='synonyms'``: each colour and item of a
    variant is said as one of its SYNONYMS row's four words (the dataset's among them), drawn with a fixed seed (a
    resumed run rebuilds the same captions); ``words='typos'``: each misspelt 3 times in 4 (typo), likewise.
    Refused for captions outside fashion-pairs' caption language."""
    if words not in CAPTION_WORDS:
        raise DataError(f"unknown caption words {words!r}; choose one of {', '.join(CAPTION_WORDS)}")
    if phrasings not in CAPTION_PHRASINGS:
        raise DataError(f"unknown caption phrasings {phrasings!r}; choose one of {', '.join(CAPTION_PHRASINGS)}")
    if attributes is None or len(attributes) != len(captions) or any(parse_caption(c) is None for c in captions[:50]):
        raise DataError("--caption-variants rephrases captions from their attributes: it needs fashion-pairs' captions")
    count = len(CAPTION_PHRASINGS[phrasings])
    rows, n = attributes.tolist(), len(attributes)
    picks = (
        torch.randint(0, 4, (variants * n, 4), generator=torch.Generator().manual_seed(0))
        if words == "synonyms"
        else torch.zeros(variants * n, 4, dtype=torch.long)
    ).tolist()
    rng = random.Random(0)  # the typos' draws
    out = []
    for v in range(variants):
        for i in range(n):
            said = said_words(rows[i], picks[v * n + i])
            if words == "typos":
                said = [typo(w, rng) if rng.random() < 0.75 else w for w in said]
            template = ALL_PHRASINGS[FIRST_VARIANT + (i * variants + v) % count]
            out.append(template.format(L=article(f"{said[0]} {said[1]}"), R=article(f"{said[2]} {said[3]}")))
    return out


def swapped(attributes) -> tuple[int, int, int, int]:
    """The attributes with the two halves exchanged (the caption-swap check of attribute binding)."""
    lk, lc, rk, rc = (int(a) for a in attributes)
    return rk, rc, lk, lc


def training_pairs(
    data, variants: int = 0, words: str = "dataset", phrasings: str = "sides"
) -> tuple[Tensor, list[str]]:
    """The (image, caption) pairs a text model trains on, as indices into ``data``'s images (an ImageSet) and a
    caption each: its own pairs (ImageSet.caption_pairs: an image with several captions once per caption), and with
    ``variants`` K every pair again with each of K rephrased captions of its image's attributes (rephrased; in
    ``words`` and ``phrasings``)."""
    index, captions = data.caption_pairs()
    if variants:
        attributes = None if data.attributes is None else data.attributes[index]
        captions = [*captions, *rephrased(captions, attributes, variants, words, phrasings)]
        index = index.repeat(variants + 1)
    return index, captions


def swap_colours(text: str) -> str:
    """A fashion-pairs caption with its two colours exchanged, items, sides and phrasing kept ("a red sneaker on the
    left and a blue bag on the right" -> "a blue sneaker ... a red bag ..."): the check that a text tower binds each
    colour to its own item. Any other text, or two items of one colour, comes back unchanged."""
    found = parse_caption(text)
    if found is None:
        return text
    (lk, lc, rk, rc), phrasing = found
    return text if lc == rc else caption((lk, rc, rk, lc), phrasing)


def tint(grey: np.ndarray, colour) -> np.ndarray:
    """uint8 (N, 28, 28) grey items -> uint8 (N, 3, 32, 32): g/255 * colour rounded to the nearest level, padded with
    black. In integers: round(g c / 255) = (2 g c + 255) // 510, and g c / 255 is never half-way between two levels
    (2 g c = 255 (2k + 1) has no solution in integers), so this is exactly NumPy's rint of the float quotient."""
    rgb = np.asarray(colour)
    if not np.issubdtype(rgb.dtype, np.integer) or rgb.min(initial=0) < 0 or rgb.max(initial=0) > 255:
        raise ValueError(f"tint: colours are integer levels 0-255, got {rgb.dtype} {rgb.min()}..{rgb.max()}")
    g = grey[:, None].astype(np.int32)  # (N, 1, 28, 28)
    out = ((2 * g * rgb.astype(np.int32).reshape(-1, 3, 1, 1) + 255) // 510).astype(np.uint8)  # (N, 3, 28, 28)
    return np.pad(out, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))


def make_pairs(split: str, n: int | None = None, seed: int = 0, data_dir: str | None = None) -> Pairs:
    """``n`` fashion-pairs images of ``split`` ("train" or "test"), deterministic in (split, n, seed); made once per
    process (tinting 20000 pairs takes 1-2 s) and handed out as copies."""
    p = _made(split, n, seed, data_dir)
    return Pairs(p.images.clone(), p.attributes.clone(), list(p.captions), p.held_out.clone())


@lru_cache(maxsize=4)
def _made(split: str, n: int | None, seed: int, data_dir: str | None) -> Pairs:
    if split not in DEFAULT_N:
        raise DataError(f"fashion-pairs: unknown split {split!r}; choose train or test")
    n = DEFAULT_N[split] if n is None else n
    if n <= 0:
        raise DataError(f"fashion-pairs: n must be positive, got {n}")
    items = load_fashion_mnist(split, data_dir)
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
    colours = RGB
    left_c, right_c = rng.integers(len(COLOURS), size=n), rng.integers(len(COLOURS), size=n)
    phrasing = rng.integers(len(PHRASINGS), size=n)
    images = np.concatenate(
        [tint(grey[left_i], colours[left_c]), tint(grey[right_i], colours[right_c])], axis=3
    )  # (n, 3, 32, 64)
    attributes = torch.from_numpy(np.stack([left_k, left_c, right_k, right_c], axis=1).astype(np.int64))
    held = torch.tensor([is_held_out(a, b) for a, b in zip(left_k, right_k)])
    return Pairs(torch.from_numpy(images), attributes, [caption(a, p) for a, p in zip(attributes, phrasing)], held)


# --------------------------------------------------------------------------- a personalisation subject


@dataclass
class Subject:
    """One Fashion-MNIST item (the subject) shown in a few fashion-pairs images, captioned with an identifier."""

    images: Tensor  # uint8 (n, 3, 32, 64): the subject in one half (tinted), another item in the other
    captions: list[str]  # "a red sks sneaker on the left and a blue bag on the right"
    attributes: Tensor  # long (n, 4), as Pairs
    sides: Tensor  # long (n,): 0 the subject is on the left, 1 on the right
    grey: Tensor  # uint8 (28, 28): the subject item itself
    item: int  # its index among the split's Fashion-MNIST items


def place(halves: Tensor, sides: Tensor, other: Tensor | None = None) -> Tensor:
    """uint8 (n, 3, 32, 32) halves put on their side of a 32x64 canvas, the other half ``other`` (black by default)."""
    canvas = torch.zeros(len(halves), 3, 32, 64, dtype=torch.uint8)
    for i, (h, s) in enumerate(zip(halves, sides.tolist())):
        canvas[i, :, :, 32 * s : 32 * s + 32] = h
        if other is not None:
            canvas[i, :, :, 32 * (1 - s) : 32 * (1 - s) + 32] = other[i]
    return canvas


def half(images: Tensor, sides: Tensor) -> Tensor:
    """The ``sides`` half (0 left, 1 right) of each (n, 3, 32, 64) image: (n, 3, 32, 32)."""
    return torch.stack([im[:, :, 32 * s : 32 * s + 32] for im, s in zip(images, sides.tolist())])


def tinted(grey: Tensor, colours) -> Tensor:
    """One grey item (28, 28) in each colour index of ``colours``: uint8 (n, 3, 32, 32)."""
    rgb = RGB[np.asarray(colours)]
    return torch.from_numpy(tint(np.repeat(grey.numpy()[None], len(rgb), axis=0), rgb))


def make_subject(
    class_word: str, n: int = 4, token: str = "sks", seed: int = 0, split: str = "test", data_dir: str | None = None
) -> Subject:
    """A subject for personalisation: one item of class ``class_word`` drawn from ``split`` (the test split's
    items are never seen in training), in n different tints, alternately on the left and on the right of
    another random item of another class; deterministic in the arguments."""
    if class_word not in NOUNS:
        raise DataError(f"unknown class word {class_word!r}; fashion-pairs has {', '.join(NOUNS)}")
    if not 1 <= n <= len(COLOURS):
        raise DataError(f"a subject has 1 to {len(COLOURS)} images (one per tint), got {n}")
    k = NOUNS.index(class_word)
    items = load_fashion_mnist(split, data_dir)
    grey, labels = items.images[:, 0], items.labels.numpy()
    rng = np.random.default_rng([seed, 2])
    item = int(rng.choice(np.flatnonzero(labels == k)))
    colours = rng.permutation(len(COLOURS))[:n]
    sides = torch.arange(n) % 2
    others = [int(c) for c in rng.choice([c for c in range(10) if c != k], size=n)]
    other_items = [int(rng.choice(np.flatnonzero(labels == c))) for c in others]
    other_colours = rng.integers(len(COLOURS), size=n)
    other = torch.from_numpy(tint(grey[other_items].numpy(), RGB[other_colours]))
    images = place(tinted(grey[item], colours), sides, other)
    attributes = torch.tensor(
        [
            [k, c, o, oc] if s == 0 else [o, oc, k, c]
            for c, s, o, oc in zip(colours, sides.tolist(), others, other_colours)
        ]
    )
    captions = [caption(a, subject=int(s), token=token) for a, s in zip(attributes, sides)]
    return Subject(images, captions, attributes, sides, grey[item], item)


def write_subject(subject: Subject, folder) -> None:
    """The subject's images as PNGs and their captions in metadata.jsonl (the `difflab personalize --images` folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (im, c) in enumerate(zip(subject.images, subject.captions)):
        name = f"{i:02d}.png"
        with atomic_path(folder / name) as tmp:
            Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp)
        rows.append(json.dumps({"file_name": name, "text": c}))
    with atomic_path(folder / "metadata.jsonl") as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))


def subject_prompts(class_word: str, n: int, token: str = "sks", seed: int = 0) -> tuple[Tensor, Tensor, list[str]]:
    """n compositions of a subject for measuring: a random tint and side for it, another class in a random
    colour in the other half. Returns (attributes (n, 4), sides (n,), captions with the identifier)."""
    k = NOUNS.index(class_word)
    rng = np.random.default_rng([seed, 3])
    colours, sides = rng.integers(len(COLOURS), size=n), rng.integers(2, size=n)
    others = rng.choice([c for c in range(10) if c != k], size=n)
    other_colours = rng.integers(len(COLOURS), size=n)
    attributes = torch.tensor(
        [[k, c, o, oc] if s == 0 else [o, oc, k, c] for c, s, o, oc in zip(colours, sides, others, other_colours)]
    )
    sides = torch.from_numpy(sides).long()
    return attributes, sides, [caption(a, subject=int(s), token=token) for a, s in zip(attributes, sides)]
