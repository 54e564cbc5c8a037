"""Data-parallel training on this machine: `torchrun --nproc-per-node N -m difflab train` against one process.

Each contender trains the same preset with the same global batch through the `difflab train` command
(one loop, no copy here), in alternating rounds; the figure is images per second from the steps and
wall time the run itself logs (metrics.jsonl's it/s at its last row), the first `--warmup` steps left out
by resuming from a checkpoint there. On 2 CPU cores, 1 process uses 2 threads and each of 2 ranks 1.

    .venv/bin/python benchmarks/ddp_scaling.py --dataset digits --steps 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import RESULTS, RUNS, header, load_average, md_table


def run_once(nproc: int, dataset: str, steps: int, warmup: int, global_batch: int, folder: Path) -> float:
    """Images per second of steps warmup..steps, trained by `nproc` processes."""
    shutil.rmtree(folder, ignore_errors=True)
    per_rank = global_batch // nproc
    threads = str(max(1, (os.cpu_count() or 2) // nproc))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OMP_WAIT_POLICY": "PASSIVE"}
    launch = (
        [sys.executable, "-m", "difflab"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(nproc),
            "-m",
            "difflab",
        ]
    )
    common = ["--out", str(folder), "--batch-size", str(per_rank), "--quiet", "--device", "cpu"]
    for stop, extra in ((warmup, [dataset]), (steps, ["--resume"])):  # the warm-up run, then the timed part
        subprocess.run(
            [*launch, "train", *extra, *common, "--steps", str(stop)],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
    return last["it_s"] * global_batch


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    rates: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.rounds):
        for nproc in (1, 2):
            rate = run_once(
                nproc, args.dataset, args.steps, args.warmup, args.global_batch, RUNS / "ddp_scaling" / f"n{nproc}"
            )
            rates[nproc].append(rate)
            print(f"round {r + 1}: {nproc} process(es): {rate:.1f} images/s", flush=True)
    med = {n: statistics.median(v) for n, v in rates.items()}
    lines = header(
        f"Data-parallel training: {args.dataset}, global batch {args.global_batch}, steps {args.warmup}..{args.steps}"
    )
    lines += [f"- load average at the end: {load_average()}", ""]
    rows = [
        [
            f"{n}",
            f"{args.global_batch // n}",
            f"{med[n]:.1f}",
            " / ".join(f"{v:.1f}" for v in rates[n]),
            f"{med[n] / med[1]:.2f}x",
        ]
        for n in (1, 2)
    ]
    lines += md_table(["processes", "batch per rank", "images/s (median)", "rounds", "vs 1 process"], rows, "rrrrr")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ddp_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
