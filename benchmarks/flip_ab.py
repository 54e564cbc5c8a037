"""Issue 34's folder targets, on the 32x32 colour folder (benchmarks/colour_folder.py, 2000 images, 1800 of them
training): do flips (or EDM's non-leaking augmentation) help at equal steps on a folder of <= 2000 images, and is
the best checkpoint that --eval-every keeps (256 samples) the best when measured afterwards with more samples?

A classifier feature net for the folder first (`difflab features train FOLDER --method classifier`, its 8 classes;
test accuracy reported), then class-conditional runs of the folder preset, --augment none, flip and edm, the same
seed and steps, each evaluated every --every steps in that net. Afterwards RUN/best and the final weights of each
are scored again with --n samples (a different seed's noise: the 256-sample figure's own noise is not reused).
An arm whose run already holds --steps is not trained again (--fresh: start every arm over).

    .venv/bin/python benchmarks/flip_ab.py [--steps 1000] [--every 250] [--n 1000] [--arms none flip edm edm-geometric]
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from colour_folder import folder_run_options, make_colour_folder
from common import RESULTS, RUNS, difflab, header, md_table

from difflab.data.images import to_uint8
from difflab.evaluation.features import embed
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats
from difflab.evaluation.watch import TrainingEval
from difflab.runs.config import AUGMENTS
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.store import has_checkpoint, weights_step


def fd_after(run, features: str, n: int) -> float:
    """FD of n samples (seed 1) of ``run`` in ``features`` against the folder's test split (TrainingEval's
    reference statistics and sampler)."""
    model = DiffusionRun.load(run)
    ev = TrainingEval(model.config, 10, features=features)
    labels = [i % model.config.num_classes for i in range(n)]
    x = model.sample(n, sampler="dpmpp-2m", steps=20, class_label=labels, seed=1, batch=250)
    feats, _ = embed(ev.net, to_uint8(x))
    mu, cov = gaussian_stats(feats)
    return frechet_from_stats(mu, cov, ev.ref["mu"], ev.ref["cov"])


def run() -> None:
    p = folder_run_options(__doc__.split("\n\n")[0], steps=1000, every=250)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--arms", nargs="+", choices=AUGMENTS, default=["none", "flip", "edm"])
    p.add_argument("--fresh", action="store_true", help="retrain the feature net and every arm")
    p.add_argument("--name", default="flip_ab", help="the results' file name (default flip_ab: results/flip_ab.md)")
    args = p.parse_args()
    folder = make_colour_folder(RUNS / "colour-folder", 2000)
    feat_dir = RUNS / "colour-folder-features"
    features = str(feat_dir / "colour-folder-classifier.safetensors")
    if args.fresh or not Path(features).is_file():
        shutil.rmtree(feat_dir, ignore_errors=True)
        shutil.rmtree(RUNS / "features-colour-folder", ignore_errors=True)
        argv = ["features", "train", str(folder), "--method", "classifier", "--out", str(feat_dir)]
        difflab([*argv, "--run", str(RUNS / "features-colour-folder"), "--quiet"])
    accuracy = json.loads((feat_dir / "colour-folder-classifier.json").read_text()).get("test_accuracy")
    rows, curves = [], []
    for augment in args.arms:
        out = RUNS / f"flip-ab-{augment}"
        if args.fresh or not (has_checkpoint(out) and weights_step(out) >= args.steps):
            shutil.rmtree(out, ignore_errors=True)
            train = ["train", str(folder), "--cond", "class", "--steps", str(args.steps)]
            train += ["--eval-every", str(args.every), "--features", features, "--augment", augment]
            t0 = time.perf_counter()
            difflab([*train, "--out", str(out), "--quiet", "--no-preview"])
            print(f"{augment}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [r for r in evals if "fd" in r]
        curves.append([augment, *(f"{r['fd']:.2f}" for r in evals)])
        best = min(evals, key=lambda r: r["fd"])
        fd_best, fd_last = fd_after(out / "best", features, args.n), fd_after(out, features, args.n)
        rows.append(
            [
                augment,
                best["step"],
                f"{best['fd']:.2f}",
                f"{fd_best:.2f}",
                f"{fd_last:.2f}",
                f"{fd_best / min(fd_best, fd_last) - 1:+.1%}",
                f"{evals[-1]['nn_ratio']:.2f}",
            ]
        )
    lines = header("Flips, EDM augmentation and the best checkpoint on the 32x32 colour folder (issue 34)")
    lines += [f"Feature net: `difflab features train` on the folder, test accuracy {accuracy}.", ""]
    lines += md_table(["augment", *(f"FD at {s}" for s in range(args.every, args.steps + 1, args.every))], curves)
    lines += [""]
    lines += md_table(
        [
            "augment",
            "best step (256 samples)",
            "its FD",
            f"FD of RUN/best ({args.n})",
            f"FD of the last ({args.n})",
            "best over the better",
            "nn ratio at the end",
        ],
        rows,
    )
    text = "\n".join(lines) + "\n"
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    run()
