"""`difflab train-clip DATASET --out RUN`: a CLIP-style image and text encoder pair trained contrastively.

    difflab train-clip fashion-pairs --out runs/clip
    difflab train-clip --out runs/clip --resume

Training goes through the one training loop (checkpoints, resume, torchrun, progress); the loss is CLIP's
symmetric cross-entropy over each process's batch with a learned temperature (difflab/text.py). At the end
it measures on the test split (RUN/clip.json): zero-shot retrieval in groups of 100 (caption -> image and
image -> caption; chance 1 %) and, where the data has attributes (fashion-pairs), a zero-shot attribute
probe. Its text tower then conditions a model: `difflab train DATASET --text clip:RUN`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .. import checkpoint as ckpt
from ..data.images import load_images, to_model
from ..data.loader import TensorDataset
from ..distributed import launched_rank, resolve_device, restarted
from ..io import atomic_path
from ..presets import preset_for
from ..text import attribute_probe, clip_config, load_clip, retrieval_accuracy
from ..training import train
from .data import check_dataset
from .options import UsageError, add_auxiliary_training, positive_int

FIELDS = ("batch_size", "lr", "seed")
REPORT = "clip.json"


def _load(cfg: ckpt.RunConfig, split: str):
    return load_images(cfg.dataset, split=split, size=cfg.data.get("size"), channels=cfg.data.get("channels"), data_dir=cfg.data.get("data_dir"))


def run_train(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    resume = args.resume or (restarted() and ckpt.has_checkpoint(out))
    if resume:
        cfg = ckpt.load_config(out)
        if cfg.net_kind != "clip":
            raise UsageError(f"{out} holds a {cfg.net_kind} run, not a CLIP model")
        given = [f"--{f.replace('_', '-')}" for f in ("name", *FIELDS, "embed_dim") if getattr(args, f) is not None]
        if given:
            raise UsageError(f"--resume continues {out} as it was saved; drop {', '.join(given)}")
        if args.steps:
            cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
        data = _load(cfg, "train")
    else:
        if args.name is None:
            raise UsageError("give the DATASET to train on (or --resume to continue the run in --out)")
        if (out / ckpt.CONFIG).exists() and not args.force and not restarted():
            raise UsageError(f"{out} already holds a run: pass --resume to continue it or --force to start over")
        check_dataset(args.name)
        base = preset_for(args.name)
        if args.data:
            base = replace(base, data=dict(base.data, data_dir=args.data))
        data = _load(base, "train")
        try:
            cfg = clip_config(base, data.captions, embed_dim=args.embed_dim or 64)
        except ValueError as e:
            raise UsageError(str(e)) from None
        cfg = replace(cfg, train=replace(cfg.train, **{f: getattr(args, f) for f in FIELDS if getattr(args, f) is not None},
                                         **({"steps": args.steps} if args.steps else {})))
        cfg.validate()
    if data.captions is None:
        raise UsageError(f"{cfg.dataset} has no captions to train a CLIP model on")
    text = cfg.build_net().config.text_config
    tokens, mask = text.tokenize(data.captions)
    if not args.quiet and launched_rank() == 0:
        n = sum(p.numel() for p in cfg.build_net().parameters())
        print(f"{'resuming' if resume else 'training'} a CLIP model on {cfg.dataset}: {n:,} parameters, {len(text.vocabulary)} words, "
              f"{cfg.train.steps} steps x batch {cfg.train.batch_size}, on {device}")
    if not resume and launched_rank() == 0:
        (out / REPORT).unlink(missing_ok=True)
    train(out, cfg, TensorDataset(data.images, {"tokens": tokens, "token_mask": mask}), device=device, resume=resume,
          progress=not args.quiet, max_minutes=args.max_minutes)
    if launched_rank() != 0:
        return
    step = ckpt.weights_step(out)
    if step < cfg.train.steps:
        print(f"stopped at step {step} of {cfg.train.steps}; finish with `difflab train-clip --out {out} --resume`")
        return
    report = clip_report(out, _load(cfg, "test"))
    print(f"zero-shot retrieval on {report['images']} test images in groups of {report['group']} (chance {1 / report['group']:.0%}): "
          f"caption -> image {report['caption_to_image']:.1%}, image -> caption {report['image_to_caption']:.1%}")
    if report.get("attribute_probe"):
        print("zero-shot attribute probe: " + ", ".join(f"{k} {v:.1%}" for k, v in report["attribute_probe"].items()))
    print(f"CLIP model written to {out}/ (condition a model on its text tower with `difflab train {cfg.dataset} --text clip:{out}`)")


def clip_report(run: Path, test, n: int = 2000, group: int = 100) -> dict:
    """Retrieval accuracies (and, with attributes, the attribute probe) of the run's EMA model on the first
    ``n`` test images; written to RUN/clip.json."""
    from ..data.pairs import ATTRIBUTES, COLOURS, NOUNS, caption

    clip, fingerprint = load_clip(run)
    x = to_model(test.images[:n])
    i2c, c2i = retrieval_accuracy(clip, x, test.captions[:n], group)
    report = {"step": ckpt.weights_step(run), "fingerprint": fingerprint, "images": len(x), "group": group,
              "image_to_caption": i2c, "caption_to_image": c2i, "logit_scale": float(clip.logit_scale.exp())}
    if test.attributes is not None:
        k = min(1000, len(x))
        sizes = [len(NOUNS), len(COLOURS), len(NOUNS), len(COLOURS)]
        report["attribute_probe"] = attribute_probe(clip, x[:k], test.attributes[:k], caption, ATTRIBUTES, sizes)
    with atomic_path(run / REPORT) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return report


def register(sub) -> None:
    t = sub.add_parser("train-clip", help="train a CLIP-style image/text encoder pair contrastively (its text tower conditions models)")
    t.add_argument("name", nargs="?", help="a captioned dataset (fashion-pairs, or a folder with a metadata.jsonl); not needed with --resume")
    t.add_argument("--out", required=True, help="CLIP run directory")
    t.add_argument("--embed-dim", type=positive_int, help="joint embedding width (default 64)")
    add_auxiliary_training(t, "optimizer steps (default 2000)")
    t.set_defaults(func=run_train)
