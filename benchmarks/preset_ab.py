"""Is a cheaper U-Net a better use of CPU time? Two Fashion-MNIST U-Nets, the same wall-clock training budget.

The throughput target (1.5x diffusers' training images/s at a matched parameter count) cannot be met
by the current 'fashion-mnist' preset: it does the same FLOPs per image as diffusers' UNet2DModel and
both already run near two thirds of the CPU's matmul peak. Fewer FLOPs per parameter can: a U-Net with
few channels at 28x28 and most of its parameters at 7x7. This script asks whether that trade pays in
sample quality per CPU-minute:

    current  PRESETS['fashion-mnist']: base 32, mults (1, 2, 2), attention at 7 (1.19 M parameters)
    cheaper  base 16, mults (1, 3, 5), attention at 7 (1.15 M parameters)

Each trains with the default recipe's step and EMA (training.train_step, ema_update with the recipe's
warm-up: cosine T=1000, v target, min-SNR-5, AdamW lr 1e-3 with 500 warm-up steps, bf16 autocast,
batch 64) for --minutes, one after the other; then its EMA weights draw --n-samples images with
dpmpp-2m in 50 steps, scored by FD against the test split in the shipped classifier's features.
Nothing is checkpointed: it is a one-shot comparison.

    .venv/bin/python benchmarks/preset_ab.py [--minutes 10] [--n-samples 1000]
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import RESULTS, busy_processes, header, load_average, md_table
from tqdm.auto import tqdm

from difflab.data.images import load_images, to_model, to_uint8
from difflab.data.loader import ShuffledBatches
from difflab.features import embed, load_feature_net
from difflab.image_presets import IMAGE_PRESETS
from difflab.losses import SimpleLoss
from difflab.metrics import frechet_from_stats, gaussian_stats
from difflab.nets.unet import PRESETS, UNetConfig, num_parameters
from difflab.samplers import sample
from difflab.training import ema_decay_at, ema_update, learning_rate, train_step

NAME = "preset_ab"
NETS = {
    "current": PRESETS["fashion-mnist"],
    "cheaper": UNetConfig(image_size=28, base_channels=16, channel_mults=(1, 3, 5), num_res_blocks=1, attention_resolutions=(7,)),
}


def train_for(net: UNetConfig, images: torch.Tensor, seconds: float) -> tuple[torch.nn.Module, int, float]:
    """The recipe's training step on ``net`` for ``seconds`` of wall clock; returns (EMA denoiser, steps, last loss)."""
    config = replace(IMAGE_PRESETS["fashion-mnist"], net=net.to_dict())
    tc = config.train
    torch.manual_seed(tc.seed)
    denoiser = config.build_denoiser()
    ema = copy.deepcopy(denoiser).requires_grad_(False)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
    batches = ShuffledBatches(images, tc.batch_size, seed=tc.seed, transform=to_model)
    gen = torch.Generator().manual_seed(tc.seed + 1)
    loss_fn = SimpleLoss(**config.loss)
    step, loss, t0 = 0, float("nan"), time.perf_counter()
    with tqdm(total=round(seconds), desc=f"train ({num_parameters(denoiser.net):,} parameters)", unit="s") as bar:
        while (elapsed := time.perf_counter() - t0) < seconds:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, tc.lr, tc.warmup)
            loss, _ = train_step(denoiser, loss_fn, opt, next(batches), gen, tc, False)
            ema_update(ema, denoiser, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
            step += 1
            if (shown := min(round(elapsed), round(seconds))) > bar.n:
                bar.set_postfix(steps=step, refresh=False)
                bar.update(shown - bar.n)
    return ema.eval(), step, loss


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each network (wall clock)")
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, busy_start = load_average(), busy_processes()
    images = load_images("fashion-mnist", "train").images
    feature_net = load_feature_net("fashion-mnist")
    ref = gaussian_stats(embed(feature_net, load_images("fashion-mnist", "test").images)[0].double())
    rows = []
    for name, net in NETS.items():
        denoiser, steps, loss = train_for(net, images, 60 * args.minutes)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            sizes = [min(250, args.n_samples - start) for start in range(0, args.n_samples, 250)]
            imgs = torch.cat([to_uint8(sample(denoiser, (b, 1, 28, 28), 50, sampler="dpmpp-2m", generator=g).float()) for b in sizes])
        fd = frechet_from_stats(*gaussian_stats(embed(feature_net, imgs)[0].double()), *ref)
        rows.append([name, f"base {net.base_channels}, mults {net.channel_mults}", f"{num_parameters(denoiser.net):,}",
                     f"{steps}", f"{steps / (60 * args.minutes):.2f}", f"{loss:.4f}", f"{fd:.2f}"])
        print(rows[-1], flush=True)
    lines = header("Equal CPU time for two Fashion-MNIST U-Nets: the current preset and a cheaper layout")
    busy = "; ".join(busy_start) or "none"
    lines += [f"- budget {args.minutes:g} min each, sequential; EMA weights; {args.n_samples} samples, dpmpp-2m 50 steps, seed 0",
              f"- load average at the start: {load_start}; at the end: {load_average()}; other busy processes at the start: {busy}",
              ""]
    lines += md_table(["network", "layout", "parameters", "steps", "steps / s", "last loss", "FD"], rows, "lllrrrr")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
