"""The KL autoencoder's kl_weight trade-off on fashion-pairs: reconstruction against a well-scaled latent.

For each --weights value one autoencoder (difflab train-autoencoder's defaults otherwise: factor 4, 4 latent
channels, L1) trains --steps steps through the one training loop; then on the test split: reconstruction PSNR
and rFD (the shipped fashion-pairs features, reconstructions of the 4000 test images against the images), and
on the training split: the latents' std before scaling (1 / latent scale) and the posterior's mean std, as a
fraction of the latents' spread (how much of the code is noise). A larger weight pulls q(z | x) toward N(0, I):
the scale nears 1 and the posterior widens, at the cost of reconstruction.

    .venv/bin/python benchmarks/kl_tradeoff.py [--steps 800] [--weights 1e-6 1e-4 1e-2]
    .venv/bin/python benchmarks/kl_tradeoff.py --weights 1e-6 --disc-weights 0 0.01 0.1 --out autoencoder_discriminator

--disc-weights adds the patch discriminator's hinge term at each weight (switched on after --disc-start
batches), one autoencoder per (kl_weight, disc_weight) pair.

Writes benchmarks/results/OUT.md and .json (OUT: kl_tradeoff); runs live in benchmarks/runs/kl_tradeoff/ (a finished
weight is not retrained; a killed one resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, RUNS, header, load_average, md_table  # noqa: E402
from benchmarks.guidance_tradeoff import write_text  # noqa: E402
from benchmarks.latent_vs_pixel import DATASET, Scorer, timed_train  # noqa: E402
from difflab.data.images import load_images  # noqa: E402
from difflab.evaluation.metrics import psnr  # noqa: E402
from difflab.latent.autoencoder import autoencoder_config, load_autoencoder, measure_scale  # noqa: E402
from difflab.runs.presets import preset_for  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--weights", type=float, nargs="+", default=[1e-6, 1e-4, 1e-2])
    p.add_argument("--disc-weights", type=float, nargs="+", default=[0.0])
    p.add_argument("--disc-start", type=int, default=400)
    p.add_argument("--out", default="kl_tradeoff", help="name of the result files under benchmarks/results/")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    load_start = load_average()
    scorer = Scorer()
    train_images = load_images(DATASET, "train").images
    rows = []
    for w, d in [(w, d) for w in args.weights for d in args.disc_weights]:
        run = RUNS / "kl_tradeoff" / (f"kl{w:g}-steps{args.steps}" + (f"-disc{d:g}-from{args.disc_start}" if d else ""))
        cfg = autoencoder_config(preset_for(DATASET), kl_weight=w, disc_weight=d, disc_start=args.disc_start)
        cfg = replace(cfg, train=replace(cfg.train, steps=args.steps, sample_every=0))
        if not (run / "latent.json").exists():
            timed_train(run, cfg, train_images, 10**6)
            measure_scale(run, train_images, progress=True)
        info = json.loads((run / "latent.json").read_text())
        space = load_autoencoder(run)
        recon = space.reconstruct(scorer.test)
        rows.append(
            {
                "kl_weight": w,
                "disc_weight": d,
                "psnr": float(psnr(recon, scorer.test).mean()),
                "rfd": scorer.fd(recon),
                "latent_std": info["std"],
                "scale": info["scale"],
                "posterior_std": info["posterior_std"],
                "noise_fraction": info["posterior_std"] / info["std"],
            }
        )
        print(rows[-1], flush=True)
    lines = header("The KL autoencoder's kl_weight trade-off on fashion-pairs")
    lines += [
        f"- {args.steps} steps per autoencoder (factor 4, 4 latent channels, L1, batch 32); test PSNR and rFD on the "
        "4000 test "
        f"images (shipped fashion-pairs features); latent statistics on the 20000 training images",
        f"- load average at the start: {load_start}; at the end: {load_average()}",
        "",
    ]
    if args.disc_weights != [0.0]:
        lines.insert(
            -2, f"- patch discriminator (3 layers, hinge) from batch {args.disc_start} at the disc_weight given"
        )
    lines += md_table(
        [
            "kl_weight",
            "disc_weight",
            "PSNR dB",
            "rFD",
            "latent std",
            "latent scale",
            "posterior std",
            "posterior std / latent std",
        ],
        [
            [
                f"{r['kl_weight']:g}",
                f"{r['disc_weight']:g}",
                f"{r['psnr']:.2f}",
                f"{r['rfd']:.3f}",
                f"{r['latent_std']:.3f}",
                f"{r['scale']:.4f}",
                f"{r['posterior_std']:.4f}",
                f"{r['noise_fraction']:.3f}",
            ]
            for r in rows
        ],
    )
    write_text(RESULTS / f"{args.out}.md", "\n".join(lines) + "\n")
    write_text(
        RESULTS / f"{args.out}.json",
        json.dumps({"steps": args.steps, "disc_start": args.disc_start, "rows": rows}, indent=1),
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
