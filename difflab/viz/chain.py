"""Pictures of the chain: forward noising q(x_t | x_0) and reverse denoising, for 2-D sets and images.

Each takes a run object (runs/diffusion.py: its ``trajectory`` draws the chain, decoded for a latent run)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from ..data.images import to_model, to_uint8
from ..data.toy2d import make_toy
from ..io import atomic_path
from ..runs.data import load_split
from . import plots

COLUMNS = 6  # moments of the chain shown side by side
FRACTIONS = (1.0, 0.6, 0.4, 0.25, 0.1, 0.0)  # of t_max: the structure appears late in the reverse chain


def _pick(n_items: int, k: int) -> list[int]:
    """k indices spread evenly over 0..n_items-1 (first and last included)."""
    return sorted({round(i * (n_items - 1) / (k - 1)) for i in range(k)})


def forward_noising(process, x0: torch.Tensor, ts: list[float], seed: int = 0) -> list[torch.Tensor]:
    """Samples of q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) at each t in ts (one noise draw per t)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in ts:
        eps = torch.randn(x0.shape, generator=g)
        out.append(process.q_sample(x0, torch.full((len(x0),), float(t), dtype=torch.float64), eps))
    return out


def toy_trajectories(run, out, n: int = 2000, steps: int = 100, seed: int = 0, sampler: str = "ddpm") -> None:
    """The classic swiss-roll figure: forward noising of the data (top) and reverse denoising of noise (bottom)."""
    process = run.process
    x0 = make_toy(run.config.dataset, n, seed=seed + 7)
    _, traj = run.trajectory(n, sampler=sampler, steps=steps, seed=seed)
    idx = [int(torch.argmin((traj.t - f * process.t_max).abs())) for f in FRACTIONS]
    rev_t = [float(traj.t[i]) for i in idx]
    fwd_t = sorted(rev_t)
    plots.trajectories_2d(forward_noising(process, x0, fwd_t, seed), fwd_t, [traj.x_t[i] for i in idx], rev_t, out)


def _strip(rows: list[list[torch.Tensor]]) -> Image.Image:
    """A grid picture from rows of uint8 (C, H, W) images."""
    flat = torch.stack([img for row in rows for img in row])
    return plots.image_grid(flat, nrow=len(rows[0]))


def image_chain(
    run, out, gif=None, forward=None, n: int = 8, steps: int = 50, seed: int = 0, sampler: str = "ddpm", **ask
) -> None:
    """Reverse chain strip (per sample, at six moments of the chain: x_t beside its predicted x_0), an optional
    GIF, and an optional forward-noising strip of real test images; ``ask``: the prompt, class_label, guidance
    and negative_prompt of ``run.trajectory``."""
    _, traj = run.trajectory(n, sampler=sampler, steps=steps, seed=seed, **ask)
    idx = _pick(len(traj.x0), COLUMNS)
    rows = [[to_uint8(img[i][k]) for i in idx for img in (traj.x_t, traj.x0)] for k in range(n)]
    with atomic_path(out) as tmp:
        _strip(rows).save(tmp)
    if gif:
        chain_gif(traj, gif)
    if forward:
        real = load_split(run.config, "test")
        ts = [float(t) for t in torch.linspace(0, run.process.t_max, COLUMNS + 2)]
        noisy = forward_noising(run.process, run.encode(to_model(real.images[:n])), ts, seed)
        with torch.no_grad():  # a latent run noises latents: shown decoded
            noisy = [run.decode(z) for z in noisy]
        rows = [[to_uint8(noisy[j][k]) for j in range(len(ts))] for k in range(n)]
        with atomic_path(forward) as tmp:
            _strip(rows).save(tmp)


def chain_gif(traj, path, n: int = 16) -> None:
    """One frame per step: a grid of x_t beside a grid of the predicted x_0."""
    frames = []
    for i in range(len(traj.x0)):
        xt = plots.image_grid(to_uint8(traj.x_t[i][:n]), nrow=4)
        x0 = plots.image_grid(to_uint8(traj.x0[i][:n]), nrow=4)
        frame = Image.new(xt.mode, (xt.width * 2 + 8, xt.height), 255)
        frame.paste(xt, (0, 0))
        frame.paste(x0, (xt.width + 8, 0))
        frames.append(frame)
    plots.save_gif(frames, Path(path))
