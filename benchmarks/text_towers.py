"""Which text tower reads any wording and still sees the sides? (issue 32, part 1: the tower variants side by side)

CLIP runs on fashion-pairs alike but for the text tower (`difflab train-clip fashion-pairs`, --steps each, batch 128,
attention pooling, side hard negatives: train-clip's defaults), scored on the test split:

    words      the small transformer on the training captions' words (train-clip's default: the baseline)
    head       MiniLM frozen, one trainable transformer layer on its token states (--init minilm --tune head)
    lora       MiniLM with rank-8 adapters on its attention (--tune lora)
    last-2     MiniLM's last 2 layers tuned (--tune last-2)
    full       all of MiniLM tuned (--tune full)
    T+variants the same, each training image also seen with 4 captions in data.pairs.AUGMENT_PHRASINGS
               (--caption-variants 4; never the phrasings measured below)
    lora+synonyms  lora+variants with the variants' colours and items also said in other words
               (--caption-words synonyms: data.pairs.SYNONYMS, never the unseen words measured below)

Figures per tower (the first --n test pairs; chance in brackets):
  - side-swap discrimination (50 %): an image closer to its caption than to the sides-swapped twin, in the training
    phrasings, in data.pairs.NEW_PHRASINGS and in data.pairs.REWORDED_PHRASINGS (both never in a training caption);
  - retrieval in groups of 100 (1 %) and the zero-shot attribute probe (classes 10 %, colours 16.7 %): RUN/clip.json;
  - the attribute probe again with words no training caption has (--probe-n images): colour and item synonyms,
    plurals, typos (data.pairs.UNSEEN_WORDS); the words tower reads them as <unk>.

    .venv/bin/python benchmarks/text_towers.py [--steps 1000] [--towers words head lora last-2 full ...] [--name N]

Writes benchmarks/results/text_towers.md and .json; runs in benchmarks/runs/text_towers/ (a finished run is not
retrained, a killed one resumes; figures are cached in figures.json by run and step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, busy_processes, header, load_average, md_table, trained  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from difflab.data.pairs import UNSEEN_WORDS  # noqa: E402

NAME = "text_towers"
ROOT = RUNS / NAME
TOWERS = {
    "words": [],
    "head": ["--init", "minilm", "--tune", "head"],
    "lora": ["--init", "minilm", "--tune", "lora"],
    "last-2": ["--init", "minilm", "--tune", "last-2"],
    "full": ["--init", "minilm", "--tune", "full"],
    "words+variants": ["--caption-variants", "4"],
    "head+variants": ["--init", "minilm", "--tune", "head", "--caption-variants", "4"],
    "lora+variants": ["--init", "minilm", "--tune", "lora", "--caption-variants", "4"],
    "last-2+variants": ["--init", "minilm", "--tune", "last-2", "--caption-variants", "4"],
    "full+variants": ["--init", "minilm", "--tune", "full", "--caption-variants", "4"],
    "lora+synonyms": ["--init", "minilm", "--tune", "lora", "--caption-variants", "4", "--caption-words", "synonyms"],
}
# words no training caption has, in the order of data.pairs.COLOURS and NOUNS (written once, 2026-12-06; no tower
# is tuned on them: data.pairs.SYNONYMS, what --caption-words synonyms tunes on, has none of them)
WORDS = UNSEEN_WORDS


def worded(attributes, phrasing: int, colours, nouns) -> str:
    """A fashion-pairs caption of ``attributes`` in ALL_PHRASINGS[phrasing] with other colour and item words
    (None keeps the dataset's); plural items lose their article."""
    from difflab.data.pairs import ALL_PHRASINGS, COLOURS, NOUNS, article

    colours, plural = colours or tuple(COLOURS), nouns is not None and nouns[0].endswith("s")
    nouns = nouns or NOUNS

    def item(k, c):
        words = f"{colours[c]} {nouns[k]}"
        return words if plural else article(words)

    lk, lc, rk, rc = (int(a) for a in attributes)
    return ALL_PHRASINGS[phrasing].format(L=item(lk, lc), R=item(rk, rc))


def one_worded(attributes, phrasing: int, word: str, meant: str) -> str:
    """A fashion-pairs caption of ``attributes`` in ALL_PHRASINGS[phrasing] in the dataset's words but one: the
    first place that says ``meant`` (a colour or an item) says ``word`` instead (a plural item loses its article:
    ``word`` is the plural of ``meant``). Refused where the attributes do not say ``meant``."""
    from difflab.data.pairs import ALL_PHRASINGS, article, said_words

    said = said_words(attributes)
    if meant not in said:
        raise ValueError(f"the attributes {attributes} do not say {meant!r}")
    place = said.index(meant)
    said[place] = word
    plural = place % 2 == 1 and word == meant + ("es" if meant.endswith("s") else "s")
    left, right = f"{said[0]} {said[1]}", f"{said[2]} {said[3]}"
    left, right = (w if plural and place // 2 == side else article(w) for side, w in enumerate((left, right)))
    return ALL_PHRASINGS[phrasing].format(L=left, R=right)


def tower_figures(run: Path, n: int, probe_n: int) -> dict:
    import torch

    from difflab.data.images import load_images, to_model
    from difflab.data.pairs import ATTRIBUTES, COLOURS, NOUNS
    from difflab.text.clip import ClipRun, attribute_probe, swap_discrimination, unseen_phrasing_swaps

    torch.manual_seed(0)
    test = load_images("fashion-pairs", "test")
    clip = ClipRun.load(run).clip
    x, attrs = to_model(test.images[:n]), test.attributes[:n]
    unseen = unseen_phrasing_swaps(clip, test, n)
    out = {
        "swap": {
            "training phrasings": swap_discrimination(clip, x, test.captions[:n]),
            "new phrasings": unseen["swap_new_phrasings"],
            "reworded": unseen["swap_reworded"],
        }
    }
    sizes = [len(NOUNS), len(COLOURS), len(NOUNS), len(COLOURS)]
    out["unseen words"] = {
        kind: attribute_probe(
            clip,
            x[:probe_n],
            attrs[:probe_n],
            lambda a, c=colours, k=nouns: worded(a, 0, c, k),
            ATTRIBUTES,
            sizes,
        )
        for kind, (colours, nouns) in WORDS.items()
    }
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--towers", nargs="+", default=list(TOWERS)[:5], choices=list(TOWERS))
    p.add_argument("--n", type=int, default=1000, help="test pairs for the side-swap figures")
    p.add_argument("--probe-n", type=int, default=200, help="test pairs for the unseen-word attribute probes")
    p.add_argument("--name", default=NAME, help=f"the results' file name (default {NAME}: results/{NAME}.md and .json)")
    args = p.parse_args(argv)
    load_start, busy_start = load_average(), busy_processes()
    ROOT.mkdir(parents=True, exist_ok=True)
    book = ROOT / "figures.json"
    figures = json.loads(book.read_text()) if book.exists() else {}
    rows = {}
    for name in args.towers:
        run, seconds = trained(
            ["train-clip", "fashion-pairs", "--out", str(ROOT / name), "--steps", str(args.steps), "--quiet"]
            + TOWERS[name]
        )
        key = f"{name} steps={args.steps} n={args.n} probe_n={args.probe_n}"
        if key not in figures:
            figures[key] = tower_figures(run, args.n, args.probe_n)
            write_text(book, json.dumps(figures, indent=1))
        config = json.loads((run / "config.json").read_text())["net"]
        weights = sorted((run / "checkpoints").glob("step-*/model.safetensors"))[-1].stat().st_size
        rows[name] = {
            **figures[key],
            "report": json.loads((run / "clip.json").read_text()),
            "seconds": seconds,
            "weights_mb": weights / 2 / 1e6,  # the file holds the weights and their EMA
            "tune": (config.get("pretrained") or {}).get("tune", "words"),
        }
    report(args, rows, load_start, busy_start)


def report(args, rows: dict, load_start, busy_start) -> None:
    lines = header("Text towers side by side: any wording, and the sides (issue 32)")
    lines += [
        f"- CLIP runs on fashion-pairs, {args.steps} steps of batch 128 each (`difflab train-clip fashion-pairs "
        "[--init minilm --tune T]`: attention pooling, side hard negatives), one at a time",
        f"- side-swap figures on the first {args.n} test pairs; retrieval and the attribute probe from RUN/clip.json "
        f"(2000 and 500 pairs); unseen-word probes on {args.probe_n} pairs",
        f"- load average at the start: {load_start}; other busy processes: {', '.join(busy_start) or 'none'}; at the "
        f"end: {load_average()}",
        "",
    ]
    head = [
        "tower",
        "swap: training phrasings",
        "swap: new phrasings",
        "swap: reworded",
        "caption -> image",
        "probe L/R class",
        "probe colours",
        "weights MB",
        "seconds",
    ]
    table = []
    for name, r in rows.items():
        probe = r["report"]["attribute_probe"]
        table.append(
            [
                name,
                *[f"{v:.1%}" for v in r["swap"].values()],
                f"{r['report']['caption_to_image']:.1%}",
                f"{probe['left class']:.1%} / {probe['right class']:.1%}",
                f"{probe['left colour']:.1%} / {probe['right colour']:.1%}",
                f"{r['weights_mb']:.1f}",
                f"{r['seconds']:.0f}",
            ]
        )
    lines += md_table(head, table)
    lines += [
        "",
        "Unseen words: the zero-shot attribute probe (the true caption against those differing in one attribute) with "
        "captions written in words no training caption has; class / colour accuracy, both sides averaged (chance "
        "10 % / 16.7 %):",
        "",
    ]
    head = ["tower", *[f"{k}: classes / colours" for k in WORDS]]
    table = []
    for name, r in rows.items():
        cells = []
        for kind in WORDS:
            u = r["unseen words"][kind]
            cells.append(
                f"{(u['left class'] + u['right class']) / 2:.1%} / {(u['left colour'] + u['right colour']) / 2:.1%}"
            )
        table.append([name, *cells])
    lines += md_table(head, table)
    lines += ["", "Words tried (in the order of data.pairs.COLOURS and NOUNS):", ""]
    for kind, (colours, nouns) in WORDS.items():
        lines.append(f"- {kind}: {', '.join(colours or ('(the dataset colours)',))}; {', '.join(nouns)}")
    write_text(RESULTS / f"{args.name}.md", "\n".join(lines) + "\n")
    write_text(RESULTS / f"{args.name}.json", json.dumps({"setting": vars(args), "towers": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
