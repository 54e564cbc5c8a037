"""Option groups and checks shared by the commands."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..evaluation.prompts import read_prompt_file
from ..guidance.config import GuidanceConfig, classes_for
from ..guidance.wrappers import SCHEDULES, check_interval
from ..io import atomic_path
from ..runs.config import RunConfig
from ..runs.diffusion import DiffusionRun
from ..runs.lifecycle import unfinished
from ..runs.presets import check_dataset, preset_for
from ..sampling.samplers import SAMPLERS, SPACINGS, default_spacing, sampler_options
from ..training.distributed import DEVICES


class UsageError(ValueError):
    """Bad input from the command line."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): `difflab sample: error: ... (see --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument types


def positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def unit_float(s: str) -> float:
    v = float(s)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {s}")
    return v


def positive_float(s: str) -> float:
    v = float(s)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


CAP_OFF = "none"


def sigma_cap(s: str) -> float | str:
    """A positive number, or 'none' (CAP_OFF) to turn the cap off."""
    if s.lower() == CAP_OFF:
        return CAP_OFF
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {s}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {s}")
    return v


def check_suffix(path: str | None, suffixes: tuple[str, ...], flag: str) -> None:
    if path is not None and Path(path).suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: expected a file ending in {' or '.join(suffixes)}")


