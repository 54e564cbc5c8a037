"""`difflab features train NAME`: train the classifiers behind the sample-quality metrics (features.py)."""

from __future__ import annotations

import sys
from dataclasses import asdict

from ..evaluation.features import RECIPES, SHIPPED, FeatureTraining, train_and_save
from .options import Parser, positive_int


def run_train(args) -> None:
    recipe = RECIPES.get(args.name, FeatureTraining())
    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    recipe = FeatureTraining(**{**asdict(recipe), **overrides})
    command = "difflab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["features"] else f"difflab features train {args.name}"
    weights, meta = train_and_save(args.name, args.out, recipe, args.data, args.size, args.channels, progress=not args.quiet, command=command)
    kb = weights.stat().st_size / 1024
    print(f"test accuracy {100 * meta['test_accuracy']:.2f}% on {meta['test_n']} images; trained in {meta['train_seconds']:.0f} s")
    print(f"wrote {weights} ({kb:.0f} KiB) and {weights.with_suffix('.json').name}")


def register(sub) -> None:
    f = sub.add_parser("features", help="the feature networks of `difflab eval`")
    fsub = f.add_subparsers(dest="features_command", required=True, parser_class=Parser)
    t = fsub.add_parser("train", help="train a classifier and write {name}-classifier.safetensors + .json")
    t.add_argument("name", help=f"{' or '.join(SHIPPED)} (written to difflab/weights/), or a labelled folder / .npz (needs --out)")
    t.add_argument("--out", help="output folder (default for built-in sets: difflab/weights/)")
    t.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    t.add_argument("--seed", type=int, help="override the recipe's seed (0)")
    t.add_argument("--data", help="folder holding the dataset's files (e.g. Fashion-MNIST IDX files)")
    t.add_argument("--size", type=positive_int)
    t.add_argument("--channels", type=int, choices=[1, 3])
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_train)
