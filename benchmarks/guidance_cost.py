"""The cost of guidance: wall-clock seconds per sample of guided against unguided sampling at the same steps.

All rows draw the same --n samples (sample i asks for class i mod 10, seeds 0..n-1) through ``generate`` with
dpmpp-2m in --steps steps, from the class-conditional Fashion-MNIST run of benchmarks/guidance_tradeoff.py
(benchmarks/runs/guidance/cond; timing does not depend on the weights, so without it an untrained network of
the same preset stands in, and the report says so):

    unguided              the plain conditional prediction (s = 1): one forward pass of B rows per step
    CFG batched           s = 3, the conditional and null rows in one forward pass of 2B rows (guidance.Guided)
    CFG two passes        s = 3, two forward passes of B rows (Guided(..., batched=False))
    CFG interval          s = 3 only for t/t_max in --interval, one pass of B rows elsewhere
    classifier guidance   the noise-aware classifier's gradient added to the unguided prediction (when its run exists)

The rows take turns for --rounds rounds (so background load hits each alike); the table gives the median.
Target (issue 9): guided sampling at <= 1.3x the unguided time, at FD and accuracy no worse than full-range
guidance (those two come from guidance_tradeoff.md's interval rows).

    .venv/bin/python benchmarks/guidance_cost.py [--n 200] [--steps 20] [--rounds 3]

Run it alone: it times the CPU. Writes benchmarks/results/guidance_cost.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, busy_processes, header, load_average, md_table  # noqa: E402
from difflab.guidance.classifier import load_classifier  # noqa: E402
from difflab.guidance.wrappers import ClassifierGuided, Guided  # noqa: E402
from difflab.runs.diffusion import DiffusionRun  # noqa: E402
from difflab.runs.presets import preset_for, with_class_labels  # noqa: E402
from difflab.runs.store import has_checkpoint  # noqa: E402
from difflab.sampling.generate import generate  # noqa: E402
from difflab.sampling.samplers import default_spacing, timesteps  # noqa: E402


def contenders(interval: tuple[float, float]):
    run, clf_run = RUNS / "guidance" / "cond", RUNS / "guidance" / "clf"
    if has_checkpoint(run):
        loaded = DiffusionRun.load(run)
        denoiser, cfg = loaded.denoiser, loaded.config
        source = f"the trained run {run.relative_to(RUNS.parent.parent)}"
    else:
        cfg = with_class_labels(preset_for("fashion-mnist"), 10, 0.1)
        denoiser, source = (
            cfg.build_denoiser().eval(),
            "an untrained network of the fashion-mnist preset (no trained run found)",
        )
    specs = cfg.condition_specs()
    rows = {
        "unguided (s = 1)": denoiser,
        "CFG batched (s = 3)": Guided(denoiser, specs, 3.0),
        "CFG two passes (s = 3)": Guided(denoiser, specs, 3.0, batched=False),
        f"CFG interval {interval[0]}-{interval[1]} (s = 3)": Guided(denoiser, specs, 3.0, interval=interval),
    }
    if has_checkpoint(clf_run):
        clf, _ = load_classifier(clf_run)
        rows["classifier guidance (s = 3)"] = ClassifierGuided(denoiser, clf, 3.0)
    return cfg, rows, source


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--interval", type=float, nargs=2, default=(0.1, 0.7), metavar=("LO", "HI"))
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cfg, rows, source = contenders(tuple(args.interval))
    labels = torch.arange(args.n) % 10
    load_start, busy_start = load_average(), busy_processes()
    times: dict[str, list[float]] = {name: [] for name in rows}
    passes: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, den in rows.items():
            if isinstance(den, Guided):
                den.evaluations = 0
            t0 = time.perf_counter()
            generate(
                den,
                cfg.shape,
                args.n,
                sampler="dpmpp-2m",
                steps=args.steps,
                cond={"class_labels": labels},
                batch=args.n,
            )
            times[name].append(time.perf_counter() - t0)
            passes[name] = den.evaluations if isinstance(den, Guided) else args.steps
    base = statistics.median(times["unguided (s = 1)"])
    process = cfg.build_process()
    u = (
        timesteps(process, args.steps, default_spacing("dpmpp-2m", process))[:-1] / process.t_max
    )  # the times of the calls
    inside = int(((u >= args.interval[0]) & (u <= args.interval[1])).sum())
    table = []
    for name, seconds in times.items():
        med = statistics.median(seconds)
        rows_per_step = {
            "CFG batched (s = 3)": "2B",
            "CFG two passes (s = 3)": "B each",
            "classifier guidance (s = 3)": "B, + the classifier's forward and backward",
        }.get(name, "B")
        if name.startswith("CFG interval"):
            rows_per_step = f"2B in {inside} calls, B in {args.steps - inside}"
        table.append([name, f"{passes[name]}", rows_per_step, f"{1000 * med / args.n:.1f}", f"{med / base:.2f}x"])
    lines = header("The cost of guidance: seconds per sample, guided against unguided (Fashion-MNIST U-Net)")
    lines += [
        f"- network: {source}",
        f"- {args.n} samples in one batch, dpmpp-2m, {args.steps} steps, fp32, torch threads "
        f"{torch.get_num_threads()}; "
        f"median of {args.rounds} interleaved rounds",
        f"- load average at the start: {load_start}; at the end: {load_average()}; other busy processes at the start: "
        f"{', '.join(busy_start) or 'none'}",
        "",
    ]
    lines += md_table(["sampling", "denoiser calls", "rows per call", "ms per sample", "vs unguided"], table)
    lines += [
        "",
        "Denoiser calls count the U-Net's calls per batch (the classifier's own passes are not in that column).",
    ]
    lines += ["", "Target: guided sampling at <= 1.3x the unguided time.", ""]
    for name in times:
        if name != "unguided (s = 1)":
            ratio = statistics.median(times[name]) / base
            lines.append(f"- {name}: {ratio:.2f}x ({'met' if ratio <= 1.3 else 'missed'})")
    (RESULTS / "guidance_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
