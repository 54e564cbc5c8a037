"""`difflab eval RUN`: sample quality (FD, KID, precision/recall, classes) and bits/dim; see evaluate.py."""

from __future__ import annotations

import argparse

import torch

from ..core.ode_likelihood import DEFAULT_TOL, DIVERGENCES
from ..evaluation.evaluate import BPD_METHODS, Likelihood, Sampling, evaluate
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
    likelihood = Likelihood(
        method=args.bpd, steps=tuple(args.bpd_steps or ()), divergence=args.divergence, probes=args.probes,
        rtol=args.rtol, atol=args.rtol,
    )  # fmt: skip
    result = evaluate(
        run,
        n=args.n,
        seed=args.seed,
        sampling=sampling,
        guidance=guidance_from(args),
        ema=args.ema,
        lora=lora_pairs(args),
        bpd_n=args.bpd_n,
        likelihood=likelihood,
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


def _bound_steps(text: str) -> list[int]:
    try:
        steps = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected step counts like 50,100, got {text!r}") from None
    if any(k < 2 for k in steps):
        raise argparse.ArgumentTypeError(f"step counts must be >= 2, got {text!r}")
    return steps


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"a tolerance lies in (0, 1), got {text!r}")
    return value


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
        "the same images' attributes in phrasings never used in training; reworded: a second such set",
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
    lik = e.add_argument_group("likelihood (see docs/likelihood.md)")
    lik.add_argument(
        "--bpd",
        choices=BPD_METHODS,
        default="vlb",
        help="vlb: the variational bound (default); ode: the probability-flow ODE's log-likelihood; both",
    )
    lik.add_argument(
        "--bpd-steps",
        type=_bound_steps,
        metavar="K[,K...]",
        help="also the bound of a DDPM run on K evenly spaced steps (e.g. 50,100: iDDPM's few-step bound)",
    )
    lik.add_argument(
        "--divergence",
        choices=DIVERGENCES,
        default="hutchinson",
        help="the ODE's divergence: Hutchinson's estimator (default) or exact (D backward passes; small images)",
    )
    lik.add_argument(
        "--probes", type=positive_int, default=1, help="Rademacher probes per image for Hutchinson (default 1)"
    )
    lik.add_argument(
        "--rtol",
        type=_tolerance,
        default=DEFAULT_TOL,
        help=f"the ODE solver's relative and absolute tolerance (default {DEFAULT_TOL:g}, Song et al.'s)",
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
