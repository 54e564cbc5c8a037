"""Text-to-image models side by side in the current fashion-pairs judge (issue 23: what was tried, and how long
it was trained). Each model, a run folder or a shipped name, is judged like the shipped model
(benchmarks/ship_models.py's text_figures: all four attributes right on seen and held-out compositions, either
side, caption swap, new phrasings and the second unseen set (reworded), FD, at the best of --scales), beside the
judge's ceiling (real test pairs).

    .venv/bin/python benchmarks/text_models.py LABEL=RUN [LABEL=RUN ...] [--n 300] [--scales 3 5]

Writes benchmarks/results/text_models.md and .json (``--name`` another name). Each row's training (steps, batch, device,
seconds) is read
from its run: config.json, its newest checkpoint, seconds.json or a shipped recipe."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, busy_processes, header, load_average, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from benchmarks.ship_models import text_figures  # noqa: E402
from difflab.evaluation.features import load_feature_net  # noqa: E402
from difflab.runs import shipped  # noqa: E402
from difflab.runs.config import load_config  # noqa: E402
from difflab.runs.store import weights_step  # noqa: E402

NAME = "text_models"


def training(run: str) -> dict:
    """What the run's training was: encoder, steps, batch and seconds (None where not recorded)."""
    cfg = load_config(run)
    folder = shipped.locate(run)
    seconds, steps = None, str(weights_step(run))
    if shipped.is_shipped(run):
        recipe = shipped.recipe(folder.name)
        seconds, steps = recipe.get("train_seconds"), shipped.said_steps(recipe)  # each stage's steps
    elif (folder / "seconds.json").exists():
        seconds = json.loads((folder / "seconds.json").read_text())["seconds"]
    return {
        "encoder": cfg.text.kind if cfg.text else None,
        "steps": steps,
        "batch": cfg.train.batch_size,
        "seconds": seconds,
    }


def unseen_word_figures(run: str, n: int, scale: float) -> dict:
    """Samples for the first n test pairs' attributes in the training phrasings, written with the dataset's words
    and with words no training caption has (text_towers.WORDS: synonyms, plurals, typos), at guidance ``scale``,
    judged by the attribute net: per kind, all four right and "either side" (the items in their colours, maybe on
    the other sides), and per unseen word the share of its uses whose attribute came out right on its side."""
    from benchmarks.text_towers import WORDS, worded
    from difflab import load
    from difflab.data.images import to_uint8
    from difflab.data.pairs import COLOURS, NOUNS, PHRASINGS, make_pairs
    from difflab.evaluation.features import embed
    from difflab.evaluation.prompts import accuracies

    model, net = load(run), load_feature_net("fashion-pairs")
    attrs = make_pairs("test").attributes[:n]
    out = {}
    for kind, (colours, nouns) in {"training words": (None, None), **WORDS}.items():
        captions = [worded(a, i % len(PHRASINGS), colours, nouns) for i, a in enumerate(attrs.tolist())]
        images = to_uint8(model.sample(n, prompt=captions, guidance=scale, seed=0, batch=100))
        predicted = net.attributes(embed(net, images)[1])
        acc = accuracies(predicted, attrs)
        right = predicted == attrs  # (n, 4): left class, left colour, right class, right colour
        words = {}
        for column, names in ((0, nouns), (1, colours), (2, nouns), (3, colours)):
            default = NOUNS if column % 2 == 0 else tuple(COLOURS)
            for value, word in enumerate(names or default):
                uses = attrs[:, column] == value
                hits, count = words.get(word, (0, 0))
                words[word] = (hits + int(right[uses, column].sum()), count + int(uses.sum()))
        out[kind] = {
            "all_four": acc["all_four"],
            "either_side": acc["either_side"],
            "per_attribute": acc["per_attribute"],
            "words": {w: round(h / c, 4) if c else None for w, (h, c) in words.items()},
        }
        print(kind, json.dumps({k: v for k, v in out[kind].items() if k != "words"}), flush=True)
    return out


