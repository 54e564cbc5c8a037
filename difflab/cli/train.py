"""`difflab train NAME --out RUN`: train a denoiser on one process or, under torchrun, on several.

    difflab train digits --out runs/digits
    difflab train --out runs/digits --resume                       # continue exactly where it stopped
    torchrun --nproc-per-node 2 -m difflab train digits --out runs/digits-ddp

``--resume`` takes the run as it was saved: a NAME or an option that contradicts the saved config is
refused (``--steps`` may extend a run; ``--device``, ``--max-minutes``, ``--compile`` and ``--quiet`` are not
part of a run). A worker that torchrun restarted (``--max-restarts``) resumes from the last checkpoint by itself."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import fields, replace
from functools import partial
from pathlib import Path

from ..core.losses import OBJECTIVES
from ..core.processes import PROCESSES_BY_NAME, LearnedVP, has_parameters, process_name
from ..data.augment import AUGMENT_DIMS
from ..data.pairs import CAPTION_WORDS, MAX_CAPTION_VARIANTS
from ..evaluation.features import features_spec
from ..evaluation.watch import DEFAULT_N as DEFAULT_EVAL_N
from ..evaluation.watch import TrainingEval, features_record
from ..export.card import write_model_card
from ..latent.autoencoder import latent_record, load_autoencoder
from ..nets.unet import num_parameters
from ..runs.config import AUGMENTS, PRECISIONS, RunConfig
from ..runs.data import load_split, training_captions, training_data
from ..runs.diffusion import DIFFUSION, preview
from ..runs.lifecycle import begin
from ..runs.presets import (
    NET_SIZES,
    PRESETS,
    check_dataset,
    preset_for,
    size_for_budget,
    with_class_labels,
    with_edm_augment,
    with_latent,
    with_low_res,
    with_net_size,
    with_text,
)
from ..text.encoders import reads_any_word, text_record
from ..training.distributed import launched_rank, resolve_device, teardown
from ..training.loop import describe_precision, train
from ..training.trackers import TRACKERS, make_tracker, saved_kind
from .options import UsageError, add_device, positive_float, positive_int, single_thread_for_points, unit_float

# options that set a field of TrainConfig, by argparse name
TRAIN_FIELDS = (
    "batch_size",
    "accumulation",
    "lr",
    "seed",
    "ema_decay",
    "ema_warmup",
    "precision",
    "checkpoint_every",
    "sample_every",
    "eval_every",
    "augment",
    "caption_variants",
    "caption_words",
)


EVAL_DEFAULT = -1  # --eval-every given without N
DEFAULT_EVAL_EVERY = (
    1000  # steps: 256 samples cost 6.1 % of the 32x32 colour folder preset's training (benchmarks/README.md)
)


def apply_options(cfg: RunConfig, args) -> RunConfig:
    """``cfg`` overridden by whatever the command line says (options left out keep cfg's values)."""
    t = replace(cfg.train, **{f: getattr(args, f) for f in TRAIN_FIELDS if getattr(args, f) is not None})
    if t.eval_every == EVAL_DEFAULT:
        t = replace(t, eval_every=DEFAULT_EVAL_EVERY)
    process = cfg.process
    if args.process or args.schedule or args.T:
        kind = args.process or process_name(process)
        schedule = args.schedule
        if schedule == "learned":  # VDM's learned schedule is a process of its own
            if kind not in ("vp", "learned", "ddpm") or (args.process and kind == "ddpm"):
                raise UsageError(
                    "--schedule learned is a variance-preserving process in continuous time (--process vp)"
                )
            kind, schedule = "learned", None
        if args.T and kind != "ddpm":
            raise UsageError("--T applies to the discrete DDPM process only")
        kw = {k: v for k, v in (("schedule", schedule), ("T", args.T)) if v}
        try:
            process = replace(process, **kw) if kind == process_name(process) else PROCESSES_BY_NAME[kind](**kw)
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None
    if args.schedule_ends:
        if not isinstance(process, LearnedVP):
            raise UsageError("--schedule-ends applies to a learned schedule (--process vp --schedule learned)")
        process = replace(process, learn_endpoints=args.schedule_ends == "learned")
    loss = replace(cfg.loss, weighting=args.weighting) if args.weighting else cfg.loss
    objective = args.objective or (
        "vlb" if has_parameters(process) else "hybrid" if args.variance == "learned" else None
    )
    if objective:
        loss = replace(loss, objective=objective)
    data = cfg.data
    if args.data:
        data = replace(data, data_dir=args.data)
    if args.n:
        if cfg.data_kind != "points":
            raise UsageError("--n (the number of training points) applies to 2-D sets only")
        data = replace(data, n=args.n)
    cfg = replace(cfg, process=process, target=args.target or cfg.target, loss=loss, train=t, data=data)
    if args.cond_dropout is not None and not (args.class_cond or args.text or cfg.conditions):
        raise UsageError("--p-uncond needs a conditional model (--cond class or --text)")
    if cfg.conditions and args.cond_dropout is not None:
        cfg = replace(cfg, conditions=[replace(c, p_drop=args.cond_dropout) for c in cfg.conditions])
    return cfg


def with_network_options(cfg: RunConfig, args) -> RunConfig:
    """``cfg``'s network with --variance learned (twice the output channels), its U-Net with --position and
    --attention-at (after the variants, which size the U-Net)."""
    if args.variance == "learned":
        out = 2 * cfg.shape[0]
        net = replace(cfg.net, out_dim=out) if cfg.net_kind == "mlp" else replace(cfg.net, out_channels=out)
        cfg = replace(cfg, net=net, variance="learned")
    if not (args.position or args.attention_at):
        return cfg
    if cfg.net_kind != "unet":
        raise UsageError(
            f"--position and --attention-at need an image run (a U-Net); {cfg.dataset} trains an {cfg.net_kind.upper()}"
        )
    changes = {}
    if args.position:
        changes |= {
            "coord_channels": args.position in ("coords", "both"),
            "query_positions": args.position in ("queries", "both"),
        }
    if args.attention_at:
        changes["attention_resolutions"] = tuple(args.attention_at)
    try:
        return replace(cfg, net=replace(cfg.net, **changes))
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0]) from None


