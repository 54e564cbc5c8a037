"""`difflab distill TEACHER --method progressive|consistency --out RUN`: a few-step student of a trained run
(difflab/distill/; docs/distill.md).

    difflab distill runs/fashion --method progressive --steps-to 4 --out runs/fashion-4
    difflab distill runs/fashion --method consistency --guidance-range 1,5 --out runs/fashion-cd
    difflab distill --out runs/fashion-4 --resume
    difflab sample runs/fashion-4                      # its own sampler and steps"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..distill.student import DISTILLED, METHODS, distill, unfinished_stage
from ..runs.config import load_config
from ..runs.lifecycle import begin
from ..training.distributed import launched_rank, resolve_device
from .options import UsageError, add_device, positive_float, positive_int

SETTINGS = ("teacher", "method", "teacher_steps", "steps_to", "guidance_range", "steps", "lr", "batch_size", "solver")


def guidance_range(s: str) -> tuple[float, float]:
    """'1,5' -> (1.0, 5.0), 0 <= LO <= HI."""
    try:
        lo, hi = (float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 1,5), got {s!r}") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {s!r}")
    return lo, hi


def run(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    fixed = [
        ("TEACHER" if k == "teacher" else f"--{k.replace('_', '-')}") for k in SETTINGS if getattr(args, k) is not None
    ]
    _, resume = begin(out, DISTILLED, resume=args.resume, force=args.force, fresh=lambda: None, fixed=fixed)
    if not resume and (args.teacher is None or args.method is None):
        raise UsageError("give TEACHER and --method (or --resume to continue the student in --out)")
    distill(
        args.teacher,
        out,
        args.method,
        teacher_steps=args.teacher_steps,
        steps_to=args.steps_to,
        guidance_range=args.guidance_range,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        solver=args.solver or "heun",
        resume=resume,
        device=device,
        progress=not args.quiet,
        max_minutes=args.max_minutes,
    )
    if launched_rank() != 0:
        return
    stage = unfinished_stage(out)
    d = load_config(out).distill
    if stage is not None:
        print(f"stopped in stage {stage} of {len(d.stages)}; finish with `difflab distill --out {out} --resume`")
        return
    how = "DDIM" if d.method == "progressive" else "consistency sampling"
    guided = (
        f" --guidance W (W in {d.guidance_range[0]:g}..{d.guidance_range[1]:g}, one pass per step)" if d.guided else ""
    )
    print(
        f"student written to {out}/ ({d.method}, {how} in {d.steps_to} step{'s' * (d.steps_to > 1)}; samples.png); "
        f"sample it with `difflab sample {out}{guided}`"
    )


def register(sub) -> None:
    p = sub.add_parser(
        "distill", help="distil a trained run into a student that samples in 1-8 steps (progressive, consistency)"
    )
    p.add_argument("teacher", nargs="?", help="the trained diffusion run to distil (not needed with --resume)")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--out", required=True, help="the student's run directory")
    p.add_argument(
        "--steps-to",
        type=positive_int,
        help="progressive: the student's DDIM steps, a power of two (default 4); "
        "consistency: its default sampling steps (default 1)",
    )
    p.add_argument(
        "--teacher-steps",
        type=positive_int,
        help="progressive: the teacher's DDIM steps the first stage halves (default 64); "
        "consistency: the levels of the teacher's ODE grid (default 18)",
    )
    p.add_argument(
        "--guidance-range",
        type=guidance_range,
        metavar="LO,HI",
        help="a guided student (class and text runs): the guidance scale becomes an input, trained for w in [LO, HI]",
    )
    p.add_argument("--solver", choices=("heun", "ddim"), help="consistency: the teacher's ODE step (default heun)")
    g = p.add_argument_group("training")
    g.add_argument(
        "--steps",
        type=positive_int,
        help="optimizer steps per stage (progressive, default 400) or in all (consistency, default 2000)",
    )
    g.add_argument("--lr", type=positive_float, help="learning rate (default: the teacher's / 5)")
    g.add_argument("--batch-size", type=positive_int, help="default: the teacher's")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    g.add_argument("--max-minutes", type=positive_float)
    add_device(g)
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
