"""A shipped model's check picture: a few samples at fixed seeds, saved beside its weights as ``check.png``.

The recipe's figures (`difflab eval` on hundreds of samples) take minutes to reproduce; these few samples take
seconds and pin the same thing, the model's weights read through today's generation path: the suite compares
``check_samples(name)`` with the picture (``compare``), and ``benchmarks/shipped_figures.py`` reproduces the
figures themselves. The settings live in the recipe (``recipe["check"]``) so the picture can be remade:

    {"n": 4, "seed": 0, "sampler": "dpmpp-2m", "steps": 20, "guidance": 5.0, "prompt": [...]}   (a text model)
    {"n": 8, "seed": 0, "sampler": "dpmpp-2m", "steps": 20, "guidance": 2.0, "class_label": [0, ..., 7]}

A picture is one row of the n samples side by side, as 8-bit levels (grey or RGB)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data.base import to_uint8
from ..io import atomic_path
from ..runs import shipped
from ..runs.diffusion import DiffusionRun

CHECK = "check.png"
PROMPTS = (  # the demo's four captions: each item on its named side
    "a red sneaker on the left and a blue bag on the right",
    "a blue bag on the left and a red sneaker on the right",
    "a green dress on the left and a yellow sandal on the right",
    "a yellow trouser on the left and a green coat on the right",
)


def check_settings(name: str) -> dict:
    """The check's settings for the shipped diffusion model ``name``: its recipe's, else the defaults above (the
    recipe's guidance scale; the four captions for a text model, classes 0-7 for a class model)."""
    recipe = shipped.recipe(name)
    if "check" in recipe:
        return dict(recipe["check"])
    run = DiffusionRun.load(name)
    s = {"n": 4, "seed": 0, "sampler": "dpmpp-2m", "steps": 20, "guidance": float(recipe["figures"]["scale"])}
    if run.config.text is not None:
        return s | {"prompt": list(PROMPTS)}
    if run.config.num_classes is not None:
        return s | {"n": 8, "class_label": list(range(8))}
    raise ValueError(f"{name} takes neither text nor classes: it has no check picture")


def check_samples(name: str, settings: dict | None = None) -> Tensor:
    """The check's samples of ``name`` as 8-bit levels (n, C, H, W)."""
    s = dict(settings or check_settings(name))
    n = s.pop("n")
    return to_uint8(DiffusionRun.load(name).sample(n, batch=n, **s))


def to_strip(images: Tensor) -> Image.Image:
    """(n, C, H, W) uint8 -> one row of n images, H x nW (grey) or H x nW x 3 (RGB)."""
    row = images.permute(2, 0, 3, 1).reshape(images.shape[2], -1, images.shape[1]).numpy()  # (H, n*W, C)
    return Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)


def from_strip(path: str | Path, n: int) -> Tensor:
    """The n images of a check picture, (n, C, H, W) uint8."""
    row = np.asarray(Image.open(path))
    row = row[..., None] if row.ndim == 2 else row  # (H, n*W, C)
    h, w, c = row.shape[0], row.shape[1] // n, row.shape[2]
    return torch.from_numpy(row.copy()).reshape(h, n, w, c).permute(1, 3, 0, 2)


def write_check(folder: str | Path, name: str, settings: dict) -> Path:
    """Draw the check of ``name`` and write it, with its settings in the recipe, into ``folder`` (the model's)."""
    folder = Path(folder)
    images = check_samples(name, settings)
    with atomic_path(folder / CHECK) as tmp:
        to_strip(images).save(tmp, format="PNG")
    recipe = json.loads((folder / shipped.RECIPE).read_text()) | {"check": settings}
    with atomic_path(folder / shipped.RECIPE) as tmp:
        Path(tmp).write_text(json.dumps(recipe, indent=2) + "\n")
    return folder / CHECK


def compare(got: Tensor, want: Tensor) -> dict:
    """How far two pictures' levels are apart: the mean, the 99.5th percentile and the largest difference."""
    d = (got.int() - want.int()).abs().float().flatten()
    return {"mean": float(d.mean()), "p995": float(d.quantile(0.995)), "max": float(d.max())}