def _encoder_name(text) -> str | None:
    """'minilm', 'joint' or 'clip:/absolute/run' for a --text value or a run's text record."""
    if isinstance(text, str):
        return f"clip:{Path(text[5:]).resolve()}" if text.startswith("clip:") else text
    if text is None:
        return None
    return f"clip:{text.run}" if text.kind == "clip" else text.kind


def _contradictions(saved: RunConfig, args) -> list[str]:
    """What the command line asks for that differs from the saved run (steps aside)."""
    wanted = apply_options(saved, args)
    wanted = replace(wanted, train=replace(wanted.train, steps=saved.train.steps))
    out = []
    if args.name is not None and args.name != saved.dataset:
        out.append(f"NAME {args.name!r} (the run trains {saved.dataset!r})")
    if args.class_cond and saved.num_classes is None:
        out.append("--cond class (the run is not class-conditional)")
    if args.text and _encoder_name(saved.text) != _encoder_name(args.text):
        out.append(f"--text {args.text} (the run's encoder: {_encoder_name(saved.text)})")
    saved_ae = saved.latent.autoencoder if saved.latent else None
    if args.latent and saved_ae != str(Path(args.latent).resolve()):
        out.append(f"--latent {args.latent} (the run's autoencoder: {saved_ae})")
    saved_factor = saved.super_resolution.factor if saved.super_resolution else None
    if (args.cond == "low-res" or args.factor) and saved_factor != (args.factor or 4):
        out.append(f"--cond low-res --factor {args.factor} (the run's factor: {saved_factor})")
    out += [
        f"{flag} (a resumed run keeps its weights)"
        for flag, given in (("--init-from", args.init_from), ("--force", args.force))
        if given
    ]
    out += [
        f"{flag} (a resumed run keeps its network)"
        for flag, given in (("--position", args.position), ("--attention-at", args.attention_at), ("--net", args.net))
        if given
    ]
    for section in ("train", "loss", "data"):
        a, b = getattr(saved, section), getattr(wanted, section)
        out += [
            f"{section}.{f.name}={getattr(b, f.name)!r} (saved: {getattr(a, f.name, None)!r})"
            for f in fields(b)
            if getattr(a, f.name, None) != getattr(b, f.name)
        ]
    if saved.features is not None:
        if args.features and features_spec(args.features, saved.dataset) != saved.features.net:
            out.append(f"--features {args.features} (the run is measured with {saved.features.net})")
        if args.eval_n and args.eval_n != saved.features.eval_n:
            out.append(f"--eval-n {args.eval_n} (saved: {saved.features.eval_n})")
    if args.variance and args.variance != saved.variance:
        out.append(f"--variance {args.variance} (saved: {saved.variance})")
    for key in ("process", "target", "conditions"):
        if getattr(saved, key) != getattr(wanted, key):
            out.append(f"{key} {getattr(wanted, key)!r} (saved: {getattr(saved, key)!r})")
    return out


