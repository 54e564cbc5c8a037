"""The studio's cost (issue 21): a studio job against the same ``run.sample`` call, and live previews against none.

The run is a class-conditional digits run trained with the project's own command
(`difflab train digits --cond class --steps 300`, as the studio's tests train theirs), built once in
benchmarks/runs/studio/dc and reused. The studio serves benchmarks/runs/studio/ (uvicorn in a thread of this
process, on a free loopback port, with the default limits: previews every ``Limits().preview_every`` steps);
its own files there (.studio/: history, images) are removed first, so every measurement starts empty.
Three calls take turns for --reps rounds, the order rotating from round to round so background load hits each
alike, after one warm-up round that is not counted:

    studio     POST /api/generate -> the job followed over its Server-Sent Events (as the page does) until
               it is done -> its grid PNG fetched
    sample     run.sample(...) in Python with the settings the studio recorded for the job (its sampler,
               steps, seed, batch; the warm-up checks that both give the same pixels)
    previews   the same run.sample with the studio's preview every k steps, k the studio's default (what its
               worker does: the predicted x_0 decoded, 8-bit, a PNG grid), the preview work also timed alone

The table gives medians; each ratio is the median of one against the median of the other, with the range of
the ratios within a round beside it. Targets: the studio at most 10 % over run.sample; sampling with previews
at most 10 % slower than without.

    .venv/bin/python benchmarks/studio.py [--reps 7] [--steps 50] [--out benchmarks/results]

Run it alone: it times the CPU (the server, the worker and this client share its cores, as they do when the
studio runs). Writes studio.json and studio.md under --out.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import difflab  # noqa: E402
from benchmarks.common import RESULTS, RUNS, busy_processes, command_line, header, load_average, machine, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from difflab.data.images import to_uint8  # noqa: E402
from difflab.runs.store import has_checkpoint  # noqa: E402
from difflab.studio import pngs  # noqa: E402
from difflab.studio.folder import STUDIO_DIR  # noqa: E402
from difflab.studio.jobs import Limits, grid_png  # noqa: E402

ROOT = RUNS / "studio"  # the runs folder the studio serves
RUN = "dc"
TRAIN_STEPS = 300
CLASS, GUIDANCE, SEED, BATCH = 3, 2.0, 0, 16
TARGET = 1.10  # at most 10 % more, for both


def build_run() -> Path:
    """The class-conditional digits run, trained once with `difflab train` and reused."""
    path = ROOT / RUN
    if not has_checkpoint(path):
        print(f"training {path} ({TRAIN_STEPS} steps) ...", flush=True)
        argv = ["train", "digits", "--cond", "class", "--out", str(path), "--steps", str(TRAIN_STEPS), "--quiet"]
        if (
            subprocess.run([sys.executable, "-m", "difflab", *argv]).returncode != 0
        ):  # the project's command, as a user runs it
            raise SystemExit(f"difflab {' '.join(argv)} failed")
    return path


@contextmanager
def serving(root: Path):
    """The studio over ``root`` on a free loopback port, uvicorn in a thread; yields its URL."""
    import uvicorn

    from difflab.studio.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="studio-server", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("the studio did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def studio_job(base: str, settings: dict) -> tuple[float, dict, bytes]:
    """Request -> the job's last state over Server-Sent Events -> its grid PNG: (seconds, last state, grid PNG)."""
    t0 = time.perf_counter()
    request = urllib.request.Request(
        f"{base}/api/generate",
        data=json.dumps(settings).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        job = json.loads(r.read())
    with urllib.request.urlopen(f"{base}/api/jobs/{job['id']}/events", timeout=600) as r:
        for line in r:  # the stream ends with the job's finished state
            if line.startswith(b"data: "):
                job = json.loads(line[6:])
    if job["status"] != "done":
        raise SystemExit(f"the studio's job ended {job['status']}: {job.get('error')}")
    with urllib.request.urlopen(f"{base}/api/jobs/{job['id']}/images/grid.png", timeout=60) as r:
        grid = r.read()
    return time.perf_counter() - t0, job, grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=7, help="counted rounds (after one warm-up round)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of every call")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own, as `difflab studio` runs)"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="where studio.json and studio.md go")
    args = p.parse_args(argv)
    if args.reps < 1 or args.steps < 1:
        p.error("--reps and --steps must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    k = Limits().preview_every  # the studio's default preview interval
    path = build_run()
    shutil.rmtree(ROOT / STUDIO_DIR, ignore_errors=True)  # earlier measurements' history and images
    run = difflab.load(path)
    ask = {"run": RUN, "class_label": CLASS, "guidance": GUIDANCE, "steps": args.steps, "seed": SEED, "batch": BATCH}
    load_start, busy_start = load_average(), busy_processes()

    preview_seconds: list[float] = []  # each counted call's preview work, in seconds
    preview_counts: list[int] = []  # and its number of previews

    def sample(s: dict, callback=None) -> torch.Tensor:
        return run.sample(
            s["batch"],
            class_label=s["class_label"],
            guidance=s["guidance"],
            sampler=s["sampler"],
            steps=s["steps"],
            spacing=s.get("spacing"),
            seed=s["seed"],
            batch=s["batch"],
            callback=callback,
        )

    def previewing(s: dict, spent: list[float]):
        def callback(step: int, x_t, x0_hat) -> None:  # the studio worker's preview (jobs.JobQueue._callback), timed
            if (step + 1) % k == 0 and step + 1 < s["steps"]:
                t0 = time.perf_counter()
                grid_png(to_uint8(run.decode(x0_hat).cpu()))
                spent.append(time.perf_counter() - t0)

        return callback

    times: dict[str, list[float]] = {"studio": [], "sample": [], "previews": []}
    worker: list[float] = []  # the studio worker's own time for the job (sampling, previews, PNGs written)
    with serving(ROOT) as base:
        # warm-up: each call once; the studio's settings (completed by it: sampler, steps, ...) are the direct calls'
        _, job, _ = studio_job(base, ask)
        s = job["settings"]
        with urllib.request.urlopen(f"{base}/api/jobs/{job['id']}/images/0.png", timeout=60) as r:
            studio_first, _ = pngs.decode(r.read())
        direct_first = to_uint8(sample(s))[0]
        same_pixels = bool(torch.equal(studio_first, direct_first))
        sample(s, previewing(s, []))
        print(
            f"warm-up done; settings {s['sampler']}, {s['steps']} steps, batch {s['batch']}; "
            f"same pixels: {same_pixels}",
            flush=True,
        )

        def time_studio() -> float:
            seconds, job, grid = studio_job(base, ask)
            assert grid[:4] == b"\x89PNG"
            worker.append(job["finished"] - job["started"])
            return seconds

        def time_sample() -> float:
            t0 = time.perf_counter()
            sample(s)
            return time.perf_counter() - t0

        def time_previews() -> float:
            spent: list[float] = []
            t0 = time.perf_counter()
            sample(s, previewing(s, spent))
            seconds = time.perf_counter() - t0
            preview_seconds.append(sum(spent))
            preview_counts.append(len(spent))
            return seconds

        calls = {"studio": time_studio, "sample": time_sample, "previews": time_previews}
        names = list(calls)
        for r in range(args.reps):
            for name in names[r % 3 :] + names[: r % 3]:  # the order rotates from round to round
                times[name].append(calls[name]())
            print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in names), flush=True)
    load_end = load_average()

    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = {"studio": med["studio"] / med["sample"], "previews": med["previews"] / med["sample"]}
    within = {n: [a / b for a, b in zip(times[n], times["sample"])] for n in ratio}  # the same round's ratios
    preview_med, worker_med = statistics.median(preview_seconds), statistics.median(worker)
    met = {n: ratio[n] <= TARGET for n in ratio}

    def spread(n: str) -> str:
        return f"{min(within[n]):.2f}-{max(within[n]):.2f}"

    what = (
        f"run.sample(16, class_label={CLASS}, guidance={GUIDANCE:g}, sampler='{s['sampler']}', steps={s['steps']}, "
        f"seed={SEED}, batch=16)"
    )
    table = [
        [f"`{what}`, no callback", f"{med['sample']:.3f}", "1.00x", "-"],
        [
            "studio: request -> job done (over SSE) -> grid PNG fetched",
            f"{med['studio']:.3f}",
            f"**{ratio['studio']:.2f}x**",
            spread("studio"),
        ],
        [
            f"of which the studio worker's job (sampling, a preview every {k} steps, {BATCH + 1} PNGs written)",
            f"{worker_med:.3f}",
            f"{worker_med / med['sample']:.2f}x",
            "-",
        ],
        [
            f"run.sample with the studio's preview every {k} steps",
            f"{med['previews']:.3f}",
            f"**{ratio['previews']:.2f}x**",
            spread("previews"),
        ],
        [
            f"of which the preview work alone ({preview_counts[0]} preview{'' if preview_counts[0] == 1 else 's'} a "
            "call: decode, 8-bit, PNG grid)",
            f"{preview_med:.3f}",
            f"{100 * preview_med / med['sample']:.1f} %",
            "-",
        ],
    ]
    lines = header("The studio's cost: a studio job against the same run.sample call; previews against none (issue 21)")
    lines += [
        f"- run: {path.relative_to(RUNS.parent.parent)} (`difflab train digits --cond class --steps {TRAIN_STEPS}`), "
        f"{sum(p.numel() for p in run.net.parameters()) / 1e6:.2f} M parameters, CPU, torch threads "
        f"{torch.get_num_threads()}",
        f"- {args.reps} interleaved rounds after a warm-up, medians; the studio with its default limits (a preview "
        f"every {k} steps); "
        "the studio's first image and run.sample's first image "
        f"{'are the same pixels' if same_pixels else 'DIFFER (the calls do not do the same work)'}",
        f"- load average at the start: {load_start}; at the end: {load_end}; other busy processes at the start: "
        f"{', '.join(busy_start) or 'none'}",
        "",
    ]
    lines += md_table(["what", "median s", "vs run.sample", "ratio within a round (min-max)"], table)
    lines += [
        "",
        f"- studio overhead: {ratio['studio']:.2f}x run.sample (target <= {TARGET:.2f}x): "
        f"**{'met' if met['studio'] else 'missed'}**",
        f"- preview cost at the default k = {k}: {ratio['previews']:.2f}x (target <= {TARGET:.2f}x): "
        f"**{'met' if met['previews'] else 'missed'}**; "
        f"the preview work alone {1000 * preview_med:.1f} ms, {100 * preview_med / med['sample']:.1f} % of run.sample",
    ]
    result = {
        "settings": s,
        "asked": ask,
        "reps": args.reps,
        "preview_every": k,
        "torch_threads": torch.get_num_threads(),
        "run": str(path.relative_to(RUNS.parent.parent)),
        "train_steps": TRAIN_STEPS,
        "same_pixels": same_pixels,
        "seconds": times,
        "median_seconds": med,
        "ratio": ratio,
        "ratio_within_round": within,
        "worker_seconds": worker,
        "preview_work_seconds": preview_seconds,
        "previews_per_call": preview_counts[0],
        "target": TARGET,
        "met": met,
        "load_average": {"start": load_start, "end": load_end},
        "busy_at_start": busy_start,
        "command": command_line(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "studio.json", json.dumps(result, indent=1))
    write_text(args.out / "studio.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
