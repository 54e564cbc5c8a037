"""A user's folder of 32x32 colour images, made offline: what issue 34's targets are measured on.

Eight category sub-folders (the Fashion-MNIST classes t-shirt .. sneaker), each image a real Fashion-MNIST
item padded from 28x28 to 32x32 and tinted with one of fashion-pairs' named colours (``g / 255 * colour`` on
black), and a ``metadata.jsonl`` caption per file ("a red sneaker"). Items come from Fashion-MNIST's train
files in a fixed random order (seed 0), so the same ``n`` gives the same bytes on any machine. difflab splits
a folder itself (every 10th file in sorted order is its test split).

    .venv/bin/python benchmarks/colour_folder.py --n 2000 --out benchmarks/runs/colour-folder
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.data.fashion_mnist import load_fashion_mnist
from difflab.data.pairs import COLOURS, NOUNS, PAD
from difflab.io import atomic_dir

CLASSES = 8  # t-shirt, trouser, pullover, dress, coat, sandal, shirt, sneaker


def make_colour_folder(out: str | Path, n: int = 2000, seed: int = 0) -> Path:
    """Write the folder (see the module doc) whole or not at all; an existing folder of the same n is kept."""
    out = Path(out)
    if (out / "metadata.jsonl").is_file() and len((out / "metadata.jsonl").read_text().splitlines()) == n:
        return out
    data = load_fashion_mnist("train")
    labels = data.labels.numpy()
    rng = np.random.default_rng(seed)
    picked = rng.permutation(np.flatnonzero(labels < CLASSES))[:n]
    names, rgb = list(COLOURS), np.array(list(COLOURS.values()), dtype=np.float64)
    colours = rng.integers(len(names), size=n)
    with atomic_dir(out) as tmp:
        rows = []
        for i, (j, c) in enumerate(zip(picked, colours)):
            grey = data.images[j, 0].numpy().astype(np.float64) / 255.0
            img = np.pad(grey[..., None] * rgb[c], ((PAD, PAD), (PAD, PAD), (0, 0)))
            noun = NOUNS[labels[j]]
            name = f"{noun}/{i:05d}.png"
            (tmp / noun).mkdir(exist_ok=True)
            Image.fromarray(np.round(img).astype(np.uint8)).save(tmp / name)
            rows.append({"file_name": name, "text": f"a {names[c]} {noun}"})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def folder_run_options(description: str, steps: int, every: int) -> argparse.ArgumentParser:
    """The options of the scripts that train on this folder: --steps of a run, evaluated --every steps."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--every", type=int, default=every)
    return p


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", default="benchmarks/runs/colour-folder")
    args = p.parse_args()
    print(make_colour_folder(args.out, args.n))


if __name__ == "__main__":
    main()
