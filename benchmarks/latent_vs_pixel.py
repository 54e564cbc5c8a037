"""Pixel-space against latent-space diffusion on fashion-pairs: training minutes to a given FD, sampling
throughput, and FD after an equal training budget (issue 11).

Contenders, both difflab's default recipe (image_presets: cosine DDPM, v-prediction, min-SNR-5, EMA, bf16),
the U-Net family sized to each space by nets.unet.preset_for_size:

    pixel   the fashion-pairs preset: 3x32x64 images, a 3-level U-Net (1.15M parameters)
    latent  a factor-4 KL autoencoder (difflab train-autoencoder's defaults: 4 latent channels, kl_weight 1e-6,
            --ae-steps steps), then a 2-level U-Net on its scaled 4x8x16 latents (1.08M parameters), trained
            on latents encoded once and cached (difflab train --latent)

Each model trains through training.train in slices of --slice-minutes (each slice a resumed run with
max_minutes), pixel and latent taking turns so background load hits both alike, until each has used --minutes
of training wall-clock in total; the autoencoder's training minutes count against the latent model's budget
(its diffusion gets --minutes minus them). After every slice the EMA model draws --n-eval samples (generate,
dpmpp-2m, 20 steps, seeds 0..n-1, decoding included) and their FD against the 4000 test images (the shipped
fashion-pairs attribute network's features) is recorded with the minutes spent so far. Reported:

* FD after the equal budget, and each model's curve (FD against total training minutes, autoencoder included);
* the minutes each needed to reach the pixel model's final FD (the latent curve, interpolated);
* samples per second at the end (--n-eval samples, batch 250, decoding included, timed alone);
* the autoencoder's rFD (its reconstructions of the test images against the test images) and PSNR: the
  floor the latent model cannot beat.

Target (issue 11): the latent model reaches the pixel model's FD at >= 4x the sampling throughput and in less
total training time.

    .venv/bin/python benchmarks/latent_vs_pixel.py [--minutes 12] [--slice-minutes 3] [--ae-steps 1000]

Writes benchmarks/results/latent_vs_pixel.md, .json and .png; runs live in benchmarks/runs/latent_vs_pixel/,
and a killed run resumes from its last slice (run it again with the same arguments; the seconds of a slice
killed midway are not charged, so do not kill it to gain time). Encoding the training set and measuring the
latent scale count as the latent model's training time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, busy_processes, header, load_average, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from difflab.data.images import load_images, to_uint8  # noqa: E402
from difflab.evaluation.features import embed, load_feature_net  # noqa: E402
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats, psnr  # noqa: E402
from difflab.latent.autoencoder import autoencoder_config, latent_record, load_autoencoder, measure_scale  # noqa: E402
from difflab.nets.unet import num_parameters  # noqa: E402
from difflab.runs import store as ckpt  # noqa: E402
from difflab.runs.data import training_data  # noqa: E402
from difflab.runs.diffusion import DiffusionRun  # noqa: E402
from difflab.runs.presets import (
    preset_for,  # noqa: E402
    with_latent,  # noqa: E402
)
from difflab.training.loop import train  # noqa: E402

NAME = "latent_vs_pixel"
DATASET = "fashion-pairs"
F64 = torch.float64


def charge(run: Path, seconds: float) -> None:
    """Add ``seconds`` to run/seconds.json."""
    book = run / "seconds.json"
    total = json.loads(book.read_text())["seconds"] if book.exists() else 0.0
    write_text(book, json.dumps({"seconds": total + seconds}))


def timed_train(run: Path, cfg, data, minutes: float) -> float:
    """Train ``run`` for at most ``minutes`` more (a resumed run when it has a checkpoint); the seconds it took
    are added to run/seconds.json, whose total is returned."""
    book = run / "seconds.json"
    total = json.loads(book.read_text())["seconds"] if book.exists() else 0.0
    if minutes > 0:
        t0 = time.perf_counter()
        train(run, cfg, data, device="cpu", resume=ckpt.has_checkpoint(run), progress=True, max_minutes=minutes)
        total += time.perf_counter() - t0
        write_text(book, json.dumps({"seconds": total}))
    return total


class Scorer:
    """FD of uint8 images against the test split in the shipped fashion-pairs features."""

    def __init__(self):
        self.net = load_feature_net(DATASET)
        self.test = load_images(DATASET, "test").images
        self.ref = gaussian_stats(embed(self.net, self.test)[0].to(F64))

    def fd(self, images: torch.Tensor) -> float:
        return frechet_from_stats(*gaussian_stats(embed(self.net, images)[0].to(F64)), *self.ref)


def draw(run: Path, n: int) -> tuple[torch.Tensor, float]:
    """n samples of the run's EMA model (uint8) and the seconds they took."""
    model = DiffusionRun.load(run)
    t0 = time.perf_counter()
    x = model.sample(n, sampler="dpmpp-2m", steps=20, seed=0, batch=250, progress=True, device="cpu")
    return to_uint8(x), time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--minutes", type=float, default=12.0, help="training budget of each model, autoencoder included (wall clock)"
    )
    p.add_argument("--slice-minutes", type=float, default=3.0)
    p.add_argument("--ae-steps", type=int, default=1000)
    p.add_argument("--n-eval", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = RUNS / NAME
    root.mkdir(parents=True, exist_ok=True)
    load_start, busy_start = load_average(), busy_processes()
    cache = root / "curves.json"
    state = json.loads(cache.read_text()) if cache.exists() else {}
    setting = {"minutes": args.minutes, "slice": args.slice_minutes, "ae_steps": args.ae_steps, "n_eval": args.n_eval}
    if state.get("setting") != setting:  # other arguments: the runs of the old ones must not be reused
        for name in ("ae", "pixel", "latent"):
            shutil.rmtree(root / name, ignore_errors=True)
        state = {"setting": setting, "curves": {"pixel": [], "latent": []}}
        write_text(cache, json.dumps(state, indent=1))
    scorer = Scorer()

    # ------------------------------------------------------------------ the autoencoder (its minutes count for latent)
    base = preset_for(DATASET)
    ae_run = root / "ae"
    ae_cfg = autoencoder_config(base)
    ae_cfg = replace(ae_cfg, train=replace(ae_cfg.train, steps=args.ae_steps, sample_every=0))
    train_images = load_images(DATASET, "train").images
    if not (ae_run / "latent.json").exists():
        timed_train(ae_run, ae_cfg, train_images, 10**6)
        t0 = time.perf_counter()
        measure_scale(ae_run, train_images, progress=True)
        charge(ae_run, time.perf_counter() - t0)  # part of the latent model's cost
    ae_seconds = json.loads((ae_run / "seconds.json").read_text())["seconds"]
    space = load_autoencoder(ae_run)
    recon = space.reconstruct(scorer.test)
    ae = {
        "seconds": ae_seconds,
        "rfd": scorer.fd(recon),
        "psnr": float(psnr(recon, scorer.test).mean()),
        "scale": space.scale,
        "parameters": sum(p.numel() for p in space.net.parameters()),
    }
    print(f"autoencoder: {ae}")

    # ------------------------------------------------------------------ the two diffusion models, in alternating slices
    long = 10**7  # steps: the budget decides
    cfgs = {"pixel": replace(base, train=replace(base.train, steps=long, sample_every=0))}
    cfgs["latent"] = with_latent(cfgs["pixel"], latent_record(space), space.latent_shape)
    data = {}
    for name, cfg in cfgs.items():
        fresh = not (root / name / "latents.safetensors").exists()
        t0 = time.perf_counter()
        data[name] = training_data(cfg, root / name, progress=True)
        if name == "latent" and fresh:  # encoding the training set is part of the latent model's cost
            charge(root / name, time.perf_counter() - t0)
    budgets = {"pixel": 60 * args.minutes, "latent": 60 * args.minutes - ae_seconds}
    if budgets["latent"] <= 0:
        raise SystemExit(
            f"the autoencoder alone took {ae_seconds / 60:.1f} minutes, more than --minutes {args.minutes}"
        )
    offset = {"pixel": 0.0, "latent": ae_seconds}
    turn = 0
    while True:
        spent = {name: timed_train(root / name, cfgs[name], data[name], 0) for name in cfgs}
        todo = [name for name in cfgs if spent[name] < budgets[name] - 1]
        if not todo:
            break
        for name in todo if turn % 2 == 0 else todo[::-1]:
            seconds = timed_train(
                root / name, cfgs[name], data[name], min(args.slice_minutes, (budgets[name] - spent[name]) / 60)
            )
            images, _ = draw(root / name, args.n_eval)
            state["curves"][name].append(
                {
                    "minutes": (seconds + offset[name]) / 60,
                    "step": ckpt.weights_step(root / name),
                    "fd": scorer.fd(images),
                }
            )
            write_text(cache, json.dumps(state, indent=1))
            print(name, state["curves"][name][-1], flush=True)
        turn += 1

    # ------------------------------------------------------------------ throughput, timed alone, and the report
    grids, speed = {}, {}
    for name in cfgs:
        images, seconds = draw(root / name, args.n_eval)
        speed[name] = args.n_eval / seconds
        grids[name] = images[:16]
    report(args, state, ae, speed, cfgs, load_start, busy_start)
    picture(grids, state, ae, scorer.test[:16])


def minutes_to_reach(curve: list[dict], fd: float) -> float | None:
    """The first training minute at which the curve's FD is <= fd (linear between evaluations); None if never."""
    prev = None
    for point in curve:
        if point["fd"] <= fd:
            if prev is None:
                return point["minutes"]
            w = (prev["fd"] - fd) / (prev["fd"] - point["fd"])
            return prev["minutes"] + w * (point["minutes"] - prev["minutes"])
        prev = point
    return None


def report(args, state, ae, speed, cfgs, load_start, busy_start) -> None:
    curves = state["curves"]
    final = {name: curves[name][-1] for name in curves}
    params = {name: num_parameters(cfg.build_net()) for name, cfg in cfgs.items()}
    target_fd = final["pixel"]["fd"]
    reach = {name: minutes_to_reach(curves[name], target_fd) for name in curves}
    lines = header("Pixel against latent diffusion on fashion-pairs: FD per training minute and sampling throughput")
    lines += [
        f"- budget: {args.minutes} minutes of training wall-clock per model, the autoencoder's "
        f"{ae['seconds'] / 60:.1f} minutes "
        f"({args.ae_steps} steps) counted in the latent model's; slices of {args.slice_minutes} minutes, taking turns",
        f"- FD: {args.n_eval} samples (dpmpp-2m, 20 steps, seeds 0..{args.n_eval - 1}) against the 4000 test images in "
        "the shipped "
        "fashion-pairs attribute network's features (FD at this n is biased upwards: compare rows)",
        f"- load average at the start: {load_start}; other busy processes: {', '.join(busy_start) or 'none'}; at the "
        f"end: {load_average()}",
        "",
    ]
    rows = [
        [
            name,
            f"{params[name] / 1e6:.2f}M",
            f"{final[name]['step']}",
            f"{final[name]['minutes']:.1f}",
            f"{final[name]['fd']:.3f}",
            "-" if reach[name] is None else f"{reach[name]:.1f}",
            f"{speed[name]:.1f}",
        ]
        for name in curves
    ]
    lines += md_table(
        [
            "model",
            "U-Net parameters",
            "steps",
            "training minutes (AE incl.)",
            "FD at the budget",
            f"minutes to FD {target_fd:.3f}",
            "samples / s",
        ],
        rows,
    )
    lines += [
        "",
        f"Autoencoder: {ae['parameters'] / 1e6:.2f}M parameters, latent scale {ae['scale']:.4f}, test reconstruction "
        f"PSNR {ae['psnr']:.2f} dB, rFD {ae['rfd']:.3f} (the latent model's floor).",
        "",
    ]
    lines += ["FD along the way (minutes, FD):", ""]
    for name in curves:
        lines.append(f"- {name}: " + ", ".join(f"{c['minutes']:.1f} min {c['fd']:.3f}" for c in curves[name]))
    ratio = speed["latent"] / speed["pixel"]
    faster = reach["latent"] is not None and reach["latent"] < reach["pixel"]
    lines += [
        "",
        "## Target: the pixel model's FD at >= 4x the sampling throughput and in less total training time",
        "",
        f"- throughput: latent {ratio:.2f}x the pixel model's ({'met' if ratio >= 4 else 'missed'})",
        f"- training time to the pixel model's final FD {target_fd:.3f}: latent "
        + ("never reached in its budget" if reach["latent"] is None else f"{reach['latent']:.1f} minutes")
        + f" against the pixel model's {reach['pixel']:.1f} ({'met' if faster else 'missed'})",
    ]
    write_text(RESULTS / f"{NAME}.md", "\n".join(lines) + "\n")
    write_text(
        RESULTS / f"{NAME}.json",
        json.dumps(
            {"setting": state["setting"], "curves": curves, "autoencoder": ae, "samples_per_second": speed}, indent=1
        ),
    )
    print("\n".join(lines))


def picture(grids, state, ae, truth) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.viz import plots

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for name, curve in state["curves"].items():
        axes[0].plot([c["minutes"] for c in curve], [c["fd"] for c in curve], "o-", label=name)
    axes[0].axhline(ae["rfd"], color="grey", ls="--", label="autoencoder rFD (latent floor)")
    (
        axes[0].set_xlabel("training minutes (autoencoder included)"),
        axes[0].set_ylabel("FD"),
        axes[0].set_yscale("log"),
        axes[0].legend(),
    )
    for ax, name in zip(axes[1:], ("pixel", "latent")):
        ax.imshow(plots.image_grid(grids[name], nrow=4, scale=2)), ax.set_title(f"{name} samples"), ax.axis("off")
    plots._save_fig(fig, RESULTS / f"{NAME}.png")


if __name__ == "__main__":
    main()
