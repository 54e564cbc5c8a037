"""The guidance trade-off on Fashion-MNIST: FD and class accuracy against the guidance scale, classifier-free
guidance against classifier guidance at matched denoiser training budgets.

Three runs train through difflab's one training loop (training.train) on the fashion-mnist preset recipe
(U-Net preset, cosine DDPM, v-prediction, min-SNR-5, bf16), each resumable (run the script again after a kill):

    cond     class-conditional, label dropout p = 0.1 to the null class          --steps optimizer steps
    uncond   the same recipe without labels                                      --steps optimizer steps
    clf      a noise-aware classifier (the U-Net's encoder half) for uncond      --classifier-steps steps

Then ``evaluate`` (the one evaluation path) scores --n samples per row, sample i asking for class i mod 10,
dpmpp-2m in --sample-steps steps, with the shipped fashion-mnist feature network: FD against the test split and
class accuracy (how often the feature network sees the class asked for). Rows:

    classifier-free   cond with scale s (s = 0: the null prediction, i.e. unconditional; s = 1: plain conditional)
    classifier        uncond guided by clf with scale s (s = 0: the unconditional model itself)
    classifier-free + interval   cond with scale s only for t/t_max in --interval

Target (issue 9): at the best scale, class accuracy >= 95 % with FD no worse than the same recipe's
unconditional model (the classifier row at s = 0).

    .venv/bin/python benchmarks/guidance_tradeoff.py [--steps 5000] [--classifier-steps 2000] [--n 1000]

Writes benchmarks/results/guidance_tradeoff.md, .json and .png; runs live in benchmarks/runs/guidance/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, header, load_average, md_table  # noqa: E402
from difflab.data.images import load_images, to_model  # noqa: E402
from difflab.evaluation.evaluate import Sampling, evaluate  # noqa: E402
from difflab.guidance.classifier import accuracy_by_noise, classifier_config, load_classifier  # noqa: E402
from difflab.guidance.config import GuidanceConfig  # noqa: E402
from difflab.io import atomic_path  # noqa: E402
from difflab.runs.data import load_split, training_data  # noqa: E402
from difflab.runs.presets import preset_for, with_class_labels  # noqa: E402
from difflab.runs.store import has_checkpoint, weights_step  # noqa: E402
from difflab.training.loop import train  # noqa: E402

SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0)
INTERVAL_SCALES = (2.0, 3.0, 5.0)


def configs(steps: int, classifier_steps: int):
    base = preset_for("fashion-mnist")
    base = replace(base, train=replace(base.train, steps=steps, sample_every=0))
    data, num_classes = training_data(base), load_split(base, "train").num_classes
    cond = with_class_labels(base, num_classes, 0.1)
    clf = classifier_config(base, num_classes)
    clf = replace(clf, train=replace(clf.train, steps=classifier_steps))
    return data, {"cond": cond, "uncond": base, "clf": clf}


def train_all(root: Path, data, cfgs: dict) -> dict:
    seconds = {}
    for name, cfg in cfgs.items():
        run = root / name
        if has_checkpoint(run) and weights_step(run) >= cfg.train.steps:
            print(f"{name}: trained ({cfg.train.steps} steps)")
            seconds[name] = (
                json.loads((run / "seconds.json").read_text())["seconds"] if (run / "seconds.json").exists() else None
            )
            continue
        print(f"training {name} ({cfg.train.steps} steps)")
        t0 = time.perf_counter()
        train(run, cfg, data, resume=has_checkpoint(run), progress=True)
        seconds[name] = time.perf_counter() - t0
        write_text(run / "seconds.json", json.dumps({"seconds": seconds[name]}))
    return seconds


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)


def classifier_accuracy(run: Path) -> dict:
    """The classifier's test accuracy by noise level (2000 test images), as `difflab train-classifier` reports it."""
    clf, _ = load_classifier(run)
    test = load_images("fashion-mnist", split="test")
    return {str(k): v for k, v in accuracy_by_noise(clf, to_model(test.images[:2000]), test.labels[:2000]).items()}


