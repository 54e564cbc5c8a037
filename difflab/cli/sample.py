"""`difflab sample RUN`: draw samples from a trained run (one process, or sharded under torchrun)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ..latent.space import data_shape
from ..viz import plots
from ..data.toy2d import TOY_DATASETS, make_toy
from ..training.distributed import resolve_device, setup
from ..sampling.generate import generate
from ..guidance.config import guided
from .options import load_model, UsageError, add_conditions, add_device, add_sampler, check_suffix, conditions_from, guidance_from, positive_int, prompts_from, sampler_choice, save_npz, single_thread_for_points


def run(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.save, (".npz",), "--save")
    check_suffix(args.gif, (".gif",), "--gif")
    sampler_choice(args, None)  # unknown sampler: fail before loading anything
    denoiser, cfg = load_model(args, args.run, ema=args.ema)
    cascade = None
    if args.then:  # a cascade: check the super-resolution run before drawing anything
        from .restore import load_upscaler

        cascade = load_upscaler(args.then)
        sr_shape, k = cascade[1].shape, cascade[2]
        low_shape = [sr_shape[0], sr_shape[1] // k, sr_shape[2] // k]
        if data_shape(cfg) != low_shape:
            raise UsageError(f"--then {args.then} upscales {'x'.join(map(str, low_shape))} images; {args.run} makes {'x'.join(map(str, data_shape(cfg)))}")
    guidance = guidance_from(args)
    denoiser = guided(denoiser, cfg, guidance, args.run)
    cond, n, nrow = conditions_from(args, cfg, guidance, args.n, args.run)
    prompts = prompts_from(args)
    captions = [p for p in prompts for _ in range(n // len(prompts))] if prompts else None
    if args.gif and cfg.kind != "images":
        raise UsageError(f"--gif draws the chain of an image run; {args.run} makes {cfg.kind} (use `difflab trajectories`)")
    sampler, spacing, options = sampler_choice(args, denoiser.process)
    single_thread_for_points(cfg.kind)
    device = resolve_device(args.device)
    world = setup(device)
    common = dict(sampler=sampler, steps=args.steps, spacing=spacing, options=options, device=device, batch=args.batch)
    x, traj = None, None
    if args.gif:  # the first batch with its chain, then the rest: per-sample seeds make this the same samples
        first = min(n, args.batch, 16)
        x, traj = generate(denoiser, cfg, first, cond={k: v[:first] for k, v in cond.items()}, seed=args.seed, return_trajectory=True, **common)
        if n > first:
            rest = generate(denoiser, cfg, n - first, cond={k: v[first:] for k, v in cond.items()}, seed=args.seed + first,
                            world=world, progress=not args.quiet, **common)
            x = torch.cat([x, rest]) if rest is not None else None
    else:
        x = generate(denoiser, cfg, n, cond=cond, seed=args.seed, world=world, progress=not args.quiet, **common)
    if not world.is_main:
        return
    if cascade:  # the samples are the low-resolution inputs of the super-resolution run
        from .restore import upscale

        sr, sr_cfg, _ = cascade
        x = upscale(sr, sr_cfg, x.clamp(-1, 1), steps=args.steps, seed=args.seed, batch=args.batch, progress=not args.quiet, device=device)
        cfg = sr_cfg
    if cfg.kind == "points":
        if args.save:
            save_npz(args.save, points=x.numpy())
        if args.out:
            ref = make_toy(cfg.dataset, len(x), seed=12345) if cfg.dataset in TOY_DATASETS else None
            plots.scatter(x, args.out, title=f"{sampler}, {args.steps} steps", reference=ref)
    else:
        from ..data.images import to_uint8

        imgs = to_uint8(x)
        if args.save:
            extra = {"labels": cond["class_labels"].numpy()} if "class_labels" in cond else {}
            if captions:
                extra["captions"] = np.array(captions)
            save_npz(args.save, images=imgs.numpy(), **extra)
        if args.out and captions:
            plots.captioned_grid(imgs, captions, args.out, ncol=min(8, max(4, n // len(prompts))))
        elif args.out:
            plots.save_grid(imgs, args.out, nrow=nrow)
        if traj is not None:
            from ..viz.chain import chain_gif

            chain_gif(traj, args.gif)
    for path in (args.out, args.save, args.gif):
        if path:
            print(f"wrote {path}")


def register(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory")
    add_sampler(s, "ddim", 50)
    add_conditions(s)
    s.add_argument("-n", "--n", type=positive_int, default=64)
    s.add_argument("--batch", type=positive_int, default=1000, help="samples per sampler call (does not change the samples)")
    s.add_argument("--seed", type=int, default=0, help="sample i has seed SEED + i")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default)")
    add_device(s)
    s.add_argument("--out", help="picture (.png)")
    s.add_argument("--save", help="raw samples (.npz; uint8 images)")
    s.add_argument("--gif", help="images: a GIF of the reverse chain of the first 16 samples (.gif)")
    s.add_argument("--then", metavar="SR_RUN", help="a cascade: upscale the samples with a super-resolution run (--cond low-res)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=run)
