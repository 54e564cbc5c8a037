"""`difflab personalize RUN --images DIR --class-word WORD --method M --out OUT`: teach a text-to-image run
one subject from a few captioned images (difflab/personalize.py; docs/personalize.md).

    difflab personalize runs/t2i --images my-sneaker/ --token sks --class-word sneaker --method lora --out runs/my-
    sneaker
    difflab personalize --out runs/my-sneaker --resume
    difflab sample runs/t2i --lora runs/my-sneaker --lora-scale 0.8 --prompt "a red sks sneaker on the left and a blue
    bag on the right"

DIR holds the subject's images, each of the run's image size, with a metadata.jsonl of captions that name
the subject by the identifier next to its class word ("a red sks sneaker on the left and ..."); without one
every image is captioned "a sks sneaker"."""

from __future__ import annotations

from pathlib import Path

from ..data.pairs import make_subject, write_subject
from ..nets.lora import LORA_MODULES, LoraSpec
from ..personalize.adapters import ADAPTER
from ..personalize.method import DEFAULTS, METHODS, PERSONALIZED, personalize
from ..runs.config import PRIOR_PROMPTS, Personalization, load_config
from ..runs.lifecycle import begin
from ..training.distributed import launched_rank, resolve_device
from .options import UsageError, add_device, positive_float, positive_int, say_unfinished, unit_float

# the options recorded in the run's Personalization (left out: its default)
RECORDED = ("token", "prior_weight", "class_images", "class_guidance", "prior_prompts", "caption_dropout", "vectors")
SETTINGS = (
    "run",
    "images",
    "method",
    "class_word",
    *RECORDED,
    "rank",
    "alpha",
    "modules",
    "steps",
    "lr",
    "batch_size",
)


def new_personalization(args) -> Personalization:
    missing = [
        f
        for f, v in (
            ("RUN", args.run),
            ("--images", args.images),
            ("--method", args.method),
            ("--class-word", args.class_word),
        )
        if v is None
    ]
    if missing:
        raise UsageError(f"give {', '.join(missing)} (or --resume to continue the run in --out)")
    if args.method != "lora" and (args.rank or args.alpha or args.modules):
        raise UsageError("--rank, --alpha and --modules are for --method lora")
    if args.method == "textual-inversion" and (args.prior_weight or args.prior_prompts):
        raise UsageError(
            "textual inversion trains only the identifier's embedding: the class word cannot drift, so it takes no "
            + ("--prior-weight" if args.prior_weight else "--prior-prompts")
        )
    return Personalization(
        args.method,
        args.class_word,
        **{k: getattr(args, k) for k in RECORDED if getattr(args, k) is not None},
    )


def run(args) -> None:
    out = Path(args.out)
    device = resolve_device(args.device)
    fixed = [("RUN" if k == "run" else f"--{k.replace('_', '-')}") for k in SETTINGS if getattr(args, k) is not None]
    p = None
    _, resume = begin(out, PERSONALIZED, resume=args.resume, force=args.force, fresh=lambda: None, fixed=fixed)
    if not resume:
        p = new_personalization(args)
    lora = (
        LoraSpec(
            **{
                k: v
                for k, v in (
                    ("rank", args.rank),
                    ("alpha", args.alpha),
                    ("targets", args.modules and LORA_MODULES[args.modules]),
                )
                if v is not None
            }
        )
        if args.method == "lora"
        else None
    )
    personalize(
        args.run,
        args.images,
        out,
        p,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size or 8,
        lora=lora,
        resume=resume,
        device=device,
        progress=not args.quiet,
        max_minutes=args.max_minutes,
    )
    if launched_rank() != 0:
        return
    cfg = load_config(out)
    p = cfg.personalize
    if say_unfinished(out, cfg, "personalize"):
        return
    example = p.captions[0]
    if p.method == "lora":
        size = (out / ADAPTER).stat().st_size
        print(
            f"adapter written to {out}/{ADAPTER} ({size / 1024:.0f} KiB); use it over the base run with "
            f"`difflab sample {p.base} --lora {out} --lora-scale 1 --prompt {example!r}`"
        )
    print(
        f"personalised run written to {out}/ (samples.png shows the subject's captions and their class prompts); "
        f"sample it with `difflab sample {out} --guidance 3 --prompt {example!r}`"
    )