def rows_to_run(root: Path, interval: tuple[float, float]) -> list[tuple[str, float, str, GuidanceConfig]]:
    rows = [("classifier-free", s, str(root / "cond"), GuidanceConfig(scale=s)) for s in SCALES]
    for s in SCALES:  # s = 0: the unconditional model itself (no classifier)
        g = GuidanceConfig(classifier=str(root / "clf"), classifier_scale=s) if s else None
        rows.append(("classifier", s, str(root / "uncond"), g))
    rows += [
        ("classifier-free + interval", s, str(root / "cond"), GuidanceConfig(scale=s, interval=interval))
        for s in INTERVAL_SCALES
    ]
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps of each denoiser")
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--n", type=int, default=1000, help="samples per row")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--interval", type=float, nargs=2, default=(0.1, 0.7), metavar=("LO", "HI"))
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    root = RUNS / "guidance"
    load_start = load_average()
    data, cfgs = configs(args.steps, args.classifier_steps)
    seconds = train_all(root, data, cfgs)
    clf_acc = classifier_accuracy(root / "clf")

    results = []
    cache = RESULTS / "guidance_tradeoff.json"
    done = {(r["method"], r["scale"]): r for r in json.loads(cache.read_text())["rows"]} if cache.exists() else {}
    setting = {"n": args.n, "sample_steps": args.sample_steps, "interval": list(args.interval)}
    for method, s, run, g in rows_to_run(root, tuple(args.interval)):
        key = (method, s)
        old = done.get(key, {})
        # rows written before these fields were stored used 20 steps and the interval (0.1, 0.7)
        old_setting = {
            "n": old.get("n"),
            "sample_steps": old.get("sample_steps", 20),
            "interval": old.get("interval", [0.1, 0.7]),
        }
        if old and old_setting == setting and old.get("step") == weights_step(run):
            results.append(old)
            continue
        print(f"{method}, s = {s}")
        t0 = time.perf_counter()
        r = evaluate(
            run, n=args.n, sampling=Sampling("dpmpp-2m", args.sample_steps), bpd_n=0, progress=False, guidance=g
        )
        results.append(
            {
                "method": method,
                "scale": s,
                "fd": r["fd"],
                "accuracy": r["classes"].get("accuracy"),
                **setting,
                "step": r["step"],
                "sampling_seconds": r["seconds"]["sampling"],
                "seconds": time.perf_counter() - t0,
            }
        )
        write_text(cache, json.dumps({"rows": results}, indent=1))  # each row kept as it comes: a killed run resumes
    write_report(args, results, seconds, clf_acc, load_start)


def write_report(args, results: list[dict], seconds: dict, clf_acc: dict | None, load_start: str) -> None:
    lines = header("Guidance trade-off on Fashion-MNIST: FD and class accuracy against the scale")
    lines += [
        f"- training: cond and uncond {args.steps} optimizer steps each (batch 64, the fashion-mnist preset recipe, "
        "bf16); "
        f"the classifier {args.classifier_steps} steps; seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items() if v),
        "- matched budgets: both methods use a denoiser trained for the same steps; classifier guidance adds the "
        "classifier's training"
        + (
            f"; its test accuracy by t/t_max: {', '.join(f'{k}: {v:.3f}' for k, v in clf_acc.items())}"
            if clf_acc
            else ""
        ),
        f"- samples: {args.n} per row (sample i asks for class i mod 10), dpmpp-2m, {args.sample_steps} steps, seed 0; "
        "FD and class "
        "accuracy with the shipped fashion-mnist feature network against the test split",
        f"- guidance interval rows: t/t_max in [{args.interval[0]}, {args.interval[1]}]",
        f"- load average at the start: {load_start}; at the end: {load_average()}",
        "",
    ]

    def pct(a):
        return "- (no class asked)" if a is None else f"{100 * a:.1f}%"

    rows = [[r["method"], f"{r['scale']:g}", f"{r['fd']:.3f}", pct(r["accuracy"])] for r in results]
    lines += md_table(["method", "scale s", "FD", "class accuracy"], rows)
    uncond = next(r for r in results if r["method"] == "classifier" and r["scale"] == 0)
    lines += ["", "## Target: class accuracy >= 95 % with FD no worse than the unconditional model's", ""]
    for method in dict.fromkeys(r["method"] for r in results):
        mine = [r for r in results if r["method"] == method and r["accuracy"] is not None]
        ok = [r for r in mine if r["accuracy"] >= 0.95 and r["fd"] <= uncond["fd"]]
        best = max(mine, key=lambda r: (r["accuracy"] >= 0.95, -r["fd"] if r["accuracy"] >= 0.95 else r["accuracy"]))
        met = ", ".join(f"{r['scale']:g}" for r in ok)
        verdict = f"met at s = {met}" if ok else "missed"
        lines.append(
            f"- {method}: {verdict}; best row s = {best['scale']:g}: accuracy {100 * best['accuracy']:.1f}%, FD "
            f"{best['fd']:.3f} "
            f"(unconditional FD {uncond['fd']:.3f})"
        )
    write_text(RESULTS / "guidance_tradeoff.md", "\n".join(lines) + "\n")
    plot(results, RESULTS / "guidance_tradeoff.png")
    print("\n".join(lines))


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in results):
        rs = [r for r in results if r["method"] == method]
        axes[0].plot([r["scale"] for r in rs], [r["fd"] for r in rs], "o-", label=method)
        ra = [r for r in rs if r["accuracy"] is not None]
        axes[1].plot([r["scale"] for r in ra], [100 * r["accuracy"] for r in ra], "o-", label=method)
    axes[0].set(xlabel="guidance scale s", ylabel="FD (lower is better)", title="sample quality")
    axes[1].set(xlabel="guidance scale s", ylabel="class accuracy %", title="asked-for class")
    axes[1].axhline(95, color="grey", lw=0.8, ls="--")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
