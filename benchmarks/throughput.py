"""Throughput of our U-Net against diffusers' UNet2DModel at a matched parameter count, on this CPU.

Both networks read 28x28 grey images (Fashion-MNIST) and are measured in one run. Ours is a layout of
preset_ab.NETS (--layout): 'previous' (default), the former fashion-mnist preset that diffusers' network
below mirrors channel for channel, or 'cheaper', today's PRESETS['fashion-mnist'].

    training   images/s of forward + backward + AdamW step at batch 64 (MSE to a random target)
    sampling   images/s of a forward pass under torch.no_grad() at batch 256
    precision  fp32, and bf16 as torch.autocast("cpu", dtype=torch.bfloat16) (weights stay fp32)

Background load on a shared machine hits both contenders alike: each round measures every
(mode, precision) for both networks back to back, alternating which goes first, and the table reports
the median over rounds. Each round also times square torch.matmul products of several sizes (512 to
4096) in fp32 and bf16; the best GFLOP/s of all of them, over all rounds, is the machine's measured
matmul peak, and the training FLOP/s of each network (FLOPs of one step counted by FlopCounterMode x
median steps/s) is reported as a fraction of it. Being a best over sizes, precisions and repeats, the
peak is an upper bound on what these matmuls reach here (not the datasheet's peak); a fraction above
100% would mean the count or the timing is wrong, and the report says so. A torch.profiler table of one
training step of each network shows where the time goes.

    .venv/bin/python benchmarks/throughput.py [--rounds 12] [--threads 2]      # ~3-4 min on 2 idle cores

Writes benchmarks/results/throughput.md and throughput.png (throughput_cheaper.md/.png with --layout cheaper).

``--part loop`` (or ``all``) then measures the whole training loop (difflab.training.loop.train) beside this bare
step and beside diffusers' own training loop, at the presets: benchmarks/loop_throughput.py says how, and writes
results/throughput_loop.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, busy_processes, header, load_average, md_table
from preset_ab import NETS as LAYOUTS
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm

from difflab.nets.unet import UNet, num_parameters

TRAIN_BATCH, SAMPLE_BATCH = 64, 256
PRECISIONS = ("fp32", "bf16")
MODES = ("train", "sample")
TARGET_SPEEDUP = 1.5
MATMUL_SIZES = (512, 1024, 2048, 4096)
MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_LAYOUT = "previous"  # the layout diffusers_config mirrors; its results file is throughput.md


def diffusers_config() -> dict:
    """UNet2DModel laid out like preset_ab.NETS['previous'] (the former fashion-mnist preset): 32/64/64 channels
    at 28/14/7, one resnet per level in the encoder (two in the decoder), self-attention at 7x7 and in the middle
    block, 4 heads of 16 channels."""
    return dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=16,
    )


class Contender:
    """A network, its AdamW optimizer and how to call it as net(x, c_noise) -> (B, 1, 28, 28)."""

    def __init__(self, name: str, net: nn.Module, call):
        self.name, self.net, self.call = name, net, call
        self.opt = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def train_step(self, x, c, target, precision: str) -> None:
        self.opt.zero_grad(set_to_none=True)
        with autocast(precision):
            out = self.call(self.net, x, c)
        F.mse_loss(out.float(), target).backward()
        self.opt.step()

    @torch.no_grad()
    def sample_step(self, x, c, precision: str) -> None:
        with autocast(precision):
            self.call(self.net, x, c)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def build_contenders(layout: str = DEFAULT_LAYOUT) -> list[Contender]:
    """Our U-Net (preset_ab.NETS[layout]: 'cheaper' is today's fashion-mnist preset) and diffusers' matched one."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    ours = UNet(LAYOUTS[layout])
    theirs = UNet2DModel(**diffusers_config())
    for net in (ours, theirs):
        # zero-initialised output layers make every gradient but the last layer's exactly zero on step 1;
        # a small random init gives both networks the arithmetic of a network in training
        with torch.no_grad():
            for p in net.parameters():
                if not p.any():
                    p.normal_(0, 1e-3)
    return [
        Contender("difflab UNet", ours, lambda net, x, c: net(x, c)),
        Contender("diffusers UNet2DModel", theirs, lambda net, x, c: net(x, c).sample),
    ]


def batch(n: int, g: torch.Generator):
    """Inputs (n, 1, 28, 28), noise levels c in [0, 1000), targets."""
    return (
        torch.randn(n, 1, 28, 28, generator=g),
        torch.rand(n, generator=g) * 1000,
        torch.randn(n, 1, 28, 28, generator=g),
    )


def measure(contender: Contender, mode: str, precision: str, inputs, iters: int) -> float:
    """images/s over ``iters`` consecutive steps."""
    x, c, target = inputs
    start = time.perf_counter()
    for _ in range(iters):
        if mode == "train":
            contender.train_step(x, c, target, precision)
        else:
            contender.sample_step(x, c, precision)
    return iters * len(x) / (time.perf_counter() - start)


def matmul_operands(sizes) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """Two (n, n) random matrices per (precision, n), made once (a 4096 pair is 128 MB in fp32)."""
    g = torch.Generator().manual_seed(0)
    return {
        (p, n): (torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype))
        for p, dtype in MATMUL_DTYPES.items()
        for n in sizes
    }