def run_subject(args) -> None:
    subject = make_subject(args.class_word, args.n, args.token, args.seed)
    write_subject(subject, args.out)
    print(
        f"wrote {len(subject.images)} images of test item {subject.item} (a {args.class_word}) and their captions to "
        f"{args.out}/ "
        f"(e.g. {subject.captions[0]!r})"
    )


def register(sub) -> None:
    s = sub.add_parser(
        "subject", help="write a personalisation subject: one unseen fashion-pairs item in a few captioned images"
    )
    s.add_argument("--class-word", required=True, help="its class (sneaker, bag, ...)")
    s.add_argument("--token", default="sks", help="the identifier in the captions (default sks)")
    s.add_argument("-n", "--n", type=positive_int, default=4, help="images, one per tint (default 4)")
    s.add_argument("--seed", type=int, default=0, help="which item (default 0)")
    s.add_argument("--out", required=True, help="folder to write (PNGs and metadata.jsonl)")
    s.set_defaults(func=run_subject)
    p = sub.add_parser(
        "personalize",
        help="teach a text-to-image run a subject from a few images (DreamBooth, LoRA, textual inversion)",
    )
    p.add_argument("run", nargs="?", help="the trained text-to-image run to personalise (not needed with --resume)")
    p.add_argument("--images", help="folder of the subject's images (3 to 5), captioned in its metadata.jsonl")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--class-word", help="the subject's class, as the captions say it (e.g. sneaker)")
    p.add_argument("--token", help="the identifier naming the subject in the captions (default sks)")
    p.add_argument("--out", required=True, help="the personalised run's directory")
    g = p.add_argument_group("prior preservation (dreambooth, lora)")
    g.add_argument(
        "--prior-weight",
        type=float,
        help="lambda, the weight of the class images' loss (default 1; 0: plain fine-tuning)",
    )
    g.add_argument(
        "--class-images",
        type=positive_int,
        help="class images the base model draws once, cached in the run (default 64)",
    )
    g.add_argument(
        "--class-guidance",
        type=positive_float,
        help="their guidance scale (default 1: the base's own conditional law, which the term preserves)",
    )
    g.add_argument(
        "--prior-prompts",
        choices=PRIOR_PROMPTS,
        help="what the class images are drawn for: the subject's captions without the identifier (subject, "
        "default), or captions of the base's training data that name the class word (data)",
    )
    g.add_argument(
        "--caption-dropout", type=unit_float, help="the captions' dropout while personalising (default: the base run's)"
    )
    g.add_argument(
        "--vectors",
        type=positive_int,
        help="textual inversion: embedding vectors for the identifier (default 8 through a pretrained CLIP tower, "
        "1 in a joint encoder)",
    )
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=positive_int, help="adapter rank r (default 8)")
    g.add_argument("--alpha", type=positive_float, help="adapter alpha: the update is (alpha / r) B A (default 8)")
    g.add_argument(
        "--modules",
        choices=list(LORA_MODULES),
        help="which of the U-Net's projections take adapters: every attention projection (default), the "
        "self-attention's (self), the cross-attention's (cross), or its keys and values alone (cross-kv)",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--steps",
        type=positive_int,
        help="optimizer steps (default: " + ", ".join(f"{m} {s}" for m, (s, _) in DEFAULTS.items()) + ")",
    )
    g.add_argument(
        "--lr",
        type=positive_float,
        help="learning rate (default: " + ", ".join(f"{m} {lr:g}" for m, (_, lr) in DEFAULTS.items()) + ")",
    )
    g.add_argument(
        "--batch-size",
        type=positive_int,
        help="subject rows per step, the images repeated (default 8; as many class rows)",
    )
    g.add_argument("--resume", action="store_true")
    g.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    g.add_argument("--max-minutes", type=positive_float)
    add_device(g)
    g.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
