"""`difflab train-classifier NAME --out RUN`: a noise-aware classifier p(y | x_t, t) for classifier guidance.

    difflab train-classifier fashion-mnist --out runs/fm-clf                 # the dataset preset's process
    difflab train-classifier --for runs/fm --out runs/fm-clf                 # the process of the run it will guide
    difflab train-classifier --out runs/fm-clf --resume

It trains through the one training loop (checkpoints, resume, torchrun, progress) and writes
``accuracy.json``: test accuracy at noise levels t / t_max in classifier.NOISE_LEVELS."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..guidance.classifier import (
    ACCURACY,
    CLASSIFIER,
    ClassifierRun,
    NoiseAwareClassifier,
    accuracy_report,
    classifier_config,
)
from ..runs.config import load_config
from ..runs.data import load_split, training_data
from ..runs.lifecycle import begin
from ..training.distributed import launched_rank, resolve_device
from ..training.loop import train
from .options import UsageError, add_auxiliary_training, dataset_preset, training_options

FIELDS = ("batch_size", "lr", "seed")


def new_config(args):
    if args.for_run:
        base = load_config(args.for_run)
        if base.run_kind != "diffusion":
            what = "itself a classifier" if base.run_kind == "classifier" else base.kind.what
            raise UsageError(f"--for {args.for_run} is {what}; give the diffusion run to be guided")
        if base.latent is not None:
            raise UsageError(
                f"--for {args.for_run} is a latent run: a noise-aware classifier on latents is not built; use "
                "classifier-free guidance"
            )
        if args.name is not None and args.name != base.dataset:
            raise UsageError(f"NAME {args.name!r} differs from the dataset of --for {args.for_run} ({base.dataset!r})")
        net = replace(base.net, num_classes=None) if base.net_kind == "unet" else base.net
        base = replace(base, conditions=[], net=net, text=None, super_resolution=None)
    else:
        base = dataset_preset(args, "give the dataset NAME (or --for RUN, or --resume)")
    if base.data_kind != "images":
        raise UsageError(f"a noise-aware classifier needs images; {base.dataset} is a set of {base.data_kind}")
    num_classes = load_split(base, "train").num_classes
    if not num_classes:
        raise UsageError(f"{base.dataset} has no class labels to learn (use class subfolders or an npz 'labels' array)")
    cfg = training_options(classifier_config(base, num_classes), args)
    cfg.validate()
    return cfg


def run(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    fixed = [
        flag
        for f, flag in {"name": "NAME", "for_run": "--for", **{f: f"--{f.replace('_', '-')}" for f in FIELDS}}.items()
        if getattr(args, f) is not None
    ]
    cfg, resume = begin(
        out,
        CLASSIFIER,
        resume=args.resume,
        force=args.force,
        fresh=lambda: new_config(args),
        fixed=fixed,
        steps=args.steps,
    )
    data = training_data(cfg)
    if not args.quiet and launched_rank() == 0:
        print(
            f"{'resuming' if resume else 'training'} a noise-aware classifier for {cfg.dataset}: "
            f"{cfg.train.steps} steps x batch {cfg.train.batch_size}, on {device}"
        )
    if not resume and launched_rank() == 0:
        (out / ACCURACY).unlink(missing_ok=True)  # an earlier run's figures must not pass for this one's
    test = load_split(cfg, "test")
    train(
        out,
        cfg,
        data,
        device=device,
        resume=resume,
        progress=not args.quiet,
        max_minutes=args.max_minutes,
        preview=lambda ema, step, run: accuracy_report(NoiseAwareClassifier(ema), step, run, test),
        command="train-classifier",
    )
    if launched_rank() == 0:
        loaded = ClassifierRun.load(out)
        saved = json.loads((out / ACCURACY).read_text()) if (out / ACCURACY).exists() else {}
        acc = (
            saved if saved.get("step") == loaded.step else accuracy_report(loaded.classifier, loaded.step, out, test)
        )  # e.g. stopped by --max-minutes
        print(
            f"test accuracy at step {loaded.step} by noise level t/t_max: "
            + ", ".join(f"{k}: {v:.3f}" for k, v in acc["accuracy"].items())
        )
        print(
            f"classifier written to {out}/ (use it with `difflab sample RUN --classifier {out} --classifier-scale S`)"
        )


def register(sub) -> None:
    t = sub.add_parser("train-classifier", help="train a noise-aware classifier p(y | x_t, t) for classifier guidance")
    t.add_argument("name", nargs="?", help="dataset name (its preset's process); not needed with --for or --resume")
    t.add_argument("--out", required=True, help="classifier run directory")
    t.add_argument(
        "--for", dest="for_run", metavar="RUN", help="the diffusion run it will guide (its dataset, shape and process)"
    )
    add_auxiliary_training(t, "optimizer steps (default: a quarter of the dataset preset's)")
    t.set_defaults(func=run)
