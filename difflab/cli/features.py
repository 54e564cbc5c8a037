"""`difflab features train NAME`: train the classifiers behind the sample-quality metrics through the one training
loop (evaluation/feature_training.py), then write them where `eval` finds them."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..evaluation.feature_training import RECIPES, FeatureTraining, train_features
from ..evaluation.features import SHIPPED
from ..evaluation.identity import IdentityTraining, train_identity
from ..evaluation.instance import InstanceTraining, train_instance
from ..training.distributed import resolve_device
from .options import Parser, UsageError, add_device, positive_float, positive_int


def method_of(args) -> str:
    """--method, or its default: a classifier for the built-in sets, instance discrimination for a folder / .npz."""
    return args.method or ("classifier" if args.name in SHIPPED else "instance")


def refuse_on_resume(args, names: tuple[str, ...]) -> None:
    """A resumed run keeps its recipe: refuse, in one line, the options among ``names`` that were given."""
    fixed = [f"--{f.replace('_', '-')}" for f in names if getattr(args, f) is not None]
    if args.resume and fixed:
        raise UsageError(f"{', '.join(fixed)}: a resumed run keeps what it was started with (its config.json)")


def run_train(args) -> None:
    if method_of(args) == "instance":
        return run_instance(args)
    wrong = [f"--{f.replace('_', '-')}" for f in ("steps", "batch_size", "max_minutes") if getattr(args, f) is not None]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: options of --method instance (a classifier trains --epochs)")
    refuse_on_resume(args, ("epochs", "seed", "pairs", "widths", "size", "channels", "data"))
    recipe = RECIPES.get(args.name, FeatureTraining())
    overrides = {
        k: v
        for k, v in (("epochs", args.epochs), ("seed", args.seed), ("pairs", args.pairs), ("widths", args.widths))
        if v is not None
    }
    recipe = FeatureTraining(**{**asdict(recipe), **overrides})
    command = (
        "difflab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["features"] else f"difflab features train {args.name}"
    )
    torch.set_num_threads(args.threads or 1)
    run = args.run or f"runs/features-{Path(args.name).stem}"
    weights, meta = train_features(
        args.name,
        run,
        out=args.out,
        recipe=recipe,
        data_dir=args.data,
        size=args.size,
        channels=args.channels,
        resume=args.resume,
        progress=not args.quiet,
        command=command,
        device=resolve_device(args.device),
    )
    kb = weights.stat().st_size / 1024
    print(
        f"test accuracy {100 * meta['test_accuracy']:.2f}% on {meta['test_n']} images; trained in "
        f"{meta['train_seconds']:.0f} s (run {run})"
    )
    if meta.get("test_attribute_accuracy"):
        print(
            "per attribute: "
            + ", ".join(f"{a} {100 * v:.2f}%" for a, v in zip(meta["attributes"], meta["test_attribute_accuracy"]))
        )
    print(f"wrote {weights} ({kb:.0f} KiB) and {weights.with_suffix('.json').name}")


def run_instance(args) -> None:
    wrong = [f"--{f}" for f in ("epochs", "pairs") if getattr(args, f) is not None]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: options of --method classifier (instance discrimination trains --steps)")
    refuse_on_resume(args, ("steps", "batch_size", "seed", "widths", "size", "channels", "data"))
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("seed", args.seed),
            ("widths", args.widths),
        )
        if v is not None
    }
    if args.threads:  # default: torch's own (measured alone on 2 cores: 200 steps in 40 s at 2 threads, 69 s at 1)
        torch.set_num_threads(args.threads)
    run = args.run or f"runs/features-{Path(args.name).stem}"
    command = "difflab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["features"] else None
    done = train_instance(
        args.name,
        run,
        out=args.out,
        recipe=InstanceTraining(**overrides),
        data_dir=args.data,
        size=args.size,
        channels=args.channels,
        resume=args.resume,
        progress=not args.quiet,
        command=command,
        device=resolve_device(args.device),
        max_minutes=args.max_minutes,
    )
    if done is None:
        print(f"stopped after --max-minutes; continue with `difflab features train {args.name} --run {run} --resume`")
        return
    weights, meta = done
    if "linear_probe" in meta:
        print(
            f"linear probe {100 * meta['linear_probe']:.1f}% on {meta['test_n']} test images "
            f"(random features {100 * meta['linear_probe_random']:.1f}%); trained in {meta['train_seconds']:.0f} s "
            f"(run {run})"
        )
    else:
        print(f"trained in {meta['train_seconds']:.0f} s (run {run}); no classes, so no linear probe")
    print(f"wrote {weights} ({weights.stat().st_size / 1024:.0f} KiB) and {weights.with_suffix('.json').name}")
    print(f"use it: difflab train {args.name} --eval-every --features {weights}  (or difflab eval RUN --features ...)")


def run_identity(args) -> None:
    recipe = IdentityTraining(
        **{
            k: v
            for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed))
            if v is not None
        }
    )
    torch.set_num_threads(args.threads)
    command = "difflab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["features"] else "difflab features identity"
    done = train_identity(
        args.run,
        out=args.out,
        recipe=recipe,
        resume=args.resume,
        progress=not args.quiet,
        command=command,
        max_minutes=args.max_minutes,
    )
    if done is None:
        print(f"stopped after --max-minutes; continue with `difflab features identity --run {args.run} --resume`")
        return
    weights, meta = done
    print(
        f"retrieval top-1 {100 * meta['retrieval_top1']:.1f}% (a view of a test item among 100 other items of its "
        f"class; run {args.run})"
    )
    print(f"wrote {weights} ({weights.stat().st_size / 1024:.0f} KiB) and {weights.with_suffix('.json').name}")


def register(sub) -> None:
    f = sub.add_parser("features", help="the feature networks of `difflab eval`")
    fsub = f.add_subparsers(dest="features_command", required=True, parser_class=Parser)
    t = fsub.add_parser(
        "train",
        help="a folder / .npz: train an instance-discrimination net on its images (no labels needed) and write "
        "{name}-instance.safetensors + .json; a built-in set: its classifier, {name}-classifier.* (fashion-pairs' "
        "recipe is GPU-sized: 7020 steps of a 64-128-256 net, 95 s on one H200, not measured on a CPU)",
    )
    t.add_argument(
        "name", help=f"{' or '.join(SHIPPED)} (a classifier, written to difflab/weights/), or a folder / .npz"
    )
    t.add_argument(
        "--method",
        choices=["instance", "classifier"],
        help="instance: NT-Xent instance discrimination (default for a folder / .npz; see docs/evaluation.md); "
        "classifier: a classifier of the labels (default for the built-in sets; a folder needs class subfolders)",
    )
    t.add_argument(
        "--out",
        help="output folder (default: difflab/weights/ for a built-in set's classifier, else the run folder; a "
        "folder's classifier needs --out)",
    )
    t.add_argument("--run", help="the training run's folder (default runs/features-NAME)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run")
    t.add_argument("--epochs", type=positive_int, help="classifier: override the recipe's epochs")
    t.add_argument("--steps", type=positive_int, help=f"instance: training steps (default {InstanceTraining.steps})")
    t.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"instance: images per step, two views each (default {InstanceTraining.batch_size})",
    )
    t.add_argument(
        "--max-minutes", type=positive_float, help="instance: stop (with a checkpoint) after this many minutes"
    )
    t.add_argument("--seed", type=int, help="override the recipe's seed (0)")
    t.add_argument(
        "--pairs",
        type=positive_int,
        help="fashion-pairs: training pairs to make (default the recipe's: 60000; the train split has 20000)",
    )
    t.add_argument(
        "--widths",
        type=positive_int,
        nargs="+",
        help="the network's conv stages (default the recipe's: 64 128 256 for fashion-pairs, else 32 64 128)",
    )
    t.add_argument("--data", help="folder holding the dataset's files (e.g. Fashion-MNIST IDX files)")
    t.add_argument("--size", type=positive_int)
    t.add_argument("--channels", type=int, choices=[1, 3])
    t.add_argument(
        "--threads",
        type=positive_int,
        help="torch CPU threads (default: a classifier 1, measured 5x faster than 2 when other work shares 2 cores; "
        "instance discrimination torch's own, 1.7x faster at 2 than 1 alone on 2 cores)",
    )
    add_device(t)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=run_train)
    i = fsub.add_parser(
        "identity", help="train the identity encoder of personalisation's subject fidelity (fashion-identity.*)"
    )
    i.add_argument(
        "--run", default="runs/features-identity", help="the training run's folder (default runs/features-identity)"
    )
    i.add_argument("--out", help="output folder (default difflab/weights/)")
    i.add_argument("--resume", action="store_true", help="continue the run in --run")
    i.add_argument("--steps", type=positive_int, help=f"training steps (default {IdentityTraining.steps})")
    i.add_argument(
        "--batch-size",
        type=positive_int,
        help=f"items per step, two views each (default {IdentityTraining.batch_size})",
    )
    i.add_argument("--seed", type=int)
    i.add_argument("--max-minutes", type=positive_float, help="stop (with a checkpoint) after this many minutes")
    i.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads (default 2)")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(func=run_identity)