def save_npz(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


def single_thread_for_points(kind: str) -> None:
    """2-D networks are tiny: a second thread costs more in synchronisation than it saves (measured: 20x
    slower when the cores are busy), so their work runs on one thread. Images use torch's default."""
    if kind == "points":
        torch.set_num_threads(1)


# --------------------------------------------------------------------------- groups


def add_device(p) -> None:
    p.add_argument("--device", default="auto", choices=DEVICES, help="auto (CUDA when present), cpu or cuda")


def add_auxiliary_training(p, steps_help: str) -> None:
    """The options of a run trained beside the denoisers (a classifier, an autoencoder) by the one loop."""
    p.add_argument("--resume", action="store_true")
    p.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    p.add_argument("--steps", type=positive_int, help=steps_help)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--seed", type=int)
    p.add_argument("--data", help="folder holding the dataset's files")
    p.add_argument("--max-minutes", type=positive_float)
    add_device(p)
    p.add_argument("--quiet", action="store_true")


def dataset_preset(
    args, missing: str = "give the DATASET to train on (or --resume to continue the run in --out)"
) -> RunConfig:
    """The preset of the auxiliary trainers' NAME (checked), with --data; ``missing`` when no NAME is given."""
    if args.name is None:
        raise UsageError(missing)
    check_dataset(args.name)
    base = preset_for(args.name)
    return replace(base, data=replace(base.data, data_dir=args.data)) if args.data else base


def given_flags(args, names) -> list[str]:
    """The flags among the auxiliary trainers' NAME, --batch-size, --lr, --seed and ``names`` that were given
    (what a resumed run refuses: they are saved in it)."""
    return [
        ("NAME" if f == "name" else f"--{f.replace('_', '-')}")
        for f in ("name", "batch_size", "lr", "seed", *names)
        if getattr(args, f) is not None
    ]


def training_options(cfg: RunConfig, args) -> RunConfig:
    """``cfg`` with the auxiliary trainers' --batch-size, --lr and --seed."""
    fields = {f: getattr(args, f) for f in ("batch_size", "lr", "seed") if getattr(args, f) is not None}
    return replace(cfg, train=replace(cfg.train, **fields))


def add_sampler(p) -> None:
    """The sampler group. A sampler and steps left out are the run's own (``run.default_sampling()``: dpmpp-2m in
    20 steps; a distilled student's own), filled in by ``sampler_choice`` with the run."""
    g = p.add_argument_group("sampler")
    g.add_argument(
        "--sampler",
        default=None,
        help=f"one of: {', '.join(SAMPLERS)} (default: the run's own, dpmpp-2m; a distilled student's own)",
    )
    g.add_argument(
        "--steps", type=positive_int, default=None, help="default: the run's own (20; a distilled student's own)"
    )
    g.add_argument("--spacing", choices=SPACINGS, default=None, help="default: the sampler's usual grid")
    g.add_argument("--eta", type=unit_float, default=None, help="ddim: eta in [0, 1] (default 0)")
    g.add_argument(
        "--variance",
        choices=["beta", "beta_tilde", "learned"],
        default=None,
        help="ddpm: the reverse variance (default: learned for a run trained with --variance learned, else beta)",
    )
    g.add_argument(
        "--n-steps-each", type=positive_int, default=None, help="langevin: Langevin steps per noise level (default 100)"
    )
    g.add_argument("--step-lr", type=positive_float, default=None, help="langevin: the step size at the smallest level")
    g.add_argument(
        "--snr", type=positive_float, default=None, help="pc: the corrector's signal-to-noise ratio (default 0.16)"
    )
    g.add_argument("--n-corrector", type=int, default=None, help="pc: corrector steps per level (default 1)")
    g.add_argument(
        "--sigma-cap",
        type=sigma_cap,
        default=None,
        metavar="CAP",
        help="karras/logsnr grids on VP processes: spread the levels below sigma/alpha = CAP (default 80; 'none': off)",
    )


SAMPLER_FLAGS = ("eta", "variance", "n_steps_each", "step_lr", "snr", "n_corrector")  # each a sampler's own keyword


def sampler_choice(args, run=None) -> tuple[str, str, dict]:
    """(sampler, spacing, options) from the sampler group, each option checked against what the sampler and
    the grid take: an option the chosen sampler or spacing does not use is an error, not dropped. With ``run``
    None it checks the flags alone (before loading anything). An unnamed sampler, steps and spacing are filled in
    ``args`` from the run (``run.check_sampling``: its ``default_sampling``; a student checks what it is asked for)."""
    if run is None and args.sampler is None:
        return None, args.spacing, {}
    if run is not None:
        args.sampler, args.steps, args.spacing = run.check_sampling(args.sampler, args.steps, args.spacing)
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    takes = sampler_options(args.sampler)
    options = {}
    for name in SAMPLER_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in takes:
            owners = " and ".join(k for k in SAMPLERS if name in sampler_options(k))
            raise UsageError(
                f"--{name.replace('_', '-')} is an option of the {owners} sampler; {args.sampler!r} does not take it"
            )
        options[name] = value
    process = None if run is None else run.process
    spacing = args.spacing or (default_spacing(args.sampler, process) if process is not None else None)
    if args.sigma_cap is not None and process is not None:
        if not process.variance_preserving:
            raise UsageError(
                "--sigma-cap applies to variance-preserving processes; a variance-exploding run's grid starts at its "
                "sigma_max"
            )
        if spacing not in ("karras", "logsnr"):
            raise UsageError(f"--sigma-cap applies to the karras and logsnr spacings; this run samples on {spacing!r}")
        options["sigma_tilde_cap"] = None if args.sigma_cap == CAP_OFF else args.sigma_cap
    return args.sampler, spacing, options


def compose_terms(s: str) -> tuple[tuple[int, float], ...]:
    """'3:+1,5:-0.5' -> ((3, 1.0), (5, -0.5))."""
    terms = []
    for part in s.split(","):
        k, sep, w = part.partition(":")
        try:
            terms.append((int(k), float(w)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected CLASS:WEIGHT pairs separated by commas (e.g. 3:+1,5:-0.5), got {s!r}"
            ) from None
        if not sep:
            raise argparse.ArgumentTypeError(
                f"expected CLASS:WEIGHT pairs separated by commas (e.g. 3:+1,5:-0.5), got {s!r}"
            )
    return tuple(terms)


def interval(s: str) -> tuple[float, float]:
    """'0.2,0.8' -> (0.2, 0.8), fractions of t_max with 0 <= lo < hi <= 1."""
    try:
        return check_interval(float(v) for v in s.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected LO,HI with 0 <= LO < HI <= 1 (fractions of t_max, e.g. 0.2,0.8), got {s!r}"
            if "lo < hi" not in str(e)
            else str(e)
        ) from None


def class_choice(s: str) -> int | str:
    if s == "all":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a class number or 'all', got {s!r}") from None


def add_conditions(p) -> None:
    g = p.add_argument_group("conditions and guidance (see docs/guidance.md)")
    g.add_argument(
        "--class",
        "--class-label",
        dest="class_label",
        type=class_choice,
        nargs="+",
        metavar="K",
        help="the class of each sample (one value for all, or several, cycled); 'all': one row per class, -n // "
        "classes each",
    )
    g.add_argument(
        "--prompt",
        action="append",
        metavar="TEXT",
        help="a text run's caption (repeatable: -n // prompts samples each)",
    )
    g.add_argument("--prompt-file", metavar="FILE", help="prompts, one per line (blank lines skipped)")
    add_lora(g)
    add_guidance(g)


def add_lora(g) -> None:
    g.add_argument(
        "--lora",
        action="append",
        metavar="RUN",
        help="add the LoRA adapter of a `difflab personalize --method lora` run "
        "(trained over this RUN; repeatable: their updates add up)",
    )
    g.add_argument(
        "--lora-scale",
        action="append",
        type=float,
        metavar="S",
        help="each adapter's strength (one for all, or one per --lora; default 1; 0 is the base model)",
    )


def add_guidance(g) -> None:
    g.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="S",
        help="classifier-free guidance scale: pred_null + S (pred_class - pred_null); 1 plain conditional, 0 "
        "unconditional (default: the run's own, 1, or the best scale a shipped model records, when a class or "
        "prompt is asked for)",
    )
    g.add_argument(
        "--guidance-schedule",
        choices=sorted(SCHEDULES),
        default="constant",
        help="how the scale varies with t (each has mean S)",
    )
    g.add_argument(
        "--negative-class",
        type=int,
        metavar="K",
        help="a class to steer away from: its prediction replaces the null one",
    )
    g.add_argument(
        "--compose",
        type=compose_terms,
        default=(),
        metavar="K:W,...",
        help="composed classes, e.g. '3:+1,5:-0.5': pred_base + sum W (pred_K - pred_base)",
    )
    g.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="a text run: a caption to steer away from (its prediction replaces the empty caption's)",
    )
    g.add_argument(
        "--compose-prompt",
        nargs=2,
        action="append",
        default=[],
        metavar=("WEIGHT", "TEXT"),
        help="a text run: add WEIGHT (pred_TEXT - pred_base) (repeatable; a negative weight steers away)",
    )
    g.add_argument(
        "--guidance-interval",
        type=interval,
        metavar="LO,HI",
        help="guide only for t/t_max in [LO, HI] (plain conditional prediction, one pass, elsewhere)",
    )
    g.add_argument(
        "--guidance-rescale",
        type=unit_float,
        default=0.0,
        metavar="PHI",
        help="Lin et al. (2024) rescale of the guided x_0's std",
    )
    g.add_argument("--classifier", metavar="RUN", help="classifier guidance with a `difflab train-classifier` run")
    g.add_argument(
        "--classifier-scale", type=float, default=None, metavar="S", help="classifier guidance scale (default 1)"
    )


