"""Issue 34, part 6: which U-Net size is best for a folder run on a wall-clock budget?

On the 32x32 colour folder (benchmarks/colour_folder.py), class-conditional runs of the folder preset with its U-Net
at --net small, medium (the preset) and large, each trained for --minutes of wall-clock time on the machine's
cores (`difflab train FOLDER --max-minutes M`, one at a time), then scored by FD of 1000 samples (dpmpp-2m, 20
steps, balanced classes, seed 1) in the folder's classifier against its test split. The winner is what
`difflab train FOLDER --max-minutes M` picks (runs/presets.py: BUDGET_SIZES).

    .venv/bin/python benchmarks/budget_ab.py --minutes 10
"""

from __future__ import annotations

import argparse
import json
import shutil

from colour_folder import make_colour_folder
from common import RESULTS, RUNS, busy_processes, difflab, header, load_average, md_table
from flip_ab import fd_after

from difflab.nets.unet import num_parameters
from difflab.runs.config import load_config
from difflab.runs.store import weights_step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--sizes", nargs="+", default=["small", "medium", "large"])
    p.add_argument("--n", type=int, default=1000)
    args = p.parse_args()
    folder = make_colour_folder(RUNS / "colour-folder", 2000)
    features = RUNS / "colour-folder-features" / "colour-folder-classifier.safetensors"
    if not features.is_file():
        argv = ["features", "train", str(folder), "--method", "classifier", "--out", str(features.parent)]
        difflab([*argv, "--run", str(RUNS / "features-colour-folder"), "--quiet"])
    lines = header(f"U-Net sizes on a {args.minutes:g}-minute budget, 32x32 colour folder (issue 34)")
    lines += [f"- load average at the start: {load_average()}; other busy processes: {busy_processes() or 'none'}", ""]
    rows, results = [], {}
    for size in args.sizes:
        out = RUNS / f"budget-{args.minutes:g}-{size}"
        shutil.rmtree(out, ignore_errors=True)
        argv = ["train", str(folder), "--cond", "class", "--net", size, "--max-minutes", str(args.minutes)]
        difflab([*argv, "--out", str(out), "--quiet", "--no-preview"])
        cfg = load_config(out)
        steps = weights_step(out)
        fd = fd_after(out, str(features), args.n)
        params = num_parameters(cfg.build_net())
        results[size] = {"parameters": params, "steps": steps, "fd": fd, "base_channels": cfg.net.base_channels}
        rows.append(
            [size, cfg.net.base_channels, f"{params:,}", steps, f"{steps / (60 * args.minutes):.2f}", f"{fd:.2f}"]
        )
        print(f"{size}: {steps} steps, FD {fd:.2f}", flush=True)
    best = min(results, key=lambda k: results[k]["fd"])
    lines += md_table(["net", "base channels", "parameters", "steps", "steps / s", f"FD ({args.n} samples)"], rows)
    lines += ["", f"Best after {args.minutes:g} minutes: **{best}**.", f"- load average at the end: {load_average()}"]
    (RESULTS / f"budget_ab_{args.minutes:g}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"budget_ab_{args.minutes:g}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
