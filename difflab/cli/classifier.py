"""`difflab train-classifier NAME --out RUN`: a noise-aware classifier p(y | x_t, t) for classifier guidance.

    difflab train-classifier fashion-mnist --out runs/fm-clf                 # the dataset preset's process
    difflab train-classifier --for runs/fm --out runs/fm-clf                 # the process of the run it will guide
    difflab train-classifier --out runs/fm-clf --resume

It trains through the one training loop (checkpoints, resume, torchrun, progress) and writes
``accuracy.json``: test accuracy at noise levels t / t_max in classifier.NOISE_LEVELS."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

from ..runs import store as ckpt
from ..guidance.classifier import NoiseAwareClassifier, accuracy_by_noise, classifier_config
from ..data.images import load_split, to_model
from ..training.distributed import launched_rank, resolve_device, restarted
from ..io import atomic_path
from ..runs.presets import preset_for
from ..training.loop import train
from .data import check_dataset
from .options import UsageError, add_auxiliary_training
from .train import load_training_data

FIELDS = ("batch_size", "lr", "seed")
ACCURACY = "accuracy.json"


def run(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    resume = args.resume or (restarted() and ckpt.has_checkpoint(out))
    if resume:
        cfg = ckpt.load_config(out)
        if cfg.net_kind not in ckpt.CLASSIFIERS:
            raise UsageError(f"{out} holds a {cfg.net_kind} denoiser run, not a classifier")
        flags = {"name": "NAME", "for_run": "--for", **{f: f"--{f.replace('_', '-')}" for f in FIELDS}}
        given = [flag for f, flag in flags.items() if getattr(args, f) is not None]
        if given:
            raise UsageError(f"--resume continues {out} as it was saved; drop {', '.join(given)}")
        if args.steps:
            cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
        data, _ = load_training_data(cfg)
    else:
        if (out / ckpt.CONFIG).exists() and not args.force and not restarted():
            raise UsageError(f"{out} already holds a run: pass --resume to continue it or --force to start over")
        if args.for_run:
            base = ckpt.load_config(args.for_run)
            if base.net_kind in ckpt.CLASSIFIERS:
                raise UsageError(f"--for {args.for_run} is itself a classifier; give the diffusion run to be guided")
            if "latent" in base.data:
                raise UsageError(f"--for {args.for_run} is a latent run: a noise-aware classifier on latents is not built; use classifier-free guidance")
            if args.name is not None and args.name != base.dataset:
                raise UsageError(f"NAME {args.name!r} differs from the dataset of --for {args.for_run} ({base.dataset!r})")
            base = replace(base, conditions=[], net=dict(base.net, num_classes=None))
        else:
            if args.name is None:
                raise UsageError("give the dataset NAME (or --for RUN, or --resume)")
            check_dataset(args.name)
            base = preset_for(args.name)
            if args.data:
                base = replace(base, data=dict(base.data, data_dir=args.data))
        if base.kind != "images":
            raise UsageError(f"a noise-aware classifier needs images; {base.dataset} is a set of {base.kind}")
        data, num_classes = load_training_data(base)
        if not num_classes:
            raise UsageError(f"{base.dataset} has no class labels to learn (use class subfolders or an npz 'labels' array)")
        cfg = classifier_config(base, num_classes)
        cfg = replace(cfg, train=replace(cfg.train, **{f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None},
                                         **({"steps": args.steps} if args.steps else {})))
        cfg.validate()
    if not args.quiet and launched_rank() == 0:
        print(f"{'resuming' if resume else 'training'} a noise-aware classifier for {cfg.dataset}: "
              f"{cfg.train.steps} steps x batch {cfg.train.batch_size}, on {device}")
    if not resume and launched_rank() == 0:
        (out / ACCURACY).unlink(missing_ok=True)  # an earlier run's figures must not pass for this one's
    ema = train(out, cfg, data, device=device, resume=resume, progress=not args.quiet, max_minutes=args.max_minutes,
                preview=partial(_write_accuracy, cfg=cfg))
    if launched_rank() == 0:
        step = ckpt.weights_step(out)
        saved = json.loads((out / ACCURACY).read_text()) if (out / ACCURACY).exists() else {}
        acc = saved if saved.get("step") == step else _write_accuracy(ema, step, out, cfg)  # e.g. stopped by --max-minutes
        print(f"test accuracy at step {step} by noise level t/t_max: " + ", ".join(f"{k}: {v:.3f}" for k, v in acc["accuracy"].items()))
        print(f"classifier written to {out}/ (use it with `difflab sample RUN --classifier {out} --classifier-scale S`)")


def _write_accuracy(ema, step: int, run: Path, cfg: ckpt.RunConfig) -> dict:
    """Test accuracy by noise level (at most 2000 test images), saved with its step in accuracy.json."""
    test = load_split(cfg, "test")
    n = min(len(test), 2000)
    acc = accuracy_by_noise(NoiseAwareClassifier(ema), to_model(test.images[:n]), test.labels[:n])
    result = {"step": step, "test_images": n, "accuracy": {str(k): v for k, v in acc.items()}}
    with atomic_path(run / ACCURACY) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    return result


def register(sub) -> None:
    t = sub.add_parser("train-classifier", help="train a noise-aware classifier p(y | x_t, t) for classifier guidance")
    t.add_argument("name", nargs="?", help="dataset name (its preset's process); not needed with --for or --resume")
    t.add_argument("--out", required=True, help="classifier run directory")
    t.add_argument("--for", dest="for_run", metavar="RUN", help="the diffusion run it will guide (its dataset, shape and process)")
    add_auxiliary_training(t, "optimizer steps (default: a quarter of the dataset preset's)")
    t.set_defaults(func=run)
