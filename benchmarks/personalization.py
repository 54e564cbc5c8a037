"""Personalisation on fashion-pairs: fidelity to a new subject, to the rest of the prompt, and language drift (issue 13).

The subject is one Fashion-MNIST sneaker of the test split (never seen in training), in 4 tints, each beside
another item (`difflab subject --class-word sneaker`). The base models are text_to_image's latent runs
(benchmarks/runs/text_to_image/minilm and joint; run benchmarks/text_to_image.py first). Each variant is
`difflab personalize` through personalize.personalize with its defaults (400 steps, 64 class images):

    dreambooth and lora over the MiniLM run, with (lambda = 1) and without (lambda = 0) prior preservation;
    textual-inversion over the joint run (MiniLM's embeddings cannot be extended);
    LoRA of rank 1; DreamBooth at 800 steps of 4e-4 (a stronger fit: the fidelity / drift trade-off); and
    DreamBooth with class images drawn with guidance (s = 3) instead of the default unguided ones.

Measured on --n new compositions of the subject (a random tint and side, another class in a random colour
in the other half), sampled at the base run's best guidance scale (text_to_image: MiniLM 5, joint 3):

* subject fidelity: the centred cosine, in the shipped attribute network's features, between each sample's
  subject half and the subject in the requested tint (personalize.subject_similarity), against a floor (other
  real test sneakers in the same tints: a generic sneaker) and a ceiling (the subject through the autoencoder
  round trip: what a latent model can give at best); "relative" = (fidelity - floor) / (ceiling - floor); the
  same in shape: the luminance correlation of the subject half with the subject (personalize.shape_similarity);
* prompt fidelity: all four attributes right (the subject half's class at its side and its requested tint,
  the other half's class and colour), against the base model asked the same without the identifier;
* language drift, on --n-plain prompts with the plain class word ("a red sneaker on the left and ..."): FD
  (attribute-network features) against real images of the same prompts (random test items of the prompts'
  classes in their colours, 4 per prompt), before and after, the sneaker halves' feature
  diversity (mean pairwise distance), and how often the subject appears uninvited (a sneaker half more like
  the subject in shape than 95 % of real sneakers are);
* cost: CPU-minutes of personalisation (process time, both threads), trainable parameters, the weights a
  user keeps (dreambooth: the whole network; lora: adapter.safetensors; textual inversion: one row).

Targets (issue 13): relative fidelity >= 0.5 with prompt fidelity within 5 points of the base; with prior
preservation, drift (the plain class word's FD change) at most a third of that without; LoRA file < 1 % of
the base model's weights.

    .venv/bin/python benchmarks/personalization.py [--n 200] [--n-plain 500]

Writes benchmarks/results/personalization.md, .json and .png; runs in benchmarks/runs/personalization/
(finished variants are not retrained, killed ones resume, evaluations are cached in evals.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, busy_processes, header, load_average, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from difflab.data.images import load_images, to_uint8  # noqa: E402
from difflab.data.pairs import NOUNS, RGB, half, make_subject, place, subject_prompts, tint, tinted, write_subject  # noqa: E402
from difflab.evaluation.features import embed, load_feature_net  # noqa: E402
from difflab.evaluation.metrics import frechet_distance  # noqa: E402
from difflab.evaluation.subject import feature_center, shape_similarity, subject_similarity  # noqa: E402
from difflab.nets.lora import LoraSpec  # noqa: E402
from difflab.personalize.adapters import ADAPTER  # noqa: E402
from difflab.personalize.identifier import class_prompt  # noqa: E402
from difflab.personalize.method import personalize, trainable_filter  # noqa: E402
from difflab.runs import store as ckpt  # noqa: E402
from difflab.runs.config import Personalization, load_config  # noqa: E402
from difflab.runs.diffusion import DiffusionRun  # noqa: E402
from difflab.viz import plots  # noqa: E402

NAME = "personalization"
ROOT = RUNS / NAME
BASES = {"minilm": RUNS / "text_to_image" / "minilm", "joint": RUNS / "text_to_image" / "joint"}
SCALES = {"minilm": 5.0, "joint": 3.0}  # each base's best guidance scale in text_to_image
CLASS = "sneaker"
@dataclass(frozen=True)
class Variant:
    method: str
    encoder: str  # the base run (BASES)
    prior_weight: float = 1.0
    rank: int = 4  # LoRA
    steps: int | None = None  # None: the method's defaults
    lr: float | None = None
    class_guidance: float = 1.0

    @property
    def name(self) -> str:
        out = f"{self.method}-{self.encoder}" + ("" if self.method == "textual-inversion" else f"-prior{self.prior_weight:g}")
        out += f"-r{self.rank}" if self.rank != 4 else ""
        out += f"-{self.steps}x{self.lr:g}" if self.steps else ""
        return out + (f"-class-s{self.class_guidance:g}" if self.class_guidance != 1 else "")


VARIANTS = [Variant("dreambooth", "minilm"), Variant("dreambooth", "minilm", 0.0), Variant("lora", "minilm"), Variant("lora", "minilm", 0.0),
            Variant("lora", "minilm", rank=1), Variant("textual-inversion", "joint", 0.0),
            Variant("dreambooth", "minilm", steps=800, lr=4e-4), Variant("dreambooth", "minilm", class_guidance=3.0)]


def variant_name(method: str, encoder: str, weight: float) -> str:
    return Variant(method, encoder, weight).name


def trained(run: Path, folder: Path, v: Variant) -> Path:
    """The personalised run, trained (or resumed) if not finished; CPU seconds recorded in seconds.json."""
    done = ckpt.has_checkpoint(run) and ckpt.weights_step(run) >= load_config(run).train.steps
    if not done:
        spent = json.loads((run / "seconds.json").read_text()) if (run / "seconds.json").exists() else {"cpu": 0.0, "wall": 0.0}
        cpu, wall = time.process_time(), time.perf_counter()
        resume = ckpt.has_checkpoint(run)
        p = Personalization(v.method, CLASS, prior_weight=v.prior_weight, class_guidance=v.class_guidance)
        lora = LoraSpec(rank=v.rank, alpha=float(v.rank)) if v.method == "lora" else None
        personalize(BASES[v.encoder], folder, run, None if resume else p, resume=resume, steps=v.steps, lr=v.lr, lora=lora)
        spent = {"cpu": spent["cpu"] + time.process_time() - cpu, "wall": spent["wall"] + time.perf_counter() - wall}
        write_text(run / "seconds.json", json.dumps(spent))
    return run


def draw(run: Path, captions: list[str], scale: float, seed: int = 0) -> torch.Tensor:
    return to_uint8(DiffusionRun.load(run).sample(len(captions), prompt=captions, guidance=scale, sampler="dpmpp-2m", steps=20, seed=seed, batch=250))


class Yardsticks:
    """What every variant is measured against: the prompts, the subject's references, the real sneakers."""

    def __init__(self, subject, n: int, n_plain: int):
        self.net = load_feature_net("fashion-pairs")
        self.center = feature_center(self.net)
        self.attributes, self.sides, self.captions = subject_prompts(CLASS, n, seed=1)
        self.references = tinted(subject.grey, self.colours(self.attributes, self.sides))
        plain_attributes, self.plain_sides, plain = subject_prompts(CLASS, n_plain, seed=2)
        self.plain = [class_prompt(c, "sks") for c in plain]
        self.plain_references = tinted(subject.grey, self.colours(plain_attributes, self.plain_sides))
        items = load_images("fashion-mnist", split="test")
        sneakers = items.images[items.labels == NOUNS.index(CLASS), 0]
        sneakers = sneakers[torch.from_numpy(np.random.default_rng(0).permutation(len(sneakers))[:n])]
        rgb = RGB[self.colours(self.attributes, self.sides)]
        lookalikes = place(torch.from_numpy(tint(sneakers.numpy(), rgb)), self.sides)
        self.floor = subject_similarity(self.net, lookalikes, self.sides, self.references, self.center).mean().item()
        shapes = shape_similarity(lookalikes, self.sides, self.references)
        self.shape_floor = shapes.mean().item()
        self.threshold = torch.quantile(shapes, 0.95).item()  # "more like the subject than 95 % of real sneakers"
        space = DiffusionRun.load(BASES["minilm"]).latent
        with torch.no_grad():
            round_trip = space.reconstruct(place(self.references, self.sides))
        self.ceiling = subject_similarity(self.net, round_trip, self.sides, self.references, self.center).mean().item()
        self.shape_ceiling = shape_similarity(round_trip, self.sides, self.references).mean().item()
        self.real_features = embed(self.net, matched_real(plain_attributes, items, 4))[0]

    @staticmethod
    def colours(attributes, sides) -> np.ndarray:
        return torch.where(sides == 0, attributes[:, 1], attributes[:, 3]).numpy()

    def subject(self, x: torch.Tensor) -> dict:
        sim = subject_similarity(self.net, x, self.sides, self.references, self.center).mean().item()
        shape = shape_similarity(x, self.sides, self.references).mean().item()
        predicted = self.net.attributes(embed(self.net, x)[1])
        return {"fidelity": sim, "relative": (sim - self.floor) / (self.ceiling - self.floor),
                "shape": shape, "shape_relative": (shape - self.shape_floor) / (self.shape_ceiling - self.shape_floor),
                "all_four": (predicted == self.attributes).all(1).double().mean().item(),
                "per_attribute": (predicted == self.attributes).double().mean(0).tolist()}

    def plain_word(self, x: torch.Tensor) -> dict:
        feats = embed(self.net, x)[0]
        halves = embed(self.net, place(half(x, self.plain_sides), self.plain_sides))[0]
        leak = shape_similarity(x, self.plain_sides, self.plain_references) > self.threshold
        return {"fd": frechet_distance(feats, self.real_features), "diversity": torch.pdist(halves).mean().item(),
                "subject_rate": leak.double().mean().item()}