def guidance_from(args, run: DiffusionRun | None = None):
    """The GuidanceConfig the flags ask for (None when they ask for nothing). Without --guidance the scale is 1,
    or with ``run``, when a class or prompt is asked for, the run's own (``run.default_sampling().guidance``)."""
    if args.classifier_scale is not None and args.classifier is None:
        raise UsageError("--classifier-scale needs --classifier RUN")
    compose_prompts = []
    for w, text in args.compose_prompt:
        try:
            compose_prompts.append((text, float(w)))
        except ValueError:
            raise UsageError(
                f'--compose-prompt takes WEIGHT TEXT, e.g. --compose-prompt 0.5 "a red bag on the left"; got {w!r}'
            ) from None
    scale = args.guidance
    if scale is None:
        asked = bool(
            getattr(args, "class_label", None) or getattr(args, "prompt", None) or getattr(args, "prompt_file", None)
        )
        scale = run.default_sampling().guidance if run is not None and asked else 1.0
    g = GuidanceConfig(
        scale=scale,
        schedule=args.guidance_schedule,
        negative=args.negative_class,
        compose=args.compose,
        negative_prompt=args.negative_prompt,
        compose_prompts=tuple(compose_prompts),
        interval=args.guidance_interval,
        rescale=args.guidance_rescale,
        classifier=args.classifier,
        classifier_scale=1.0 if args.classifier_scale is None else args.classifier_scale,
    )
    return g if g.active or g.schedule != "constant" or g.interval is not None else None


