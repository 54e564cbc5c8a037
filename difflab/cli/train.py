"""`difflab train NAME --out RUN`: train a denoiser on one process or, under torchrun, on several.

    difflab train digits --out runs/digits
    difflab train --out runs/digits --resume                       # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m difflab train digits --out runs/digits-ddp

``--resume`` takes the run as it was saved: a NAME or an option that contradicts the saved config is
refused (``--steps`` may extend a run; ``--device``, ``--max-minutes`` and ``--quiet`` are not part of a
run). A worker that torchrun restarted (``--max-restarts``) resumes from the last checkpoint by itself."""

from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

import torch

from ..runs import store as ckpt
from ..viz import plots
from ..latent.space import LATENTS, cached_latents, data_shape, latent_space, load_autoencoder, with_latent
from ..core.conditions import ConditionSpec, class_labels
from ..data.loader import TensorDataset
from ..data.toy2d import make_toy
from ..training.distributed import launched_rank, resolve_device, restarted
from ..sampling.generate import generate
from ..nets.unet import num_parameters
from ..runs.presets import preset_for
from ..core.processes import PROCESSES_BY_NAME
from ..text.encoders import text_condition, with_text
from ..training.loop import PRECISIONS, train
from .data import check_dataset
from .options import UsageError, add_device, positive_float, positive_int, single_thread_for_points, unit_float

# options that set a field of TrainConfig, by argparse name
TRAIN_FIELDS = ("batch_size", "accumulation", "lr", "seed", "ema_decay", "ema_warmup", "precision", "checkpoint_every", "sample_every")


def apply_options(cfg: ckpt.RunConfig, args) -> ckpt.RunConfig:
    """``cfg`` overridden by whatever the command line says (options left out keep cfg's values)."""
    t = replace(cfg.train, **{f: getattr(args, f) for f in TRAIN_FIELDS if getattr(args, f) is not None})
    process = dict(cfg.process)
    if args.process or args.schedule or args.T:
        kind = args.process or process["kind"]
        if args.T and kind != "ddpm":
            raise UsageError("--T applies to the discrete DDPM process only")
        kw = {k: v for k, v in (("schedule", args.schedule), ("T", args.T)) if v}
        if kind == process["kind"]:
            kw = {**{k: v for k, v in process.items() if k != "kind"}, **kw}
        try:
            process = ckpt.process_to_dict(PROCESSES_BY_NAME[kind](**kw))
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
    loss = dict(cfg.loss, **({"weighting": args.weighting} if args.weighting else {}))
    data = dict(cfg.data)
    if args.data:
        data["data_dir"] = args.data
    if args.n:
        if cfg.kind != "points":
            raise UsageError("--n (the number of training points) applies to 2-D sets only")
        data["n"] = args.n
    cfg = replace(cfg, process=process, target=args.target or cfg.target, loss=loss, train=t, data=data)
    if args.cond_dropout is not None and not (args.class_cond or args.text or cfg.conditions):
        raise UsageError("--p-uncond needs a conditional model (--cond class or --text)")
    if cfg.conditions and args.cond_dropout is not None:
        cfg = replace(cfg, conditions=[dict(c, p_drop=args.cond_dropout) for c in cfg.conditions])
    return cfg


def with_class_labels(cfg: ckpt.RunConfig, num_classes: int | None, p_drop: float | None) -> ckpt.RunConfig:
    """The run conditioned on class labels: the U-Net gets a class embedding (plus its null row)."""
    if cfg.net_kind != "unet":
        raise UsageError(f"--cond class needs an image run (a U-Net); {cfg.dataset} trains an {cfg.net_kind.upper()}")
    if not num_classes:
        raise UsageError(f"--cond class needs class labels, and {cfg.dataset} has none (use class subfolders or an npz 'labels' array)")
    spec = class_labels(num_classes, ConditionSpec.p_drop if p_drop is None else p_drop)
    others = [c for c in cfg.conditions if c["name"] != "class_labels"]  # a text condition stays
    return replace(cfg, net=dict(cfg.net, num_classes=num_classes), conditions=[*others, spec.to_dict()])


