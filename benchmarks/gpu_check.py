"""The GPU check: the CUDA paths of the one training loop and the generation path, in one command that fits in
10 minutes on one GPU. Run it whenever a CUDA machine is at hand (`make gpu-check`, or `bash benchmarks/gpu_check.sh`):

  1. tests/test_gpu.py                       fp32 / bf16 / fp16 training on CUDA, each checkpoint resumed on the CPU
  2. the fashion-mnist preset in bf16 and in fp16 for --steps steps on CUDA: finite losses, images/s
  3. the bf16 CUDA run resumed on the CPU for a few more steps (its checkpoint holds no CUDA tensor)
  4. a 2-rank NCCL run under torchrun, when the machine has two GPUs (said so and skipped otherwise)
  5. benchmarks/quality_vs_nfe.py at its smallest useful size: FD at 10 and 20 evaluations for dpmpp-2m and ddim
     (uniform and log-SNR grids, 2000 samples) against DDPM at 1000 steps, on the bf16 run
  6. the training step: synchronisations per step between logging steps, the full loop against the bare step and
     diffusers' loop, the latent text preset at batch 256 against 64, a profile (training_step below)

Each part's outcome goes to --out/gpu_check.json (ok, seconds, figures) as it finishes; a failing part is recorded
and the rest still run; the exit status is 1 when any part failed. On a machine without CUDA, ``--device cpu``
runs the same parts at a tiny size (the suite does: tests/test_gpu_check.py), so the logic is tested everywhere."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from difflab.data.images import load_images  # noqa: E402
from difflab.data.loader import TensorDataset  # noqa: E402
from difflab.io import atomic_path  # noqa: E402
from difflab.runs.presets import preset_for  # noqa: E402
from difflab.runs.store import load_training_state, load_weights  # noqa: E402
from difflab.training.loop import native_bf16, train  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Check:
    """The parts' outcomes, written after each one."""

    def __init__(self, out: Path):
        self.out, self.parts = out, {}

    def part(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            figures = fn() or {}
            self.parts[name] = {"ok": True, **figures}
        except Exception as e:  # noqa: BLE001 - one part's failure is recorded, the others still run
            self.parts[name] = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-2000:],
            }
        self.parts[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"{name}: {'ok' if self.parts[name]['ok'] else 'FAILED ' + self.parts[name]['error']} "
            f"({self.parts[name]['seconds']} s)",
            flush=True,
        )
        with atomic_path(self.out / "gpu_check.json") as tmp:
            Path(tmp).write_text(json.dumps({"device": self.device_name(), "parts": self.parts}, indent=1))

    @staticmethod
    def device_name() -> str:
        return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"

    @property
    def ok(self) -> bool:
        return all(p["ok"] for p in self.parts.values())


def pytest_gpu(device: str) -> dict:
    if device != "cuda":
        return {"skipped": "no CUDA: tests/test_gpu.py skips itself"}
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_gpu.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-1500:])
    return {"summary": p.stdout.strip().splitlines()[-1]}


