"""Pictures: scatter plots, image grids, chains (strips and GIFs), trajectories and loss curves.
Every writer is atomic (difflab.io.atomic_path)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..io import atomic_path


def pyplot():
    """matplotlib's pyplot, imported on first use (half a second of every command's start otherwise, and most
    commands draw nothing); on the file-only Agg backend unless the caller (a notebook) imported pyplot first."""
    import sys

    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LIM = 2.5  # axis half-width for the 2-D toy sets


def _save_fig(fig, path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def scatter(points: torch.Tensor, path, title: str = "", reference: torch.Tensor | None = None) -> None:
    """A 2-D scatter plot of (N, 2) points, with optional reference data in grey beside them."""
    fig, ax = pyplot().subplots(figsize=(4.5, 4.5))
    if reference is not None:
        ax.scatter(*reference[:, :2].T.numpy(), s=1, c="0.75", label="data")
    ax.scatter(*points[:, :2].T.numpy(), s=1, c="tab:blue", label="samples" if reference is not None else None)
    ax.set_xlim(-LIM, LIM), ax.set_ylim(-LIM, LIM), ax.set_aspect("equal"), ax.set_title(title)
    if reference is not None:
        ax.legend(loc="upper right", markerscale=6)
    _save_fig(fig, path)


def trajectories_2d(
    forward: list[torch.Tensor], forward_t: list[float], reverse: list[torch.Tensor], reverse_t: list[float], path
) -> None:
    """The classic swiss-roll figure: a row of forward noising q(x_t|x_0) and a row of reverse denoising."""
    n = max(len(forward), len(reverse))
    fig, axes = pyplot().subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for row, (pts, ts, name) in enumerate([(forward, forward_t, "q(x_t | x_0)"), (reverse, reverse_t, "p(x_t)")]):
        for j in range(n):
            ax = axes[row, j]
            ax.set_xticks([]), ax.set_yticks([]), ax.set_xlim(-LIM, LIM), ax.set_ylim(-LIM, LIM), ax.set_aspect("equal")
            if j < len(pts):
                ax.scatter(*pts[j][:, :2].T.numpy(), s=0.5, c="tab:blue" if row else "tab:red")
                ax.set_title(f"t = {ts[j]:g}", fontsize=9)
        axes[row, 0].set_ylabel(name)
    _save_fig(fig, path)


def image_grid(images: torch.Tensor, nrow: int | None = None, scale: int | None = None, pad: int = 1) -> Image.Image:
    """uint8 (N, C, H, W) -> one PIL image, nrow per row, upscaled (nearest) so small images stay visible."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    scale = scale or max(1, 64 // max(h, w))
    canvas = np.full((ncol_rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    for i in range(n):
        r, k = divmod(i, nrow)
        canvas[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = arr[i]
    mode = "L" if c == 1 else "RGB"
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas, mode)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def save_grid(images: torch.Tensor, path, nrow: int | None = None) -> None:
    with atomic_path(path) as tmp:
        image_grid(images, nrow).save(tmp)


def captioned_grid(images: torch.Tensor, captions: list[str], path, ncol: int = 4) -> None:
    """uint8 (N, C, H, W) images with their captions beneath, ``ncol`` per row (e.g. fashion-pairs)."""
    n, c, h, w = images.shape
    rows = math.ceil(n / ncol)
    fig, axes = pyplot().subplots(rows, ncol, figsize=(2.4 * ncol, rows * (2.4 * h / w + 0.45)), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            picture = images[i].permute(1, 2, 0).numpy()
            ax.imshow(
                picture[..., 0] if c == 1 else picture,
                cmap="gray" if c == 1 else None,
                vmin=0,
                vmax=255,
                interpolation="nearest",
            )
            ax.text(
                0.5, -0.04, textwrap.fill(captions[i], 36), fontsize=6.5, ha="center", va="top", transform=ax.transAxes
            )
    fig.subplots_adjust(hspace=0.45, wspace=0.05)
    _save_fig(fig, path)


def save_gif(frames: list[Image.Image], path, duration_ms: int = 80, hold_last_ms: int = 1200) -> None:
    """An animated GIF of PIL frames; the last frame is held so the result can be seen."""
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    with atomic_path(path) as tmp:
        frames[0].save(tmp, save_all=True, append_images=frames[1:], duration=durations, loop=0)


def loss_curve(metrics_jsonl, path) -> None:
    """The training loss (and its running mean) against the step, from a run's metrics.jsonl; beside it, when the
    run was evaluated while training (--eval-every), the FD of each evaluation with the best one marked."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "fd" in r]
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    k = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    fig, axes = pyplot().subplots(1, 2 if evals else 1, figsize=(10 if evals else 5.5, 3.2), squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, loss, lw=0.8, alpha=0.4, label="loss")
    ax.plot(steps[k - 1 :], smooth, lw=1.6, label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
    if (loss > 0).all():  # a bound in nats can be negative for continuous data: then a linear axis
        ax.set_yscale("log")
    if evals:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in evals], [r["fd"] for r in evals], "o-", lw=1.2, ms=3, label="FD of samples")
        best = min(evals, key=lambda r: r["fd"])
        ax.plot([best["step"]], [best["fd"]], "*", ms=12, color="C3", label=f"best (step {best['step']})")
        ax.set_xlabel("step"), ax.set_ylabel("FD (lower is better)"), ax.legend(), ax.grid(alpha=0.3)
    _save_fig(fig, path)
