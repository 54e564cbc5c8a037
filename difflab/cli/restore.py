"""`difflab restore RUN --task ... --method ...`: inverse problems with a trained (unconditional or
conditional) model, writing a strip per image: the measurement, each method's restoration, the truth.

    difflab restore runs/fm --task inpaint --clean x.png --method repaint ddrm --out strip.png
    difflab restore runs/fm --task sr4 --input small.png --method ddrm --out up.png        # a 7x7 input
    difflab restore runs/fm --task inpaint --input photo.png --mask mask.png --method dps  # white = fill in

--clean gives clean images that the command degrades (the truth is then known and shown, with PSNR);
--input gives observations: for inpainting the image (its masked pixels are ignored), for srK the
low-resolution image, for deblur the blurred image, for grey the grey image."""

from __future__ import annotations

import argparse
import re

import torch

from ..core.operators import Blur, Downsample, Grey, Mask, box_mask, random_mask
from ..data.images import read_inputs, read_mask, to_model, to_uint8
from ..evaluation.metrics import psnr
from ..runs.diffusion import load_upscaler
from ..sampling.inverse import METHODS, evaluations
from ..training.distributed import resolve_device
from ..viz import plots
from .options import (
    UsageError,
    add_conditions,
    add_device,
    asked_for,
    check_suffix,
    guidance_from,
    load_run,
    positive_int,
    save_npz,
    unit_float,
)  # fmt: skip

TASKS = "inpaint, random, srK (e.g. sr4), deblur, grey"


def build_operator(args, shape):
    C, H, W = shape
    task = args.task
    if task == "inpaint":
        keep = read_mask(args.mask, (H, W)) if args.mask else box_mask(shape, args.box)
        return Mask(keep, shape, args.sigma_y)
    if args.mask or args.box:
        raise UsageError("--mask and --box are for --task inpaint")
    if task == "random":
        return Mask(random_mask(shape, args.missing, args.seed), shape, args.sigma_y)
    if m := re.fullmatch(r"sr(\d+)", task):
        return Downsample(int(m.group(1)), shape, args.sigma_y)
    if task == "deblur":
        return Blur(args.blur, shape, args.sigma_y)
    if task == "grey":
        return Grey(shape, args.sigma_y)
    raise UsageError(f"unknown task {task!r}; choose one of: {TASKS}")


def observation_shape(op, shape):
    """The shape of an observed image for this operator (what --input must be)."""
    return tuple(op.y_shape) if isinstance(op, (Downsample, Grey)) else tuple(shape)


def run(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.save, (".npz",), "--save")
    if (args.input is None) == (args.clean is None):
        raise UsageError("give the observations (--input) or clean images to degrade (--clean), one of the two")
    for m in args.method or ():
        if m not in METHODS:
            raise UsageError(f"unknown method {m!r}; choose from: {', '.join(METHODS)}")
    model = load_run(args, args.run)
    cfg = model.config
    if cfg.data_kind != "images":
        raise UsageError(f"{args.run} makes {cfg.data_kind}; restoration works on image runs")
    shape = tuple(cfg.data_shape)
    if args.sigma_y < 0:
        raise UsageError(f"--sigma-y must be >= 0, got {args.sigma_y}")
    op = build_operator(args, shape)
    methods = args.method or [model.default_restoration(op)]
    if "ddrm" in methods and op.svd is None:  # fail before any method has run
        raise UsageError(f"DDRM needs an operator with an SVD; {op.name} has none")
    if model.latent is not None and set(methods) - {"dps"}:
        raise UsageError(
            f"{args.run} is a latent run: {', '.join(sorted(set(methods) - {'dps'}))} need the pixels at every "
            "step; use --method dps (its gradient runs through the decoder)"
        )
    truth = None
    if args.clean:
        truth = read_inputs(args.clean, shape, "--clean")
        y = op.measure(to_model(truth).double(), torch.Generator().manual_seed(args.seed)).float()
    else:
        observed = to_model(read_inputs(args.input, observation_shape(op, shape), "--input"))
        y = op(observed) if isinstance(op, Mask) else observed
    guidance = guidance_from(args)
    asked, _, _ = asked_for(args, model, guidance, len(y))
    options = {
        "ddrm": {"eta": args.ddrm_eta, "eta_b": args.ddrm_eta_b},
        "dps": {"scale": args.dps_scale},
        "repaint": {"jump_length": args.jump_length, "jump_n_sample": args.jump_n_sample},
    }
    columns, rows = [to_uint8(op.show(y).clamp(-1, 1))], {}
    for m in methods:
        x = model.restore(
            y,
            op,
            method=m,
            steps=args.steps,
            options=options.get(m),
            seed=args.seed,
            batch=args.batch,
            guidance=guidance,
            device=resolve_device(args.device),
            progress=not args.quiet,
            **asked,
        )
        rows[m] = x
        images = to_uint8(x)
        columns.append(images)
        line = (
            f"{m}: {evaluations(m, args.steps, options.get(m))} network evaluations per image, "
            f"consistency {float(op.consistency(x.double(), y.double()).mean()):.4f}"
        )
        if truth is not None:
            line += f", PSNR {float(psnr(images, truth).mean()):.2f} dB"
        print(line)
    if truth is not None:
        columns.append(truth)
    strip = torch.stack(columns, dim=1).reshape(-1, *shape)  # per image: measurement, methods..., truth
    if args.out:
        plots.save_grid(strip, args.out, nrow=len(columns))
        print(f"wrote {args.out} (per row: measurement, {', '.join(methods)}{', truth' if truth is not None else ''})")
    if args.save:
        save_npz(args.save, **{m: to_uint8(x).numpy() for m, x in rows.items()})
        print(f"wrote {args.save}")


