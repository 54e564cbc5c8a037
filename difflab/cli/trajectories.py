"""`difflab trajectories RUN --out PNG`: forward noising and reverse denoising at chosen moments."""

from __future__ import annotations

from ..sampling.samplers import SAMPLERS
from ..viz.chain import image_chain, toy_trajectories
from .options import (
    UsageError,
    add_conditions,
    asked_for,
    check_suffix,
    guidance_from,
    load_run,
    positive_int,
    single_thread_for_points,
)


def run(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.gif, (".gif",), "--gif")
    check_suffix(args.forward, (".png",), "--forward")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    model = load_run(args, args.run)
    cfg = model.config
    if not model.default_sampling().fixed:  # this command's own: a DDPM chain of 100 steps shows the noise going
        args.sampler, args.steps = args.sampler or "ddpm", args.steps or 100
    args.sampler, args.steps, _ = model.check_sampling(args.sampler, args.steps)  # a student: its own, checked
    guidance = guidance_from(args, model)
    asked, n, _ = asked_for(args, model, guidance, args.n or (2000 if cfg.data_kind == "points" else 8))
    single_thread_for_points(cfg.data_kind)
    if cfg.data_kind == "points":
        if args.gif or args.forward:
            raise UsageError("--gif and --forward are for image runs; a 2-D run's picture shows both directions")
        toy_trajectories(model, args.out, n=n, steps=args.steps, seed=args.seed, sampler=args.sampler)
    else:
        image_chain(
            model,
            args.out,
            gif=args.gif,
            forward=args.forward,
            n=n,
            steps=args.steps,
            seed=args.seed,
            sampler=args.sampler,
            guidance=guidance,
            **asked,
        )
    for path in (args.out, args.gif, args.forward):
        if path:
            print(f"wrote {path}")


def register(sub) -> None:
    r = sub.add_parser("trajectories", help="forward noising and reverse denoising at chosen steps")
    r.add_argument("run")
    r.add_argument("--out", required=True)
    r.add_argument("--gif", help="images: also a GIF of the chain")
    r.add_argument("--forward", help="images: also a forward-noising strip of real test images (.png)")
    r.add_argument("--steps", type=positive_int, default=None, help="default 100 (a distilled student: its own)")
    r.add_argument("-n", "--n", type=positive_int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sampler", default=None, help="default ddpm (a distilled student: its own)")
    add_conditions(r)
    r.set_defaults(func=run)