def with_low_res(cfg: ckpt.RunConfig, factor: int, aug_max: float | None) -> ckpt.RunConfig:
    """The run conditioned on its images downsampled by ``factor`` (SR3, Saharia et al. 2022): the U-Net takes
    the bilinearly upsampled low-resolution image as extra input channels and its augmentation noise level."""
    if cfg.net_kind != "unet":
        raise UsageError(f"--cond low-res needs an image run (a U-Net); {cfg.dataset} trains an {cfg.net_kind.upper()}")
    C, H, W = cfg.shape
    if factor < 2 or H % factor or W % factor:
        raise UsageError(f"--factor {factor} must be at least 2 and divide the image size {H}x{W}")
    aug = ckpt.AUG_MAX if aug_max is None else aug_max
    spec = ConditionSpec("low_res", "tensor", p_drop=0.0)
    return replace(cfg, net=dict(cfg.net, cond_channels=C, low_res_noise=True), conditions=[spec.to_dict()],
                   data=dict(cfg.data, factor=factor, aug_max=aug))


def low_res_of(images, factor: int):
    """uint8 images (N, C, H, W) -> their average-pooled low-resolution versions in the model space (operators.Downsample)."""
    from ..data.images import to_model
    from ..core.operators import Downsample

    op = Downsample(factor, tuple(images.shape[1:]))
    return torch.cat([op(to_model(chunk)) for chunk in images.split(4096)])


def load_training_data(cfg: ckpt.RunConfig, run: Path | None = None, progress: bool = False) -> tuple[TensorDataset, int | None]:
    """The training split as a TensorDataset (images stay uint8; labels as the 'class_labels' condition; for a
    super-resolution run the low-resolution images as 'low_res'; for a latent run the scaled latents, encoded
    once and cached in ``run``), and the number of classes (None when unlabelled)."""
    if cfg.kind == "points":
        return TensorDataset(make_toy(cfg.dataset, cfg.data.get("n", 20000), cfg.data.get("seed", 1))), None
    from ..data.images import load_split

    ds = load_split(cfg, "train")
    if list(ds.images.shape[1:]) != data_shape(cfg):
        raise UsageError(f"{cfg.dataset} holds {tuple(ds.images.shape[1:])} images but the run makes {tuple(data_shape(cfg))}")
    cond = {"class_labels": ds.labels} if ds.labels is not None else {}
    if "text" in cfg.data:
        if ds.captions is None:
            raise UsageError(f"the run reads captions, and {cfg.dataset} has none")
        cond |= text_condition(cfg, ds.captions)
    if "factor" in cfg.data:
        cond["low_res"] = low_res_of(ds.images, cfg.data["factor"])
    space = latent_space(cfg)
    if space is not None:
        return TensorDataset(cached_latents(space, ds.images, run / LATENTS if run else None, progress), cond), ds.num_classes
    return TensorDataset(ds.images, cond), ds.num_classes


def training_captions(cfg: ckpt.RunConfig) -> list[str] | None:
    from ..data.images import load_split

    return load_split(cfg, "train").captions


def _encoder_name(text: dict | str | None) -> str | None:
    """'minilm', 'joint' or 'clip:/absolute/run' for a --text value or a run's text record."""
    if isinstance(text, str):
        return f"clip:{Path(text[5:]).resolve()}" if text.startswith("clip:") else text
    if text is None:
        return None
    return f"clip:{text['run']}" if text["kind"] == "clip" else text["kind"]


def _contradictions(saved: ckpt.RunConfig, args) -> list[str]:
    """What the command line asks for that differs from the saved run (steps aside)."""
    wanted = apply_options(saved, args)
    wanted = replace(wanted, train=replace(wanted.train, steps=saved.train.steps))
    out = []
    if args.name is not None and args.name != saved.dataset:
        out.append(f"NAME {args.name!r} (the run trains {saved.dataset!r})")
    if args.class_cond and not any(c["name"] == "class_labels" for c in saved.conditions):
        out.append("--cond class (the run is not class-conditional)")
    if args.text and _encoder_name(saved.data.get("text")) != _encoder_name(args.text):
        out.append(f"--text {args.text} (the run's encoder: {_encoder_name(saved.data.get('text'))})")
    if args.latent and saved.data.get("latent", {}).get("autoencoder") != str(Path(args.latent).resolve()):
        out.append(f"--latent {args.latent} (the run's autoencoder: {saved.data.get('latent', {}).get('autoencoder')})")
    if (args.cond == "low-res" or args.factor) and saved.data.get("factor") != args.factor:
        out.append(f"--cond low-res --factor {args.factor} (the run's factor: {saved.data.get('factor')})")
    out += [f"{flag} (a resumed run keeps its weights)" for flag, given in (("--init-from", args.init_from), ("--force", args.force)) if given]
    a, b = asdict(saved), asdict(wanted)
    for section in ("train", "loss", "data"):
        out += [f"{section}.{k}={b[section][k]!r} (saved: {a[section].get(k)!r})" for k in b[section] if a[section].get(k) != b[section][k]]
    for key in ("process", "target", "conditions"):
        if a[key] != b[key]:
            out.append(f"{key} {b[key]!r} (saved: {a[key]!r})")
    return out