def new_config(args) -> RunConfig:
    """The run the command line describes: the dataset's preset with the options and the variants."""
    if args.name is None:
        raise UsageError("give the dataset NAME to train on (or --resume to continue the run in --out)")
    check_dataset(args.name)
    cfg = apply_options(preset_for(args.name), args)
    if args.cond == "low-res":
        if args.latent:
            raise UsageError(
                "--cond low-res trains in pixel space; drop --latent (super-resolution in latent space is not built)"
            )
        cfg = with_low_res(cfg, args.factor or 4, args.aug_max)
    elif args.factor or args.aug_max is not None:
        raise UsageError("--factor and --aug-max are for --cond low-res")
    if args.latent:
        space = load_autoencoder(args.latent)
        cfg = with_latent(cfg, latent_record(space), space.latent_shape)
    if args.caption_variants and not args.text:
        raise UsageError(f"--caption-variants {args.caption_variants} rephrases a text run's captions: give --text")
    if args.caption_words not in (None, "dataset") and not args.caption_variants:
        raise UsageError(
            f"--caption-words {args.caption_words} says the caption variants in other words: give --caption-variants K"
        )
    if args.text:
        split = load_split(cfg, "train")
        captions = split.every_caption()
        if not captions:
            raise UsageError(
                f"--text needs captions, and {cfg.dataset} has none (a folder with a metadata.jsonl, an .npz with "
                "'captions', or fashion-pairs)"
            )
        record, width, joint = text_record(args.text, training_captions(cfg, split)[1])  # variants' lengths too
        cfg = with_text(cfg, record, width, joint.to_dict() if joint else None, args.cond_dropout)
        if cfg.train.caption_variants and record.kind == "clip" and not reads_any_word(cfg):
            raise UsageError(
                f"--caption-variants: the tower of {args.text} reads only its training captions' words, and the "
                "variants are other phrasings; give a tower that reads any wording (train-clip --init minilm), "
                "--text minilm or --text joint"
            )
    if args.class_cond:
        cfg = with_class_labels(
            cfg, load_split(cfg, "train").num_classes if cfg.data_kind == "images" else None, args.cond_dropout
        )
    cfg = with_network_options(cfg, args)
    size = args.net
    if size is None and args.max_minutes and args.name not in PRESETS and cfg.net_kind == "unet":
        size, budget = size_for_budget(args.max_minutes)  # a folder run on a budget: the size measured best for it
        args.budget_note = (
            f"--max-minutes {args.max_minutes:g}: the {size} U-Net, "
            + (
                f"measured best after {budget:g} CPU-minutes on a 32x32 folder (benchmarks/README.md)"
                if budget is not None
                else "the preset's (no budget near this one was measured)"
            )
            + "; it stops then with a checkpoint (--resume continues)"
        )
    if size is not None:
        cfg = with_net_size(cfg, size)
    if cfg.train.augment in AUGMENT_DIMS:
        cfg = with_edm_augment(cfg, cfg.train.augment)
    if cfg.train.eval_every or args.features:
        cfg = replace(cfg, features=features_record(cfg, args.features, args.eval_n))
    elif args.eval_n is not None:
        raise UsageError("--eval-n is the samples of --eval-every; add --eval-every")
    try:
        cfg.validate()
    except ValueError as e:
        raise UsageError(str(e).removeprefix("config: ")) from None
    return cfg