def matmul_gflops(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
    """Best of ``reps`` timings (after one untimed call) of the (n x n) @ (n x n) product, in GFLOP/s (2 n^3 FLOPs)."""
    n = a.shape[0]
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def count_flops(contender: Contender, mode: str, inputs) -> int:
    """FLOPs (matmuls, convolutions, attention) of one step, forward + backward for training."""
    x, c, target = inputs
    with FlopCounterMode(display=False) as counter:
        if mode == "train":
            out = contender.call(contender.net, x, c)
            F.mse_loss(out, target).backward()
        else:
            with torch.no_grad():
                contender.call(contender.net, x, c)
    contender.net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def profile_step(contender: Contender, precision: str, inputs, steps: int = 3) -> dict[str, float]:
    """Self CPU time per training step (ms) of each aten op, from torch.profiler over ``steps`` steps."""
    from torch.profiler import ProfilerActivity, profile

    x, c, target = inputs
    contender.train_step(x, c, target, precision)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            contender.train_step(x, c, target, precision)
    totals: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        totals[evt.key] += evt.self_cpu_time_total / 1e3 / steps
    return dict(totals)


OP_GROUPS = {
    "convolution (fwd + bwd)": ("convolution", "conv2d", "mkldnn_convolution", "_slow_conv2d", "thnn_conv2d"),
    "group norm (fwd + bwd)": ("group_norm", "native_group_norm"),
    "attention": ("scaled_dot_product", "_flash_attention", "bmm", "softmax", "baddbmm"),
    "linear / matmul": ("addmm", "aten::mm", "linear"),
    "AdamW": ("_fused_adamw", "_foreach", "adamw", "lerp", "addcdiv", "addcmul"),
    "element-wise (SiLU, add, mul, cat, copies)": (
        "silu",
        "add",
        "mul",
        "cat",
        "copy_",
        "clone",
        "to_copy",
        "fill",
        "zero",
        "sub",
        "div",
    ),
}


def group_ops(totals: dict[str, float]) -> dict[str, float]:
    """Self time grouped into the categories above (an op goes to the first group whose pattern it contains)."""
    groups: dict[str, float] = defaultdict(float)
    for op, ms in totals.items():
        name = op.lower()
        for group, patterns in OP_GROUPS.items():
            if any(p in name for p in patterns):
                groups[group] += ms
                break
        else:
            groups["other"] += ms
    return dict(groups)


def plot(path, medians, names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(m, p) for m in MODES for p in PRECISIONS]
    labels = [f"{m}\n{p}" for m, p in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.38
    for i, name in enumerate(names):
        vals = [medians[(name, m, p)] for m, p in keys]
        bars = ax1.bar([k + (i - 0.5) * width for k in range(len(keys))], vals, width, label=name)
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ax1.set_xticks(range(len(keys)), labels)
    ax1.set_ylabel("images / s (median over rounds)")
    ax1.set_title("throughput, 28x28x1, matched parameter count")
    ax1.legend(fontsize=8)
    ratios = [medians[(names[0], m, p)] / medians[(names[1], m, p)] for m, p in keys]
    bars = ax2.bar(
        range(len(keys)), ratios, 0.5, color=["tab:green" if r >= TARGET_SPEEDUP else "tab:red" for r in ratios]
    )
    ax2.bar_label(bars, fmt="%.2fx", fontsize=8)
    ax2.axhline(TARGET_SPEEDUP, ls="--", c="k", lw=1, label=f"target {TARGET_SPEEDUP}x (training)")
    ax2.axhline(1.0, c="grey", lw=0.8)
    ax2.set_xticks(range(len(keys)), labels)
    ax2.set_ylabel("difflab / diffusers")
    ax2.set_title("speed-up of difflab's UNet")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12, help="interleaved measurement rounds (median reported)")
    parser.add_argument("--train-iters", type=int, default=2, help="training steps per measurement")
    parser.add_argument("--sample-iters", type=int, default=2, help="forward passes per measurement")
    parser.add_argument(
        "--matmul-sizes",
        type=int,
        nargs="+",
        default=list(MATMUL_SIZES),
        help="sizes n of the square matmuls whose best GFLOP/s is the peak",
    )
    parser.add_argument("--matmul-reps", type=int, default=2, help="timed repeats of each matmul per round (best kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument(
        "--part",
        choices=("step", "loop", "all"),
        default="all",
        help="step: the networks' bare steps (above); loop: the full training loop against the bare step and "
        "diffusers' loop (loop_throughput.py); all: both, one after the other",
    )
    parser.add_argument("--loop-rounds", type=int, default=3, help="rounds of the loop part (medians)")
    parser.add_argument(
        "--loop-steps",
        type=int,
        default=60,
        help="loop part: steps per measurement at fashion-mnist (digits 4x, the swiss-roll MLP 1000)",
    )
    parser.add_argument("--out", default=str(RESULTS), help="folder for throughput.md and throughput.png")
    parser.add_argument(
        "--layout",
        choices=tuple(LAYOUTS),
        default=DEFAULT_LAYOUT,
        help="our U-Net: the previous fashion-mnist layout, which diffusers' network mirrors (default), or "
        "'cheaper', today's fashion-mnist preset (writes throughput_cheaper.md/.png)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.part != "step":
        from loop_throughput import main_loop_part

        steps = {"swissroll": 1000, "digits": 4 * args.loop_steps, "fashion-mnist": args.loop_steps}
        main_loop_part(args.loop_rounds, steps, Path(args.out))
        if args.part == "loop":
            return
    load_before, others_before = load_average(), busy_processes()
    t_start = time.perf_counter()

    contenders = build_contenders(args.layout)
    names = [c.name for c in contenders]
    params = {c.name: num_parameters(c.net) for c in contenders}
    g = torch.Generator().manual_seed(0)
    inputs = {"train": batch(TRAIN_BATCH, g), "sample": batch(SAMPLE_BATCH, g)}
    operands = matmul_operands(args.matmul_sizes)

    flops = {(c.name, m): count_flops(c, m, inputs[m]) for c in contenders for m in MODES}

    for c in tqdm(contenders, desc="warm-up", leave=False):
        for p in PRECISIONS:
            measure(c, "train", p, inputs["train"], 2)
            measure(c, "sample", p, inputs["sample"], 1)

    samples: dict[tuple, list[float]] = defaultdict(list)
    for r in tqdm(range(args.rounds), desc="rounds"):
        order = contenders if r % 2 == 0 else contenders[::-1]  # A B, then B A: neither always goes first
        for mode in MODES:
            iters = args.train_iters if mode == "train" else args.sample_iters
            for p in PRECISIONS:
                for c in order:
                    samples[(c.name, mode, p)].append(measure(c, mode, p, inputs[mode], iters))
        for (p, n), (a, b) in operands.items():
            samples[("matmul", p, n)].append(matmul_gflops(a, b, args.matmul_reps))
    med = {k: statistics.median(v) for k, v in samples.items()}
    best_matmul = {(p, n): max(samples[("matmul", p, n)]) for p, n in operands}  # GFLOP/s
    peak_at = max(best_matmul, key=best_matmul.get)
    peak = best_matmul[peak_at]

    profiles = {}
    if not args.no_profile:
        for c in tqdm(contenders, desc="profile", leave=False):
            for p in PRECISIONS:
                profiles[(c.name, p)] = profile_step(c, p, inputs["train"])
    load_after, others_after = load_average(), busy_processes()
    minutes = (time.perf_counter() - t_start) / 60

    # ------------------------------------------------------------------ report
    ours, theirs = names
    lines = header("Training and sampling throughput: difflab UNet vs diffusers UNet2DModel (CPU)")
    lines += [
        f"- threads: torch.set_num_threads({args.threads}); {args.rounds} interleaved rounds "
        f"({args.train_iters} training steps / {args.sample_iters} forward passes per measurement), medians reported; "
        f"took {minutes:.1f} min",
        f"- load average (uptime) before: {load_before}; after: {load_after}",
        f"- other busy processes before: {'; '.join(others_before) or 'none'}",
        f"- other busy processes after: {'; '.join(others_after) or 'none'}",
        f"- difflab UNet: `preset_ab.NETS[{args.layout!r}]` = `{LAYOUTS[args.layout]}`",
        f"- diffusers UNet2DModel: `{diffusers_config()}`",
        f"- parameters: {ours} {params[ours]:,}; {theirs} {params[theirs]:,} "
        f"(ratio {params[ours] / params[theirs]:.3f})",
        f"- FLOPs per image (FlopCounterMode: convolutions, matmuls, attention): training step (fwd + bwd) "
        f"{ours} {flops[(ours, 'train')] / TRAIN_BATCH / 1e6:.1f} M, {theirs} "
        f"{flops[(theirs, 'train')] / TRAIN_BATCH / 1e6:.1f} M; "
        f"forward {ours} {flops[(ours, 'sample')] / SAMPLE_BATCH / 1e6:.1f} M, {theirs} "
        f"{flops[(theirs, 'sample')] / SAMPLE_BATCH / 1e6:.1f} M",
        "",
        "## Throughput (images/s, median over rounds; min-max in brackets)",
        "",
    ]
    rows = []
    for mode in MODES:
        batch_size = TRAIN_BATCH if mode == "train" else SAMPLE_BATCH
        for p in PRECISIONS:
            cells = []
            for name in names:
                v = samples[(name, mode, p)]
                cells.append(f"{med[(name, mode, p)]:.1f} [{min(v):.0f}-{max(v):.0f}]")
            ratio = med[(ours, mode, p)] / med[(theirs, mode, p)]
            best = max(samples[(ours, mode, p)]) / max(samples[(theirs, mode, p)])
            verdict = ("yes" if ratio >= TARGET_SPEEDUP else "**no**") if mode == "train" else "(no target)"
            rows.append([f"{mode} (batch {batch_size})", p, *cells, f"{ratio:.2f}x", f"{best:.2f}x", verdict])
    lines += md_table(
        [
            "mode",
            "precision",
            ours,
            theirs,
            "ours / theirs (medians)",
            "ours / theirs (best rounds)",
            f"target >= {TARGET_SPEEDUP}x met (medians)",
        ],
        rows,
        "llrrrrl",
    )
    lines += [
        "",
        "Background load only ever slows a measurement down, so on a shared machine the best round (max) "
        "is the cleaner estimate of each network's own speed; the median is what the issue asked for.",
    ]

    lines += ["", "## Fraction of the measured matmul peak", ""]
    lines += [
        f"Peak: the best GFLOP/s of any timing of an n x n torch.matmul, n in {tuple(args.matmul_sizes)}, with fp32 "
        "and with "
        f"bf16 tensors ({args.matmul_reps} timed repeats after a warm-up call, in each of the {args.rounds} rounds): "
        f"**{peak:.0f} GFLOP/s** ({peak_at[0]}, n = {peak_at[1]}). One peak for both precisions, the best "
        "any matmul was seen to reach on this machine (measured, not a datasheet figure), so each fraction below is a "
        "conservative one and none should exceed 100%. Training GFLOP/s = FLOPs of one step "
        "(FlopCounterMode) x median steps/s.",
        "",
    ]
    lines += md_table(
        ["matmul", *(f"n = {n}" for n in args.matmul_sizes)],
        [[f"best {p} GFLOP/s", *(f"{best_matmul[(p, n)]:.0f}" for n in args.matmul_sizes)] for p in MATMUL_DTYPES],
    )
    lines += [""]
    rows, above = [], False
    for p in PRECISIONS:
        for name in names:
            gflops = flops[(name, "train")] * med[(name, "train", p)] / TRAIN_BATCH / 1e9
            above |= gflops > peak
            rows.append([name, p, f"{gflops:.1f}", f"{100 * gflops / peak:.1f}%"])
    lines += md_table(["network", "training precision", "training GFLOP/s", "fraction of the peak"], rows, "llrr")
    if above:
        lines += [
            "",
            "**A training rate above the measured peak: the peak is not an upper bound here (or the FLOP count "
            "is off); do not read these fractions.**",
        ]

    if profiles:
        lines += [
            "",
            "## Where a training step's time goes (torch.profiler, self CPU time, ms per step of batch 64)",
            "",
        ]
        headers, table = ["op group"], defaultdict(dict)
        for (name, p), totals in profiles.items():
            col = f"{'ours' if name == ours else 'diffusers'} {p}"
            headers.append(col)
            for group, ms in group_ops(totals).items():
                table[group][col] = ms
            table["total"][col] = sum(totals.values())
        order = sorted(table, key=lambda gname: (gname == "total", -table[gname].get(headers[1], 0)))
        lines += md_table(
            headers, [[gname, *(f"{table[gname].get(h, 0):.1f}" for h in headers[1:])] for gname in order]
        )
        for (name, p), totals in profiles.items():
            top = sorted(totals.items(), key=lambda kv: -kv[1])[:12]
            lines += ["", f"Top ops, {name}, {p} (ms per step):", ""]
            lines += md_table(["op", "ms"], [[f"`{op}`", f"{ms:.1f}"] for op, ms in top])

    args_out = Path(args.out)
    args_out.mkdir(parents=True, exist_ok=True)
    stem = "throughput" if args.layout == DEFAULT_LAYOUT else f"throughput_{args.layout}"
    (args_out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    plot(args_out / f"{stem}.png", med, names)
    print("\n".join(lines))
    print(f"\nwrote {args_out / stem}.md and .png")


if __name__ == "__main__":
    main()