def run(args) -> None:
    args.class_cond = args.class_cond or args.cond == "class"
    if args.resume and args.cond == "low-res" and args.factor is None:
        args.factor = 4
    out = Path(args.out)
    device = resolve_device(args.device)
    resume = args.resume or (restarted() and ckpt.has_checkpoint(out))
    if resume:
        cfg = ckpt.load_config(out)
        if cfg.net_kind in ckpt.AUTOENCODERS:
            raise UsageError(f"{out} holds an autoencoder: continue it with `difflab train-autoencoder --out {out} --resume`")
        if cfg.net_kind in ckpt.CLASSIFIERS:
            raise UsageError(f"{out} holds a noise-aware classifier: continue it with `difflab train-classifier --out {out} --resume`")
        if cfg.net_kind == "clip":
            raise UsageError(f"{out} holds a CLIP model: continue it with `difflab train-clip --out {out} --resume`")
        if "personalize" in cfg.data:
            raise UsageError(f"{out} is a personalised run: continue it with `difflab personalize --out {out} --resume`")
        bad = _contradictions(cfg, args)
        if bad:
            raise UsageError(f"--resume continues {out} as it was saved; drop {'; '.join(bad)} (or train a new run with --out)")
        if args.steps:  # extend a finished run
            cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
        data, _ = load_training_data(cfg, out, not args.quiet)
    else:
        if args.name is None:
            raise UsageError("give the dataset NAME to train on (or --resume to continue the run in --out)")
        if (out / ckpt.CONFIG).exists() and not args.force and not restarted():  # a restart before any checkpoint starts over
            raise UsageError(f"{out} already holds a run: pass --resume to continue it or --force to start over")
        check_dataset(args.name)
        cfg = apply_options(preset_for(args.name), args)
        if args.steps:
            cfg = replace(cfg, train=replace(cfg.train, steps=args.steps))
        if args.cond == "low-res":
            if args.latent:
                raise UsageError("--cond low-res trains in pixel space; drop --latent (super-resolution in latent space is not built)")
            cfg = with_low_res(cfg, args.factor or 4, args.aug_max)
        elif args.factor or args.aug_max is not None:
            raise UsageError("--factor and --aug-max are for --cond low-res")
        if args.latent:
            try:
                cfg = with_latent(cfg, load_autoencoder(args.latent))
            except ValueError as e:
                raise UsageError(str(e)) from None
        if args.text:
            try:
                cfg = with_text(cfg, args.text, training_captions(cfg), args.cond_dropout)
            except ValueError as e:
                raise UsageError(str(e)) from None
        data, num_classes = load_training_data(cfg, out, not args.quiet)
        if args.class_cond:
            cfg = with_class_labels(cfg, num_classes, args.cond_dropout)
        cfg.validate()
    single_thread_for_points(cfg.kind)
    if not args.quiet and launched_rank() == 0:
        n_params = num_parameters(cfg.build_net())
        t = cfg.train
        print(f"{'resuming' if resume else 'training'} {cfg.dataset}: {cfg.net_kind} with {n_params:,} parameters, "
              f"{t.steps} steps x batch {t.batch_size} per process x {t.accumulation} accumulation, {t.precision}, on {device}")
    preview = partial(_points_preview if cfg.kind == "points" else _images_preview, cfg)
    train(out, cfg, data, device=device, resume=resume, progress=not args.quiet, preview=preview, max_minutes=args.max_minutes,
          init_from=args.init_from)
    if launched_rank() == 0:
        print(f"run written to {out}/ (config.json, checkpoints/, metrics.jsonl, loss.png, samples.png)")


