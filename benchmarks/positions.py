"""Do sides follow words? Positional information where the image meets the text, on a small task (issue 23).

Data: two different digits side by side (8 x 16), captioned in either order, "a three on the left and a seven
on the right" or "a seven on the right and a three on the left" (a fair coin per pair), read by MiniLM (frozen):
the side is in the words "left" and "right", not in which digit is named first (with the left one always named
first, even the U-Net without positions put 100 % of the named left digits on the left at s = 3, 600 steps).
One small latent-free U-Net per variant, the same seed, batches and steps; only where positions enter differs
(``--position`` of `difflab train --text`):

    none     the U-Net as it was: position only through the zero padding
    coords   two input channels holding each pixel's row and column
    queries  a 2-D sinusoidal encoding added to the cross-attention queries
    both     coords and queries

Judge: the shipped digits feature net on each 8 x 8 half (99.7 % on single test digits). Scores on 300 test
captions at guidance s = 1 and 3 (dpmpp-2m, 20 steps): left_on_left (the named left digit is on the left),
both (both halves right), swapped (both halves right but exchanged). tests/test_positions.py trains ``both``
for 600 steps with the left digit named first and checks it puts that digit on the left.

    .venv/bin/python benchmarks/positions.py [--steps 600] [--variants none coords queries both]

Writes benchmarks/results/positions.md and .json."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, header, md_table  # noqa: E402
from difflab.data.images import load_images, to_uint8  # noqa: E402
from difflab.data.loader import TensorDataset  # noqa: E402
from difflab.evaluation.features import embed, load_feature_net  # noqa: E402
from difflab.runs.diffusion import DiffusionRun  # noqa: E402
from difflab.runs.presets import preset_for, with_text  # noqa: E402
from difflab.text.encoders import text_condition, text_record  # noqa: E402
from difflab.training.loop import train  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
VARIANTS = ("none", "coords", "queries", "both")


def digit_pairs(split: str, n: int, seed: int, either_order: bool = True):
    """Up to n pairs of different digits side by side (n', 1, 8, 16), the left and right labels, captions (in either
    order, or the left digit always named first)."""
    d = load_images("digits", split=split)
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(len(d.images), (2, n), generator=g)
    keep = d.labels[i] != d.labels[j]
    i, j = i[keep], j[keep]
    a, b = d.labels[i], d.labels[j]
    flip = (torch.rand(len(a), generator=g) < 0.5) & either_order
    captions = [
        f"a {WORDS[q]} on the right and a {WORDS[p]} on the left"
        if f
        else f"a {WORDS[p]} on the left and a {WORDS[q]} on the right"
        for p, q, f in zip(a.tolist(), b.tolist(), flip.tolist())
    ]
    return torch.cat([d.images[i], d.images[j]], dim=3), a, b, captions


def train_variant(run: Path, position: str, steps: int, either_order: bool = True) -> float:
    """Train the small text run with positions entering as ``position``; its seconds."""
    x, _, _, captions = digit_pairs("train", 6000, 0, either_order)
    cfg = preset_for("digits")
    net = replace(
        cfg.net,
        image_size=8,
        image_width=16,
        base_channels=32,
        channel_mults=(1, 2),
        attention_resolutions=(4,),
        num_heads=4,
        num_res_blocks=1,
        coord_channels=position in ("coords", "both"),
        query_positions=position in ("queries", "both"),
    )
    cfg = replace(
        cfg,
        shape=[1, 8, 16],
        net=net,
        train=replace(cfg.train, steps=steps, batch_size=64, warmup=50, sample_every=0, checkpoint_every=10**6),
    )
    record, width, _ = text_record("minilm", captions)
    cfg = with_text(cfg, record, width, None)
    t0 = time.perf_counter()
    train(run, cfg, TensorDataset(x, text_condition(cfg, captions)), progress=False)
    return time.perf_counter() - t0


def side_scores(run: Path, scale: float, n: int = 300, either_order: bool = True) -> dict:
    """left_on_left, both and swapped on n test captions at guidance ``scale``."""
    _, a, b, test = digit_pairs("test", n, 1, either_order)
    images = to_uint8(
        DiffusionRun.load(run).sample(len(test), prompt=test, guidance=scale, sampler="dpmpp-2m", steps=20, seed=0)
    )
    judge = load_feature_net("digits")
    left, right = (embed(judge, half)[1].argmax(1) for half in (images[..., :8], images[..., 8:]))
    return {
        "left_on_left": (left == a).float().mean().item(),
        "both": ((left == a) & (right == b)).float().mean().item(),
        "swapped": ((left == b) & (right == a)).float().mean().item(),
    }


def write(rows: list[dict], name: str, title: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    cols = list(rows[0])
    lines = header(title) + md_table(cols, [[r[c] for c in cols] for r in rows])
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for v in args.variants:
        run = RUNS / "positions" / f"{v}-{args.steps}"
        seconds = train_variant(run, v, args.steps)
        row = {"variant": v, "steps": args.steps, "seconds": round(seconds)}
        for s in (1.0, 3.0):
            row |= {f"{k} s={s:g}": round(100 * val, 1) for k, val in side_scores(run, s).items()}
        print(json.dumps(row), flush=True)
        rows.append(row)
    write(rows, "positions", "Positions: do sides follow words? (digit pairs, MiniLM)")


if __name__ == "__main__":
    main()
