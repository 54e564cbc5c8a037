"""Does a text tower bind each colour to its own item, in every phrasing? (issue 32: why one unseen phrasing fails)

Per phrasing (the training ones, data.pairs.NEW_PHRASINGS and REWORDED_PHRASINGS), the first --n fashion-pairs test
images captioned in it, for each CLIP (a run folder or a shipped name): side-swap discrimination (the image closer to
its caption than to the same items on the other sides) and colour-swap discrimination (closer than to the caption
with the two colours exchanged between the items; images with two items of one colour left out). A coin flip is
50 %. text.clip.binding_by_phrasing computes both.

    .venv/bin/python benchmarks/tower_binding.py [CLIP ...] [--n 300] [--name tower_binding] [--probe]

--probe also measures PROBES, forms near the colon phrasing "left: {L}; right: {R}" (written 2026-12-07 to see how far
a fix for it reaches; never in a training caption).

Writes benchmarks/results/NAME.md and .json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, busy_processes, header, load_average, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402

NAME = "tower_binding"
PROBES = (
    "left: {L}, right: {R}",
    "left: {L} right: {R}",
    "{L}; {R}",
    "left {L}; right {R}",
    "left: {L}. right: {R}",
    "on the left: {L}; on the right: {R}",
    "right: {R}; left: {L}",
)


def probe_binding(clip, test, n: int, template: str) -> dict:
    """Side-swap and colour-swap discrimination of the first ``n`` test images captioned in ``template`` (any
    "{L}"/"{R}" form; the colour twin is built from the swapped attributes, so it needs no known phrasing)."""
    from difflab.data.images import to_model
    from difflab.data.pairs import said_items
    from difflab.text.clip import swap_discrimination

    def say(*attributes):
        left, right = said_items(attributes)
        return template.format(L=left, R=right)

    rows = test.attributes[:n].tolist()
    texts = [say(*a) for a in rows]
    twins = {say(*a): say(a[0], a[3], a[2], a[1]) for a in rows}
    x = to_model(test.images[:n])
    return {
        "sides": swap_discrimination(clip, x, texts),
        "colours": swap_discrimination(clip, x, texts, swap=twins.__getitem__),
    }


def main(argv=None) -> None:
    from difflab.data.images import load_images
    from difflab.data.pairs import NEW_PHRASINGS, PHRASINGS, REWORDED_PHRASINGS
    from difflab.text.clip import ClipRun, binding_by_phrasing

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("clips", nargs="*", default=["fashion-pairs-clip-minilm", "fashion-pairs-clip"])
    p.add_argument("--n", type=int, default=300, help="test images per phrasing")
    p.add_argument("--name", default=NAME, help=f"the results' file name (default {NAME})")
    p.add_argument("--probe", action="store_true", help="also the forms near the colon phrasing (PROBES)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    load_start, busy_start = load_average(), busy_processes()
    test = load_images("fashion-pairs", "test")
    figures = {}
    for name in args.clips:
        clip = ClipRun.load(name).clip
        figures[name] = binding_by_phrasing(clip, test, args.n)
        for template in PROBES if args.probe else ():
            figures[name][template] = probe_binding(clip, test, args.n, template)
        print(name, json.dumps(figures[name]), flush=True)
    sets = {**{p: "training" for p in PHRASINGS}, **{p: "new" for p in NEW_PHRASINGS}}
    sets |= {p: "reworded" for p in REWORDED_PHRASINGS} | {p: "probe" for p in PROBES}
    lines = header("Side and colour binding of text towers, per phrasing")
    lines += [
        f"- the first {args.n} test images per phrasing; colour swap over those with two colours "
        f"({sum(1 for a in test.attributes[: args.n].tolist() if a[1] != a[3])} images); a coin flip is 50 %",
        f"- load average at the start: {load_start}; other busy processes: {', '.join(busy_start) or 'none'}; at the "
        f"end: {load_average()}",
        "",
    ]

    def pct(v):
        return "-" if v is None else f"{v:.1%}"

    rows = [
        [f"`{phrasing}`", sets[phrasing]]
        + [f"{pct(figures[c][phrasing]['sides'])} / {pct(figures[c][phrasing]['colours'])}" for c in args.clips]
        for phrasing in figures[args.clips[0]]
    ]
    lines += md_table(["phrasing", "set", *[f"{c}: sides / colours" for c in args.clips]], rows)
    RESULTS.mkdir(exist_ok=True)
    write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    write_text(RESULTS / f"{args.name}.json", json.dumps({"n": args.n, "figures": figures}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
