"""Samples/s of the shipped word-tower text model fashion-pairs-t2i-words (20-step dpmpp-2m, its own guidance)
now against an earlier commit.

Each measurement is a fresh process that imports difflab from one source tree (this checkout, or a git worktree of
--baseline made under benchmarks/runs/), loads the shipped model, draws one untimed batch and then times --repeats
batches of --n samples (best kept: background load only slows a batch down). The trees take turns, round by round,
so load on a shared machine hits both alike. Variants of today's tree: `compile` (nn.Module.compile of the network
before sampling; the compile's own minute not counted) and `bf16` (torch.autocast bfloat16 around sampling).

    .venv/bin/python benchmarks/sampling_throughput.py [--baseline d92d683] [--rounds 3]

Target (issue 33): today's tree >= 1.5x the baseline's samples/s. Writes results/sampling_throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import ROOT, RUNS, header, load_average, md_table

MODEL = "fashion-pairs-t2i-words"
FORMER_NAME = "fashion-pairs-t2i"  # its name in trees before issue 32 gave that name to the open-vocabulary model
PROMPT = "a red shirt on the left and blue trousers on the right"
TARGET = 1.5

CHILD = r"""
import contextlib, json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from difflab.runs.load import load
model, n, repeats, variant = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
run = load(model)
ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if variant == "bf16" else contextlib.nullcontext
if variant == "compile":
    run.denoiser.net.compile()
best = 0.0
with ctx():
    run.sample(n, prompt=PROMPT, batch=n, sampler="dpmpp-2m", steps=20)  # untimed: warm-up (and the compile)
    for _ in range(repeats):
        start = time.perf_counter()
        run.sample(n, prompt=PROMPT, batch=n, sampler="dpmpp-2m", steps=20)
        best = max(best, n / (time.perf_counter() - start))
import difflab
print(json.dumps({"samples_s": best, "source": difflab.__file__}))
""".replace("PROMPT", repr(PROMPT))


def baseline_tree(rev: str) -> Path:
    """A git worktree of ``rev`` under benchmarks/runs/ (made once)."""
    tree = RUNS / f"baseline-{rev}"
    if not tree.exists():
        RUNS.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True)
    return tree


def measure(tree: Path, variant: str, n: int, repeats: int, threads: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    model = MODEL if (tree / "difflab" / "shipped" / MODEL).is_dir() else FORMER_NAME  # the same weights either way
    argv = [sys.executable, "-c", CHILD, model, str(n), str(repeats), variant, str(threads)]
    p = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if not Path(result["source"]).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"the child imported difflab from {result['source']}, not from {tree}")
    return result["samples_s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="d92d683", help="the commit to compare against (before issue 33)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=64, help="samples per timed batch")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=["compile", "bf16"], choices=["compile", "bf16"])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    load_before = load_average()
    contenders = [(f"baseline {args.baseline}", baseline_tree(args.baseline), "plain"), ("today", ROOT, "plain")]
    contenders += [(f"today, {v}", ROOT, v) for v in args.variants]
    rates: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    for r in range(args.rounds):
        for label, tree, variant in contenders if r % 2 == 0 else contenders[::-1]:
            rates[label].append(measure(tree, variant, args.n, args.repeats, args.threads))
            print(f"round {r + 1}: {label}: {rates[label][-1]:.2f} samples/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    base = med[contenders[0][0]]
    lines = header(f"Sampling throughput of {MODEL}: 20-step dpmpp-2m, guided, batch {args.n} (CPU)")
    lines += [
        f"- {args.rounds} rounds, the contenders' order alternating; each figure the best of {args.repeats} timed "
        f"batches in a fresh process, median over rounds; load average before {load_before}, after {load_average()}",
        "",
    ]
    rows = []
    for label, _, _ in contenders:
        ratio = med[label] / base
        verdict = "" if label == contenders[0][0] else ("met" if ratio >= TARGET else "**missed**")
        runs = ", ".join(f"{v:.2f}" for v in rates[label])
        rows.append([label, f"{med[label]:.2f}", runs, f"{ratio:.2f}x", verdict])
    lines += md_table(["tree", "samples/s (median)", "rounds", "over the baseline", f">= {TARGET}x"], rows, "lrrrl")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
