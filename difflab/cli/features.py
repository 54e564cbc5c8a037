"""`difflab features train NAME`: train the classifiers behind the sample-quality metrics through the one training
loop (evaluation/feature_training.py), then write them where `eval` finds them."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..evaluation.feature_training import RECIPES, FeatureTraining, train_features
from ..evaluation.features import SHIPPED
from .options import Parser, positive_int


def run_train(args) -> None:
    recipe = RECIPES.get(args.name, FeatureTraining())
    overrides = {k: v for k, v in (("epochs", args.epochs), ("seed", args.seed)) if v is not None}
    recipe = FeatureTraining(**{**asdict(recipe), **overrides})
    command = "difflab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["features"] else f"difflab features train {args.name}"
    torch.set_num_threads(args.threads)
    run = args.run or f"runs/features-{Path(args.name).stem}"
    weights, meta = train_features(args.name, run, out=args.out, recipe=recipe, data_dir=args.data, size=args.size, channels=args.channels,
                                   resume=args.resume, progress=not args.quiet, command=command)
    kb = weights.stat().st_size / 1024
    print(f"test accuracy {100 * meta['test_accuracy']:.2f}% on {meta['test_n']} images; trained in {meta['train_seconds']:.0f} s (run {run})")
    if meta.get("test_attribute_accuracy"):
        print("per attribute: " + ", ".join(f"{a} {100 * v:.2f}%" for a, v in zip(meta["attributes"], meta["test_attribute_accuracy"])))
    print(f"wrote {weights} ({kb:.0f} KiB) and {weights.with_suffix('.json').name}")


def register(sub) -> None:
    f = sub.add_parser("features", help="the feature networks of `difflab eval`")
    fsub = f.add_subparsers(dest="features_command", required=True, parser_class=Parser)
    t = fsub.add_parser("train", help="train a classifier and write {name}-classifier.safetensors + .json")
    t.add_argument("name", help=f"{' or '.join(SHIPPED)} (written to difflab/weights/), or a labelled folder / .npz (needs --out)")
    t.add_argument("--out", help="output folder (default for built-in sets: difflab/weights/)")
    t.add_argument("--run", help="the training run's folder (default runs/features-NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run")
    t.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    t.add_argument("--seed", type=int, help="override the recipe's seed (0)")
    t.add_argument("--data", help="folder holding the dataset's files (e.g. Fashion-MNIST IDX files)")
    t.add_argument("--size", type=positive_int)
    t.add_argument("--channels", type=int, choices=[1, 3])
    t.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1: measured 5x faster than 2 when other work shares 2 cores)")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_train)
