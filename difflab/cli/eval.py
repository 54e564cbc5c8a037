"""`difflab eval RUN`: sample quality (FD, KID, precision/recall, classes) and bits/dim; see evaluate.py."""

from __future__ import annotations

import argparse

import torch

from ..evaluation.evaluate import Sampling, evaluate
from ..evaluation.report import format_report, write_json
from ..runs.config import load_config
from ..training.distributed import resolve_device
from .options import (
    UsageError,
    add_device,
    add_guidance,
    add_lora,
    add_sampler,
    check_suffix,
    guidance_from,
    load_run,
    lora_pairs,
    positive_int,
    sampler_choice,
    single_thread_for_points,
)


def run(args) -> None:
    check_suffix(args.json, (".json",), "--json")
    sampler_choice(args)  # fail before loading anything
    if args.bpd_n < 0:
        raise UsageError(f"--bpd-n must be 0 (skip) or a positive integer, got {args.bpd_n}")
    cfg = load_config(args.run)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        single_thread_for_points(cfg.data_kind)
    run = load_run(args, args.run, ema=args.ema)  # it says what it samples with by default (a student: its own)
    sampler, spacing, options = sampler_choice(args, run)
    sampling = Sampling(sampler, args.steps, spacing, options, args.batch, resolve_device(args.device))
    result = evaluate(
        run,
        n=args.n,
        seed=args.seed,
        sampling=sampling,
        guidance=guidance_from(args),
        ema=args.ema,
        lora=lora_pairs(args),
        bpd_n=args.bpd_n,
        features=args.features,
        split=args.split,
        prompts=args.prompts,
        caption_swap=args.caption_swap,
        clip=args.clip,
        progress=not args.quiet,
    )
    print(format_report(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


def register(sub) -> None:
    e = sub.add_parser("eval", help="sample quality (FD, KID, precision/recall, classes) and bits/dim of a run")
    e.add_argument("run", help="run directory")
    add_sampler(e)
    add_lora(e)
    add_guidance(
        e.add_argument_group(
            "guidance: a class-conditional run samples class i mod K for sample i (see docs/guidance.md)"
        )
    )
    t = e.add_argument_group("text-to-image runs (see docs/text.md)")
    t.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts, one per line, cycled to -n; default test-captions (the test split's captions); new-phrasings: "
        "the same images' attributes in phrasings never used in training",
    )
    t.add_argument(
        "--caption-swap",
        action="store_true",
        help="also sample every prompt with left and right exchanged and score those",
    )
    t.add_argument(
        "--clip", metavar="RUN", help="a `difflab train-clip` run: the CLIP-score of samples and of real test images"
    )
    e.add_argument("-n", "--n", type=positive_int, default=1000, help="number of samples (default 1000; at least 10)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=positive_int, default=250, help="samples per sampler call")
    e.add_argument(
        "--bpd-n",
        type=int,
        default=32,
        help="test images for bits/dim (default 32; 0 skips; ~0.6 s each for 8x8 digits, ~7 s for 28x28)",
    )
    e.add_argument(
        "--features",
        help="feature net: digits, fashion-mnist, random, or a classifier .safetensors (default: the dataset's, else "
        "random)",
    )
    e.add_argument("--split", choices=["test", "train"], default="test", help="reference split (default test)")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default)")
    e.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's; 1 for 2-D runs)")
    add_device(e)
    e.add_argument("--json", help="write the numbers to this .json")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=run)
