"""The `difflab` command: data, train, sample, trajectories.

Bad input (unknown names, out-of-range numbers, missing or corrupt files) ends with one
line `difflab: error: ...` on stderr and exit status 1 (argparse's own errors exit 2);
outputs are written atomically, so nothing half-written is left behind."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from . import plots
from .checkpoint import CheckpointError, RunConfig, load_config, load_denoiser, process_to_dict
from .data.toy2d import TOY_DATASETS, make_toy
from .io import atomic_path
from .presets import preset_for
from .processes import PROCESSES_BY_NAME
from .samplers import SAMPLERS, SPACINGS, get_sampler, sample


class UsageError(ValueError):
    """Bad input from the command line."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump): `difflab sample: error: ... (see --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# --------------------------------------------------------------------------- argument checks


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


def _check_suffix(path: str | None, suffixes: tuple[str, ...], flag: str) -> None:
    if path is not None and Path(path).suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {path}: expected a file ending in {' or '.join(suffixes)}")


def is_toy(dataset: str) -> bool:
    return dataset in TOY_DATASETS


def small_work_single_thread(dataset: str) -> None:
    """2-D networks are tiny: a second thread costs more in synchronisation than it saves (measured: 20x slower
    when the cores are busy), so their work runs on one thread. Images use torch's default."""
    if is_toy(dataset):
        torch.set_num_threads(1)


def check_dataset(name: str) -> None:
    """A dataset is a built-in name or an existing folder / .npz file."""
    from .data.images import DATASETS

    if name not in TOY_DATASETS and name not in DATASETS and not Path(name).exists():
        raise UsageError(
            f"unknown dataset {name!r}: choose one of {', '.join([*TOY_DATASETS, *DATASETS])}, or give a folder of images or an .npz file"
        )


def _save_npz(path, **arrays) -> None:
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)


# --------------------------------------------------------------------------- data


def cmd_data(args) -> None:
    _check_suffix(args.save, (".npz",), "--save")
    _check_suffix(args.out, (".png",), "--out")
    check_dataset(args.name)
    if is_toy(args.name):
        pts = make_toy(args.name, args.n or 5000, args.seed)
        if args.save:
            _save_npz(args.save, points=pts.numpy())
        if args.out:
            plots.scatter(pts, args.out, title=f"{args.name} (n={len(pts)})")
    else:
        from .data.images import load_images

        data = load_images(args.name, split=args.split, size=args.size, channels=args.channels, data_dir=args.data)
        g = torch.Generator().manual_seed(args.seed)
        idx = torch.randperm(len(data.images), generator=g)[: args.n or 64]
        imgs = data.images[idx]
        if args.save:
            arrays = {"images": imgs.numpy()}
            if data.labels is not None:
                arrays["labels"] = data.labels[idx].numpy()
            _save_npz(args.save, **arrays)
        if args.out:
            plots.save_grid(imgs, args.out)
        pts = imgs
    for what, path in (("points" if is_toy(args.name) else "images", args.save), ("picture", args.out)):
        if path:
            print(f"wrote {len(pts)} {what} to {path}" if what != "picture" else f"wrote {path}")


# --------------------------------------------------------------------------- train


def build_run_config(args) -> RunConfig:
    """The dataset's preset, overridden by whatever the command line says."""
    cfg = preset_for(args.name)
    t = cfg.train
    t = replace(
        t,
        steps=args.steps or t.steps,
        batch_size=args.batch_size or t.batch_size,
        lr=args.lr or t.lr,
        seed=args.seed if args.seed is not None else t.seed,
        precision=args.precision or t.precision,
        ema_decay=args.ema_decay if args.ema_decay is not None else t.ema_decay,
        ema_warmup=args.ema_warmup if args.ema_warmup is not None else t.ema_warmup,
        checkpoint_every=args.checkpoint_every or t.checkpoint_every,
        sample_every=args.sample_every if args.sample_every is not None else t.sample_every,
        accumulation=args.accumulation or t.accumulation,
    )
    process = cfg.process
    if args.process or args.schedule or args.T:
        kind = args.process or process["kind"]
        cls = PROCESSES_BY_NAME[kind]
        kw = {}
        if args.schedule:
            kw["schedule"] = args.schedule
        if args.T:
            if kind != "ddpm":
                raise UsageError("--T applies to the discrete DDPM process only")
            kw["T"] = args.T
        process = process_to_dict(cls(**kw))
    target = args.target or cfg.target
    loss = dict(cfg.loss)
    if args.weighting:
        loss["weighting"] = args.weighting
    data = dict(cfg.data)
    if args.data:
        data["data_dir"] = args.data
    if args.n and is_toy(args.name):
        data["n"] = args.n
    return replace(cfg, process=process, target=target, loss=loss, train=t, data=data)


def load_training_data(cfg: RunConfig):
    """Training data (2-D points as floats, images as uint8) and labels for a run config."""
    if is_toy(cfg.dataset):
        return make_toy(cfg.dataset, cfg.data.get("n", 20000), cfg.data.get("seed", 1)), None
    from .data.images import load_images

    ds = load_images(cfg.dataset, split="train", size=cfg.data.get("size"), channels=cfg.data.get("channels"), data_dir=cfg.data.get("data_dir"))
    return ds.images, ds.labels


