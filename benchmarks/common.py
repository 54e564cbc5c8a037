"""Shared by the benchmark scripts: where results go, what machine they ran on, the command that made them."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "benchmarks" / "runs"  # git-ignored


def command_line() -> str:
    """The command as typed from the repository root, e.g. `.venv/bin/python benchmarks/throughput.py --rounds 5`."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(ROOT)
    except ValueError:
        pass
    exe = Path(sys.executable)
    python = ".venv/bin/python" if (ROOT / ".venv") in exe.parents or exe.parent == ROOT / ".venv" / "bin" else "python"
    return " ".join([python, str(script), *map(shlex.quote, sys.argv[1:])])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> str:
    """`uptime`'s load averages (1, 5, 15 min), e.g. '3.31, 3.50, 3.58'."""
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def busy_processes(min_cpu: float = 20.0, exclude_pid: int | None = None) -> list[str]:
    """Other processes using more than min_cpu % of a core right now (what else shared the machine)."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 2)
        if len(parts) < 3:
            continue
        pid, pcpu, args = int(parts[0]), float(parts[1]), parts[2]
        if (
            pcpu >= min_cpu and pid != (exclude_pid or os.getpid()) and not args.startswith("ps -eo")
        ):  # not this very query
            rows.append(f"{pcpu:.0f}% {args[:90]}")
    return rows


def trained(argv: list[str]) -> tuple[Path, float]:
    """The run of the difflab training command ``argv`` (with its --out and --steps), trained or resumed to its
    steps in a subprocess, and its training seconds (summed over sittings in RUN/seconds.json). A resumed run is
    given only --out, --resume, --steps and --device: the rest is in its config, and commands refuse it again
    (train-clip refuses its NAME and recipe flags)."""
    from difflab.runs.store import has_checkpoint, weights_step  # heavy: only the scripts that train import it

    run, steps = Path(argv[argv.index("--out") + 1]), argv[argv.index("--steps") + 1]
    book = run / "seconds.json"
    spent = json.loads(book.read_text())["seconds"] if book.exists() else 0.0
    if has_checkpoint(run) and weights_step(run) >= int(steps):
        return run, spent
    device = argv[argv.index("--device") : argv.index("--device") + 2] if "--device" in argv else []
    cmd = (
        [argv[0], "--out", str(run), "--resume", "--steps", steps, *device, *(["--quiet"] if "--quiet" in argv else [])]
        if has_checkpoint(run)
        else argv
    )
    t0 = time.perf_counter()
    rc = difflab(cmd, check=False)
    spent += time.perf_counter() - t0
    book.write_text(json.dumps({"seconds": spent}))
    if rc != 0:
        sys.exit(f"{run}: training failed ({rc})")
    return run, spent


def difflab(argv: list[str], check: bool = True) -> int:
    """Run ``difflab ARGV`` in a subprocess (as a user would; the benchmarks call the CLI, never import it), printing
    the command; exits the script when it fails and ``check``."""
    print(f"$ difflab {' '.join(argv)}", flush=True)
    rc = subprocess.run([sys.executable, "-m", "difflab", *argv]).returncode
    if check and rc != 0:
        sys.exit(f"difflab {argv[0]} failed ({rc})")
    return rc


def machine(device: str = "cpu") -> str:
    """One line naming the hardware and software a result was measured with."""
    if device.startswith("cuda") and torch.cuda.is_available():
        hw = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda}), host {cpu_model()}, {os.cpu_count()} CPUs"
    else:
        hw = f"{cpu_model()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}"
    return (
        f"{hw}; Python {platform.python_version()}, torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def header(title: str, device: str = "cpu", command: str | None = None, machine_line: str | None = None) -> list[str]:
    return [
        f"# {title}",
        "",
        f"- command: `{command or command_line()}`",
        f"- machine: {machine_line or machine(device)}",
        f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
    ]


def md_table(headers: list[str], rows: list[list], align: str | None = None) -> list[str]:
    """A markdown table; align is one of 'l'/'r' per column (default: first left, the rest right)."""
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines
