"""Few-step students against their teacher, side by side (issue 22; difflab/distill/).

The teacher is the shipped class-conditional Fashion-MNIST run (fashion-mnist-classes: 2000 steps, batch 64). Two
students are distilled from it by `difflab distill` (resumed where a run stopped), their distillation seconds
recorded beside the teacher's training seconds:

    pd   progressive, guided (--guidance-range 1,3), 32 DDIM steps halved to 1: stage one (the guided prediction in
         one pass), then 32 -> 16 -> 8 -> 4 -> 2 -> 1; every stage's folder is a student of its own step count
    cd   consistency, unguided, the teacher's 18-level capped Karras grid, Heun steps
    text progressive, guided (--guidance-range 2,6), of the shipped MiniLM text model fashion-pairs-t2i-minilm, 32 -> 4
    steps: its
         all-four caption accuracy at s = 5 in 4 evaluations against the teacher's 20 steps x 2 passes

Then FD (the fashion-mnist feature net, n samples of balanced classes, test split) against network evaluations
per sample: the teacher with ddim and dpmpp-2m at 1, 2, 4, 8, 16, 20 steps (s = 1: one pass per step), the
progressive students at their own steps, the consistency student at 1, 2, 4; and class accuracy at guidance 1.5
(the teacher: two passes per step; the guided student: one).

    .venv/bin/python benchmarks/distillation.py [--n 500] [--pd-steps 250] [--cd-steps 1000] [--students pd cd text]
    [--measure-only]

Writes benchmarks/results/distillation.json, distillation.png (FD against evaluations) and distillation-text.json."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import difflab  # noqa: E402
from benchmarks.common import RESULTS, RUNS  # noqa: E402
from difflab.distill.student import unfinished_stage  # noqa: E402
from difflab.evaluation.evaluate import Sampling, evaluate  # noqa: E402
from difflab.evaluation.features import load_feature_net  # noqa: E402
from difflab.guidance.config import GuidanceConfig  # noqa: E402
from difflab.runs import shipped  # noqa: E402
from difflab.runs.config import CONFIG, load_config  # noqa: E402
from difflab.runs.store import weights_fingerprint  # noqa: E402

ROOT = RUNS / "distill"
TEACHER = "fashion-mnist-classes"
TEXT_TEACHER = "fashion-pairs-t2i-minilm"  # measured when it shipped as fashion-pairs-t2i (renamed in issue 23)
TEXT_SCALE = 5.0  # the shipped text model's best scale (its recipe)
COUNTS = (1, 2, 4, 8, 16, 20)
GUIDANCE = 1.5


def students(args) -> dict[str, list[str]]:
    r = str(ROOT.relative_to(ROOT.parent.parent.parent))
    return {
        "pd": [
            "distill",
            TEACHER,
            "--method",
            "progressive",
            "--guidance-range",
            "1,3",
            "--teacher-steps",
            "32",
            "--steps-to",
            "1",
            "--steps",
            str(args.pd_steps),
            "--out",
            f"{r}/pd",
        ],
        "cd": ["distill", TEACHER, "--method", "consistency", "--steps", str(args.cd_steps), "--out", f"{r}/cd"],
        "text": [
            "distill",
            TEXT_TEACHER,
            "--method",
            "progressive",
            "--guidance-range",
            "2,6",
            "--teacher-steps",
            "32",
            "--steps-to",
            "4",
            "--steps",
            str(args.pd_steps),
            "--out",
            f"{r}/text",
        ],
    }


def distilled(name: str, argv: list[str], measure_only: bool) -> tuple[Path, float]:
    """The student, distilled (or resumed) to its last stage; the seconds spent (run/seconds.json, summed over
    sessions)."""
    out = Path(argv[argv.index("--out") + 1])
    book = out / "seconds.json"
    spent = json.loads(book.read_text())["seconds"] if book.exists() else 0.0
    started = (out / CONFIG).exists()
    if not measure_only and (not started or unfinished_stage(out) is not None):
        cmd = ["distill", "--out", str(out), "--resume"] if started else argv
        print(f"$ difflab {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", "difflab", *cmd]).returncode
        spent += time.perf_counter() - t0
        book.write_text(json.dumps({"seconds": spent}))
        if rc != 0:
            sys.exit(f"{name}: distillation failed")
    return out, spent


ROWS = ROOT / "rows.jsonl"  # every measured row, keyed by the weights' fingerprint: a rerun measures only what changed


def fd(run, n: int, sampler=None, steps=None, guidance=None) -> dict:
    """FD and class accuracy of n samples (read from ROWS when these weights were measured so before)."""
    judge = load_feature_net(load_config(getattr(run, "path", run)).dataset).fingerprint()  # a new judge measures anew
    key = json.dumps([weights_fingerprint(getattr(run, "path", run)), n, sampler, steps, guidance, judge])
    seen = (
        {json.loads(line)["key"]: json.loads(line)["value"] for line in ROWS.read_text().splitlines()}
        if ROWS.exists()
        else {}
    )
    if key in seen:
        return seen[key]
    r = evaluate(
        run,
        n=n,
        seed=0,
        sampling=Sampling(sampler, steps, batch=250),
        guidance=GuidanceConfig(scale=guidance) if guidance else None,
        bpd_n=0,
        progress=False,
    )
    value = {"fd": r["fd"], "accuracy": r["classes"].get("accuracy")}
    with ROWS.open("a") as f:
        f.write(json.dumps({"key": key, "value": value}) + "\n")
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--pd-steps", type=int, default=250, help="optimizer steps per progressive stage")
    p.add_argument("--cd-steps", type=int, default=1000)
    p.add_argument("--measure-only", action="store_true", help="measure the students as they are (no distillation)")
    p.add_argument("--students", nargs="+", choices=("pd", "cd", "text"), default=["pd", "cd", "text"])
    args = p.parse_args()
    torch.set_num_threads(2)
    runs = {
        name: distilled(name, argv, args.measure_only) for name, argv in students(args).items() if name in args.students
    }
    if "text" in runs:
        text_part(runs["text"], args)
    if "pd" not in runs and "cd" not in runs:
        return
    recipe = shipped.recipe(TEACHER)
    rows = []
    teacher = difflab.load(TEACHER)
    for sampler in ("ddim", "dpmpp-2m"):
        for k in COUNTS:
            rows.append({"model": "teacher", "sampler": sampler, "evaluations": k, **fd(teacher, args.n, sampler, k)})
            print(rows[-1], flush=True)
    guided = [
        {
            "model": "teacher",
            "sampler": "dpmpp-2m",
            "steps": 20,
            "evaluations": 40,
            **fd(teacher, args.n, "dpmpp-2m", 20, GUIDANCE),
        }
    ]
    if "pd" in runs:
        pd, _ = runs["pd"]
        record = load_config(pd).distill
        for stage in range(1, len(record.stages)):
            a, b = record.stages[stage]
            folder = pd if stage == len(record.stages) - 1 else pd / "stages" / f"{stage + 1}-{a}to{b}"
            rows.append({"model": "progressive", "sampler": "ddim", "evaluations": b, **fd(folder, args.n)})
            print(rows[-1], flush=True)
            if b in (4, 2, 1):
                guided.append(
                    {
                        "model": "progressive (guided)",
                        "sampler": "ddim",
                        "steps": b,
                        "evaluations": b,
                        **fd(folder, args.n, guidance=GUIDANCE),
                    }
                )
    if "cd" in runs:
        cd, _ = runs["cd"]
        for k in (1, 2, 4):
            rows.append({"model": "consistency", "sampler": "consistency", "evaluations": k, **fd(cd, args.n, steps=k)})
            print(rows[-1], flush=True)
    for g in guided:
        print(g, flush=True)
    if "pd" not in runs or "cd" not in runs:
        return  # the rows are cached (ROWS); the table is written when both students are measured
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "command": "python benchmarks/distillation.py " + " ".join(sys.argv[1:]),
        "n": args.n,
        "teacher": TEACHER,
        "teacher_training_seconds": recipe.get("train_seconds"),
        "teacher_steps": recipe.get("steps"),
        "distillation_seconds": {name: s for name, (_, s) in runs.items()},
        "students": {name: load_config(path).distill.__dict__ for name, (path, _) in runs.items()},
        "fd": rows,
        "guided": {"scale": GUIDANCE, "rows": guided},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distillation.json").write_text(json.dumps(result, indent=2))
    plot(rows, RESULTS / "distillation.png")
    print(f"wrote {RESULTS / 'distillation.json'} and {RESULTS / 'distillation.png'}")


def caption_accuracy(run, n: int, sampler=None, steps=None) -> dict:
    r = evaluate(
        run,
        n=n,
        seed=0,
        sampling=Sampling(sampler, steps, batch=100),
        guidance=GuidanceConfig(scale=TEXT_SCALE),
        bpd_n=0,
        progress=False,
    )
    f = r["text"]["follows"]
    return {
        "seen": f["seen"]["all_four"],
        "held_out": f["held_out"]["all_four"],
        "either_side": f["seen"]["either_side"],
        "fd": r["fd"],
    }


def text_part(student: tuple[Path, float], args) -> None:
    """The guided text student (4 DDIM steps, one pass each) against its teacher (dpmpp-2m, 20 steps x 2 passes)
    at the shipped scale: all-four caption accuracy on the test captions; benchmarks/results/distillation-text.json."""
    path, seconds = student
    rows = [
        {
            "model": "teacher",
            "sampler": "dpmpp-2m",
            "steps": 20,
            "evaluations": 40,
            **caption_accuracy(TEXT_TEACHER, args.n, "dpmpp-2m", 20),
        },
        {
            "model": "teacher",
            "sampler": "dpmpp-2m",
            "steps": 4,
            "evaluations": 8,
            **caption_accuracy(TEXT_TEACHER, args.n, "dpmpp-2m", 4),
        },
        {
            "model": "teacher",
            "sampler": "ddim",
            "steps": 4,
            "evaluations": 8,
            **caption_accuracy(TEXT_TEACHER, args.n, "ddim", 4),
        },
        {"model": "student", "sampler": "ddim", "steps": 4, "evaluations": 4, **caption_accuracy(path, args.n)},
    ]
    for r in rows:
        print(r, flush=True)
    recipe = shipped.recipe(TEXT_TEACHER)
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "command": "python benchmarks/distillation.py " + " ".join(sys.argv[1:]),
        "n": args.n,
        "scale": TEXT_SCALE,
        "teacher": TEXT_TEACHER,
        "teacher_training_seconds": recipe.get("train_seconds"),
        "distillation_seconds": seconds,
        "student": load_config(path).distill.__dict__,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distillation-text.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'distillation-text.json'}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label in ("teacher ddim", "teacher dpmpp-2m", "progressive ddim", "consistency consistency"):
        model, sampler = label.split(" ")
        pts = sorted((r["evaluations"], r["fd"]) for r in rows if r["model"] == model and r["sampler"] == sampler)
        if pts:
            ax.plot(
                *zip(*pts),
                marker="o",
                label=label.replace("consistency consistency", "consistency student").replace(
                    "progressive ddim", "progressive student"
                ),
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations per sample")
    ax.set_ylabel("FD (fashion-mnist features)")
    ax.set_title("Fashion-MNIST, class-conditional: students vs their teacher")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
