"""`difflab interpolate` and `difflab img2img`: edit real images with a trained model (see edit.py).

difflab interpolate runs/fm a.png b.png --frames 9 --method ddim --out strip.png --gif morph.gif
difflab img2img runs/fm-class in.png --strength 0.6 --class 3 --guidance 2 -n 4 --out out.png"""

from __future__ import annotations

import torch

from ..data.images import read_inputs, to_model, to_uint8
from ..sampling.edit import METHODS
from ..viz import plots
from .options import (
    UsageError,
    add_conditions,
    asked_for,
    check_suffix,
    guidance_from,
    load_run,
    positive_int,
    save_npz,
    unit_float,
)


def run_interpolate(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.gif, (".gif",), "--gif")
    if args.frames < 2:
        raise UsageError(f"--frames must be at least 2, got {args.frames}")
    if not 0 < args.t <= 1:
        raise UsageError(f"--t must lie in (0, 1] (a fraction of t_max), got {args.t}")
    model = load_run(args, args.run)
    if model.config.data_kind != "images":
        raise UsageError(f"{args.run} makes {model.config.data_kind}; editing works on image runs")
    a, b = (to_model(read_inputs([p], tuple(model.config.data_shape))) for p in (args.a, args.b))
    guidance = guidance_from(args)
    asked, _, _ = asked_for(args, model, guidance, 2)  # --class K (both) or K1 K2
    frames = model.interpolate(
        a, b, args.frames, method=args.method, t=args.t, steps=args.steps, seed=args.seed, guidance=guidance, **asked
    )
    images = to_uint8(frames)
    if args.out:
        plots.save_grid(images, args.out, nrow=len(images))
    if args.gif:
        plots.save_gif([plots.image_grid(im[None], nrow=1, scale=8) for im in images], args.gif, duration_ms=150)
    if args.save:
        save_npz(args.save, images=images.numpy())
    for path in (args.out, args.gif, args.save):
        if path:
            print(f"wrote {path}")


def run_img2img(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.save, (".npz",), "--save")
    model = load_run(args, args.run)
    if model.config.data_kind != "images":
        raise UsageError(f"{args.run} makes {model.config.data_kind}; editing works on image runs")
    shown = read_inputs(args.input, tuple(model.config.data_shape))
    guidance = guidance_from(args)
    asked, _, _ = asked_for(args, model, guidance, len(shown) * args.n)
    out = to_uint8(
        model.img2img(
            to_model(shown),
            args.strength,
            n=args.n,
            steps=args.steps,
            sampler=args.sampler,
            seed=args.seed,
            guidance=guidance,
            progress=not args.quiet,
            **asked,
        )
    )
    if args.out:  # per row: the input, then its variations
        rows = torch.cat([shown[:, None], out.reshape(-1, args.n, *out.shape[1:])], dim=1)
        plots.save_grid(rows.reshape(-1, *out.shape[1:]), args.out, nrow=args.n + 1)
    if args.save:
        save_npz(args.save, images=out.numpy())
    for path in (args.out, args.save):
        if path:
            print(f"wrote {path}")


def register(sub) -> None:
    i = sub.add_parser("interpolate", help="frames between two real images (DDIM inversion + slerp, or the DDPM mix)")
    i.add_argument("run")
    i.add_argument("a", help="first image (.png/.jpg or .npz, the run's size and channels)")
    i.add_argument("b", help="second image")
    i.add_argument("--frames", type=int, default=9)
    i.add_argument("--method", choices=METHODS, default="ddim")
    i.add_argument("--t", type=float, default=0.5, help="ddpm: how deep to noise, as a fraction of t_max (default 0.5)")
    i.add_argument("--steps", type=positive_int, default=50)
    i.add_argument("--seed", type=int, default=0)
    add_conditions(i)
    i.add_argument("--out", help="the strip (.png)")
    i.add_argument("--gif", help="the morph (.gif)")
    i.add_argument("--save", help="the frames (.npz)")
    i.set_defaults(func=run_interpolate)

    e = sub.add_parser("img2img", help="SDEdit: noise an image to a strength and denoise it back")
    e.add_argument("run")
    e.add_argument(
        "input", nargs="+", help="images (.png/.jpg files, folders of them, or .npz; the run's size and channels)"
    )
    e.add_argument(
        "--strength", type=unit_float, default=0.6, help="how deep to noise, a fraction of t_max (default 0.6)"
    )
    e.add_argument("-n", "--n", type=positive_int, default=1, help="variations per input (seeds SEED + i)")
    e.add_argument(
        "--steps", type=positive_int, default=50, help="steps of the full grid (the edit runs those below the strength)"
    )
    e.add_argument("--sampler", default="ddim")
    e.add_argument("--seed", type=int, default=0)
    add_conditions(e)
    e.add_argument("--out", help="per input: the input and its variations (.png)")
    e.add_argument("--save", help="the edits (.npz)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=run_img2img)
