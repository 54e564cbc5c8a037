"""Train, measure and ship the models that come ready in the package (issue 23; runs/shipped.py).

Each model is trained by the project's own commands (recorded in its recipe), resumed where a run stopped,
measured with `difflab eval`'s evaluate, and copied into difflab/shipped/NAME by runs.ship.ship (EMA
weights only; a model on another records it by shipped name and fingerprint):

    fashion-pairs-ae          the KL autoencoder of fashion-pairs (factor 4, 4 latent channels)
    fashion-pairs-clip        a CLIP of fashion-pairs (attention pool, side hard negatives): a text encoder
    fashion-pairs-t2i-words   latent text-to-image on the autoencoder, captions through fashion-pairs-clip's text
                              tower (the training captions' words; the flagship's name until issue 32)
    fashion-pairs-t2i-minilm  the same on frozen MiniLM captions
    fashion-pairs-clip-minilm a CLIP whose text tower is MiniLM tuned by LoRA with 4 caption variants (issue 32),
                              then 300 more steps with label phrasings and colour hard negatives
    fashion-pairs-t2i         the flagship: latent text-to-image on the autoencoder, captions through
                              fashion-pairs-clip-minilm's text tower: any wording, personalisable (DreamBooth, LoRA,
                              textual inversion); 6000 steps on the first tower, then 2000 on the second
    fashion-mnist-classes     class-conditional Fashion-MNIST (pixel space)

    .venv/bin/python benchmarks/ship_models.py [--models NAME ...] [--t2i-steps N] [--words-steps N]
    [--classes-steps N] [--clip-minilm-tune-steps N] [--t2i-tune-steps N] [--n 300] [--device cuda]

A model's recipe is a chain of commands (stages): each later stage starts from the run before it (--init-from);
the last stage's run is the one shipped, and the training time is the sum. A finished stage is not retrained: after
changing an earlier stage's steps, delete the later stages' runs.

Runs live in benchmarks/runs/ship/; the figures go into each recipe and benchmarks/results/shipped.json. A
model whose run is not finished is trained first (hours on 2 CPU cores: give fewer steps to try it)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, trained  # noqa: E402
from difflab.data.images import load_images  # noqa: E402
from difflab.evaluation.checks import check_settings, write_check  # noqa: E402
from difflab.evaluation.evaluate import evaluate  # noqa: E402
from difflab.evaluation.features import embed, load_feature_net  # noqa: E402
from difflab.evaluation.prompts import follows, parsed  # noqa: E402
from difflab.guidance.config import GuidanceConfig  # noqa: E402
from difflab.latent.autoencoder import LATENT, RECONSTRUCTION, rebased  # noqa: E402
from difflab.runs import shipped  # noqa: E402
from difflab.runs.ship import ship  # noqa: E402
from difflab.runs.store import weights_step  # noqa: E402
from difflab.text.clip import (  # noqa: E402
    CLIP_REPORT,
    ClipRun,
    clip_figures,
    clip_report,
    unseen_phrasing_swaps,
)
from difflab.text.encoders import rebased_text  # noqa: E402

ROOT = RUNS / "ship"
REL = str(ROOT.relative_to(ROOT.parent.parent.parent))  # the run folders as the recipes record them
MODELS = (
    "fashion-pairs-ae",
    "fashion-pairs-clip",
    "fashion-pairs-t2i-words",
    "fashion-pairs-t2i-minilm",
    "fashion-mnist-classes",
    "fashion-pairs-clip-minilm",
    "fashion-pairs-t2i",
)
NEEDS = {
    "fashion-pairs-t2i-words": ("fashion-pairs-ae", "fashion-pairs-clip"),
    "fashion-pairs-t2i-minilm": ("fashion-pairs-ae",),
    "fashion-pairs-t2i": ("fashion-pairs-ae", "fashion-pairs-clip-minilm"),
}
# fashion-pairs-clip-minilm's tower, the same in both stages (check_init_from refuses another)
CLIP_MINILM = ["train-clip", "fashion-pairs", "--init", "minilm", "--tune", "lora", "--caption-variants", "4"]
CLIP_OF = {"fashion-pairs-t2i-words": "fashion-pairs-clip", "fashion-pairs-t2i": "fashion-pairs-clip-minilm"}


def commands(args) -> dict[str, list[list[str]]]:
    """Each model's training commands (difflab's argv, one per stage, the last one's run shipped), with the run
    folders relative to the repository."""
    base = base_commands(args)
    return {name: [argv] for name, argv in base.items()} | {
        "fashion-pairs-clip-minilm": [
            base["fashion-pairs-clip-minilm"],
            [  # the colon phrasing's colours (docs/text.md): label phrasings, either side first, + colour twins
                *CLIP_MINILM,
                "--caption-phrasings",
                "sides+labels",
                "--hard-negatives",
                "sides+colours",
                "--init-from",
                f"{REL}/clip-minilm",
                "--lr",
                "3e-4",
                "--out",
                f"{REL}/clip-minilm-labels",
                "--steps",
                str(args.clip_minilm_tune_steps),
                *device(args),
            ],
        ],
        "fashion-pairs-t2i": [
            base["fashion-pairs-t2i"],
            [  # the same model on the second tower's token states
                "train",
                "fashion-pairs",
                "--latent",
                "fashion-pairs-ae",
                "--text",
                f"clip:{REL}/clip-minilm-labels",
                "--init-from",
                f"{REL}/t2i-open",
                "--out",
                f"{REL}/t2i-labels",
                "--batch-size",
                str(args.t2i_batch),
                "--steps",
                str(args.t2i_tune_steps),
                *device(args),
            ],
        ],
    }


def base_commands(args) -> dict[str, list[str]]:
    """Each model's first training command (difflab's argv)."""
    return {
        "fashion-pairs-ae": ["train-autoencoder", "fashion-pairs", "--out", f"{REL}/ae", "--steps", str(args.ae_steps)],
        "fashion-pairs-clip": [
            "train-clip",
            "fashion-pairs",
            "--out",
            f"{REL}/clip",
            "--steps",
            str(args.clip_steps),
            *device(args),
        ],
        "fashion-pairs-t2i-words": [
            "train",
            "fashion-pairs",
            "--latent",
            f"{REL}/ae",
            "--text",
            f"clip:{REL}/clip",
            "--out",
            f"{REL}/t2i-clip",
            "--batch-size",
            "256",
            "--steps",
            str(args.words_steps),
            *device(args),
        ],
        "fashion-pairs-t2i-minilm": [
            "train",
            "fashion-pairs",
            "--latent",
            f"{REL}/ae",
            "--text",
            "minilm",
            "--out",
            f"{REL}/t2i",
            "--steps",
            str(args.minilm_steps),
        ],
        "fashion-pairs-clip-minilm": [
            *CLIP_MINILM,
            "--out",
            f"{REL}/clip-minilm",
            "--steps",
            str(args.clip_minilm_steps),
            *device(args),
        ],
        "fashion-pairs-t2i": [
            "train",
            "fashion-pairs",
            "--latent",
            "fashion-pairs-ae",  # the shipped one: the model reads the latents users get
            "--text",
            f"clip:{REL}/clip-minilm",
            "--out",
            f"{REL}/t2i-open",
            "--batch-size",
            str(args.t2i_batch),
            "--steps",
            str(args.t2i_steps),
            *device(args),
        ],
        "fashion-mnist-classes": [
            "train",
            "fashion-mnist",
            "--cond",
            "class",
            "--out",
            f"{REL}/classes",
            "--steps",
            str(args.classes_steps),
        ],
    }


def device(args) -> list[str]:
    return ["--device", args.device] if args.device else []


def ceiling(n: int) -> dict:
    """The attribute network on the first n real test pairs against their own captions."""
    test = load_images("fashion-pairs", "test")
    net = load_feature_net("fashion-pairs")
    return follows(net.attributes(embed(net, test.images[:n])[1]), parsed(test.captions[:n]))


def text_figures(run: Path, n: int, scales: list[float], reworded: bool = False) -> dict:
    """All-four accuracy (seen, held-out, swapped captions, new phrasings, and with ``reworded`` the second set of
    unseen phrasings: on all their prompts, on the seen combinations and per phrasing) and FD at the best of
    ``scales``."""
    best = None
    for s in scales:
        r = evaluate(run, n=n, guidance=GuidanceConfig(scale=s), caption_swap=True, bpd_n=0, progress=False)
        f = r["text"]["follows"]
        row = {
            "scale": s,
            "seen": f["seen"]["all_four"],
            "held_out": f["held_out"]["all_four"],
            "either_side": f["seen"]["either_side"],
            "swap": r["text"]["caption_swap"]["all_four"],
            "fd": r["fd"],
        }
        print(json.dumps(row), flush=True)
        if best is None or row["seen"] > best["seen"]:
            best = row
    unseen = {  # the same images' attributes in phrasings no training caption uses (two sets)
        name: evaluate(run, n=n, guidance=GuidanceConfig(scale=best["scale"]), prompts=name, bpd_n=0, progress=False)
        for name in (["new-phrasings", "reworded"] if reworded else ["new-phrasings"])
    }
    real = ceiling(n)
    return {k: round(v, 4) for k, v in best.items()} | {
        "new_phrasings": round(unseen["new-phrasings"]["text"]["follows"]["all"]["all_four"], 4),
        **(
            {"reworded": round(unseen["reworded"]["text"]["follows"]["all"]["all_four"], 4)}
            if "reworded" in unseen
            else {}
        ),
        **{  # the seen combinations only (what "all four, seen" counts) and per phrasing
            f"{key}_seen": round(unseen[name]["text"]["follows"]["seen"]["all_four"], 4)
            for key, name in (("new_phrasings", "new-phrasings"), ("reworded", "reworded"))
            if name in unseen
        },
        "by_phrasing": {
            p: round(v["all_four"], 4)
            for r in unseen.values()
            for p, v in r["text"]["follows"].get("by_phrasing", {}).items()
        },
        "ceiling_seen": round(real["seen"]["all_four"], 4),
        "ceiling_held_out": round(real["held_out"]["all_four"], 4),
        "n": n,
    }


def clip_figures_of(run: Path) -> dict:
    """The CLIP's own figures on the first 2000 test pairs (its clip.json, rewritten when another step)."""
    rec = json.loads((run / CLIP_REPORT).read_text()) if (run / CLIP_REPORT).exists() else {}
    if rec.get("step") != weights_step(run):
        rec = clip_report(run, load_images("fashion-pairs", "test"))
    return {k: round(rec[k], 4) for k in ("swap_discrimination", "caption_to_image", "image_to_caption")} | {
        "n": rec["images"]
    }