def prompts_from(args) -> list[str] | None:
    """The prompts of --prompt and --prompt-file (None when neither is given)."""
    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    return prompts or None


def lora_pairs(args) -> list[tuple[str, float]]:
    """(adapter run, strength) pairs of --lora and --lora-scale."""
    loras, scales = getattr(args, "lora", None) or [], getattr(args, "lora_scale", None) or []
    if scales and not loras:
        raise UsageError("--lora-scale sets the strength of a --lora adapter; give --lora RUN")
    if len(scales) not in (0, 1, len(loras)):
        raise UsageError(f"give one --lora-scale for all adapters or one per --lora ({len(loras)}), not {len(scales)}")
    scales = scales * len(loras) if len(scales) == 1 else scales or [1.0] * len(loras)
    return list(zip(loras, scales))


def load_run(args, path, ema: bool = True) -> DiffusionRun:
    """The diffusion run ``path`` with the adapters of --lora at the strengths of --lora-scale."""
    return DiffusionRun.load(path, ema=ema, lora=lora_pairs(args))


def asked_for(args, run: DiffusionRun, guidance: GuidanceConfig | None, n: int) -> tuple[dict, int, int | None]:
    """What the flags ask each sample for, as keyword arguments of the run's methods (prompt, class_label), the
    number of samples and the grid's row length: ``--prompt`` repeated n // prompts times each, ``--class all``
    n // classes samples of every class (a row each), ``--class K ...`` cycled over n."""
    prompts = prompts_from(args)
    if prompts is not None:
        if args.class_label:
            raise UsageError("give --prompt or --class, not both")
        if n < len(prompts):
            raise UsageError(
                f"-n {n} is fewer than the {len(prompts)} prompts (n // prompts samples are drawn for each)"
            )
        per = n // len(prompts)
        return {"prompt": [p for p in prompts for _ in range(per)]}, per * len(prompts), None
    requested = args.class_label
    if not requested:
        return {}, n, None
    if "all" in requested:
        if len(requested) > 1:
            raise UsageError("--class all stands alone (it means every class)")
        K = classes_for(run.config, guidance)
        if K is None:
            raise UsageError(f"--class all: {run.path} is not class-conditional (and no --classifier was given)")
        per = max(1, n // K)
        return {"class_label": [k for k in range(K) for _ in range(per)]}, per * K, per
    return {"class_label": [requested[i % len(requested)] for i in range(n)]}, n, None


def say_unfinished(out, cfg: RunConfig, command: str, why: str = "") -> bool:
    """Whether the run ``out`` stopped before its last step (--max-minutes); if so, print how to finish it."""
    step = unfinished(out, cfg)
    if step is not None:
        print(f"stopped at step {step} of {cfg.train.steps}; finish with `difflab {command} --out {out} --resume`{why}")
    return step is not None
