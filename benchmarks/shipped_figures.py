"""Reproduce every shipped model's recorded figures (the recipe's `figures`) with `difflab eval`'s evaluate.

The suite checks each shipped diffusion model against its check picture (seconds; tests/test_shipped.py); this
reproduces the figures themselves (minutes on 2 CPU cores: the class model's 300 samples of 20 guided steps
are the longest), and says for each figure what was recorded, what came out and whether it is within tolerance
(1 point of accuracy, 2 % of FD, 0.05 dB of PSNR).

    .venv/bin/python benchmarks/shipped_figures.py [--models NAME ...] [--out benchmarks/results]

Writes benchmarks/results/shipped_figures.md."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from difflab.data.images import load_images  # noqa: E402
from difflab.evaluation.evaluate import evaluate  # noqa: E402
from difflab.evaluation.metrics import psnr  # noqa: E402
from difflab.guidance.config import GuidanceConfig  # noqa: E402
from difflab.latent.autoencoder import load_autoencoder  # noqa: E402
from difflab.runs import shipped  # noqa: E402
from difflab.text.clip import clip_figures  # noqa: E402


def measured(name: str) -> list[tuple[str, float, float, float]]:
    """(figure, recorded, measured, tolerance) for the shipped model ``name``."""
    fig = shipped.recipe(name)["figures"]
    if name == "fashion-pairs-ae":
        test = load_images("fashion-pairs", "test").images[:2000]
        return [("psnr", fig["psnr"], float(psnr(load_autoencoder(name).reconstruct(test), test).mean()), 0.05)]
    if name in ("fashion-pairs-clip", "fashion-pairs-clip-minilm"):
        got = clip_figures(name, load_images("fashion-pairs", "test"), n=fig["n"])
        return [(k, fig[k], got[k], 0.01) for k in ("swap_discrimination", "caption_to_image", "image_to_caption")]
    r = evaluate(name, n=fig["n"], guidance=GuidanceConfig(scale=fig["scale"]), bpd_n=0, progress=False)
    rows = [("fd", fig["fd"], r["fd"], 0.02 * fig["fd"])]
    if name.startswith("fashion-pairs-t2i"):
        follows = r["text"]["follows"]
        rows += [("seen", fig["seen"], follows["seen"]["all_four"], 0.01)]
        rows += [("held_out", fig["held_out"], follows["held_out"]["all_four"], 0.01)]
        for key, prompts in (("new_phrasings", "new-phrasings"), ("reworded", "reworded")):  # where recorded
            if key in fig:
                unseen = evaluate(
                    name,
                    n=fig["n"],
                    guidance=GuidanceConfig(scale=fig["scale"]),
                    prompts=prompts,
                    bpd_n=0,
                    progress=False,
                )
                rows += [(key, fig[key], unseen["text"]["follows"]["all"]["all_four"], 0.01)]
    else:
        rows += [("class_accuracy", fig["class_accuracy"], r["classes"]["accuracy"], 0.01)]
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=shipped.names())
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    lines = [
        "| model | figure | recorded | measured | within tolerance | seconds |",
        "| --- | --- | ---: | ---: | --- | ---: |",
    ]
    ok = True
    for name in args.models:
        start = time.perf_counter()
        rows = measured(name)
        seconds = time.perf_counter() - start
        for figure, want, got, tol in rows:
            within = abs(got - want) <= tol
            ok &= within
            lines.append(
                f"| {name} | {figure} | {want:.4f} | {got:.4f} | {'yes' if within else 'NO'} | {seconds:.0f} |"
            )
            print(lines[-1], flush=True)
    head = [
        "# Shipped models' recorded figures, reproduced",
        "",
        f"`.venv/bin/python benchmarks/shipped_figures.py` on {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shipped_figures.md").write_text("\n".join(head + lines) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