CHECK_N = 300  # the suite's seconds-long check of a shipped CLIP (tests/test_shipped.py)


def clip_check_figures(run: Path, unseen: bool) -> dict:
    """clip_figures on the first CHECK_N test images, and with ``unseen`` the side-swap discrimination of the same
    images captioned in the two phrasing sets no training caption uses (data.pairs.caption, phrasing by image)."""
    test = load_images("fashion-pairs", "test")
    got = clip_figures(run, test, n=CHECK_N)
    out = {
        "what": "clip_figures on the first n test images (the suite's seconds-long check of these weights)",
        "n": CHECK_N,
        **{k: got[k] for k in ("image_to_caption", "caption_to_image", "swap_discrimination", "attribute_probe")},
    }
    if unseen:
        out |= unseen_phrasing_swaps(ClipRun.load(run).clip, test, CHECK_N)
    return out


def class_figures(run: Path, n: int, scale: float) -> dict:
    r = evaluate(run, n=n, guidance=GuidanceConfig(scale=scale), bpd_n=0, progress=False)
    return {"scale": scale, "class_accuracy": round(r["classes"]["accuracy"], 4), "fd": round(r["fd"], 4), "n": n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--ae-steps", type=int, default=1000)
    p.add_argument("--clip-steps", type=int, default=2000)
    p.add_argument("--words-steps", type=int, default=4720, help="fashion-pairs-t2i-words's steps (batch 256)")
    p.add_argument("--minilm-steps", type=int, default=5000)
    p.add_argument("--clip-minilm-steps", type=int, default=1000)
    p.add_argument("--t2i-steps", type=int, default=6000, help="fashion-pairs-t2i's steps")
    p.add_argument("--t2i-batch", type=int, default=64, help="fashion-pairs-t2i's batch")
    p.add_argument(
        "--clip-minilm-tune-steps", type=int, default=300, help="fashion-pairs-clip-minilm's second stage's steps"
    )
    p.add_argument("--t2i-tune-steps", type=int, default=2000, help="fashion-pairs-t2i's second stage's steps")
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        help="train on this device (recorded in the command; default: the CLI's auto)",
    )
    p.add_argument(
        "--note", action="append", default=[], metavar="NAME=TEXT", help="a note for one model's recipe (repeatable)"
    )
    p.add_argument("--classes-steps", type=int, default=5000)
    p.add_argument("--n", type=int, default=300, help="samples per evaluation")
    p.add_argument("--scales", type=float, nargs="+", default=[2.0, 3.0, 5.0])
    p.add_argument("--class-scale", type=float, default=1.5)
    args = p.parse_args(argv)
    notes = dict(n.split("=", 1) for n in args.note if "=" in n)
    if len(notes) != len(args.note) or not set(notes) <= set(MODELS):
        p.error(f"--note is NAME=TEXT with NAME one of {', '.join(MODELS)}")
    torch.set_num_threads(2)
    cmds = commands(args)
    book = RESULTS / "shipped.json"
    results = json.loads(book.read_text()) if book.exists() else {}
    for name in sorted(dict.fromkeys(args.models), key=MODELS.index):  # a model after what it is trained on
        missing = [m for m in NEEDS.get(name, ()) if m not in shipped.names()]
        if missing:
            sys.exit(f"ship {', '.join(missing)} first (what {name} is trained on)")
        seconds, steps = 0.0, []
        for stage in cmds[name]:
            run, spent = trained(stage)
            seconds += spent
            steps.append(weights_step(run))  # what the run has (a finished run given fewer steps keeps its own)
        recipe = {
            "commands": ["difflab " + " ".join(stage) for stage in cmds[name]],
            **({"stage_steps": steps} if len(steps) > 1 else {}),
            "train_seconds": round(seconds),
            **({"note": notes[name]} if name in notes else {}),
        }
        if name == "fashion-pairs-ae":
            if not (run / RECONSTRUCTION).exists():
                sys.exit(f"{run} has no {RECONSTRUCTION}")
            rec = json.loads((run / RECONSTRUCTION).read_text())
            recipe |= {
                "what": "KL autoencoder of fashion-pairs (3x32x64 -> 4x8x16 latents)",
                "figures": {k: rec[k] for k in ("psnr", "rfd") if k in rec},
            }
            ship(run, name, recipe, extra_files=(LATENT, RECONSTRUCTION))
        elif name in ("fashion-pairs-clip", "fashion-pairs-clip-minilm"):
            tower = (
                "a small transformer on the captions' 25 words"
                if name == "fashion-pairs-clip"
                else "MiniLM tuned by rank-8 LoRA, each image also with 4 rephrased captions, then with label "
                "phrasings and colour hard negatives: any wording"
            )
            recipe |= {
                "what": f"CLIP of fashion-pairs (attention pool, side hard negatives; text tower {tower}): a text "
                f"encoder, `--text clip:{name}`",
                "figures": clip_figures_of(run),
                "check_figures": clip_check_figures(run, unseen=name == "fashion-pairs-clip-minilm"),
            }
            ship(run, name, recipe, extra_files=(CLIP_REPORT,))
        elif name in ("fashion-pairs-t2i-words", "fashion-pairs-t2i-minilm", "fashion-pairs-t2i"):
            clip = CLIP_OF.get(name)
            recipe |= {
                "what": "text-to-image on fashion-pairs: latent (fashion-pairs-ae), "
                + (f"captions through {clip}'s text tower" if clip else "MiniLM captions (any phrasing)"),
                "figures": text_figures(run, args.n, args.scales, reworded=name == "fashion-pairs-t2i"),
            }
            config = rebased(json.loads((run / "config.json").read_text()), "fashion-pairs-ae")
            ship(run, name, recipe, config=rebased_text(config, clip) if clip else config)
        else:
            recipe |= {
                "what": "class-conditional Fashion-MNIST (28x28, --class 0-9, guidance)",
                "figures": class_figures(run, args.n, args.class_scale),
            }
            ship(run, name, recipe)
        if name not in ("fashion-pairs-ae", "fashion-pairs-clip", "fashion-pairs-clip-minilm"):  # makes images
            write_check(shipped.SHIPPED_DIR / name, name, check_settings(name))
        results[name] = shipped.recipe(name)
        print(json.dumps(results[name], indent=1), flush=True)
        RESULTS.mkdir(exist_ok=True)
        book.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