def run(args) -> None:
    args.class_cond = args.class_cond or args.cond == "class"
    out = Path(args.out)
    device = resolve_device(args.device)
    asked = make_tracker(args.tracker) if args.tracker else None  # a missing package refused before anything is written
    cfg, resume = begin(
        out, DIFFUSION, resume=args.resume, force=args.force, fresh=lambda: new_config(args), steps=args.steps
    )
    if resume and args.resume:
        bad = _contradictions(cfg, args)
        if bad:
            raise UsageError(
                f"--resume continues {out} as it was saved; drop {'; '.join(bad)} (or train a new run with --out)"
            )
    tracker = asked or make_tracker(saved_kind(out) if resume else "none")
    evaluator = None
    if cfg.train.eval_every and launched_rank() == 0:
        legacy = cfg.features is None  # a run started before runs recorded their feature net
        evaluator = TrainingEval(
            cfg,
            args.eval_n if legacy else None,
            features=args.features if legacy else None,
            progress=not args.quiet,
        )
    data = training_data(cfg, out, not args.quiet and launched_rank() == 0)  # one progress bar, not one per rank
    single_thread_for_points(cfg.data_kind)
    if not args.quiet and launched_rank() == 0:
        t = cfg.train
        print(
            f"{'resuming' if resume else 'training'} {cfg.dataset}: {cfg.net_kind} with "
            f"{num_parameters(cfg.build_net()):,} parameters, "
            f"{t.steps} steps x batch {t.batch_size} per process x {t.accumulation} accumulation, "
            f"{describe_precision(t.precision, device)}, on {device}"
        )
        if getattr(args, "budget_note", None):
            print(args.budget_note)
    train(
        out,
        cfg,
        data,
        device=device,
        resume=resume,
        progress=not args.quiet,
        preview=partial(preview_and_track, cfg=cfg, tracker=tracker) if args.preview else None,
        max_minutes=args.max_minutes,
        init_from=args.init_from,
        compile=args.compile,
        tracker=tracker,
        evaluator=evaluator,
    )
    teardown()  # the ranks leave together before rank 0 writes the card (a rank kept waiting in gloo may abort)
    if launched_rank() == 0:
        # a resumed run keeps the command its card recorded when it started
        command = None if resume else "difflab " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
        write_model_card(out, command=command)
        print(f"run written to {out}/ (config.json, checkpoints/, metrics.jsonl, loss.png, samples.png, README.md)")


def preview_and_track(ema, step: int, run: Path, cfg: RunConfig, tracker) -> None:
    """The run's pictures (runs/diffusion.py preview), the sample grid also sent to the tracker."""
    preview(ema, step, run, cfg)
    tracker.image(step, "samples", run / "samples.png")