def preset_run(run: Path, precision: str, steps: int, device: str, data: TensorDataset) -> dict:
    cfg = preset_for("fashion-mnist")
    cfg = replace(
        cfg,
        train=replace(
            cfg.train,
            steps=steps,
            precision=precision,
            sample_every=0,
            checkpoint_every=steps,
            log_every=max(1, steps // 10),
        ),
    )
    t0 = time.perf_counter()
    train(run, cfg, data, device=device, progress=False)
    seconds = time.perf_counter() - t0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    if not losses or not all(torch.isfinite(torch.tensor(losses))):
        raise RuntimeError(f"{precision}: losses {losses}")
    return {"steps": steps, "images_per_s": round(steps * cfg.train.batch_size / seconds, 1), "last_loss": losses[-1]}


def low_precision(device: str) -> str:
    """The mixed precision the check trains in: bf16 on CUDA and on a CPU that computes it natively; fp32 in a CPU
    rehearsal where bf16 is emulated (60-90x slower matmuls on an AVX2 CPU: the rehearsal took nine minutes)."""
    return "bf16" if device == "cuda" or native_bf16(torch.device(device)) else "fp32"


def resume_on_cpu(run: Path, extra: int, precision: str = "bf16") -> dict:
    if not all(v.device.type == "cpu" for v in load_weights(run, "net").values()):
        raise RuntimeError("the checkpoint holds tensors of another device")
    step, _, _ = load_training_state(run)
    cfg = preset_for("fashion-mnist")
    cfg = replace(
        cfg,
        train=replace(
            cfg.train, steps=step + extra, precision=precision, sample_every=0, checkpoint_every=step + extra
        ),
    )
    data = TensorDataset(load_images("fashion-mnist", "train").images[:2048])
    train(run, cfg, data, device="cpu", resume=True, progress=False)
    if load_training_state(run)[0] != step + extra:
        raise RuntimeError("the resumed run did not reach its last step")
    return {"from_step": step, "to_step": step + extra}


def nccl(device: str, tmp: Path) -> dict:
    if device != "cuda" or torch.cuda.device_count() < 2:
        return {
            "skipped": f"{torch.cuda.device_count() if device == 'cuda' else 0} GPU(s): the 2-rank NCCL run needs two"
        }
    p = subprocess.run(
        [
            "torchrun",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "difflab",
            "train",
            "digits",
            "--out",
            str(tmp / "ddp"),
            "--steps",
            "50",
            "--device",
            "cuda",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-1500:])
    return {"steps": 50}


def quality(run: Path, device: str, out: Path, small: bool) -> dict:
    size = (
        ["--nfe", "5", "--spacings", "uniform", "--n-samples", "16", "--sample-batch", "16", "--ref-steps", "10"]
        if small
        else [
            "--nfe",
            "10",
            "20",
            "--spacings",
            "uniform",
            "logsnr",
            "--n-samples",
            "2000",
            "--sample-batch",
            "2000",
            "--ref-steps",
            "1000",
        ]
    )
    argv = [
        sys.executable,
        str(ROOT / "benchmarks" / "quality_vs_nfe.py"),
        "--device",
        device,
        "--run",
        str(run),
        "--out",
        str(out),
        "--samplers",
        "dpmpp-2m",
        "ddim",
        "--steps",
        "1",
        *size,
    ]
    # the script imports difflab from the checkout (a CUDA machine may have it uninstalled: measured, it failed there)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-1500:])
    rows = [json.loads(line) for line in (out / "quality_vs_nfe.jsonl").read_text().splitlines() if line.strip()]
    return {"points": [{k: r[k] for k in ("sampler", "spacing", "nfe", "fd") if k in r} for r in rows]}


def training_step(device: str, work: Path, data: TensorDataset, small: bool, low: str = "bf16") -> dict:
    """Issue 33's GPU targets: synchronisations per step between logging steps (torch.cuda.set_sync_debug_mode
    'warn'; target 0), the full loop against the bare step and diffusers' loop (benchmarks/loop_throughput.py;
    target >= 1.5x diffusers'), images/s of the latent text preset at batch 256 against 64 (target >= 3x), and
    torch.profiler's view of a few steps (where the host waits). On the CPU: the loop comparison at a tiny size,
    the CUDA-only parts said so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from loop_throughput import bare_step_rate, diffusers_loop, full_loop

    steps = 3 if small else 200
    out: dict = {}
    for precision in dict.fromkeys(("fp32", low)):
        cfg = preset_for("fashion-mnist")
        cfg = replace(cfg, train=replace(cfg.train, steps=steps, precision=precision))
        bare = bare_step_rate(cfg, data, steps, device)
        loop = full_loop(cfg, data, with_preview=False, device=device)
        peer = diffusers_loop(data.x, precision, steps, cfg.train.batch_size, device)
        out[precision] = {
            "bare_images_s": round(bare, 1),
            "loop_images_s": round(loop["charged_images_s"], 1),
            "diffusers_images_s": round(peer["charged_images_s"], 1),
            "loop_over_bare": round(loop["charged_images_s"] / bare, 3),
            "loop_over_diffusers": round(loop["charged_images_s"] / peer["charged_images_s"], 3),
        }
    if device != "cuda":
        out["syncs"] = out["batch_scaling"] = out["profile"] = "skipped: CUDA only"
        return out
    out["syncs"] = count_syncs(work / "syncs", data, steps=120, log_every=50)
    out["batch_scaling"] = {b: text_preset_rate(work / f"t2i-{b}", b, steps=150) for b in (64, 256)}
    out["batch_scaling"]["ratio_256_over_64"] = round(out["batch_scaling"][256] / out["batch_scaling"][64], 2)
    out["profile"] = profile_steps(data)
    return out


def count_syncs(run: Path, data: TensorDataset, steps: int, log_every: int) -> dict:
    """Warnings of torch.cuda.set_sync_debug_mode('warn') per training step, by step: a step's are those between
    its loss call and the next step's; steps that log or checkpoint are counted apart."""
    import warnings

    cfg = preset_for("fashion-mnist")
    cfg = replace(
        cfg, train=replace(cfg.train, steps=steps, log_every=log_every, checkpoint_every=steps, sample_every=0)
    )
    loss, marks, seen = cfg.build_loss(), [], {}

    def marked(denoiser, x0, **kw):
        marks.append(len(seen["warnings"]))
        return loss(denoiser, x0, **kw)

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen["warnings"] = caught
            train(run, cfg, data, device="cuda", progress=False, loss_fn=marked)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    per_step = [b - a for a, b in zip(marks, marks[1:])]  # step k: from its loss call to step k+1's
    quiet = [n for k, n in enumerate(per_step) if k >= 2 and (k + 1) % log_every]  # after warm-up, not logging
    messages = sorted({str(w.message).splitlines()[0] for w in caught})[:5]
    return {"max_between_logs": max(quiet), "total_between_logs": sum(quiet), "steps": len(quiet), "first": messages}


def text_preset_rate(run: Path, batch: int, steps: int) -> float:
    """Images/s of the latent text preset (fashion-pairs-t2i-words's recipe) at ``batch``, from its metrics.jsonl."""
    argv = [
        sys.executable,
        "-m",
        "difflab",
        "train",
        "fashion-pairs",
        "--latent",
        "fashion-pairs-ae",
        "--text",
        "clip:fashion-pairs-clip",
        "--batch-size",
        str(batch),
        "--steps",
        str(steps),
        "--device",
        "cuda",
        "--quiet",
        "--no-preview",
        "--out",
        str(run),
    ]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-1500:])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return round(rows[-1]["it_s"] * batch, 1)