def run_upscale(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    check_suffix(args.save, (".npz",), "--save")
    if (args.input is None) == (args.clean is None):
        raise UsageError("give low-resolution images (--input) or clean images to downsample (--clean), one of the two")
    if not 0 <= args.noise_level <= 1:
        raise UsageError(f"--noise-level must lie in [0, 1], got {args.noise_level}")
    model = load_upscaler(args.run)
    C, H, W = model.config.shape
    k = model.config.super_resolution.factor
    op = Downsample(k, (C, H, W))
    truth = None
    if args.clean:
        truth = read_inputs(args.clean, (C, H, W), "--clean")
        low = op(to_model(truth))
    else:
        low = to_model(read_inputs(args.input, op.y_shape, "--input"))
    x = model.upscale(
        low,
        noise_level=args.noise_level,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        batch=args.batch,
        progress=not args.quiet,
        device=resolve_device(args.device),
    )
    bilinear = torch.nn.functional.interpolate(low, scale_factor=k, mode="bilinear", align_corners=False).clamp(-1, 1)
    images = to_uint8(x)
    columns = [to_uint8(op.show(low)), to_uint8(bilinear), images] + ([truth] if truth is not None else [])
    print(f"consistency (RMS of downsampled output minus input): {float(op.consistency(x, low).mean()):.4f}")
    if truth is not None:
        print(
            f"PSNR: upscaled {float(psnr(images, truth).mean()):.2f} dB, bilinear "
            f"{float(psnr(to_uint8(bilinear), truth).mean()):.2f} dB"
        )
    if args.out:
        plots.save_grid(torch.stack(columns, dim=1).reshape(-1, C, H, W), args.out, nrow=len(columns))
        print(f"wrote {args.out} (per row: input, bilinear, upscaled{', truth' if truth is not None else ''})")
    if args.save:
        save_npz(args.save, images=images.numpy())
        print(f"wrote {args.save}")


def box(s: str) -> tuple[int, int, int, int]:
    try:
        top, left, h, w = (int(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOP,LEFT,HEIGHT,WIDTH in pixels, got {s!r}") from None
    return top, left, h, w


def register(sub) -> None:
    r = sub.add_parser(
        "restore", help="inpainting, super-resolution, deblurring, colour from grey with a trained model"
    )
    r.add_argument("run")
    r.add_argument("--task", required=True, help=TASKS)
    r.add_argument(
        "--method",
        nargs="+",
        help=f"one or more of: {', '.join(METHODS)} (default: ddrm where the degradation has an SVD, "
        "dps otherwise and on latent runs)",
    )
    r.add_argument(
        "--input", nargs="+", help="observed images (.png/.jpg files, folders of them, or .npz with 'images')"
    )
    r.add_argument(
        "--clean",
        nargs="+",
        help="clean images to degrade (files, folders or .npz; the truth is shown and PSNR reported)",
    )
    r.add_argument("--mask", help="inpaint: a mask image, white = fill in, black = keep (default: --box)")
    r.add_argument("--box", type=box, help="inpaint: the missing box TOP,LEFT,HEIGHT,WIDTH (default: the right half)")
    r.add_argument(
        "--missing", type=unit_float, default=0.7, help="random: the fraction of missing pixels (default 0.7)"
    )
    r.add_argument("--blur", type=float, default=1.0, help="deblur: the Gaussian blur's sigma in pixels (default 1)")
    r.add_argument("--sigma-y", type=float, default=0.0, help="measurement noise std in [-1, 1] units (default 0)")
    r.add_argument("--steps", type=positive_int, default=100)
    r.add_argument("--jump-length", type=positive_int, default=10, help="repaint: levels per jump back (default 10)")
    r.add_argument(
        "--jump-n-sample", type=positive_int, default=10, help="repaint: passes over each stretch (default 10)"
    )
    r.add_argument("--ddrm-eta", type=unit_float, default=0.85)
    r.add_argument("--ddrm-eta-b", type=unit_float, default=1.0)
    r.add_argument("--dps-scale", type=float, default=1.0, help="dps: the gradient step size (default 1)")
    add_conditions(r)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--batch", type=positive_int, default=250)
    add_device(r)
    r.add_argument("--out", help="the strip (.png)")
    r.add_argument("--save", help="the restorations (.npz, one array per method)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=run)

    u = sub.add_parser("upscale", help="super-resolution with a run trained with --cond low-res (SR3)")
    u.add_argument("run")
    u.add_argument("--input", nargs="+", help="low-resolution images (.png/.jpg or .npz), the run's size / factor")
    u.add_argument(
        "--clean", nargs="+", help="full-size images to downsample first (PSNR against bilinear is reported)"
    )
    u.add_argument(
        "--noise-level", type=float, default=0.0, help="augmentation noise std given to the input (default 0)"
    )
    u.add_argument("--steps", type=positive_int, default=20)
    u.add_argument("--sampler", default="dpmpp-2m")
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--batch", type=positive_int, default=250)
    add_device(u)
    u.add_argument("--out", help="per image: input, bilinear, upscaled, truth (.png)")
    u.add_argument("--save", help="the upscaled images (.npz)")
    u.add_argument("--quiet", action="store_true")
    u.set_defaults(func=run_upscale)