def register(sub) -> None:
    t = sub.add_parser("train", help="train a denoiser; a progress bar shows loss, it/s and ETA")
    t.add_argument("name", nargs="?", help="dataset name (its preset sets the defaults); not needed with --resume")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--steps", type=positive_int, help="total optimizer steps (with --resume: extend the run)")
    t.add_argument(
        "--batch-size",
        type=positive_int,
        help="per process and micro-batch; the global batch is this x processes x accumulation",
    )
    t.add_argument("--accumulation", type=positive_int, help="gradient accumulation micro-batches")
    t.add_argument("--lr", type=positive_float)
    t.add_argument("--seed", type=int)
    t.add_argument("--ema-decay", type=unit_float)
    t.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ramp the EMA decay up as min(decay, (1+step)/(10+step)) (default: the preset's choice)",
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bf16 autocast (CPU, CUDA), fp16 with a gradient scaler (CUDA), or auto: bf16 where the device computes "
        "it natively (GPU, AVX-512/AMX CPU), else fp32 (the image presets' default)",
    )
    t.add_argument("--process", choices=sorted(PROCESSES_BY_NAME))
    t.add_argument(
        "--schedule",
        help="beta schedule (linear, cosine, sigmoid) or VP/VE schedule; learned: VDM's learned schedule (a vp "
        "process trained on the bound)",
    )
    t.add_argument(
        "--schedule-ends",
        choices=["learned", "fixed"],
        help="--schedule learned: whether gamma_min and gamma_max (the log-SNR's ends, which alone set the bound) "
        "are trained too (default learned, VDM's choice) or kept at -13.3 and 5",
    )
    t.add_argument("--T", type=positive_int, help="number of DDPM steps")
    t.add_argument("--target", choices=["eps", "x0", "v", "score"])
    t.add_argument("--weighting", choices=["none", "snr", "min_snr"])
    t.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="simple (default), hybrid (L_simple + L_vlb, for --variance learned) or vlb (the continuous-time bound "
        "of a vp process; the default for --schedule learned); see docs/likelihood.md",
    )
    t.add_argument(
        "--variance",
        choices=["fixed", "learned"],
        help="learned: the network also predicts the reverse variance (iDDPM; trained with --objective hybrid)",
    )
    t.add_argument("-n", "--n", type=positive_int, help="2-D sets: number of training points")
    t.add_argument("--data", help="folder holding the dataset's files")
    t.add_argument(
        "--cond",
        choices=["class", "low-res"],
        help="class: learn p(x | class) from the data's labels, with a null class for guidance; "
        "low-res: p(x | its downsampled image), super-resolution (SR3)",
    )
    t.add_argument("--factor", type=positive_int, help="--cond low-res: the downsampling factor (default 4)")
    t.add_argument(
        "--latent",
        metavar="AE_RUN",
        help="train in the latent space of this autoencoder run (difflab train-autoencoder)",
    )
    t.add_argument(
        "--text",
        metavar="ENCODER",
        help="condition on the captions through minilm (pretrained, frozen), clip:RUN (a "
        "`difflab train-clip` run, frozen) or joint (a text transformer trained with the U-Net); --p-uncond drops "
        "captions",
    )
    t.add_argument(
        "--aug-max",
        type=unit_float,
        help="--cond low-res: the largest std of the noise added to low_res in training (default 0.2)",
    )
    t.add_argument("--class-cond", action="store_true", help="the same as --cond class")
    t.add_argument(
        "--p-uncond",
        "--cond-dropout",
        dest="cond_dropout",
        type=unit_float,
        help="probability of training on the null condition (default 0.1; 0: never, and no classifier-free guidance)",
    )
    t.add_argument(
        "--position",
        choices=["none", "coords", "queries", "both"],
        help="where the U-Net knows it is: coordinate channels at its input, a 2-D encoding added to the "
        "cross-attention queries, both",
    )
    t.add_argument(
        "--attention-at",
        type=positive_int,
        nargs="+",
        metavar="SIZE",
        help="the feature-map heights where (self- and cross-) attention runs (default: the preset's)",
    )
    t.add_argument("--init-from", help="a run whose EMA weights initialise the network")
    t.add_argument("--checkpoint-every", type=positive_int)
    t.add_argument("--sample-every", type=int, help="write a sample grid every N steps (0: at the end only)")
    t.add_argument(
        "--eval-every",
        type=int,
        nargs="?",
        const=EVAL_DEFAULT,
        metavar="N",
        help=f"every N steps (N left out: {DEFAULT_EVAL_EVERY}) and at the end: FD and KID of "
        "--eval-n samples in the run's feature net, and the distance of samples to their nearest training image "
        "(memorisation); the best EMA is kept as RUN/best (0: never, the default)",
    )
    t.add_argument(
        "--eval-n",
        type=positive_int,
        help=f"samples per --eval-every (default {DEFAULT_EVAL_N}; recorded in the run)",
    )
    t.add_argument(
        "--features",
        help="the run's feature net, for --eval-every and `difflab eval RUN`: a .safetensors from `difflab features "
        "train` (e.g. a folder's instance net), a built-in name or random (default: the shipped classifier of a "
        "built-in set, else random); recorded in the run, refused if trained on other images",
    )
    t.add_argument(
        "--augment",
        choices=AUGMENTS,
        help="flip: mirror each training image left-right with probability 1/2 (refused where a flip changes the "
        "meaning: digits, fashion-pairs' sides, latent runs); edm: EDM's non-leaking augmentation, its pixel-exact "
        "transforms (flips, quarter turns, whole-pixel translations, each with probability 0.12, the network told "
        "which; pixel-space runs); edm-geometric: EDM's CIFAR-10 set (half the images mirrored, then y-flip, "
        "scaling, any rotation, anisotropic scaling and sub-pixel translation, each with probability 0.12)",
    )
    t.add_argument(
        "--caption-variants",
        type=int,
        choices=range(0, MAX_CAPTION_VARIANTS + 1),
        metavar="K",
        help="a fashion-pairs text run: each training image is also seen with K captions (0-8) of its attributes in "
        "other phrasings (data.pairs.AUGMENT_PHRASINGS; never those of eval's new phrasings and reworded); default 0",
    )
    t.add_argument(
        "--caption-words",
        choices=CAPTION_WORDS,
        help="the caption variants' colour and item words: the dataset's (default), synonyms (data.pairs.SYNONYMS) "
        "or typos (misspelt by one letter 3 times in 4, data.pairs.typo); never the unseen words the figures measure",
    )
    t.add_argument(
        "--tracker",
        choices=TRACKERS,
        help="also log scalars, sample grids and the config to TensorBoard (RUN/tensorboard) or wandb (RUN/wandb, "
        "offline unless WANDB_MODE=online or logged in); a resumed run keeps its tracker (default none)",
    )
    t.add_argument(
        "--preview",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="samples.png and loss.png while training (default)",
    )
    t.add_argument(
        "--max-minutes",
        type=positive_float,
        help="stop (with a checkpoint) after this much wall-clock time; a new folder run without --net takes the "
        "U-Net size measured best for that budget (the start line says which)",
    )
    t.add_argument(
        "--net",
        choices=list(NET_SIZES),
        help="the preset U-Net with half (small) or twice (large) its channels (default medium: the preset)",
    )
    t.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the network (a minute or more of compiling first; needs a C compiler on the CPU); "
        "not part of the run: resume with or without it",
    )
    add_device(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=run)
