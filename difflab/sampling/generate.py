"""One generation path: every run object, and through them every command, the evaluation, the chain pictures,
the studio and the benchmarks, draw here.

    x = generate(denoiser, shape, n=64, sampler="dpmpp-2m", steps=20, seed=0)   # (64, *shape)

* Sample i has its own seed, ``seed + i`` (a ``PerSampleGenerator``): the same seed gives the same
  sample whatever the batch size, the device's batch split or the number of processes.
* The samples come in batches of ``batch`` with a progress bar; under torchrun (``world``) each rank
  draws a consecutive block of the n samples and rank 0 gathers them (the others get None).
* ``shape`` is one sample's shape in the space the denoiser works in (a run's ``config.shape``), never the
  network's guess.
* ``decode`` maps the denoiser's space to the data space: the identity by default; a latent run passes its
  autoencoder's decoder (runs/diffusion.py); a recorded trajectory is decoded too (x_t and the x_0 predictions).
* Conditions: ``cond`` holds tensors with one row per sample (n rows), sliced with the batches.
* ``callback(i, t, x_t, prediction)`` is the samplers' per-step callback, called for every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..training.distributed import World, gather_rows, shard
from .samplers import PerSampleGenerator, SamplerName, Spacing, Trajectory, check_options, device_of, sample


def identity(x: Tensor) -> Tensor:
    return x


def _frames(decode, frames: Tensor) -> Tensor:
    """Decode a (K, B, ...) stack of states."""
    K, B = frames.shape[:2]
    x = decode(frames.reshape(K * B, *frames.shape[2:]))
    return x.reshape(K, B, *x.shape[1:])


def check_cond(cond: Mapping[str, Tensor] | None, n: int) -> dict[str, Tensor]:
    """Conditions for n samples: each tensor must have n rows."""
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    for name, value in cond.items():
        if not isinstance(value, Tensor) or value.ndim == 0 or len(value) != n:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"condition {name!r} needs one row per sample ({n}), got {got}")
    return cond


def generate(
    denoiser,
    shape,
    n: int,
    *,
    sampler: SamplerName | Callable = "ddim",
    steps: int = 50,
    spacing: Spacing | None = None,
    options: dict | None = None,
    cond: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    batch: int = 250,
    device: torch.device | str | None = None,
    world: World | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    decode: Callable[[Tensor], Tensor] | None = None,
    x_start: Tensor | None = None,
    init: Tensor | None = None,
    strength: float | None = None,
    callback: Callable | None = None,
):
    """``n`` samples of the run in the data space, on the CPU (rank 0; None on other ranks).

    options  the sampler's own options (ddim: eta; ddpm: variance; ...) and the grid's sigma_tilde_cap
    return_trajectory  also return the chain of the samples (one batch, one process: n <= batch)
    decode   the denoiser's space -> the data space (default: the identity)
    x_start  n starting states at t_max instead of the prior draw (e.g. DDIM-inverted images)
    init, strength  SDEdit: n images in the model space, noised to t = strength * t_max with the sample's own
                    seed, then denoised from there"""
    options = dict(options or {})
    grid = {k: options.pop(k) for k in ("sigma_tilde_cap",) if k in options}
    check_options(sampler, options)  # unknown sampler or option: fail before any work
    for name, value in (("n", n), ("steps", steps), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    world = world or World()
    cond = check_cond(cond, n)
    begins = check_cond({k: v for k, v in (("x_start", x_start), ("init", init)) if v is not None}, n)
    t_start = None
    if init is not None:
        if strength is None or not 0.0 < strength <= 1.0:
            raise ValueError(f"init needs a strength in (0, 1], got {strength!r}")
        t_max = denoiser.process.t_max
        t_start = float(round(strength * t_max)) if denoiser.process.discrete else strength * t_max
        t_start = max(t_start, 1.0 if denoiser.process.discrete else 1e-3 * t_max)
    if return_trajectory and (n > batch or world.distributed):
        raise ValueError("a trajectory is recorded for one batch in one process: use n <= batch")
    decode = decode or identity
    shape = tuple(shape)
    device = torch.device(device) if device is not None else device_of(denoiser)
    if isinstance(denoiser, nn.Module):
        denoiser = denoiser.to(device)

    lo, hi = shard(n, world.rank, world.size)
    starts = list(range(lo, hi, batch))
    chunks, traj = [], None
    for start in tqdm(
        starts,
        desc=f"sample ({getattr(sampler, '__name__', sampler)}, {steps} steps)",
        disable=not progress or len(starts) < 2 or not world.is_main,
    ):
        stop = min(start + batch, hi)
        gen = PerSampleGenerator(range(seed + start, seed + stop))
        part = {k: v[start:stop].to(device) for k, v in cond.items()}
        begin = {k: v[start:stop] for k, v in begins.items()}
        out = sample(
            denoiser,
            (stop - start, *shape),
            steps,
            sampler=sampler,
            spacing=spacing,
            generator=gen,
            cond=part or None,
            device=device,
            return_trajectory=return_trajectory,
            t_start=t_start,
            callback=callback,
            **begin,
            **grid,
            **options,
        )
        if return_trajectory:
            out, traj = out
            if decode is not identity:
                traj = Trajectory(traj.t, _frames(decode, traj.x_t), _frames(decode, traj.x0))
        with torch.no_grad():
            chunks.append(decode(out).cpu())
    x = torch.cat(chunks) if chunks else decode(torch.empty((0, *shape), device=device)).cpu()
    if world.distributed:  # NCCL gathers CUDA tensors, gloo CPU ones
        x = gather_rows(x.to(device), n, world)
        x = x.cpu() if x is not None else None
    return (x, traj) if return_trajectory else x