def cmd_train(args) -> None:
    from .training import train

    run = Path(args.out)
    if args.resume:
        cfg = load_config(run)
        if args.steps:  # extend a finished run
            cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
    else:
        if (run / "model.safetensors").exists() and not args.force:
            raise UsageError(f"{run} already holds a run: pass --resume to continue it or --force to start over")
        check_dataset(args.name)
        cfg = build_run_config(args)
    small_work_single_thread(cfg.dataset)
    data, labels = load_training_data(cfg)
    preview = _toy_preview if is_toy(cfg.dataset) else _image_preview
    train(run, cfg, data, labels, resume=args.resume, progress=not args.quiet, preview=preview)
    print(f"run written to {run}/ (config.json, model.safetensors, metrics.jsonl, loss.png, samples.png)")


def _toy_preview(denoiser, step: int, run: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = sample(denoiser, (2000, 2), 50, sampler="ddim", generator=g)
    plots.scatter(x, run / "samples.png", title=f"DDIM, 50 steps, step {step}")
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def _image_preview(denoiser, step: int, run: Path) -> None:
    from .data.images import to_uint8

    shape = _image_shape(denoiser)
    x = sample(denoiser, (64, *shape), 20, sampler="dpmpp-2m", generator=torch.Generator().manual_seed(0))
    plots.save_grid(to_uint8(x), run / "samples.png")
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def _image_shape(denoiser) -> tuple[int, int, int]:
    c = denoiser.net.config
    return (c.in_channels, c.image_size, c.image_size)


# --------------------------------------------------------------------------- sample


def cmd_sample(args) -> None:
    _check_suffix(args.out, (".png",), "--out")
    _check_suffix(args.save, (".npz",), "--save")
    _check_suffix(args.gif, (".gif",), "--gif")
    get_sampler(args.sampler)  # fail before loading anything
    denoiser, cfg = load_denoiser(args.run, ema=args.ema)
    toy = is_toy(cfg.dataset)
    small_work_single_thread(cfg.dataset)
    shape = (2,) if toy else _image_shape(denoiser)
    options = {"eta": args.eta} if args.sampler == "ddim" else {}
    g = torch.Generator().manual_seed(args.seed)
    chunks, traj = [], None
    from tqdm.auto import tqdm

    sizes = [min(args.batch, args.n - i) for i in range(0, args.n, args.batch)]
    for i, b in enumerate(tqdm(sizes, desc="sample", disable=len(sizes) == 1 or args.quiet)):
        want_traj = args.gif is not None and i == 0
        out = sample(denoiser, (b, *shape), args.steps, sampler=args.sampler, spacing=args.spacing, generator=g, return_trajectory=want_traj, sigma_tilde_cap=args.sigma_cap, **options)
        if want_traj:
            out, traj = out
        chunks.append(out)
    x = torch.cat(chunks)
    if toy:
        if args.save:
            _save_npz(args.save, points=x.numpy())
        if args.out:
            ref = make_toy(cfg.dataset, len(x), seed=12345)
            plots.scatter(x, args.out, title=f"{args.sampler}, {args.steps} steps", reference=ref)
    else:
        from .data.images import to_uint8

        imgs = to_uint8(x)
        if args.save:
            _save_npz(args.save, images=imgs.numpy())
        if args.out:
            plots.save_grid(imgs, args.out)
        if traj is not None:
            from .chain import chain_gif

            chain_gif(traj, args.gif)
    for path in (args.out, args.save, args.gif):
        if path:
            print(f"wrote {path}")


# --------------------------------------------------------------------------- trajectories


def cmd_trajectories(args) -> None:
    _check_suffix(args.out, (".png",), "--out")
    _check_suffix(args.gif, (".gif",), "--gif")
    _check_suffix(args.forward, (".png",), "--forward")
    get_sampler(args.sampler)
    denoiser, cfg = load_denoiser(args.run, ema=True)
    from .chain import toy_trajectories, image_chain

    small_work_single_thread(cfg.dataset)
    if is_toy(cfg.dataset):
        toy_trajectories(denoiser, cfg, args.out, n=args.n or 2000, steps=args.steps, seed=args.seed, sampler=args.sampler)
    else:
        image_chain(denoiser, cfg, args.out, gif=args.gif, forward=args.forward, n=args.n or 8, steps=args.steps, seed=args.seed, sampler=args.sampler)
    for path in (args.out, args.gif, args.forward):
        if path:
            print(f"wrote {path}")


# --------------------------------------------------------------------------- eval


def cmd_eval(args) -> None:
    """Sample quality (FD, KID, precision/recall, class histogram) and bits/dim of a run; see difflab/evaluate.py."""
    from .evaluate import evaluate, format_report, write_json

    _check_suffix(args.json, (".json",), "--json")
    get_sampler(args.sampler)  # fail before loading anything
    if args.bpd_n < 0:
        raise UsageError(f"--bpd-n must be 0 (skip) or a positive integer, got {args.bpd_n}")
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        small_work_single_thread(load_config(args.run).dataset)
    result = evaluate(
        args.run, n=args.n, sampler=args.sampler, steps=args.steps, spacing=args.spacing, seed=args.seed,
        batch=args.batch, ema=args.ema, bpd_n=args.bpd_n, features=args.features, split=args.split, progress=not args.quiet,
    )  # fmt: skip
    print(format_report(result))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="difflab", description="Diffusion models: train, sample, look.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    d = sub.add_parser("data", help="export points or images of a dataset (and a preview picture)")
    d.add_argument("name", help=f"a 2-D set ({', '.join(TOY_DATASETS)}), an image set (digits, fashion-mnist), a folder or an .npz")
    d.add_argument("--n", type=positive_int, help="how many (default 5000 points / 64 images)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--split", default="train", choices=["train", "test"])
    d.add_argument("--size", type=positive_int, help="image size for folders of images")
    d.add_argument("--channels", type=int, choices=[1, 3])
    d.add_argument("--data", help="folder holding the dataset's files (e.g. Fashion-MNIST IDX files)")
    d.add_argument("--save", help="write the raw data to this .npz")
    d.add_argument("--out", help="write a preview picture to this .png")
    d.set_defaults(func=cmd_data)

    t = sub.add_parser("train", help="train a denoiser; a progress bar shows loss, it/s and ETA")
    t.add_argument("name", help="dataset name (its preset sets the defaults)")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--steps", type=positive_int)
    t.add_argument("--batch-size", type=positive_int)
    t.add_argument("--accumulation", type=positive_int, help="gradient accumulation micro-batches")
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--ema-decay", type=unit_float)
    t.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="ramp the EMA decay up as min(decay, (1+step)/(10+step)) (default: the preset's choice)")
    t.add_argument("--precision", choices=["fp32", "bf16"])
    t.add_argument("--process", choices=sorted(PROCESSES_BY_NAME))
    t.add_argument("--schedule", help="beta schedule (linear, cosine, sigmoid) or VP/VE schedule")
    t.add_argument("--T", type=positive_int, help="number of DDPM steps")
    t.add_argument("--target", choices=["eps", "x0", "v", "score"])
    t.add_argument("--weighting", choices=["none", "snr", "min_snr"])
    t.add_argument("--n", type=positive_int, help="2-D sets: number of training points")
    t.add_argument("--data", help="folder holding the dataset's files")
    t.add_argument("--checkpoint-every", type=positive_int)
    t.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: at the end only)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run")
    s.add_argument("run", help="run directory")
    s.add_argument("--sampler", default="ddim", help=f"one of: {', '.join(SAMPLERS)}")
    s.add_argument("--steps", type=positive_int, default=50)
    s.add_argument("--spacing", choices=SPACINGS, default=None)
    s.add_argument("--eta", type=unit_float, default=0.0, help="DDIM's eta in [0, 1]")
    s.add_argument("--sigma-cap", type=float, default=None, help="karras/logsnr grids: spread the levels below sigma/alpha = this (e.g. 80)")
    s.add_argument("--n", type=positive_int, default=64)
    s.add_argument("--batch", type=positive_int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default)")
    s.add_argument("--out", help="picture (.png)")
    s.add_argument("--save", help="raw samples (.npz; uint8 images)")
    s.add_argument("--gif", help="images: a GIF of the reverse chain (.gif)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_sample)

    r = sub.add_parser("trajectories", help="forward noising and reverse denoising at chosen steps")
    r.add_argument("run")
    r.add_argument("--out", required=True)
    r.add_argument("--gif", help="images: also a GIF of the chain")
    r.add_argument("--forward", help="images: also a forward-noising strip of real test images (.png)")
    r.add_argument("--steps", type=positive_int, default=100)
    r.add_argument("--n", type=positive_int)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sampler", default="ddpm")
    r.set_defaults(func=cmd_trajectories)

    e = sub.add_parser("eval", help="sample quality (FD, KID, precision/recall, classes) and bits/dim of a run")
    e.add_argument("run", help="run directory")
    e.add_argument("--n", type=positive_int, default=1000, help="number of samples (default 1000; at least 10)")
    e.add_argument("--sampler", default="dpmpp-2m", help=f"one of: {', '.join(SAMPLERS)}")
    e.add_argument("--steps", type=positive_int, default=20)
    e.add_argument("--spacing", choices=SPACINGS, default=None, help="default: the sampler's usual grid")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch", type=positive_int, default=250, help="samples per sampler call")
    e.add_argument("--bpd-n", type=int, default=32, help="test images for bits/dim (default 32; 0 skips; ~0.6 s each for 8x8 digits, ~7 s for 28x28)")
    e.add_argument("--features", help="feature net: digits, fashion-mnist, random, or a classifier .safetensors (default: the dataset's, else random)")
    e.add_argument("--split", choices=["test", "train"], default="test", help="reference split (default test)")
    e.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights (default)")
    e.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's; 1 for 2-D runs)")
    e.add_argument("--json", help="write the numbers to this .json")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, CheckpointError, FileNotFoundError, KeyboardInterrupt) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"difflab: error: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
