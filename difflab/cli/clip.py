"""`difflab train-clip DATASET --out RUN`: a CLIP-style image and text encoder pair trained contrastively.

    difflab train-clip fashion-pairs --out runs/clip
    difflab train-clip --out runs/clip --resume

Training goes through the one training loop (checkpoints, resume, torchrun, progress); the loss is CLIP's
symmetric cross-entropy over each process's batch with a learned temperature (text/clip.py), and, where the
captions name sides, each caption with 'left' and 'right' exchanged as a hard negative for its image (--hard-negatives;
sides+colours: also with its two items' colours exchanged). --init-from RUN starts from another CLIP run's weights
(the same towers). At the end
it measures on the test split (RUN/clip.json): zero-shot retrieval in groups of 100 (caption -> image and
image -> caption; chance 1 %) and, where the data has attributes (fashion-pairs), a zero-shot attribute
probe. Its text tower then conditions a model: `difflab train DATASET --text clip:RUN`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..core.losses import HARD_NEGATIVES
from ..data.pairs import CAPTION_PHRASINGS, CAPTION_WORDS
from ..nets.clip import POOLS
from ..nets.pretrained_text import BASES, tuned_layers
from ..runs.config import load_config
from ..runs.data import load_split
from ..runs.lifecycle import begin
from ..text.clip import CLIP, CLIP_REPORT, GROUP, check_init_from, clip_config, clip_data, clip_report
from ..training.distributed import launched_rank, resolve_device
from ..training.loop import train
from .options import (
    UsageError,
    add_auxiliary_training,
    dataset_preset,
    given_flags,
    positive_int,
    say_unfinished,
    training_options,
)


def new_config(args):
    if args.init is None and (args.tune or args.rank):
        raise UsageError("--tune and --rank tune a pretrained text tower: give --init minilm")
    if args.rank and (args.tune or "lora") != "lora":
        raise UsageError(f"--rank is LoRA's rank; --tune {args.tune} has none")
    base = dataset_preset(args)
    train_split = load_split(base, "train")
    captions = train_split.every_caption()
    cfg = training_options(
        clip_config(
            base,
            captions,
            embed_dim=args.embed_dim or 64,
            pool=args.pool or "attention",
            hard_negatives=args.hard_negatives,
            init=args.init,
            tune=args.tune or "lora",
            rank=args.rank or 8,
            caption_variants=args.caption_variants or 0,
            attributes=train_split.attributes,
            caption_words=args.caption_words or "dataset",
            caption_phrasings=args.caption_phrasings or "sides",
        ),
        args,
    )
    cfg.validate()
    return cfg


def run_train(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    if args.init_from and args.resume:
        raise UsageError("--init-from starts a run; a resumed run keeps its weights")

    def fresh():
        cfg = new_config(args)
        if args.init_from:  # before anything is written
            check_init_from(cfg, load_config(args.init_from), args.init_from)
        return cfg

    cfg, resume = begin(
        out,
        CLIP,
        resume=args.resume,
        force=args.force,
        fresh=fresh,
        fixed=given_flags(
            args,
            (
                "embed_dim",
                "pool",
                "hard_negatives",
                "init",
                "tune",
                "rank",
                "caption_variants",
                "caption_words",
                "caption_phrasings",
            ),
        ),
        steps=args.steps,
    )
    data = load_split(cfg, "train")
    if data.captions is None:
        raise UsageError(f"{cfg.dataset} has no captions to train a CLIP model on")
    net = cfg.build_net()
    if not args.quiet and launched_rank() == 0:
        pretrained = net.config.pretrained_config
        trained = sum(p.numel() for n, p in net.named_parameters() if net.trains(n))
        total = sum(p.numel() for p in net.parameters())
        text = (
            f"{len(net.config.text_config.vocabulary)} words"
            if pretrained is None
            else f"text tower {pretrained.base} (any wording, up to {net.text.limit} tokens) tuned as {pretrained.tune}"
        )
        print(
            f"{'resuming' if resume else 'training'} a CLIP model on {cfg.dataset}: "
            f"{f'{trained:,} of {total:,} parameters trained' if trained < total else f'{total:,} parameters'}, "
            f"{text}, {cfg.train.steps} steps x batch {cfg.train.batch_size}, on {device}"
        )
    if not resume and launched_rank() == 0:
        (out / CLIP_REPORT).unlink(missing_ok=True)
    train(
        out,
        cfg,
        clip_data(cfg, data),
        device=device,
        resume=resume,
        progress=not args.quiet,
        max_minutes=args.max_minutes,
        command="train-clip",
        init_from=args.init_from,
    )
    if launched_rank() != 0:
        return
    if say_unfinished(out, cfg, "train-clip"):
        return
    report = clip_report(out, load_split(cfg, "test"), n=args.report_n)
    print(
        f"zero-shot retrieval on {report['images']} test images in groups of {report['group']} (chance "
        f"{1 / report['group']:.0%}): "
        f"caption -> image {report['caption_to_image']:.1%}, image -> caption {report['image_to_caption']:.1%}"
    )
    if report.get("swap_discrimination") is not None:
        print(
            f"side-swap discrimination: {report['swap_discrimination']:.1%} of test images closer to their caption "
            "than to "
            "its sides-swapped twin (a coin flip is 50 %)"
        )
    if report.get("attribute_probe"):
        print("zero-shot attribute probe: " + ", ".join(f"{k} {v:.1%}" for k, v in report["attribute_probe"].items()))
    print(
        f"CLIP model written to {out}/ (condition a model on its text tower with `difflab train {cfg.dataset} --text "
        f"clip:{out}`)"
    )


def tune_mode(text: str) -> str:
    try:
        tuned_layers(text, 6)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def report_size(text: str) -> int:
    n = positive_int(text)
    if n < GROUP:
        raise argparse.ArgumentTypeError(f"{n} test images are fewer than one retrieval group of {GROUP}")
    return n


def register(sub) -> None:
    t = sub.add_parser(
        "train-clip", help="train a CLIP-style image/text encoder pair contrastively (its text tower conditions models)"
    )
    t.add_argument(
        "name",
        nargs="?",
        help="a captioned dataset (fashion-pairs, or a folder with a metadata.jsonl); not needed with --resume",
    )
    t.add_argument("--out", required=True, help="CLIP run directory")
    t.add_argument("--embed-dim", type=positive_int, help="joint embedding width (default 64)")
    t.add_argument(
        "--pool",
        choices=POOLS,
        help="the image tower's pooling: attention (CLIP's attention pool with learned "
        "positions: it knows where a feature was; the default) or mean (global average)",
    )
    t.add_argument(
        "--hard-negatives",
        choices=HARD_NEGATIVES,
        help="sides: each caption with 'left'/'right' exchanged is a "
        "negative for its image, so the towers must tell the sides apart; sides+colours: also each caption with its "
        "two items' colours exchanged, so they must bind a colour to its item (fashion-pairs' captions) (default: "
        "sides when a training caption names a side, else none)",
    )
    t.add_argument(
        "--init",
        choices=BASES,
        help="start the text tower from a pretrained language model: minilm (all-MiniLM-L6-v2, installed with "
        "the text extra; reads any wording up to 256 tokens); default: a small transformer on the captions' words",
    )
    t.add_argument(
        "--tune",
        type=tune_mode,
        help="how much of the pretrained text tower trains: head (frozen, a trainable layer on top), lora "
        "(adapters on its attention; the default), last-K (its last K layers), full",
    )
    t.add_argument("--rank", type=positive_int, help="LoRA's rank with --tune lora (default 8)")
    t.add_argument(
        "--caption-variants",
        type=int,
        choices=range(0, 9),
        metavar="K",
        help="fashion-pairs: each training image is also seen with K captions (0-8) of its attributes in other "
        "phrasings (data.pairs.AUGMENT_PHRASINGS; never those of eval's new-phrasings and reworded); default 0",
    )
    t.add_argument(
        "--caption-words",
        choices=CAPTION_WORDS,
        help="the caption variants' colour and item words: dataset (the default), synonyms (each also said in "
        "other words, data.pairs.SYNONYMS) or typos (each misspelt by one letter 3 times in 4, data.pairs.typo); "
        "never the unseen words the figures use",
    )
    t.add_argument(
        "--caption-phrasings",
        choices=CAPTION_PHRASINGS,
        help="the phrasings the caption variants take turns in: sides (data.pairs.AUGMENT_PHRASINGS; the default) or "
        "sides+labels (also data.pairs.LABEL_PHRASINGS, the sides as labels, 'left = {L}, right = {R}', either side "
        "first; never eval's colon form)",
    )
    t.add_argument(
        "--init-from",
        help="a CLIP run (or shipped model) whose EMA weights initialise the network: the same towers (--init, "
        "--tune, --rank, --embed-dim, --pool; a word tower's vocabulary, fitted to the same captions), checked "
        "before anything is written; the caption variants, phrasings and hard negatives may differ",
    )
    add_auxiliary_training(t, "optimizer steps (default 2000)")
    t.add_argument(
        "--report-n",
        type=report_size,
        default=2000,
        help=f"test images the closing report (RUN/clip.json) reads, in groups of {GROUP} (default 2000; fewer "
        "is faster and noisier)",
    )
    t.set_defaults(func=run_train)