def one_word_figures(run: str, n: int, scale: float) -> dict:
    """Issue 32's unseen-word measure: samples for the first n test pairs' attributes in the training phrasings,
    each caption in the dataset's words but one, said in a word no training caption has (each kind of
    data.pairs.UNSEEN_WORDS in turn; caption i changes its left or right colour or item in turn), at guidance
    ``scale``, judged by the attribute net: "either side" (both items in their colours, maybe on the other sides)
    over all captions and over those whose word the pretrained model knows (the frozen MiniLM reads it as the word
    it stands for: pretrained_text.nearest_meanings among the dataset's colours or items), and per word."""
    from benchmarks.text_towers import WORDS, one_worded
    from difflab import load
    from difflab.data.images import to_uint8
    from difflab.data.pairs import COLOURS, NOUNS, PHRASINGS, make_pairs, meant_words, said_words
    from difflab.evaluation.features import embed
    from difflab.evaluation.prompts import either_side
    from difflab.nets.pretrained_text import nearest_meanings

    model, net = load(run), load_feature_net("fashion-pairs")
    attrs = make_pairs("test").attributes[:n]
    out = {}
    for kind in WORDS:
        meant = meant_words(kind)
        word_of = {m: w for w, m in meant.items()}
        read = {}
        for dataset in (tuple(COLOURS), NOUNS):
            words = [w for w, m in meant.items() if m in dataset]
            if words:
                read |= dict(zip(words, nearest_meanings(words, dataset)))
        places = [p for p in range(4) if any((m in COLOURS) == (p % 2 == 0) for m in meant.values())]
        captions, used = [], []
        for i, a in enumerate(attrs.tolist()):
            said = said_words(a)[places[i % len(places)]]
            used.append(word_of[said])
            captions.append(one_worded(a, i % len(PHRASINGS), used[-1], said))
        images = to_uint8(model.sample(n, prompt=captions, guidance=scale, seed=0, batch=100))
        predicted = net.attributes(embed(net, images)[1])
        right = either_side(predicted, attrs)
        known = torch.tensor([read[w] == meant[w] for w in used])
        out[kind] = {
            "either_side": round(right.double().mean().item(), 4),
            "either_side_known": round(right[known].double().mean().item(), 4) if known.any() else None,
            "either_side_unknown": round(right[~known].double().mean().item(), 4) if (~known).any() else None,
            "known_captions": int(known.sum()),
            "words": {
                w: {
                    "means": meant[w],
                    "minilm_reads": read[w],
                    "either_side": round(right[[u == w for u in used]].double().mean().item(), 4),
                    "captions": used.count(w),
                }
                for w in meant
                if w in used
            },
        }
        print(kind, json.dumps({k: v for k, v in out[kind].items() if k != "words"}), flush=True)
    return out