def profile_steps(data: TensorDataset) -> dict:
    """torch.profiler over 20 steps of the fashion-mnist preset (bf16) on CUDA: the CPU's and the GPU's busy time,
    and the top CUDA-runtime calls by host time (cudaStreamSynchronize, cudaMemcpy... are where the host waits)."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    cfg = preset_for("fashion-mnist")
    cfg = replace(cfg, train=replace(cfg.train, steps=30, checkpoint_every=30, sample_every=0))
    seen = {}
    with (
        tempfile.TemporaryDirectory() as run,
        profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof,
    ):
        train(run, cfg, data, device="cuda", progress=False)
    events = prof.key_averages()
    runtime = sorted(
        (e for e in events if e.key.startswith("cuda") or e.key.startswith("cudaStream")),
        key=lambda e: -e.cpu_time_total,
    )[:8]
    seen["cuda_runtime_ms"] = {e.key: round(e.cpu_time_total / 1e3, 1) for e in runtime}
    seen["gpu_busy_ms"] = round(sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3, 1)
    seen["host_ms"] = round(sum(e.self_cpu_time_total for e in events) / 1e3, 1)
    return seen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cuda (default when present) or cpu (a tiny rehearsal)",
    )
    p.add_argument("--steps", type=int, help="training steps of the preset runs (default 300 on CUDA, 4 on the CPU)")
    p.add_argument(
        "--work",
        type=Path,
        default=ROOT / "benchmarks" / "runs" / "gpu_check",
        help="where the runs go (cleared first)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")),
        help="where gpu_check.json goes",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it with --device cpu for the rehearsal", file=sys.stderr)
        return 2
    small = args.device != "cuda"
    steps = args.steps or (4 if small else 300)
    import shutil

    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out)
    images = load_images("fashion-mnist", "train").images
    data = TensorDataset(images[:2048] if small else images)
    check.part("pytest tests/test_gpu.py", lambda: pytest_gpu(args.device))
    low = low_precision(args.device)
    check.part(f"fashion-mnist preset, {low}", lambda: preset_run(args.work / low, low, steps, args.device, data))
    check.part(
        "fashion-mnist preset, fp16",
        lambda: (
            preset_run(args.work / "fp16", "fp16", steps, args.device, data)
            if args.device == "cuda"
            else {"skipped": "fp16 trains on CUDA only"}
        ),
    )
    check.part(f"the {low} run resumed on the CPU", lambda: resume_on_cpu(args.work / low, 2, low))
    check.part("2-rank NCCL", lambda: nccl(args.device, args.work))
    check.part(
        "quality_vs_nfe, smallest size", lambda: quality(args.work / low, args.device, args.work / "quality", small)
    )
    check.part("the training step (issue 33)", lambda: training_step(args.device, args.work, data, small, low))
    return 0 if check.ok else 1


if __name__ == "__main__":
    sys.exit(main())
