"""What --eval-every costs: one run on the 32x32 colour folder (benchmarks/colour_folder.py, 2000 images, class
labels, the folder preset), evaluated every --every steps; the eval rows of metrics.jsonl give the seconds of each
evaluation (256 samples, dpmpp-2m 20 steps, FD/KID and the nearest-training-image distance), the loss rows the
training rate. Reported: the cost at the default interval (1000 steps) and at --every, and the FD per evaluation.

    .venv/bin/python benchmarks/eval_every_cost.py [--steps 500] [--every 250]
"""

from __future__ import annotations

import json
import shutil
import statistics

from colour_folder import folder_run_options, make_colour_folder
from common import RESULTS, RUNS, difflab, header, md_table


def run() -> None:
    args = folder_run_options(__doc__.split("\n\n")[0], steps=500, every=250).parse_args()
    folder = make_colour_folder(RUNS / "colour-folder", 2000)
    out = RUNS / "eval-every-cost"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["train", str(folder), "--cond", "class", "--steps", str(args.steps), "--eval-every", str(args.every)]
    difflab([*argv, "--out", str(out), "--quiet", "--no-preview"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fd" in r]
    rate = statistics.median(r["it_s"] for r in rows if "it_s" in r)
    eval_s = statistics.median(r["eval_seconds"] for r in evals)
    lines = header("What --eval-every costs (32x32 colour folder, class labels)")
    lines += md_table(
        ["training steps/s", "seconds per evaluation", "cost every 1000 steps (default)", f"cost every {args.every}"],
        [[f"{rate:.2f}", f"{eval_s:.1f}", f"{eval_s * rate / 1000:.1%}", f"{eval_s * rate / args.every:.1%}"]],
    )
    lines += [
        "",
        *md_table(
            ["step", "FD", "KID", "nearest-training distance / real's"],
            [[r["step"], f"{r['fd']:.2f}", f"{r['kid']:.3f}", f"{r['nn_ratio']:.2f}"] for r in evals],
        ),
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS / "eval_every_cost.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run()
