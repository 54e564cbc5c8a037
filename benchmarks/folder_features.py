"""Issue 34, part 1: is a folder's own instance-discrimination feature net (evaluation/instance.py) a sound judge?

For each of digits, Fashion-MNIST and the 32x32 colour folder (benchmarks/colour_folder.py):

1. train its instance net with the default recipe (`difflab features train SRC --method instance`), and read its
   linear probe (ridge read-out of the frozen features, train split -> test split) beside the same probe on fixed
   random features and on the labelled classifier's features (the shipped classifier; for the folder, one trained
   by `difflab features train FOLDER --method classifier`);
2. train one unconditional diffusion run in stages (constant LR: a stage's checkpoint is the checkpoint of one
   long run), draw the same samples from each stage's EMA (`difflab sample`, dpmpp-2m, 20 steps, seeds 0..n-1),
   and score them by FD against the test split in the classifier, the instance net and random features; the
   instance net passes where it ranks the stages as the classifier does (Kendall's tau between the orders).

    .venv/bin/python benchmarks/folder_features.py            # about 40 min on 2 cores
    .venv/bin/python benchmarks/folder_features.py --only digits --n 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import combinations
from pathlib import Path

import numpy as np
import torch
from colour_folder import make_colour_folder
from common import RESULTS, RUNS, busy_processes, difflab, header, load_average, md_table, trained

from difflab.data.images import load_images
from difflab.evaluation.features import embed, load_feature_net, resolve_feature_net
from difflab.evaluation.instance import linear_probe
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats
from difflab.evaluation.reference import reference_stats
from difflab.nets.features import random_feature_net
from difflab.runs.store import weights_step

FOLDER = RUNS / "colour-folder"
FOLDER_CLASSIFIER = RUNS / "colour-folder-features" / "colour-folder-classifier.safetensors"
SETS = {
    # name: (source, the classifier the instance net is judged against, diffusion stages)
    "digits": ("digits", "digits", [100, 200, 400, 800, 1500]),
    "fashion-mnist": ("fashion-mnist", "fashion-mnist", [250, 500, 1000, 2000]),
    "colour-folder": (str(FOLDER), str(FOLDER_CLASSIFIER), [250, 500, 1000, 2000]),
}


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-a between two score lists over the same items: 1 when they order every pair alike."""
    pairs = list(combinations(range(len(a)), 2))
    s = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(s / len(pairs))


def instance_net(name: str, source: str, steps: int | None) -> tuple[Path, dict]:
    out = RUNS / (f"instance-{name}" if steps is None else f"instance-{name}-{steps}")
    weights = out / f"{Path(source).stem}-instance.safetensors"
    if not weights.is_file():
        run = ["features", "train", source, "--method", "instance", "--run", str(out), "--threads", "2", "--quiet"]
        run += [] if steps is None else ["--steps", str(steps)]
        difflab(run + (["--resume"] if (out / "config.json").is_file() else []))
    return weights, json.loads(weights.with_suffix(".json").read_text())


def classifier(name: str, spec: str) -> str:
    if Path(spec).suffix == ".safetensors" and not Path(spec).is_file():
        difflab(
            ["features", "train", str(FOLDER), "--method", "classifier", "--out", str(Path(spec).parent), "--quiet"]
        )
    return spec


def probe(net, train, test) -> float:
    return linear_probe(embed(net, train.images)[0], train.labels, embed(net, test.images)[0], test.labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(SETS), nargs="+", default=list(SETS))
    p.add_argument("--n", type=int, default=1000, help="samples per stage")
    p.add_argument("--instance-steps", type=int, help="the instance nets' training steps (default: the recipe's)")
    p.add_argument("--tag", default="", help="suffix of the results' file names")
    args = p.parse_args()
    torch.set_num_threads(2)
    make_colour_folder(FOLDER)
    lines = header("A folder's own feature net: linear probe and FD ranking against the labelled classifier")
    lines += [f"- load average at the start: {load_average()}; other busy processes: {busy_processes() or 'none'}", ""]
    probes, rankings, results = [], [], {}
    for name in args.only:
        source, spec, stages = SETS[name]
        weights, meta = instance_net(name, source, args.instance_steps)
        train, test = load_images(source, "train"), load_images(source, "test")
        C, H, W = train.images.shape[1:]
        nets = {
            "classifier": resolve_feature_net(classifier(name, spec), source, C, H, W),
            "instance": load_feature_net(str(weights)),
            "random": random_feature_net(C),
        }
        t0 = time.perf_counter()
        row = {k: probe(net, train, test) for k, net in nets.items()}
        probes.append(
            [
                name,
                len(train),
                len(test),
                f"{meta['run']['steps']} in {meta['train_seconds']:.0f} s",
                *(f"{100 * row[k]:.1f}" for k in nets),
            ]
        )
        print(f"{name}: probes {row} ({time.perf_counter() - t0:.0f} s)", flush=True)
        run = RUNS / f"rank-{name}"
        fds = {k: [] for k in nets}
        refs = {k: reference_stats(test, net, progress=False) for k, net in nets.items()}
        real = train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: args.n]]
        floor = {}  # FD of n real training images: what a perfect model would score at this n
        for k, net in nets.items():
            mu, cov = gaussian_stats(embed(net, real)[0])
            floor[k] = frechet_from_stats(mu, cov, refs[k]["mu"], refs[k]["cov"])
        for steps in stages:
            argv = ["train", source, "--out", str(run), "--steps", str(steps), "--no-preview", "--quiet"]
            trained(argv)
            samples = run / f"samples-{steps}.npz"
            if not samples.is_file():
                if weights_step(run) != steps:  # the run went past this stage: its samples cannot be drawn again
                    sys.exit(f"{run} is at step {weights_step(run)}, past stage {steps}: delete it and run again")
                draw = ["sample", str(run), "-n", str(args.n), "--sampler", "dpmpp-2m", "--steps", "20"]
                difflab([*draw, "--save", str(samples), "--quiet"])
            images = torch.from_numpy(np.load(samples)["images"])
            for k, net in nets.items():
                mu, cov = gaussian_stats(embed(net, images)[0])
                fds[k].append(frechet_from_stats(mu, cov, refs[k]["mu"], refs[k]["cov"]))
            print(f"{name} step {steps}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in fds.items()), flush=True)
        steps_text = " / ".join(map(str, stages))
        for k in nets:
            tau = "(the order)" if k == "classifier" else f"{kendall_tau(fds['classifier'], fds[k]):+.2f}"
            span = fds[k][0] / fds[k][-1]
            rankings.append(
                [name, k, steps_text, " / ".join(f"{v:.2f}" for v in fds[k]), f"{floor[k]:.3f}", f"{span:.1f}", tau]
            )
        results[name] = {
            "probe": row, "stages": stages, "fd": fds, "floor": floor, "instance_meta": meta, "n": args.n
        }  # fmt: skip
    lines += ["## Linear probe (ridge read-out of frozen features; test accuracy %)", ""]
    lines += md_table(["data", "train", "test", "instance net steps", "classifier", "instance", "random"], probes)
    lines += ["", f"## FD of one run's checkpoints ({args.n} samples each, dpmpp-2m 20 steps) in three nets", ""]
    headers = ["data", "net", "steps", "FD at each", "real floor", "first / last", "Kendall tau vs classifier"]
    lines += md_table(headers, rankings, "llllrrl")
    lines += ["", f"- load average at the end: {load_average()}"]
    (RESULTS / f"folder_features{args.tag}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"folder_features{args.tag}.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
