"""Inverse problems on held-out Fashion-MNIST: every method on every task, with its cost in network evaluations.

The model is the unconditional Fashion-MNIST run of benchmarks/guidance_tradeoff.py (benchmarks/runs/guidance/
uncond, trained there through the one training loop; this script trains it the same way when it is missing).
--n held-out test images (a fixed subset) are degraded by each task's operator (difflab.operators):

    box       the right half missing (Mask)                 random70  70 % of the pixels missing (Mask)
    sr4       4x average-pool downsampling (Downsample)     blur      Gaussian blur, sigma 1.5 px (Blur)

and restored through ``generate`` with each method of difflab.inverse (sample i seeded i):

    replace   --steps-replace ancestral steps (default 50)
    repaint   RePaint at its default resampling (jumps of 10 levels, 10 passes) on a --steps-repaint grid (default 50)
    ddrm      --steps-ddrm steps (default 20, the paper's), eta 0.85, eta_b 1
    dps       --steps-dps steps (default 100), step size --dps-scale

and, for sr4 only, a trained super-resolution model (SR3: ``difflab train fashion-mnist --cond low-res --factor 4``,
the same preset recipe and --steps as the unconditional model, trained here through the one loop when missing,
benchmarks/runs/sr4) sampling p(x | low_res) with dpmpp-2m in --steps-sr3 steps (default 20).

Scores: FD of the restorations against the real test set (the shipped fashion-mnist features; with n in the
hundreds FD is biased upwards, so compare rows, not papers), PSNR against the ground truth, consistency
(RMS of A x_hat - y), network evaluations per image and wall-clock seconds per image (2 threads, alone).
Target (issue 10): on each task, a method at <= 100 network evaluations within 10 % of RePaint's FD at >= 10x
fewer evaluations.

    .venv/bin/python benchmarks/inverse_problems.py [--n 200]

Writes benchmarks/results/inverse_problems.md, .json and .png; a killed run resumes from the rows it saved (the
picture's rows are kept in benchmarks/runs/inverse_grids.npz, so a resumed run draws the rows it did not redo).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, header, load_average, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import configs, train_all, write_text  # noqa: E402
from difflab.core.operators import Blur, Downsample, Mask, box_mask, random_mask  # noqa: E402
from difflab.data.images import load_images, to_model, to_uint8  # noqa: E402
from difflab.evaluation.features import embed, load_feature_net  # noqa: E402
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats, psnr  # noqa: E402
from difflab.evaluation.reference import reference_stats  # noqa: E402
from difflab.runs.data import training_data  # noqa: E402
from difflab.runs.diffusion import DiffusionRun, load_upscaler  # noqa: E402
from difflab.runs.presets import with_low_res  # noqa: E402
from difflab.runs.store import has_checkpoint  # noqa: E402
from difflab.sampling.inverse import METHODS, evaluations  # noqa: E402

SHAPE = (1, 28, 28)
TASKS = {
    "box": lambda: Mask(box_mask(SHAPE), SHAPE),
    "random70": lambda: Mask(random_mask(SHAPE, 0.7, seed=0), SHAPE),
    "sr4": lambda: Downsample(4, SHAPE),
    "blur": lambda: Blur(1.5, SHAPE),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps-replace", type=int, default=50)
    p.add_argument("--steps-repaint", type=int, default=50)
    p.add_argument("--steps-ddrm", type=int, default=20)
    p.add_argument("--steps-dps", type=int, default=100)
    p.add_argument("--dps-scale", type=float, default=1.0)
    p.add_argument("--steps-sr3", type=int, default=20)
    p.add_argument("--train-steps", type=int, default=5000, help="training steps of a model this script has to train")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = p.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    run = RUNS / "guidance" / "uncond"
    if not has_checkpoint(run):
        data, cfgs = configs(args.train_steps, 2000)
        train_all(RUNS / "guidance", data, {"uncond": cfgs["uncond"]})
    if "sr4" in args.tasks:
        sr_cfg = with_low_res(configs(args.train_steps, 2000)[1]["uncond"], 4, None)
        train_all(RUNS, training_data(sr_cfg), {"sr4": sr_cfg})
    model = DiffusionRun.load(run)
    test = load_images("fashion-mnist", split="test")
    index = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[: args.n]
    truth = test.images[index]
    net = load_feature_net("fashion-mnist")
    ref = reference_stats(test, net, progress=False)
    steps = {
        "replace": args.steps_replace,
        "repaint": args.steps_repaint,
        "ddrm": args.steps_ddrm,
        "dps": args.steps_dps,
    }
    options = {"dps": {"scale": args.dps_scale}}
    cache = RESULTS / "inverse_problems.json"
    rows = json.loads(cache.read_text())["rows"] if cache.exists() else []
    setting = {"n": args.n, "steps": steps, "dps_scale": args.dps_scale}
    rows = [r for r in rows if r["setting"] == setting and r.get("steps_sr3", args.steps_sr3) == args.steps_sr3]
    grid_file = RUNS / "inverse_grids.npz"
    grids = (
        {tuple(k.split("/")): torch.from_numpy(v) for k, v in np.load(grid_file).items()} if grid_file.exists() else {}
    )
    load_start = load_average()
    for task in args.tasks:
        op = TASKS[task]()
        y = op(to_model(truth))
        for method in [*METHODS, "sr3"] if task == "sr4" else METHODS:
            if any(r["task"] == task and r["method"] == method for r in rows):
                continue
            t0 = time.perf_counter()
            if method == "sr3":
                x = load_upscaler(RUNS / "sr4").upscale(y, steps=args.steps_sr3, batch=args.n, progress=True)
                calls = args.steps_sr3
            else:
                x = model.restore(
                    y,
                    op,
                    method=method,
                    steps=steps[method],
                    options=options.get(method),
                    seed=0,
                    batch=args.n,
                    progress=True,
                )
                calls = evaluations(method, steps[method], options.get(method))
            seconds = time.perf_counter() - t0
            images = to_uint8(x)
            feats, _ = embed(net, images)
            mu, cov = gaussian_stats(feats)
            rows.append(
                {
                    "task": task,
                    "method": method,
                    "setting": setting,
                    "fd": frechet_from_stats(mu, cov, ref["mu"], ref["cov"]),
                    "psnr": float(psnr(images, truth).mean()),
                    "consistency": float(op.consistency(x, y).mean()),
                    "evaluations": calls,
                    "seconds_per_image": seconds / args.n,
                    **({"steps_sr3": args.steps_sr3} if method == "sr3" else {}),
                }
            )
            grids[(task, method)] = images[:8]
            write_text(cache, json.dumps({"rows": rows}, indent=1))
            np.savez(grid_file, **{"/".join(k): v.numpy() for k, v in grids.items()})
            print(rows[-1])
        grids[(task, "measurement")] = to_uint8(op.show(y[:8]).clamp(-1, 1))
    report(args, rows, load_start)
    picture(grids, truth[:8], args.tasks)


def report(args, rows, load_start) -> None:
    lines = header("Inverse problems on held-out Fashion-MNIST: FD, PSNR, consistency and cost per method")
    lines += [
        f"- model: benchmarks/runs/guidance/uncond (the unconditional fashion-mnist preset recipe, {args.train_steps} "
        "steps); sr3: "
        "benchmarks/runs/sr4 (the same recipe conditioned on the 4x low-res image, SR3 with noise-conditioning "
        "augmentation)",
        f"- {args.n} held-out test images per task; FD against the 10000 test images (shipped fashion-mnist features; "
        "biased "
        f"upwards at this n), PSNR against the truth, consistency = RMS of A x_hat - y in [-1, 1] units",
        f"- load average at the start: {load_start}; at the end: {load_average()}",
        "",
    ]
    table = [
        [
            r["task"],
            r["method"],
            r["evaluations"],
            f"{r['fd']:.2f}",
            f"{r['psnr']:.2f}",
            f"{r['consistency']:.4f}",
            f"{r['seconds_per_image']:.2f}",
        ]
        for r in rows
    ]
    lines += md_table(
        ["task", "method", "network evaluations", "FD", "PSNR dB", "consistency", "seconds / image"], table
    )
    lines += [
        "",
        "## Target: a method at <= 100 evaluations within 10 % of RePaint's FD at >= 10x fewer evaluations",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = {r["method"]: r for r in rows if r["task"] == task}
        rp = mine.get("repaint")
        if rp is None:
            continue
        ok = [
            m
            for m, r in mine.items()
            if m != "repaint"
            and r["evaluations"] <= 100
            and r["evaluations"] * 10 <= rp["evaluations"]
            and r["fd"] <= 1.1 * rp["fd"]
        ]
        best = min((r for m, r in mine.items() if m != "repaint" and r["evaluations"] <= 100), key=lambda r: r["fd"])
        lines.append(
            f"- {task}: {'met by ' + ', '.join(ok) if ok else 'missed'}; RePaint FD {rp['fd']:.2f} at "
            f"{rp['evaluations']} "
            f"evaluations; best cheap method {best['method']} FD {best['fd']:.2f} at {best['evaluations']} "
            f"({best['fd'] / rp['fd']:.2f}x RePaint's FD)"
        )
    write_text(RESULTS / "inverse_problems.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def picture(grids: dict, truth: torch.Tensor, tasks) -> None:
    """Per task a block: rows measurement, each method, truth; 8 images each."""
    from difflab.viz import plots

    blocks = []
    for task in tasks:
        for key in ["measurement", *METHODS, "sr3"]:
            if (task, key) in grids:
                blocks.append(grids[(task, key)])
        blocks.append(truth)
    if blocks:
        plots.save_grid(torch.cat(blocks), RESULTS / "inverse_problems.png", nrow=8)


if __name__ == "__main__":
    main()
