"""Editing real images with a trained model: SDEdit image-to-image and interpolation between two images.

    img2img      noise x to t = strength * t_max with q(x_t | x_0), denoise back (Meng et al. 2022, SDEdit)
    interpolate  'ddpm': the DDPM paper's way (Ho et al. 2020, section 4.3): noise both images to t with q and
                 the same noise, mix them, run the reverse chain; since the noise is shared, the mix of the
                 noised images is the noised mix, so each frame is SDEdit of (1 - lambda) a + lambda b
                 'ddim': DDIM-invert both (eta = 0 run forwards to t_max), interpolate the inverted noises
                 spherically (linearly when nearly parallel), decode with DDIM on the same grid

Both go through ``generate`` (per-sample seeds, batches) with its ``init``/``strength`` and ``x_start``.
Images are in the model's space ([-1, 1] pixels). Class labels are taken from the nearer end (a label
cannot be mixed); tensor conditions are mixed linearly alongside the images."""

from __future__ import annotations

import torch
from torch import Tensor

from .generate import generate
from .samplers import ddim_invert, default_spacing, timesteps

METHODS = ("ddim", "ddpm")
# fixed-point refinements of each inversion step: with the exact Gaussian denoiser, 50 steps round-trip to a
# largest error of 0.24 without them and 0.014 with 3 (tests/test_edit.py)
INVERT_ITERS = 3


def slerp(a: Tensor, b: Tensor, lam: float) -> Tensor:
    """Spherical interpolation per sample (flattened), linear when the angle is below 1e-4 rad."""
    fa, fb = a.flatten(1).double(), b.flatten(1).double()
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-30)
    theta = torch.arccos(cos.clamp(-1, 1))[:, None]
    lin = (1 - lam) * fa + lam * fb
    sph = (torch.sin((1 - lam) * theta) * fa + torch.sin(lam * theta) * fb) / torch.sin(theta).clamp_min(1e-30)
    return torch.where(theta < 1e-4, lin, sph).to(a.dtype).reshape(a.shape)


def _mix_cond(cond_a: dict | None, cond_b: dict | None, lam: float, specs) -> dict:
    cond_a, cond_b = cond_a or {}, cond_b or {}
    labels = {s.name for s in specs if s.kind == "label"}
    out = {}
    for k in set(cond_a) | set(cond_b):
        if k not in cond_a or k not in cond_b:
            raise ValueError(f"condition {k!r} is given for one image only")
        a, b = cond_a[k], cond_b[k]
        out[k] = (a if lam < 0.5 else b) if k in labels or not a.dtype.is_floating_point else (1 - lam) * a + lam * b
    return out


def img2img(
    denoiser,
    x: Tensor,
    strength: float,
    *,
    steps: int = 50,
    sampler: str = "ddim",
    seed: int = 0,
    cond: dict | None = None,
    options: dict | None = None,
    batch: int = 250,
    progress: bool = False,
    decode=None,
    callback=None,
) -> Tensor:
    """SDEdit: x (n, ...) in the model space noised to strength * t_max and denoised; strength 1 ignores x.
    ``callback`` is the samplers' callback(i, t, x_t, prediction), at every step of the shortened chain."""
    return generate(
        denoiser,
        x.shape[1:],
        len(x),
        sampler=sampler,
        steps=steps,
        options=options,
        cond=cond,
        seed=seed,
        batch=batch,
        init=x,
        strength=strength,
        progress=progress,
        decode=decode,
        callback=callback,
    )


def interpolate(
    denoiser,
    a: Tensor,
    b: Tensor,
    frames: int = 9,
    *,
    method: str = "ddim",
    t: float = 0.5,
    steps: int = 50,
    seed: int = 0,
    cond_a: dict | None = None,
    cond_b: dict | None = None,
    specs=(),
    invert_iters: int = INVERT_ITERS,
    decode=None,
    callback=None,
) -> Tensor:
    """``frames`` images from a (1, ...) to b (1, ...): (frames, ...), in the model space of ``denoiser`` (``decode``
    maps them out). ``t`` (fraction of t_max) is the DDPM way's depth; ``specs`` the run's ConditionSpecs (which
    conditions are labels); ``invert_iters`` fixed-point refinements per DDIM inversion step (samplers.ddim_invert).
    ``callback(i, t, x_t, prediction)``: the samplers' callback at every step of every chain in turn, i counting
    over all of them ('ddim': the inversion of both ends, then the decoding of the frames, 2 * steps in all;
    'ddpm': each frame's shortened chain)."""
    if method not in METHODS:
        raise ValueError(f"unknown interpolation method {method!r}; choose one of {', '.join(METHODS)}")
    if frames < 2:
        raise ValueError(f"frames must be at least 2, got {frames}")
    if a.shape != b.shape or len(a) != 1:
        raise ValueError(f"interpolation needs two images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    lams = torch.linspace(0, 1, frames).tolist()
    callback = _counted(callback)
    conds = [_mix_cond(cond_a, cond_b, lam, specs) for lam in lams]
    cond = {k: torch.cat([c[k] for c in conds]) for k in conds[0]} if conds[0] else None
    if method == "ddpm":  # every frame with the same seed: the same noise, so the frames differ only by the mix
        out = [
            generate(
                denoiser,
                a.shape[1:],
                1,
                sampler="ddpm",
                steps=steps,
                seed=seed,
                init=(1 - lam) * a + lam * b,
                strength=t,
                cond={k: v[i : i + 1] for k, v in (cond or {}).items()} or None,
                decode=decode,
                callback=callback,
            )
            for i, lam in enumerate(lams)
        ]
        return torch.cat(out)
    ts = timesteps(denoiser.process, steps, default_spacing("ddim", denoiser.process))
    ends = torch.cat([a, b])
    end_cond = {k: torch.cat([v[:1], v[-1:]]) for k, v in (cond or {}).items()} or None
    z = ddim_invert(
        denoiser, ends.to(torch.float32), ts, cond=end_cond, fixed_point_iters=invert_iters, callback=callback
    )  # (2, ...) at t_max
    x_T = torch.cat([slerp(z[:1], z[1:], lam) for lam in lams])
    return generate(
        denoiser,
        a.shape[1:],
        frames,
        sampler="ddim",
        steps=steps,
        seed=seed,
        x_start=x_T,
        cond=cond,
        decode=decode,
        callback=callback,
    )


def _counted(callback):
    """The samplers' callback(i, t, x_t, prediction) over several chains in turn: i counts every step of all of them."""
    if callback is None:
        return None
    count = [0]

    def counted(i, t, x, pred):
        callback(count[0], t, x, pred)
        count[0] += 1

    return counted
