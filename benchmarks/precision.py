"""bf16 against fp32 on this CPU: what `--precision auto` decides, and why.

The image presets trained in bf16 autocast because it measured 1.4-2x faster on an Intel Xeon with AMX. On a CPU
without native bf16 (AVX2 only: most laptops and many cloud cores) PyTorch's bf16 matmul is a generic loop, and a
training step takes minutes. This script measures, side by side in one process, taking turns:

* matmul GFLOP/s, n x n, fp32 and bf16;
* the bare training step (forward, the preset's loss, backward, AdamW) of the fashion-mnist and fashion-pairs
  presets' U-Nets at their batch of 64, in fp32 and under bf16 autocast, images/s;

and writes benchmarks/results/precision_<cpu>.md with what ``training.loop.native_bf16`` says and so what the
presets' ``auto`` trains in here.

    .venv/bin/python benchmarks/precision.py [--steps 3] [--sizes 256 512]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from contextlib import nullcontext

import torch
from common import RESULTS, busy_processes, cpu_model, header, load_average, md_table

from difflab.runs.presets import preset_for
from difflab.training.loop import native_bf16, resolve_precision


def context(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def matmul_gflops(n: int, dtype: torch.dtype, reps: int = 3) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def step_images_per_second(dataset: str, precision: str, steps: int) -> float:
    """The preset's network, loss and batch: one forward + backward + AdamW per step on a fixed batch."""
    cfg = preset_for(dataset)
    torch.manual_seed(0)
    denoiser, loss_fn = cfg.build_denoiser(), cfg.build_loss()
    opt = torch.optim.AdamW(denoiser.net.parameters(), lr=1e-4)
    x = torch.randn(cfg.train.batch_size, *cfg.data_shape)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):  # the first is a warm-up
        t = denoiser.process.sample_t(len(x), g)
        noise = torch.randn(x.shape, generator=g)
        t0 = time.perf_counter()
        with context(precision):
            loss = loss_fn(denoiser, x, t=t, noise=noise, cond={})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed training steps per precision (after one warm-up)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--datasets", nargs="+", default=["fashion-mnist", "fashion-pairs"])
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    cpu = torch.device("cpu")
    native = native_bf16(cpu)
    busy_before = busy_processes()
    rows = []
    for n in args.sizes:
        fp32, bf16 = matmul_gflops(n, torch.float32), matmul_gflops(n, torch.bfloat16)
        rows.append([f"matmul {n}x{n} (GFLOP/s)", f"{fp32:.1f}", f"{bf16:.2f}", f"{fp32 / bf16:.1f}x"])
        print(rows[-1], flush=True)
    for dataset in args.datasets:
        fp32 = step_images_per_second(dataset, "fp32", args.steps)
        bf16 = step_images_per_second(dataset, "bf16", args.steps)
        rows.append(
            [f"{dataset} training step, batch 64 (images/s)", f"{fp32:.1f}", f"{bf16:.2f}", f"{fp32 / bf16:.1f}x"]
        )
        print(rows[-1], flush=True)
    lines = header("bf16 against fp32 on this CPU (`--precision auto`)")
    lines += [
        f"- load average before/after: {load_average()}; other busy processes at the start: "
        f"{'; '.join(busy_before) or 'none'}",
        f"- `training.loop.native_bf16(cpu)`: **{native}** (oneDNN bf16 kernels: AVX-512 or AMX); `--precision "
        f"auto` (the image presets') trains in **{resolve_precision('auto', cpu)}** here",
        "",
        *md_table(["what", "fp32", "bf16", "fp32 / bf16"], rows),
        "",
    ]
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", cpu_model().lower()).strip("-")[:40]
    out = RESULTS / f"precision_{slug}.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
