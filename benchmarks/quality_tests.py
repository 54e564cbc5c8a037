"""The suite's quality checks: what small trained runs achieve, measured apart from `make test`.

`make test` trains its shared runs only to the size their plumbing needs and skips the tests marked `quality`
(tests/conftest.py): class-conditional digits following their class and guidance sharpening it, the noise-aware
classifier's accuracy by noise level, super-resolution beating bilinear, a latent run about as good as the pixel
run, the autoencoder's reconstructions, a guided student against its two-pass teacher, trained digits beating an
untrained network, the default swiss roll's samples against held-out data and its progressive and consistency
students against their teacher, every sampler on it, and a LoRA over the shipped text model raising its
subject's identity. This runs exactly those, with the shared runs at their full 300 steps (DIFFLAB_QUALITY=1),
and writes each test's outcome and time to benchmarks/results/quality_tests.md.

    .venv/bin/python benchmarks/quality_tests.py [--out benchmarks/results]      (about 10 minutes on 2 cores)"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args(argv)
    env = dict(os.environ, DIFFLAB_QUALITY="1", OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "pytest", "-m", "quality", "-n", "2", "--dist", "worksteal", "-rA", "--durations=0"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n")
    outcomes = {name: status for status, name in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", done.stdout, flags=re.M)}
    seconds: dict[str, float] = {}
    for s, name in re.findall(r"^([0-9.]+)s (?:call|setup) +(\S+)", done.stdout, flags=re.M):
        seconds[name] = seconds.get(name, 0.0) + float(s)
    lines = [
        "# The suite's quality checks",
        "",
        f"`.venv/bin/python benchmarks/quality_tests.py` on {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}: {minutes:.1f} minutes, exit status {done.returncode}. A test's seconds include "
        "the shared runs it was the first to need.",
        "",
        "| test | outcome | seconds |",
        "| --- | --- | ---: |",
        *[f"| `{name}` | {status} | {seconds.get(name, 0):.0f} |" for name, status in sorted(outcomes.items())],
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality_tests.md").write_text("\n".join(lines) + "\n")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
