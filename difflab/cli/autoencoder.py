"""`difflab train-autoencoder DATASET --out RUN` and `difflab autoencode AE_RUN images --out recon.png`.

    difflab train-autoencoder fashion-pairs --out runs/ae --factor 4 --latent-channels 4
    difflab train-autoencoder --out runs/ae --resume
    difflab autoencode runs/ae a.png b.png --out recon.png

Training goes through the one training loop (checkpoints, resume, torchrun, progress). At the end it measures
the latent scale on the training split (RUN/latent.json, see difflab/autoencoder.py), the reconstruction
PSNR on the test split against the dataset-mean-image baseline and the rFD (RUN/reconstruction.json), and draws
originals beside reconstructions (RUN/reconstructions.png)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from ..data.images import read_inputs
from ..evaluation.metrics import psnr
from ..latent.autoencoder import (
    AUTOENCODER,
    LATENT,
    RECONSTRUCTION,
    autoencoder_config,
    load_autoencoder,
    measure_scale,
    preview,
    reconstruction_report,
)
from ..runs.data import load_split
from ..runs.lifecycle import begin
from ..training.distributed import launched_rank, resolve_device
from ..training.loop import train
from ..viz import plots
from .options import (
    UsageError,
    add_auxiliary_training,
    check_suffix,
    dataset_preset,
    given_flags,
    positive_int,
    say_unfinished,
    training_options,
)

FLAGS = ("factor", "latent_channels", "kl_weight", "recon", "disc_weight", "disc_start")


def new_config(args):
    base = dataset_preset(args)
    for flag in ("kl_weight", "disc_weight", "disc_start"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if args.disc_start is not None and not args.disc_weight:
        raise UsageError("--disc-start needs --disc-weight > 0 (the discriminator is off without it)")
    try:
        cfg = autoencoder_config(
            base,
            factor=args.factor or 4,
            latent_channels=args.latent_channels or 4,
            kl_weight=1e-6 if args.kl_weight is None else args.kl_weight,
            recon=args.recon or "l1",
            attention=args.attention,
            disc_weight=args.disc_weight or 0.0,
            disc_start=1000 if args.disc_start is None else args.disc_start,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    cfg = training_options(cfg, args)
    cfg.validate()
    return cfg


def run_train(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    fixed = given_flags(args, FLAGS) + ["--attention"] * args.attention
    cfg, resume = begin(
        out,
        AUTOENCODER,
        resume=args.resume,
        force=args.force,
        fresh=lambda: new_config(args),
        fixed=fixed,
        steps=args.steps,
    )
    data = load_split(cfg, "train")
    if not args.quiet and launched_rank() == 0:
        net = cfg.build_net()
        print(
            f"{'resuming' if resume else 'training'} a KL autoencoder for {cfg.dataset}: factor {net.config.factor}, "
            "latent "
            f"{'x'.join(map(str, net.config.latent_shape))}, {sum(p.numel() for p in net.parameters()):,} parameters, "
            f"{cfg.train.steps} steps x batch {cfg.train.batch_size}, on {device}"
        )
    if not resume and launched_rank() == 0:
        for name in (LATENT, RECONSTRUCTION):  # an earlier run's figures must not pass for this one's
            (out / name).unlink(missing_ok=True)
    test = load_split(cfg, "test")
    train(
        out,
        cfg,
        data.images,
        device=device,
        resume=resume,
        progress=not args.quiet,
        max_minutes=args.max_minutes,
        preview=partial(preview, test=test.images[:16]),
        command="train-autoencoder",
    )
    if launched_rank() != 0:
        return
    if say_unfinished(out, cfg, "train-autoencoder", " (the latent scale is measured at the end)"):
        return  # a half-trained autoencoder gets no scale, so --latent refuses it
    info = measure_scale(out, data.images, progress=not args.quiet)
    report = reconstruction_report(out, test.images, data.images, cfg.dataset)
    print(
        f"latent scale {info['scale']:.4f} (1 / std of {info['images']} training latents; posterior std "
        f"{info['posterior_std']:.4f})"
    )
    print(
        f"test reconstruction PSNR {report['psnr']:.2f} dB on {report['test_images']} images "
        f"(the dataset-mean image: {report['baseline_psnr']:.2f} dB); rFD {report['rfd']:.3f} ({report['features']} "
        "features)"
    )
    print(
        f"autoencoder written to {out}/ (train a latent model with `difflab train {cfg.dataset} --latent {out} --out "
        "RUN`)"
    )


def run_autoencode(args) -> None:
    check_suffix(args.out, (".png",), "--out")
    space = load_autoencoder(args.run)
    images = read_inputs(args.images, tuple(space.image_shape), "images")
    recon = space.reconstruct(images)
    value = psnr(recon, images)
    plots.save_grid(torch.stack([images, recon], dim=1).reshape(-1, *images.shape[1:]), args.out, nrow=2)
    print(f"PSNR per image: {', '.join(f'{v:.2f}' for v in value.tolist())} dB (mean {float(value.mean()):.2f})")
    print(f"wrote {args.out} (each row: the image, its reconstruction)")


def register(sub) -> None:
    t = sub.add_parser("train-autoencoder", help="train a KL-regularised autoencoder for latent diffusion")
    t.add_argument("name", nargs="?", help="dataset (a name, a folder or an .npz); not needed with --resume")
    t.add_argument("--out", required=True, help="autoencoder run directory")
    t.add_argument("--factor", type=positive_int, help="downsampling factor, a power of two (default 4)")
    t.add_argument("--latent-channels", type=positive_int, help="latent channels (default 4)")
    t.add_argument("--kl-weight", type=float, help="weight of the KL term (default 1e-6)")
    t.add_argument("--recon", choices=["l1", "l2"], help="reconstruction loss (default l1)")
    t.add_argument("--attention", action="store_true", help="self-attention at the lowest resolution")
    t.add_argument(
        "--disc-weight", type=float, help="weight of a patch discriminator's hinge term (default 0: no discriminator)"
    )
    t.add_argument("--disc-start", type=int, help="batches before the discriminator term switches on (default 1000)")
    add_auxiliary_training(t, "optimizer steps (default 3000)")
    t.set_defaults(func=run_train)

    a = sub.add_parser("autoencode", help="round-trip images through a trained autoencoder")
    a.add_argument("run", help="autoencoder run directory")
    a.add_argument(
        "images", nargs="+", help="PNG/JPEG files, folders of them, or an .npz, of the autoencoder's image size"
    )
    a.add_argument("--out", required=True, help="picture: each image beside its reconstruction (.png)")
    a.set_defaults(func=run_autoencode)