def _points_preview(cfg: ckpt.RunConfig, denoiser, step: int, run: Path) -> None:
    x = generate(denoiser, cfg, 2000, sampler="ddim", steps=50, batch=2000)
    plots.scatter(x, run / "samples.png", title=f"DDIM, 50 steps, step {step}")
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def _images_preview(cfg: ckpt.RunConfig, denoiser, step: int, run: Path) -> None:
    from ..data.images import to_uint8

    if "factor" in cfg.data:  # super-resolution: per test image, its low-resolution input, the model's upscaling, the truth
        from ..data.images import load_split

        test = load_split(cfg, "test").images[:16]
        low = low_res_of(test, cfg.data["factor"])
        x = generate(denoiser, cfg, len(test), sampler="dpmpp-2m", steps=20, cond={"low_res": low}, batch=len(test))
        shown = torch.nn.functional.interpolate(low, scale_factor=cfg.data["factor"], mode="nearest")
        plots.save_grid(torch.stack([to_uint8(shown), to_uint8(x), test], dim=1).reshape(-1, *test.shape[1:]), run / "samples.png", nrow=6)
        plots.loss_curve(run / "metrics.jsonl", run / "loss.png")
        return
    if "text" in cfg.data:  # a text-to-image run: the first 16 training captions, each under its sample
        captions = training_captions(cfg)[:16]
        x = generate(denoiser, cfg, len(captions), sampler="dpmpp-2m", steps=20, cond=text_condition(cfg, captions), batch=16)
        plots.captioned_grid(to_uint8(x), captions, run / "samples.png")
        plots.loss_curve(run / "metrics.jsonl", run / "loss.png")
        return
    cond, nrow = {}, None
    for spec in cfg.condition_specs():  # a class-conditional run: one row of 8 per class
        if spec.name == "class_labels":
            cond["class_labels"] = torch.arange(spec.null_label).repeat_interleave(8)
            nrow = 8
    n = len(cond["class_labels"]) if cond else 64
    x = generate(denoiser, cfg, n, sampler="dpmpp-2m", steps=20, cond=cond, batch=n)
    plots.save_grid(to_uint8(x), run / "samples.png", nrow=nrow)
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def register(sub) -> None:
    t = sub.add_parser("train", help="train a denoiser; a progress bar shows loss, it/s and ETA")
    t.add_argument("name", nargs="?", help="dataset name (its preset sets the defaults); not needed with --resume")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--steps", type=positive_int, help="total optimizer steps (with --resume: extend the run)")
    t.add_argument("--batch-size", type=positive_int, help="per process and micro-batch; the global batch is this x processes x accumulation")
    t.add_argument("--accumulation", type=positive_int, help="gradient accumulation micro-batches")
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--seed", type=int)
    t.add_argument("--ema-decay", type=unit_float)
    t.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="ramp the EMA decay up as min(decay, (1+step)/(10+step)) (default: the preset's choice)")
    t.add_argument("--precision", choices=PRECISIONS, help="bf16 autocast (CPU, CUDA) or fp16 with a gradient scaler (CUDA)")
    t.add_argument("--process", choices=sorted(PROCESSES_BY_NAME))
    t.add_argument("--schedule", help="beta schedule (linear, cosine, sigmoid) or VP/VE schedule")
    t.add_argument("--T", type=positive_int, help="number of DDPM steps")
    t.add_argument("--target", choices=["eps", "x0", "v", "score"])
    t.add_argument("--weighting", choices=["none", "snr", "min_snr"])
    t.add_argument("-n", "--n", type=positive_int, help="2-D sets: number of training points")
    t.add_argument("--data", help="folder holding the dataset's files")
    t.add_argument("--cond", choices=["class", "low-res"],
                   help="class: learn p(x | class) from the data's labels, with a null class for guidance; "
                        "low-res: p(x | its downsampled image), super-resolution (SR3)")
    t.add_argument("--factor", type=positive_int, help="--cond low-res: the downsampling factor (default 4)")
    t.add_argument("--latent", metavar="AE_RUN", help="train in the latent space of this autoencoder run (difflab train-autoencoder)")
    t.add_argument("--text", metavar="ENCODER", help="condition on the captions through minilm (pretrained, frozen), clip:RUN (a "
                   "`difflab train-clip` run, frozen) or joint (a text transformer trained with the U-Net); --p-uncond drops captions")
    t.add_argument("--aug-max", type=unit_float, help="--cond low-res: the largest std of the noise added to low_res in training (default 0.2)")
    t.add_argument("--class-cond", action="store_true", help="the same as --cond class")
    t.add_argument("--p-uncond", "--cond-dropout", dest="cond_dropout", type=unit_float,
                   help="probability of training on the null condition (default 0.1; 0: never, and no classifier-free guidance)")
    t.add_argument("--init-from", help="a run whose EMA weights initialise the network")
    t.add_argument("--checkpoint-every", type=positive_int)
    t.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: at the end only)")
    t.add_argument("--max-minutes", type=positive_float, help="stop (with a checkpoint) after this much wall-clock time")
    add_device(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run)
