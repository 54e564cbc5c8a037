"""Can a CLIP encoder tell the sides apart, and does a text model conditioned on it then put items on the
side its caption names? (issue 23: "contrastive hard negatives that swap sides").

Four CLIP-style encoders on fashion-pairs, alike but for two switches (`difflab train-clip`, --clip-steps each):

    mean               global average pooling in the image tower, plain contrastive loss
    attention          CLIP's attention pooling with learned positions (--pool attention)
    mean+sides         side hard negatives: each caption with 'left'/'right' exchanged is a negative for
                       its image (--hard-negatives sides; NegCLIP's recipe for word order)
    attention+sides    both (train-clip's defaults on captions that name sides)

Each is scored on the 2000 first test pairs: retrieval in groups of 100, the zero-shot attribute probe, and
side-swap discrimination (how often an image is closer to its own caption than to its sides-swapped twin;
a coin flip is 50 %). Then a latent text-to-image model (on the shipped fashion-pairs-ae, as the shipped
fashion-pairs-t2i-words is built) is trained for --t2i-steps on the frozen text tower of today's encoder and of the
best swap discriminator, and judged like the shipped model (benchmarks/ship_models.py's text_figures: all
four right on seen and held-out compositions, either side, caption swap, at each scale of --scales).

    .venv/bin/python benchmarks/clip_sides.py [--clip-steps 1000] [--t2i-steps 2500] [--n 300] [--scales 3 5]

Writes benchmarks/results/clip_sides.md and .json; runs live in benchmarks/runs/clip_sides/ (a finished run is
not retrained; a killed one resumes; figures are cached in figures.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, busy_processes, header, load_average, md_table, trained  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from difflab.runs.store import weights_step  # noqa: E402

NAME = "clip_sides"
ROOT = RUNS / NAME
VARIANTS = {
    "mean": ["--pool", "mean", "--hard-negatives", "none"],
    "attention": ["--pool", "attention", "--hard-negatives", "none"],
    "mean+sides": ["--pool", "mean", "--hard-negatives", "sides"],
    "attention+sides": ["--pool", "attention", "--hard-negatives", "sides"],
}


def clip_run(name: str, steps: int) -> tuple[Path, dict]:
    run = ROOT / f"clip-{name.replace('+', '-')}"
    report = run / "clip.json"
    if not report.exists() or json.loads(report.read_text())["step"] < steps:
        trained(["train-clip", "fashion-pairs", "--out", str(run), "--steps", str(steps), "--quiet", *VARIANTS[name]])
    seconds = (
        json.loads((run / "seconds.json").read_text())["seconds"] if (run / "seconds.json").exists() else float("nan")
    )
    return run, json.loads(report.read_text()) | {"seconds": seconds}


def t2i_run(name: str, clip: Path, steps: int) -> tuple[Path, float]:
    return trained(
        [
            "train",
            "fashion-pairs",
            "--latent",
            "fashion-pairs-ae",
            "--text",
            f"clip:{clip}",
            "--out",
            str(ROOT / f"t2i-{name.replace('+', '-')}"),
            "--steps",
            str(steps),
            "--quiet",
        ]
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip-steps", type=int, default=1000)
    p.add_argument("--t2i-steps", type=int, default=2500)
    p.add_argument("--n", type=int, default=300, help="test captions (and samples) per text-to-image evaluation")
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-t2i", action="store_true", help="measure the encoders only")
    args = p.parse_args(argv)
    load_start, busy_start = load_average(), busy_processes()
    ROOT.mkdir(parents=True, exist_ok=True)
    book = ROOT / "figures.json"
    figures = json.loads(book.read_text()) if book.exists() else {}

    clips = {name: clip_run(name, args.clip_steps) for name in args.variants}
    best = max(clips, key=lambda k: clips[k][1]["swap_discrimination"])
    from benchmarks.ship_models import text_figures  # noqa: E402  (heavy: the evaluation stack)

    for name in [] if args.no_t2i else dict.fromkeys(["mean", best]):
        if name not in clips:
            continue
        run, seconds = t2i_run(name, clips[name][0], args.t2i_steps)
        key = f"{name} steps={weights_step(run)} n={args.n} scales={args.scales}"
        if key not in figures:
            figures[key] = {
                "encoder": name,
                "seconds": seconds,
                "steps": weights_step(run),
                **text_figures(run, args.n, args.scales),
            }
            write_text(book, json.dumps(figures, indent=1))
    report(
        args,
        clips,
        best,
        [f for k, f in figures.items() if f" n={args.n} " in k and f"steps={args.t2i_steps} " in k],
        load_start,
        busy_start,
    )


def report(args, clips, best, rows, load_start, busy_start) -> None:
    lines = header(
        "Side hard negatives for the CLIP encoder: can it tell the sides, and does its text model follow them?"
    )
    lines += [
        f"- CLIP encoders: {args.clip_steps} steps of batch 128 each (`difflab train-clip fashion-pairs`), scored on "
        "the first 2000 test pairs",
        f"- text-to-image: latent on the shipped fashion-pairs-ae, {args.t2i_steps} steps, the frozen text tower of "
        "today's encoder (mean) and "
        f"of the best swap discriminator ({best}); {args.n} test captions per row, dpmpp-2m 20 steps, the best of s = "
        + ", ".join(f"{s:g}" for s in args.scales)
        + " by seen all-four; judged by the shipped attribute net",
        f"- load average at the start: {load_start}; other busy processes: {', '.join(busy_start) or 'none'}; at the "
        f"end: {load_average()}",
        "",
        "## The encoders",
        "",
    ]
    head = [
        "encoder",
        "side-swap discrimination",
        "caption -> image",
        "image -> caption",
        "left class",
        "left colour",
        "right class",
        "right colour",
        "seconds",
    ]
    table = [
        [
            name,
            f"{c['swap_discrimination']:.1%}",
            f"{c['caption_to_image']:.1%}",
            f"{c['image_to_caption']:.1%}",
            *[f"{v:.1%}" for v in c["attribute_probe"].values()],
            f"{c['seconds']:.0f}",
        ]
        for name, (_, c) in clips.items()
    ]
    lines += md_table(head, table)
    lines += [
        "",
        "Side-swap discrimination: the share of test images closer to their own caption than to the same caption with "
        "'left' and 'right' exchanged (50 % is a coin flip). Retrieval in groups of 100 (chance 1 %).",
        "",
        "## Text-to-image on each encoder's text tower",
        "",
    ]
    head = [
        "encoder",
        "steps",
        "train seconds",
        "best s",
        "all four, seen",
        "all four, held-out",
        "either side",
        "caption swap",
        "FD",
        "ceiling seen / held-out",
    ]
    table = [
        [
            r["encoder"],
            str(r["steps"]),
            f"{r['seconds']:.0f}",
            f"{r['scale']:g}",
            f"{r['seen']:.1%}",
            f"{r['held_out']:.1%}",
            f"{r['either_side']:.1%}",
            f"{r['swap']:.1%}",
            f"{r['fd']:.2f}",
            f"{r['ceiling_seen']:.1%} / {r['ceiling_held_out']:.1%}",
        ]
        for r in rows
    ]
    lines += md_table(head, table)
    write_text(RESULTS / f"{NAME}.md", "\n".join(lines) + "\n")
    write_text(
        RESULTS / f"{NAME}.json",
        json.dumps(
            {
                "setting": vars(args),
                "clips": {k: c for k, (_, c) in clips.items()},
                "best": best,
                "text_to_image": rows,
            },
            indent=1,
        ),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