def one_word_lines(rows: list[dict]) -> list[str]:
    """The markdown of one_word_figures' rows: per kind, either side over all captions, over the words the
    pretrained model knows and over the others; then per word (what it stands for, what MiniLM reads it as)."""
    if not rows:
        return []
    kinds = list(rows[0]["one_word"])
    lines = [
        "",
        "One word no training caption has (the test attributes in the training phrasings and the dataset's words but "
        "one; issue 32's measure), at each row's s: both items in their colours on either side, over all captions / "
        "those whose word the frozen MiniLM reads as the word it stands for (known) / the others:",
        "",
    ]

    def cell(v):
        return "-" if v is None else f"{v:.1%}"

    lines += md_table(
        ["model", *kinds],
        [
            [
                r["label"],
                *[
                    " / ".join(
                        cell(r["one_word"][k][f]) for f in ("either_side", "either_side_known", "either_side_unknown")
                    )
                    + f" ({r['one_word'][k]['known_captions']} known)"
                    for k in kinds
                ],
            ]
            for r in rows
        ],
    )
    lines += [
        "",
        "Per word: either side, and what the frozen MiniLM reads it as (x: not the word it stands for):",
        "",
    ]
    for r in rows:
        for k in kinds:
            lines.append(
                f"- {r['label']}, {k}: "
                + ", ".join(
                    f"{w} {v['either_side']:.0%} ({'' if v['minilm_reads'] == v['means'] else 'x '}{v['minilm_reads']})"
                    for w, v in r["one_word"][k]["words"].items()
                )
            )
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="LABEL=RUN (a run folder or a shipped model's name)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--scales", type=float, nargs="+", default=[3.0, 5.0])
    p.add_argument(
        "--unseen-words",
        action="store_true",
        help="also sample the test attributes in words no training caption has (synonyms, plurals, typos) at the "
        "best scale",
    )
    p.add_argument(
        "--one-word",
        action="store_true",
        help="also sample captions in the dataset's words but one that no training caption has (issue 32's measure, "
        "by whether the pretrained model knows the word) at the best scale",
    )
    p.add_argument(
        "--words-only",
        action="store_true",
        help="skip the usual figures and judge the words alone (--unseen-words, --one-word) at the first of --scales",
    )
    p.add_argument("--name", default=NAME, help=f"the results' file name (default {NAME}: results/{NAME}.md and .json)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    pairs = [r.split("=", 1) for r in args.runs]
    if any(len(x) != 2 for x in pairs):
        p.error("each run is LABEL=RUN")
    load_start, busy_start = load_average(), busy_processes()
    rows = []
    for label, run in pairs:
        t0 = time.perf_counter()
        figures = (
            {"scale": args.scales[0]} if args.words_only else text_figures(run, args.n, args.scales, reworded=True)
        )
        rows.append({"label": label, "run": run, **training(run), **figures})
        if args.unseen_words:
            rows[-1]["unseen_words"] = unseen_word_figures(run, args.n, rows[-1]["scale"])
        if args.one_word:
            rows[-1]["one_word"] = one_word_figures(run, args.n, rows[-1]["scale"])
        rows[-1]["eval_seconds"] = round(time.perf_counter() - t0)
        print(json.dumps(rows[-1]), flush=True)
    judge = load_feature_net("fashion-pairs").meta
    lines = header("Text-to-image models side by side in the fashion-pairs judge")
    lines += [
        f"- judge: the shipped attribute net ({judge['command']}); per-half class accuracy on the 4000 real test pairs "
        + " / ".join(f"{v:.1%}" for v in judge["test_attribute_accuracy"][0::2]),
        f"- {args.n} test captions per row, dpmpp-2m 20 steps, the best of s = "
        f"{', '.join(f'{s:g}' for s in args.scales)} by seen all-four",
        f"- load average at the start: {load_start}; other busy processes: {', '.join(busy_start) or 'none'}; at the "
        f"end: {load_average()}",
        "",
    ]
    if not args.words_only:
        head = [
            "model",
            "encoder",
            "steps x batch",
            "train seconds",
            "s",
            "all four, seen",
            "all four, held-out",
            "either side",
            "caption swap",
            "new phrasings (seen)",
            "reworded (seen)",
            "FD",
        ]
        table = [
            [
                r["label"],
                r["encoder"],
                f"{r['steps']} x {r['batch']}",
                "-" if r["seconds"] is None else f"{r['seconds']:.0f}",
                f"{r['scale']:g}",
                f"{r['seen']:.1%}",
                f"{r['held_out']:.1%}",
                f"{r['either_side']:.1%}",
                f"{r['swap']:.1%}",
                f"{r['new_phrasings']:.1%}"
                + (f" ({r['new_phrasings_seen']:.1%})" if "new_phrasings_seen" in r else ""),
                f"{r['reworded']:.1%}" + (f" ({r['reworded_seen']:.1%})" if "reworded_seen" in r else ""),
                f"{r['fd']:.2f}",
            ]
            for r in rows
        ]
        table.append(
            [
                "real test images (the judge's ceiling)",
                "-",
                "-",
                "-",
                "-",
                f"{rows[0]['ceiling_seen']:.1%}",
                f"{rows[0]['ceiling_held_out']:.1%}",
                "-",
                "-",
                "-",
                "-",
                "-",
            ]
        )
        lines += md_table(head, table)
    phrased = [r for r in rows if r.get("by_phrasing")]
    if phrased:
        lines += [
            "",
            "All four right on the seen combinations, per unseen phrasing (data.pairs.NEW_PHRASINGS, then "
            f"REWORDED_PHRASINGS; {args.n // 4} captions each, the held-out ones left out), at each row's s:",
            "",
        ]
        lines += md_table(
            ["phrasing", *[r["label"] for r in phrased]],
            [
                [f"`{p}`", *["-" if p not in r["by_phrasing"] else f"{r['by_phrasing'][p]:.1%}" for r in phrased]]
                for p in dict.fromkeys(p for r in phrased for p in r["by_phrasing"])
            ],
        )
    worded_rows = [r for r in rows if "unseen_words" in r]
    if worded_rows:
        kinds = list(worded_rows[0]["unseen_words"])
        lines += [
            "",
            "Words no training caption has (the test attributes in the training phrasings, each kind's words in place "
            "of the dataset's; benchmarks/text_towers.py WORDS), at each row's s: all four / either side (the items "
            "in their colours on either side):",
            "",
        ]
        lines += md_table(
            ["model", *kinds],
            [
                [
                    r["label"],
                    *[
                        f"{r['unseen_words'][k]['all_four']:.1%} / {r['unseen_words'][k]['either_side']:.1%}"
                        for k in kinds
                    ],
                ]
                for r in worded_rows
            ],
        )
        lines += ["", "Per unseen word, the share of its uses whose attribute came out right on its side:", ""]
        for r in worded_rows:
            for k in kinds[1:]:
                words = r["unseen_words"][k]["words"]
                lines.append(f"- {r['label']}, {k}: " + ", ".join(f"{w} {v:.0%}" for w, v in words.items()))
    lines += one_word_lines([r for r in rows if "one_word" in r])
    write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    write_text(RESULTS / f"{args.name}.json", json.dumps({"setting": vars(args), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
