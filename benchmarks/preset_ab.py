"""Is a cheaper U-Net a better use of CPU time? Two Fashion-MNIST U-Nets, the same wall-clock training budget.

The throughput target (1.5x diffusers' training images/s at a matched parameter count) could not be met
by the previous 'fashion-mnist' preset: laid out like diffusers' UNet2DModel, it does the same FLOPs per
image. Fewer FLOPs per parameter can: a U-Net with few channels at 28x28 and most of its parameters at
7x7. This script asks whether that trade pays in sample quality per CPU-minute (it did, and the cheaper
layout became the preset):

    previous  the former PRESETS['fashion-mnist']: base 32, mults (1, 2, 2), attention at 7 (1.19 M parameters)
    cheaper   PRESETS['fashion-mnist'] today: base 16, mults (1, 3, 5), attention at 7 (1.15 M parameters)

Each is trained by difflab's own loop (training.train) with the default recipe of image_presets (cosine
T=1000, v target, min-SNR-5, AdamW lr 1e-3 with 500 warm-up steps, EMA with warm-up, bf16 autocast,
batch 64), given only ``max_minutes=--minutes``: the step horizon is out of reach, so the learning rate is
the recipe's and the run stops on the clock with one checkpoint, in benchmarks/runs/preset_ab/NAME (a
fresh run each time: the folder is cleared first). The two train one after the other. Then each EMA
model draws --n-samples images with generate (dpmpp-2m, 50 steps, its default log-SNR grid with the
default sigma cap 80), scored by FD against the test split in the shipped classifier's features.

    .venv/bin/python benchmarks/preset_ab.py [--minutes 10] [--n-samples 1000]
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from common import RESULTS, RUNS, busy_processes, header, load_average, md_table

from difflab.data.images import load_images, to_uint8
from difflab.data.loader import TensorDataset
from difflab.evaluation.features import embed, load_feature_net
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats
from difflab.nets.unet import PRESETS, UNetConfig, num_parameters
from difflab.runs import store as ckpt
from difflab.runs.config import RunConfig, load_config
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.presets import PRESETS as RUN_PRESETS
from difflab.training.loop import train

NAME = "preset_ab"
NETS = {
    "previous": UNetConfig(
        image_size=28, base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(7,)
    ),
    "cheaper": PRESETS["fashion-mnist"],
}
SAMPLER, STEPS = "dpmpp-2m", 50


def config_for(net: UNetConfig) -> RunConfig:
    """The recipe with ``net``, a step horizon no budget reaches, no previews and no checkpoint but the last."""
    preset = RUN_PRESETS["fashion-mnist"]
    tc = replace(preset.train, steps=10**9, sample_every=0, checkpoint_every=10**9)
    return replace(preset, net=net, train=tc)


def train_for(run: Path, net: UNetConfig, data: TensorDataset, minutes: float) -> tuple[torch.nn.Module, int, dict]:
    """A fresh run of the recipe on ``net`` for ``minutes`` of wall clock; (EMA denoiser, steps, last metrics row)."""
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: no checkpoint of an earlier call may outrank this one
    ema = train(run, config_for(net), data, progress=False, max_minutes=minutes)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])  # {"step", "loss", "it_s", ...}
    return ema.eval(), ckpt.weights_step(run), last


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each network (wall clock)")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(RUNS / NAME), help="folder of the two runs (cleared and rewritten)")
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, busy_start = load_average(), busy_processes()
    data = TensorDataset(
        load_images("fashion-mnist", "train", data_dir=args.data_dir).images
    )  # uint8 (60000, 1, 28, 28)
    feature_net = load_feature_net("fashion-mnist")
    test = load_images("fashion-mnist", "test", data_dir=args.data_dir).images
    ref = gaussian_stats(embed(feature_net, test)[0].double())
    rows = []
    for name, net in NETS.items():
        print(f"training {name} for {args.minutes:g} min ...", flush=True)
        denoiser, steps, last = train_for(Path(args.runs) / name, net, data, args.minutes)
        model = DiffusionRun(Path(args.runs) / name, load_config(Path(args.runs) / name), denoiser.net)
        imgs = to_uint8(model.sample(args.n_samples, sampler=SAMPLER, steps=STEPS, seed=0))  # (n, 1, 28, 28)
        fd = frechet_from_stats(*gaussian_stats(embed(feature_net, imgs)[0].double()), *ref)
        rows.append(
            [
                name,
                f"base {net.base_channels}, mults {net.channel_mults}",
                f"{num_parameters(denoiser.net):,}",
                f"{steps}",
                f"{last['it_s']:.2f}",
                f"{last['loss']:.4f}",
                f"{fd:.2f}",
            ]
        )
        print(rows[-1], flush=True)
    lines = header(
        "Equal CPU time for two Fashion-MNIST U-Nets: the previous preset and the cheaper layout (today's preset)"
    )
    busy = "; ".join(busy_start) or "none"
    lines += [
        f"- budget {args.minutes:g} min each (training.train(..., max_minutes)), sequential; EMA weights; "
        f"{args.n_samples} samples by generate: {SAMPLER} {STEPS} steps, logsnr grid with the default sigma cap 80, "
        f"seeds 0..{args.n_samples - 1}",
        f"- load average at the start: {load_start}; at the end: {load_average()}; other busy processes at the start: "
        f"{busy}",
        "",
    ]
    lines += md_table(["network", "layout", "parameters", "steps", "steps / s", "last loss", "FD"], rows, "lllrrrr")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
