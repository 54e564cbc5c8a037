"""`difflab sample RUN`: draw samples from a trained run (one process, or sharded under torchrun)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..data.images import to_uint8
from ..data.toy2d import TOY_DATASETS, make_toy
from ..runs.diffusion import load_upscaler
from ..training.distributed import resolve_device, setup
from ..viz import plots
from ..viz.chain import chain_gif
from .options import (
    UsageError,
    add_conditions,
    add_device,
    add_sampler,
    asked_for,
    check_suffix,
    guidance_from,
    load_run,
    positive_int,
    prompts_from,
    sampler_choice,
    save_npz,
    single_thread_for_points,
)


def run(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.save, (".npz",), "--save")
    check_suffix(args.gif, (".gif",), "--gif")
    sampler_choice(args)  # unknown sampler: fail before loading anything
    model = load_run(args, args.run, ema=args.ema)
    cfg = model.config
    cascade = None
    if args.then:  # a cascade: check the super-resolution run before drawing anything
        cascade = load_upscaler(args.then)
        C, H, W = cascade.config.shape
        k = cascade.config.super_resolution.factor
        low_shape = [C, H // k, W // k]
        if cfg.data_shape != low_shape:
            raise UsageError(
                f"--then {args.then} upscales {'x'.join(map(str, low_shape))} images; {args.run} makes "
                f"{'x'.join(map(str, cfg.data_shape))}"
            )
    guidance = guidance_from(args, model)
    asked, n, nrow = asked_for(args, model, guidance, args.n)
    if args.gif and cfg.data_kind != "images":
        raise UsageError(
            f"--gif draws the chain of an image run; {args.run} makes {cfg.data_kind} (use `difflab trajectories`)"
        )
    sampler, spacing, options = sampler_choice(args, model)
    single_thread_for_points(cfg.data_kind)
    device = resolve_device(args.device)
    world = setup(device)
    common = dict(guidance=guidance, sampler=sampler, steps=args.steps, spacing=spacing, options=options)
    traj = None
    if args.gif:  # the first batch with its chain, then the rest: per-sample seeds make this the same samples
        first = min(n, args.batch, 16)
        model.to(device)
        x, traj = model.trajectory(first, seed=args.seed, **common, **{k: v[:first] for k, v in asked.items()})
        if n > first:
            rest = model.sample(
                n - first,
                seed=args.seed + first,
                world=world,
                progress=not args.quiet,
                batch=args.batch,
                device=device,
                **common,
                **{k: v[first:] for k, v in asked.items()},
            )
            x = torch.cat([x, rest]) if rest is not None else None
    else:
        x = model.sample(
            n, seed=args.seed, world=world, progress=not args.quiet, batch=args.batch, device=device, **common, **asked
        )
    if not world.is_main:
        return
    if cascade:  # the samples are the low-resolution inputs of the super-resolution run
        x = cascade.upscale(
            x.clamp(-1, 1), steps=args.steps, seed=args.seed, batch=args.batch, progress=not args.quiet, device=device
        )
        cfg = cascade.config
    if cfg.data_kind == "points":
        if args.save:
            save_npz(args.save, points=x.numpy())
        if args.out:
            ref = make_toy(cfg.dataset, len(x), seed=12345) if cfg.dataset in TOY_DATASETS else None
            plots.scatter(x, args.out, title=f"{sampler}, {args.steps} steps", reference=ref)
    else:
        imgs = to_uint8(x)
        captions = asked.get("prompt")
        if args.save:
            extra = {"labels": np.array(asked["class_label"])} if "class_label" in asked else {}
            if captions:
                extra["captions"] = np.array(captions)
            save_npz(args.save, images=imgs.numpy(), **extra)
        if args.out and captions:
            plots.captioned_grid(imgs, captions, args.out, ncol=min(8, max(4, n // len(prompts_from(args)))))
        elif args.out:
            plots.save_grid(imgs, args.out, nrow=nrow)
        if traj is not None:
            chain_gif(traj, args.gif)
    for path in (args.out, args.save, args.gif):
        if path:
            print(f"wrote {path}")


def register(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory")
    add_sampler(s)
    add_conditions(s)
    s.add_argument("-n", "--n", type=positive_int, default=64)
    s.add_argument(
        "--batch", type=positive_int, default=1000, help="samples per sampler call (does not change the samples)"
    )
    s.add_argument("--seed", type=int, default=0, help="sample i has seed SEED + i")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default)")
    add_device(s)
    s.add_argument("--out", help="picture (.png)")
    s.add_argument("--save", help="raw samples (.npz; uint8 images)")
    s.add_argument("--gif", help="images: a GIF of the reverse chain of the first 16 samples (.gif)")
    s.add_argument(
        "--then", metavar="SR_RUN", help="a cascade: upscale the samples with a super-resolution run (--cond low-res)"
    )
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=run)