def matched_real(attributes: torch.Tensor, items, repeat: int, seed: int = 0) -> torch.Tensor:
    """Real fashion-pairs images with the given attributes (each row ``repeat`` times): random test-split
    items of the classes, in the colours. The plain class word's samples are compared with these."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(items.labels.numpy() == k) for k in range(10)]
    rows = attributes.repeat(repeat, 1).numpy()
    grey = items.images[:, 0].numpy()
    left = tint(grey[[rng.choice(by_class[k]) for k in rows[:, 0]]], RGB[rows[:, 1]])
    right = tint(grey[[rng.choice(by_class[k]) for k in rows[:, 2]]], RGB[rows[:, 3]])
    return torch.from_numpy(np.concatenate([left, right], axis=3))


def evaluate_run(run: Path, encoder: str, sticks: Yardsticks, book: dict, key: str, base: bool = False) -> dict:
    if key not in book:
        subject_prompts_ = [class_prompt(c, "sks") for c in sticks.captions] if base else sticks.captions
        x = draw(run, subject_prompts_, SCALES[encoder])
        book[key] = {"subject": sticks.subject(x), "plain": sticks.plain_word(draw(run, sticks.plain, SCALES[encoder], seed=10**6))}
    return book[key]


def cost(run: Path) -> dict:
    cfg = load_config(run)
    net = cfg.build_net()
    keep = trainable_filter(cfg)
    trainable = 0
    for name, p in net.named_parameters():
        k = True if keep is None else keep(name, p)
        trainable += int(k.sum()) if isinstance(k, torch.Tensor) else (p.numel() if k else 0)
    method = cfg.personalize.method
    kept = (run / ADAPTER).stat().st_size if method == "lora" else 4 * trainable  # fp32 bytes
    seconds = json.loads((run / "seconds.json").read_text())
    return {"trainable": trainable, "bytes": kept, "cpu_minutes": seconds["cpu"] / 60, "wall_minutes": seconds["wall"] / 60}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="subject prompts (samples) per variant")
    p.add_argument("--n-plain", type=int, default=500, help="plain class-word prompts (samples) per variant")
    args = p.parse_args(argv)
    for encoder, run in BASES.items():
        if not ckpt.has_checkpoint(run):
            sys.exit(f"{run} is missing: train the base models first with "
                     f"`.venv/bin/python benchmarks/text_to_image.py --encoders minilm joint`")
    torch.set_num_threads(2)
    load_start, busy_start = load_average(), busy_processes()
    subject = make_subject(CLASS, n=4)
    folder = ROOT / "subject"
    write_subject(subject, folder)
    sticks = Yardsticks(subject, args.n, args.n_plain)
    book_path = ROOT / "evals.json"
    book = json.loads(book_path.read_text()) if book_path.exists() else {}
    rows = {}
    for encoder in sorted({v.encoder for v in VARIANTS}):
        key = f"base-{encoder} v2 n={args.n}/{args.n_plain} step={ckpt.weights_step(BASES[encoder])}"
        rows[f"base-{encoder}"] = evaluate_run(BASES[encoder], encoder, sticks, book, key, base=True)
        write_text(book_path, json.dumps(book, indent=1))
    for v in VARIANTS:
        name, encoder, method, weight = v.name, v.encoder, v.method, v.prior_weight
        run = trained(ROOT / name, folder, v)
        key = f"{name} v2 n={args.n}/{args.n_plain} step={ckpt.weights_step(run)}"
        rows[name] = evaluate_run(run, encoder, sticks, book, key) | {"cost": cost(run), "encoder": encoder, "method": method, "weight": weight}
        write_text(book_path, json.dumps(book, indent=1))
        print(name, json.dumps(rows[name]["subject"]), json.dumps(rows[name]["plain"]), flush=True)
    base_bytes = {e: 4 * sum(v.numel() for v in ckpt.load_weights(BASES[e]).values()) for e in BASES}
    report(args, rows, sticks, base_bytes, load_start, busy_start)
    picture(rows, sticks, subject)


def report(args, rows, sticks: Yardsticks, base_bytes, load_start, busy_start) -> None:
    lines = header("Personalisation: subject fidelity, prompt fidelity and language drift (issue 13)")
    lines += [f"Subject: Fashion-MNIST test sneaker, 4 training images; {args.n} new compositions, {args.n_plain} plain class-word prompts.",
              f"Subject fidelity in the attribute network's features (centred cosine): floor (other real sneakers, same tints and sides) "
              f"{sticks.floor:.3f}, ceiling (the subject through the autoencoder) {sticks.ceiling:.3f}. "
              f"In shape (luminance correlation of the subject half): floor {sticks.shape_floor:.3f}, ceiling {sticks.shape_ceiling:.3f}. "
              "Relative = (value - floor) / (ceiling - floor).", ""]
    table = []
    for name, r in rows.items():
        s, pl = r["subject"], r["plain"]
        base = rows[f"base-{r.get('encoder', name.split('-')[1])}"]
        c = r.get("cost")
        table.append([name, f"{s['fidelity']:.3f} ({s['relative']:+.1f})", f"{s['shape']:.3f} ({s['shape_relative']:+.2f})", f"{100 * s['all_four']:.1f} %",
                      f"{100 * (s['all_four'] - base['subject']['all_four']):+.1f}" if c else "",
                      f"{pl['fd']:.2f}", f"{pl['fd'] - base['plain']['fd']:+.2f}" if c else "", f"{pl['diversity']:.3f}",
                      f"{100 * pl['subject_rate']:.1f} %",
                      f"{c['cpu_minutes']:.1f}" if c else "", f"{c['trainable']:,}" if c else "",
                      (f"{c['bytes'] / 1024:.1f} KiB ({100 * c['bytes'] / base_bytes[r['encoder']]:.2f} %)") if c else ""])
    lines += md_table(["variant", "features (relative)", "shape (relative)", "prompt: all four", "vs base", "plain-word FD", "FD change",
                       "diversity", "subject uninvited", "CPU-min", "trainable", "weights kept (of base)"], table)
    lines += ["", "Base rows: the base model asked for the class word (it has no identifier). \"vs base\" and \"FD change\" are "
              "against the base of the same encoder.", ""]
    lines += targets(rows, base_bytes)
    lines += ["", f"Load average at start: {load_start}; busy processes: {', '.join(busy_start) or 'none'}."]
    write_text(RESULTS / f"{NAME}.md", "\n".join(lines) + "\n")
    write_text(RESULTS / f"{NAME}.json", json.dumps({"rows": rows, "floor": sticks.floor, "ceiling": sticks.ceiling, "base_bytes": base_bytes}, indent=1))
    print("\n".join(lines))


def targets(rows, base_bytes) -> list[str]:
    out = ["Targets:"]
    for name, r in rows.items():
        if "cost" not in r:
            continue
        base = rows[f"base-{r['encoder']}"]["subject"]["all_four"]
        prompt_ok = r["subject"]["all_four"] >= base - 0.05
        for what, key in (("features", "relative"), ("shape", "shape_relative")):
            ok = r["subject"][key] >= 0.5 and prompt_ok
            out.append(f"- {name}: relative fidelity in {what} {r['subject'][key]:.2f} (>= 0.5) with prompt fidelity "
                       f"{100 * (r['subject']['all_four'] - base):+.1f} points (>= -5): {'met' if ok else 'missed'}")
    for method in ("dreambooth", "lora"):
        base_fd = rows["base-minilm"]["plain"]["fd"]
        on, off = (rows.get(variant_name(method, "minilm", w)) for w in (1.0, 0.0))
        if on and off:
            d_on, d_off = on["plain"]["fd"] - base_fd, off["plain"]["fd"] - base_fd
            ok = d_on <= d_off / 3 if d_off > 0 else d_on <= 0
            out.append(f"- {method}: drift with prior preservation {d_on:+.2f} against {d_off:+.2f} without (<= a third): {'met' if ok else 'missed'}")
    for name, r in rows.items():
        if r.get("method") == "lora":
            share = r["cost"]["bytes"] / base_bytes[r["encoder"]]
            out.append(f"- {name}: adapter file {100 * share:.2f} % of the base weights (< 1 %): {'met' if share < 0.01 else 'missed'}")
    return out


def picture(rows, sticks: Yardsticks, subject) -> None:
    """references | base (class word) | each variant on the same 4 subject prompts | plain word before and after."""
    k = 4
    images, captions = [place(sticks.references[:k], sticks.sides[:k])], ["reference"] * k
    images.append(draw(BASES["minilm"], [class_prompt(c, "sks") for c in sticks.captions[:k]], SCALES["minilm"]))
    captions += ["base (class word)"] * k
    for name, r in rows.items():
        if "cost" in r:
            images.append(draw(ROOT / name, sticks.captions[:k], SCALES[r["encoder"]]))
            captions += [name] * k
    images.append(draw(BASES["minilm"], sticks.plain[:k], SCALES["minilm"], seed=10**6))
    captions += ["plain word, base"] * k
    for w in (0.0, 1.0):
        name = variant_name("dreambooth", "minilm", w)
        images.append(draw(ROOT / name, sticks.plain[:k], SCALES["minilm"], seed=10**6))
        captions += [f"plain word, {name}"] * k
    plots.captioned_grid(torch.cat(images), captions, RESULTS / f"{NAME}.png", ncol=k)
    print(f"wrote {RESULTS / NAME}.png; prompts: {sticks.captions[:k]}")


if __name__ == "__main__":
    main()
