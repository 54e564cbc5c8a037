"""`difflab trajectories RUN --out PNG`: forward noising and reverse denoising at chosen moments."""

from __future__ import annotations

from ..sampling.samplers import SAMPLERS
from .options import load_model, UsageError, add_conditions, check_suffix, conditions_from, guidance_from, positive_int, single_thread_for_points


def run(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.gif, (".gif",), "--gif")
    check_suffix(args.forward, (".png",), "--forward")
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    denoiser, cfg = load_model(args, args.run)
    from ..viz.chain import image_chain, toy_trajectories
    from ..guidance.config import guided

    guidance = guidance_from(args)
    denoiser = guided(denoiser, cfg, guidance, args.run)
    cond, n, _ = conditions_from(args, cfg, guidance, args.n or (2000 if cfg.kind == "points" else 8), args.run)

    single_thread_for_points(cfg.kind)
    if cfg.kind == "points":
        if args.gif or args.forward:
            raise UsageError("--gif and --forward are for image runs; a 2-D run's picture shows both directions")
        toy_trajectories(denoiser, cfg, args.out, n=args.n or 2000, steps=args.steps, seed=args.seed, sampler=args.sampler)
    else:
        image_chain(denoiser, cfg, args.out, gif=args.gif, forward=args.forward, n=n, steps=args.steps, seed=args.seed, sampler=args.sampler,
                    cond=cond or None)
    for path in (args.out, args.gif, args.forward):
        if path:
            print(f"wrote {path}")


def register(sub) -> None:
    r = sub.add_parser("trajectories", help="forward noising and reverse denoising at chosen steps")
    r.add_argument("run")
    r.add_argument("--out", required=True)
    r.add_argument("--gif", help="images: also a GIF of the chain")
    r.add_argument("--forward", help="images: also a forward-noising strip of real test images (.png)")
    r.add_argument("--steps", type=positive_int, default=100)
    r.add_argument("-n", "--n", type=positive_int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sampler", default="ddpm")
    add_conditions(r)
    r.set_defaults(func=run)
