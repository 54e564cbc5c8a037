"""Samplers: pure functions that run a forward process backwards, and the step grids they walk.

Every sampler has one signature and draws randomness only from the generator it is given:

    x0 = sampler(denoiser, x, ts, *, cond=None, generator=None, callback=None, return_trajectory=False, **options)

    denoiser  the Denoiser interface: denoiser(x_t, t, **cond) -> Prediction, with ``denoiser.process``
    x         the starting state x_{ts[0]} (for sampling: noise already scaled, e.g. ``process.prior_sample``)
    ts        a decreasing float64 grid t_0 = t_max > ... > t_N = 0 from ``timesteps``
    callback  callback(i, t_i, x_{t_i}, prediction at (x_{t_i}, t_i)), once per step
    return_trajectory  also return a ``Trajectory`` (x_t at every grid time, predicted x_0 at every step)

Notation (all processes write x_t = alpha_t x_0 + sigma_t eps; s < t is the next, less noisy time):

    paper symbol                         here
    bar-alpha_t (Ho et al.)              alpha_t^2
    sigma_t (DDIM, Song et al. 2021a)    c, the std of the fresh noise in a DDIM step
    sigma (EDM), y = x / s(t)            sigma_tilde = sigma_t / alpha_t, y = x_t / alpha_t
    lambda_t (DPM-Solver)                lambda_t = log(alpha_t / sigma_t)  (half of ``process.log_snr``)
    eps_hat, x0_hat                      pred.eps, pred.x0 (the Prediction read in either target)
    alpha_i (Song & Ermon 2019)          a, the Langevin step size

The single-step updates (``ddpm_step``, ``ddim_step``, ``euler_step``, ``dpmpp_2m_step``,
``langevin_step``) are pure functions of a Prediction, the two times and the noise, so they can be
checked against other implementations (tests/test_parity_diffusers.py). ``ddim_invert`` encodes data
into noise (DDIM run forwards); ``sample`` builds the grid and the prior noise and runs a sampler by name.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from ..core.parameterize import Prediction, expand_t
from ..core.processes import (
    ContinuousVP,
    DiscreteDDPM,
    LearnedVP,
    Process,
    VarianceExploding,
    broadcast,
    posterior_coefficients,
    transition_variance,
)

F64 = torch.float64
DEFAULT_SIGMA_CAP = 80.0  # EDM's sigma_max: karras/logsnr grids on VP processes start their spread here

__all__ = [
    "DEFAULT_SIGMA_CAP",
    "PerSampleGenerator",
    "SAMPLERS",
    "SAMPLER_NAMES",
    "SPACINGS",
    "SamplerName",
    "Spacing",
    "Trajectory",
    "ddim",
    "ddim_invert",
    "ddim_step",
    "ddpm",
    "ddpm_step",
    "default_spacing",
    "device_of",
    "dpmpp_2m",
    "dpmpp_2m_step",
    "euler",
    "euler_step",
    "check_options",
    "consistency",
    "get_sampler",
    "heun",
    "langevin",
    "langevin_step",
    "pc",
    "randn",
    "sample",
    "sampler_options",
    "timesteps",
]


# --------------------------------------------------------------------------- trajectory


@dataclass
class Trajectory:
    """The states a sampler visited.

    t   (N+1,) float64: the grid times (``langevin``: the positive levels, then 0; ``ddim_invert``: increasing).
    x_t (N+1, B, ...): x_t[0] is the start, x_t[i] the state at t[i], x_t[N] the returned sample.
    x0  (N, B, ...):   x0[i] is the first x_0 prediction made at step i, i.e. denoiser(x_t[i], t[i]).x0
                       (N entries: no prediction is made at the final time).
    """

    t: Tensor
    x_t: Tensor
    x0: Tensor


class _Recorder:
    """Collects a Trajectory when asked to, and does nothing otherwise."""

    def __init__(self, on: bool):
        self.on = on
        self.t: list[float] = []
        self.x_t: list[Tensor] = []
        self.x0: list[Tensor] = []

    def step(self, t: Tensor, x_t: Tensor, x0: Tensor) -> None:
        if self.on:
            self.t.append(float(t))
            self.x_t.append(x_t.detach().clone())
            self.x0.append(x0.detach().clone())

    def finish(self, t: Tensor, x: Tensor):
        """Return x, or (x, Trajectory) when recording."""
        if not self.on:
            return x
        self.t.append(float(t))
        self.x_t.append(x.detach().clone())
        traj = Trajectory(torch.tensor(self.t, dtype=F64), torch.stack(self.x_t), torch.stack(self.x0))
        return x, traj


# --------------------------------------------------------------------------- helpers


class PerSampleGenerator:
    """One ``torch.Generator`` per sample (NVlabs/edm's StackedRandomGenerator): every draw is the stack of
    each sample's own draw, so sample i depends on its own seed alone, whatever the batch it is drawn in.

    Drawing each sample's noise separately at every step costs one small call per sample (5000 calls per step
    for a 2-D batch: 85 % of a DDPM step's time, measured). So each generator draws ahead, in blocks of 1, 2, 4,
    ... up to ``block_limit(shape)`` draws of one shape and dtype, and every call takes the next draw of the
    block: sample i's stream is still a function of its seed, the draw's shape and dtype alone (never of the
    batch), and a deterministic sampler that draws once pays for one. Pass it wherever a sampler takes ``generator``."""

    BLOCK_NUMBERS = 2**14  # at most this many numbers drawn ahead per sample (64 KiB of float32)
    BLOCK_MAX = 64

    def __init__(self, seeds, device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]
        self._key, self._block, self._used, self._size = None, None, 0, 0

    @classmethod
    def block_limit(cls, item_shape) -> int:
        numel = max(1, math.prod(item_shape))
        return max(1, min(cls.BLOCK_MAX, cls.BLOCK_NUMBERS // numel))

    def randn(self, shape, dtype=torch.float32, device=None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(
                f"a PerSampleGenerator of {len(self.generators)} samples cannot draw a batch of {shape[0]}"
            )
        key = (tuple(shape[1:]), dtype)
        if key != self._key:  # a new shape or dtype starts its own stream of blocks
            self._key, self._block, self._used, self._size = key, None, 0, 0
        if self._block is None or self._used == len(self._block[0]):
            self._size = min(max(1, 2 * self._size), self.block_limit(key[0]))
            self._block = torch.stack(
                [
                    torch.randn((self._size, *key[0]), generator=g, dtype=dtype, device=self.device)
                    for g in self.generators
                ]
            )  # (B, size, ...)
            self._used = 0
        out = self._block[:, self._used]  # (B, ...)
        self._used += 1
        return out.to(device or self.device)


def randn(shape, generator=None, dtype=torch.float32, device=None) -> Tensor:
    """Standard normal noise drawn on the generator's device (a seed reproduces anywhere), then moved to ``device``."""
    if isinstance(generator, PerSampleGenerator):
        return generator.randn(shape, dtype, device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, dtype=dtype, device=gen_device).to(device)


DDPM_VARIANCES = ("beta", "beta_tilde", "learned")


def _randn_like(x: Tensor, generator) -> Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


def _alpha_sigma(process: Process, t: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(t, dtype=F64)
    return process.alpha(t), process.sigma(t)


def _sigma_tilde(process: Process, t: Tensor) -> Tensor:
    """EDM's noise level sigma_tilde = sigma_t / alpha_t (0 at t = 0)."""
    alpha_t, sigma_t = _alpha_sigma(process, t)
    return sigma_t / alpha_t


def _lambda(process: Process, t: Tensor) -> Tensor:
    """DPM-Solver's lambda_t = log(alpha_t / sigma_t) (+inf at t = 0)."""
    alpha_t, sigma_t = _alpha_sigma(process, t)
    return torch.log(alpha_t) - torch.log(sigma_t)


def _check_grid(ts: Tensor, increasing_ok: bool = False) -> Tensor:
    ts = torch.as_tensor(ts, dtype=F64)
    if ts.ndim != 1 or len(ts) < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}")
    d = ts[1:] - ts[:-1]
    if bool((d < 0).all()) or (increasing_ok and bool((d > 0).all())):
        return ts
    raise ValueError("ts must be strictly decreasing (use timesteps(process, n, spacing))")


def _call(denoiser, x: Tensor, t: Tensor, cond: dict | None) -> Prediction:
    return denoiser(x, expand_t(t, x), **(cond or {}))


def _require_ve(process: Process, name: str) -> None:
    if not isinstance(process, VarianceExploding):
        raise ValueError(
            f"the {name!r} sampler needs a VarianceExploding process (x_t = x_0 + sigma eps), "
            f"got {type(process).__name__}; use 'ddpm', 'ddim', 'euler', 'heun' or 'dpmpp-2m'"
        )


# --------------------------------------------------------------------------- single steps (pure)


def ddpm_step(process: Process, pred: Prediction, t, s, variance: str = "beta", noise: Tensor | None = None) -> Tensor:
    """Ancestral step x_t -> x_s (Ho et al. 2020, Algorithm 2 on any subsequence): mean mu_tilde(x_t, x0_hat)
    of q(x_s | x_t, x0_hat) (eq. 7) plus std * noise, variance 'beta' (sigma_{t|s}^2), 'beta_tilde'
    (the posterior variance) or 'learned' (the denoiser's interpolation of the two on this step, Nichol &
    Dhariwal 2021, eq. 15); no noise when s = 0, nor when noise is None (the mean alone)."""
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(DDPM_VARIANCES)}")
    t, s = torch.as_tensor(t, dtype=F64), torch.as_tensor(s, dtype=F64)
    c_x0, c_xt, beta_tilde = posterior_coefficients(process, t, s)
    x_t = pred.x_t
    mu_tilde = broadcast(c_x0, x_t) * pred.x0 + broadcast(c_xt, x_t) * x_t
    if noise is None:
        return mu_tilde
    if float(s.max()) <= 0:  # the step into the data (t = 0) adds no noise
        return mu_tilde
    if variance == "learned":
        if pred.var_frac is None:
            raise ValueError("variance 'learned' needs a run trained with --variance learned")
        log_beta = broadcast(torch.log(transition_variance(process, t, s)), x_t)
        log_tilde = broadcast(torch.log(beta_tilde), x_t)
        std = torch.exp(0.5 * (pred.var_frac * log_beta + (1 - pred.var_frac) * log_tilde))
        return mu_tilde + std * noise
    var = beta_tilde if variance == "beta_tilde" else transition_variance(process, t, s)
    var = torch.where(s > 0, var, torch.zeros_like(var))
    return mu_tilde + broadcast(var.clamp(min=0).sqrt(), x_t) * noise


def ddim_step(process: Process, pred: Prediction, t, s, eta: float = 0.0, noise: Tensor | None = None) -> Tensor:
    """DDIM step x_t -> x_s (Song et al. 2021a, eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c^2 = eta^2 beta_tilde (eq. 16). With eta = 0 it also runs forwards (s > t: DDIM inversion).
    noise=None drops the c z term (the deterministic part)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
    t, s = torch.as_tensor(t, dtype=F64), torch.as_tensor(s, dtype=F64)
    alpha_s, sigma_s = _alpha_sigma(process, s)
    x_t = pred.x_t
    if eta > 0:
        if bool((s >= t).any()):
            raise ValueError("DDIM with eta > 0 only runs backwards (s < t); inversion needs eta = 0")
        c2 = eta**2 * posterior_coefficients(process, t, s)[2]
    else:
        c2 = torch.zeros_like(sigma_s)
    x_s = broadcast(alpha_s, x_t) * pred.x0 + broadcast((sigma_s**2 - c2).clamp(min=0).sqrt(), x_t) * pred.eps
    if noise is not None and eta > 0:
        x_s = x_s + broadcast(c2.sqrt(), x_t) * noise
    return x_s


def euler_step(process: Process, pred: Prediction, t, s) -> Tensor:
    """Euler step of the probability-flow ODE in EDM coordinates (Karras et al. 2022, eq. 4 with s(t) = alpha_t):
    y = x / alpha, dy/dsigma_tilde = eps_hat, so y_s = y_t + (sigma_tilde_s - sigma_tilde_t) eps_hat.

    Since y_t - sigma_tilde_t eps_hat = x0_hat, this is computed as x_s = alpha_s x0_hat + sigma_s eps_hat (DDIM's
    form): the literal y_t + h eps_hat cancels two numbers of size sigma_tilde_t (2e4 at the top of cosine DDPM)
    and loses float32's digits."""
    alpha_s, sigma_s = _alpha_sigma(process, s)
    x_t = pred.x_t
    return broadcast(alpha_s, x_t) * pred.x0 + broadcast(sigma_s, x_t) * pred.eps


def dpmpp_2m_step(process: Process, pred: Prediction, t, s, t_prev=None, x0_prev: Tensor | None = None) -> Tensor:
    """DPM-Solver++(2M) step x_t -> x_s (Lu et al. 2022, Algorithm 2) in lambda = log(alpha/sigma):
    x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) D, h = lambda_s - lambda_t, with
    D = (1 + 1/(2r)) x0_hat - 1/(2r) x0_prev, r = (lambda_t - lambda_prev) / h, or D = x0_hat (first order,
    when there is no previous step). Into sigma_s = 0 the step returns x0_hat (diffusers' final_sigmas_type='zero')."""
    (alpha_t, sigma_t), (alpha_s, sigma_s) = _alpha_sigma(process, t), _alpha_sigma(process, s)
    x_t, x0_hat = pred.x_t, pred.x0
    if bool((sigma_s == 0).all()):
        return x0_hat
    lambda_t, lambda_s = torch.log(alpha_t / sigma_t), torch.log(alpha_s / sigma_s)
    h = lambda_s - lambda_t
    if x0_prev is None or t_prev is None:
        D = x0_hat
    else:
        r = (lambda_t - _lambda(process, t_prev)) / h
        D = broadcast(1 + 1 / (2 * r), x_t) * x0_hat - broadcast(1 / (2 * r), x_t) * x0_prev
    return broadcast(sigma_s / sigma_t, x_t) * x_t - broadcast(alpha_s * torch.expm1(-h), x_t) * D


def langevin_step(pred: Prediction, a, noise: Tensor) -> Tensor:
    """One unadjusted Langevin step (Song & Ermon 2019, Algorithm 1): x + a/2 score + sqrt(a) z.
    ``a`` is a scalar or a (B,) tensor of step sizes."""
    x = pred.x_t
    a = torch.as_tensor(a, dtype=F64)
    return x + broadcast(a / 2, x) * pred.score + broadcast(a.sqrt(), x) * noise


# --------------------------------------------------------------------------- samplers


@torch.no_grad()
def ddpm(
    denoiser,
    x: Tensor,
    ts,
    *,
    variance: str | None = None,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) on the grid ts, variance 'beta', 'beta_tilde' or
    'learned'; None: 'learned' for a denoiser that predicts its variance, else 'beta'."""
    if variance is None:
        variance = "learned" if getattr(denoiser, "learned_variance", False) else "beta"
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {', '.join(DDPM_VARIANCES)}")
    ts = _check_grid(ts)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        z = _randn_like(x, generator) if float(s) > 0 else None
        x = ddpm_step(process, pred, t, s, variance, z)
    return rec.finish(ts[-1], x)


@torch.no_grad()
def ddim(
    denoiser,
    x: Tensor,
    ts,
    *,
    eta: float = 0.0,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """DDIM (Song et al. 2021a, eq. 12) on the grid ts; eta = 0 is deterministic.
    An increasing grid with eta = 0 encodes instead (see ``ddim_invert``)."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must lie in [0, 1], got {eta}")
    ts = _check_grid(ts, increasing_ok=eta == 0)
    if ts[1] > ts[0]:
        return ddim_invert(denoiser, x, ts, cond=cond, callback=callback, return_trajectory=return_trajectory)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        z = _randn_like(x, generator) if eta > 0 and float(s) > 0 else None
        x = ddim_step(process, pred, t, s, eta, z)
    return rec.finish(ts[-1], x)


@torch.no_grad()
def ddim_invert(
    denoiser,
    x0: Tensor,
    ts,
    *,
    fixed_point_iters: int = 0,
    cond: dict | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """DDIM inversion (Song et al. 2021a, Sec. 4.3; Dhariwal & Nichol 2021, eq. 13): the eta = 0 ODE run from data up.

    ts may be the decreasing sampling grid (walked backwards) or an increasing one; the result x_T satisfies
    ddim(denoiser, x_T, decreasing ts) ~= x0. Each step t -> s solves the decoding step s -> t for x_s:
        x_s = (alpha_s / alpha_t) x_t + alpha_s (sigma_tilde_s - sigma_tilde_t) eps_hat(x_s, s),
    starting from eps_hat(x_t, t) (the usual approximation) and refining with ``fixed_point_iters``
    evaluations at (x_s, s); with enough iterations encode-then-decode is exact. At t = 0 eps_hat is
    undefined, so that step always takes one evaluation at (alpha_s x_0, s)."""
    ts = _check_grid(ts, increasing_ok=True)
    if ts[1] < ts[0]:
        ts = ts.flip(0)
    process, rec, x = denoiser.process, _Recorder(return_trajectory), x0
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _alpha_sigma(process, t), _alpha_sigma(process, s)
        a = broadcast(alpha_s / alpha_t, x)
        b = broadcast(alpha_s * (sigma_s / alpha_s - sigma_t / alpha_t), x)
        iters = fixed_point_iters
        if float(t) > 0:
            pred = _call(denoiser, x, t, cond)
            x_s, x0_hat = a * x + b * pred.eps, pred.x0
        else:  # t = 0: x is the data itself; start from eps = 0 and evaluate once at the next level
            pred, x_s, x0_hat, iters = None, a * x, x, iters + 1
        for _ in range(iters):
            pred = _call(denoiser, x_s, s, cond)
            x_s = a * x + b * pred.eps
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, x0_hat)
        x = x_s
    return rec.finish(ts[-1], x)


@torch.no_grad()
def euler(
    denoiser,
    x: Tensor,
    ts,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the correction);
    the same map as DDIM with eta = 0."""
    ts = _check_grid(ts)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        x = euler_step(process, pred, t, s)
    return rec.finish(ts[-1], x)


@torch.no_grad()
def heun(
    denoiser,
    x: Tensor,
    ts,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """Heun's 2nd-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1, deterministic),
    in y = x / alpha and sigma_tilde = sigma / alpha; 2N - 1 evaluations (none extra into sigma = 0, nor out
    of sigma_tilde > DEFAULT_SIGMA_CAP, where the step is Euler's = DDIM's)."""
    ts = _check_grid(ts)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        (alpha_t, sigma_t), (alpha_s, sigma_s) = _alpha_sigma(process, t), _alpha_sigma(process, s)
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        h = broadcast(sigma_s / alpha_s - sigma_t / alpha_t, x)  # sigma_tilde_{i+1} - sigma_tilde_i
        d = pred.eps  # line 6: d_i = (y_i - D(y_i; sigma_i)) / sigma_i
        x_next = euler_step(process, pred, t, s)  # line 7: Euler step (x = alpha y)
        # line 8: second-order correction unless sigma_{i+1} = 0, and (our addition) not across a step out of
        # sigma_tilde > DEFAULT_SIGMA_CAP: there the trapezoid multiplies the change of eps_hat by a huge h
        # (cosine DDPM starts at 2e4) and blows up, while the Euler step alone, which is DDIM, stays exact
        if float(s) > 0 and float(sigma_t / alpha_t) <= DEFAULT_SIGMA_CAP * (
            1 + 1e-9
        ):  # a capped grid's level 80 keeps it
            d_prime = _call(denoiser, x_next, s, cond).eps  # line 9
            x_next = x_next + broadcast(alpha_s, x) * h * (d_prime - d) / 2  # line 10: y + h (d + d') / 2
        x = x_next
    return rec.finish(ts[-1], x)


@torch.no_grad()
def dpmpp_2m(
    denoiser,
    x: Tensor,
    ts,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): first step first order, multistep 2nd order after,
    the final step into sigma = 0 returns the data prediction (as diffusers' DPMSolverMultistepScheduler)."""
    ts = _check_grid(ts)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    t_prev = x0_prev = None
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        x0_hat = pred.x0
        rec.step(t, x, x0_hat)
        x = dpmpp_2m_step(process, pred, t, s, t_prev, x0_prev)
        t_prev, x0_prev = t, x0_hat
    return rec.finish(ts[-1], x)


@torch.no_grad()
def langevin(
    denoiser,
    x: Tensor,
    ts,
    *,
    n_steps_each: int = 100,
    step_lr: float | None = None,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) for VarianceExploding: at each level sigma_i of
    ts (> 0), n_steps_each steps with a_i = step_lr sigma_i^2 / sigma_L^2, then a Tweedie denoising step
    x_0 = x + sigma_L^2 score(x, sigma_L) from the smallest level.

    step_lr is a_L, the step at the smallest level; the paper's 2e-5 with sigma_L = 0.01 is a_i / sigma_i^2 = 0.2,
    the default for any sigma_L. a_i / sigma_i^2 >= 4 diverges at the large levels (a ValueError)."""
    process = denoiser.process
    _require_ve(process, "langevin")
    ts = _check_grid(ts)
    levels = ts[process.sigma(ts) > 0]
    sigma_L = process.sigma(levels[-1])
    step_lr = 0.2 * float(sigma_L) ** 2 if step_lr is None else step_lr
    if n_steps_each < 1 or not 0 < step_lr < 4 * float(sigma_L) ** 2:
        raise ValueError(
            f"need n_steps_each >= 1 and 0 < step_lr < 4 sigma_L^2 = {4 * float(sigma_L) ** 2:.3g} "
            f"(larger steps diverge), got {n_steps_each}, {step_lr}"
        )
    rec = _Recorder(return_trajectory)
    for i, t in enumerate(levels):
        a_i = step_lr * process.sigma(t) ** 2 / sigma_L**2
        for k in range(n_steps_each):
            pred = _call(denoiser, x, t, cond)
            if k == 0:
                if callback is not None:
                    callback(i, t, x, pred)
                rec.step(t, x, pred.x0)
            x = langevin_step(pred, a_i, _randn_like(x, generator))
    x = _call(denoiser, x, levels[-1], cond).x0  # denoise: E[x_0 | x] by Tweedie's formula
    return rec.finish(torch.zeros((), dtype=F64), x)


@torch.no_grad()
def pc(
    denoiser,
    x: Tensor,
    ts,
    *,
    snr: float = 0.16,
    n_corrector: int = 1,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """Predictor-corrector sampling for the VE SDE (Song et al. 2021b, Algorithms 2 and 4), ordered as in the
    authors' code: at each t_i, n_corrector Langevin steps of size eps = 2 (snr ||z|| / ||score||)^2 (norms
    averaged over the batch), then the reverse-diffusion predictor to t_{i+1}; the last predictor step, into
    sigma = 0, is noise-free, i.e. Tweedie's denoising step."""
    process = denoiser.process
    _require_ve(process, "pc")
    if n_corrector < 0 or not snr > 0:
        raise ValueError(f"need n_corrector >= 0 and snr > 0, got {n_corrector}, {snr}")
    ts = _check_grid(ts)
    rec = _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        for _ in range(n_corrector):  # corrector: Langevin MCMC at fixed t (Algorithm 4)
            z = _randn_like(x, generator)
            grad = pred.score
            # norms averaged over the batch, as in the reference code: per sample, ||z|| / ||score|| is
            # heavy-tailed in low dimension (a point near the mode has a tiny score) and the step explodes
            z_norm = z.flatten(1).norm(dim=1).mean().to(F64)
            g_norm = grad.flatten(1).norm(dim=1).mean().to(F64)
            eps = 2 * (snr * z_norm / g_norm) ** 2
            x = langevin_step(pred, 2 * eps, z)  # x + eps score + sqrt(2 eps) z
            pred = _call(denoiser, x, t, cond)
        # predictor: reverse diffusion, x + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_t^2 - sigma_s^2) z,
        # which for VE is exactly the ancestral step with variance 'beta'
        z = _randn_like(x, generator) if float(s) > 0 else None
        x = ddpm_step(process, pred, t, s, "beta", z)
    return rec.finish(ts[-1], x)


@torch.no_grad()
def consistency(
    denoiser,
    x: Tensor,
    ts,
    *,
    cond: dict | None = None,
    generator: torch.Generator | None = None,
    callback: Callable | None = None,
    return_trajectory: bool = False,
):
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): at each time x0_hat = f(x_t, t), then noise
    it afresh to the next time, x_s = alpha_s x0_hat + sigma_s z; into t = 0 the sample is x0_hat. One step (ts =
    [t_max, 0]) is the one-evaluation sample. Made for a consistency student (distill/), whose prediction is f;
    any denoiser runs it (its x_0 reading in place of f)."""
    ts = _check_grid(ts)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = _call(denoiser, x, t, cond)
        if callback is not None:
            callback(i, t, x, pred)
        x0_hat = pred.x0
        rec.step(t, x, x0_hat)
        if float(s) > 0:
            alpha_s, sigma_s = _alpha_sigma(process, s)
            x = broadcast(alpha_s, x) * x0_hat + broadcast(sigma_s, x) * _randn_like(x, generator)
        else:
            x = x0_hat
    return rec.finish(ts[-1], x)


SamplerName = Literal["ddpm", "ddim", "euler", "heun", "dpmpp-2m", "langevin", "pc", "consistency"]
SAMPLER_NAMES: tuple[SamplerName, ...] = get_args(SamplerName)
SAMPLERS: dict[SamplerName, Callable] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    "dpmpp-2m": dpmpp_2m,
    "langevin": langevin,
    "pc": pc,
    "consistency": consistency,
}


if tuple(SAMPLERS) != SAMPLER_NAMES:
    raise ImportError(f"SamplerName {SAMPLER_NAMES} and SAMPLERS {tuple(SAMPLERS)} differ")


def get_sampler(name: SamplerName | Callable) -> Callable:
    """The sampler function registered under ``name`` (a function with the samplers' signature passes through,
    e.g. the restoration methods of inverse.py)."""
    if callable(name):
        return name
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


_SHARED = ("cond", "generator", "callback", "return_trajectory")


def sampler_options(name: SamplerName | Callable) -> dict:
    """The options a sampler takes beyond the shared signature, with their defaults (e.g. ddim: {'eta': 0.0})."""
    params = inspect.signature(get_sampler(name)).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _SHARED}


def check_options(name: SamplerName | Callable, options: dict) -> None:
    """Raise one line for an option the sampler does not take (rather than dropping it)."""
    known = sampler_options(name)
    unknown = sorted(set(options) - set(known) - set(_SHARED))
    if unknown:
        takes = ", ".join(known) or "no options"
        raise ValueError(
            f"sampler {getattr(name, '__name__', name)!r} takes {takes}; it has no option "
            f"{', '.join(map(repr, unknown))}"
        )


# --------------------------------------------------------------------------- step spacings

Spacing = Literal["uniform", "leading", "trailing", "karras", "logsnr"]  # the grids timesteps() builds
SPACINGS: tuple[Spacing, ...] = get_args(Spacing)


def _default_t_min(process: Process) -> float:
    """The smallest positive level of the Karras and log-SNR grids: t = 1, sigma_min, or 1e-3 (Song et al.)."""
    if isinstance(process, DiscreteDDPM):
        return 1.0
    if isinstance(process, VarianceExploding):
        return float(process.sigma_min)
    if isinstance(process, (ContinuousVP, LearnedVP)):
        return 1e-3
    raise ValueError(f"pass t_min for a {type(process).__name__} process")


def timesteps(
    process: Process,
    n: int,
    spacing: Spacing = "uniform",
    rho: float = 7.0,
    t_min: float | None = None,
    sigma_tilde_cap: float | None = DEFAULT_SIGMA_CAP,
) -> Tensor:
    """A decreasing float64 grid of n+1 times from t_max (for 'leading', from diffusers' first step) down to 0.

    ``spacing`` (`Spacing`, defaults to `"uniform"`) is one of SPACINGS:

    uniform   linspace(t_max, 0, n+1), rounded to integers for DiscreteDDPM (the same grid as 'trailing' there)
    leading   DiscreteDDPM only, diffusers' 'leading' + 1: (T // n) k + 1 for k = n-1..0, then 0
    trailing  DiscreteDDPM only, diffusers' 'trailing' + 1: round(T - k T / n) for k = 0..n-1, then 0
    karras    Karras et al. (2022) eq. 5 in sigma_tilde = sigma/alpha between t_max and t_min, then 0
    logsnr    uniform in log-SNR between t_max and t_min (geometric in sigma for VE), then 0
    (karras and logsnr map back with process.t_from_log_snr; t may be fractional for DiscreteDDPM).
    ``sigma_tilde_cap`` (default EDM's sigma_max = 80; None turns it off): on a variance-preserving process
    whose sigma_tilde(t_max) is above it (cosine DDPM: about 2e4), karras and logsnr start at t_max and
    spread their other n-1 levels from the cap down, so a short grid is not spent where nothing can be
    seen (README: DPM-Solver++ karras, 10 steps, FD 6.9 -> 0.77). It does not touch the other spacings.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"the number of steps must be a positive integer, got {n!r}")
    discrete = isinstance(process, DiscreteDDPM)
    t_max = float(process.t_max)
    zero = torch.zeros(1, dtype=F64)

    if spacing in ("uniform", "leading", "trailing"):
        if spacing != "uniform" and not discrete:
            raise ValueError(
                f"spacing {spacing!r} is diffusers' integer grid, defined for DiscreteDDPM only; "
                f"use 'uniform', 'karras' or 'logsnr'"
            )
        if discrete and n > process.T:
            raise ValueError(f"{n} steps exceed the T={process.T} steps of the process for spacing {spacing!r}")
        k = torch.arange(n, dtype=F64)
        if spacing == "leading":
            grid = (process.T // n) * k.flip(0) + 1
        else:  # uniform / trailing: t_max + k (-t_max / n), numpy-arange style so the rounding matches diffusers
            grid = t_max + k * (-t_max / n)
            if discrete:
                grid = grid.round()
        return torch.cat([grid, zero])

    t_lo = _default_t_min(process) if t_min is None else float(t_min)
    if not 0 < t_lo < t_max:
        raise ValueError(f"t_min must lie in (0, t_max={t_max}), got {t_lo}")
    if n == 1:
        return torch.tensor([t_max, 0.0], dtype=F64)
    t_top, m = t_max, n
    if sigma_tilde_cap is not None:
        if isinstance(sigma_tilde_cap, bool) or not float(sigma_tilde_cap) > float(
            _sigma_tilde(process, torch.tensor(t_lo, dtype=F64))
        ):
            st_lo = float(_sigma_tilde(process, torch.tensor(t_lo, dtype=F64)))
            raise ValueError(
                f"the sigma cap must exceed sigma/alpha at the grid's smallest level ({st_lo:.3g}), got "
                f"{sigma_tilde_cap!r}"
            )
    if (
        sigma_tilde_cap is not None
        and process.variance_preserving
        and float(_sigma_tilde(process, torch.tensor(t_max, dtype=F64))) > sigma_tilde_cap
    ):
        t_top, m = float(process.t_from_log_snr(torch.tensor(-2 * math.log(sigma_tilde_cap), dtype=F64))), n - 1
    ends = torch.tensor([t_top, t_lo], dtype=F64)
    ramp = torch.linspace(0, 1, m, dtype=F64)
    if spacing == "karras":
        st_max, st_min = _sigma_tilde(process, ends)
        inv_rho = 1.0 / rho
        st = (st_max**inv_rho + ramp * (st_min**inv_rho - st_max**inv_rho)) ** rho
        log_snr = -2 * torch.log(st)
    else:  # logsnr
        log_snr_lo, log_snr_hi = process.log_snr(ends)  # at t_max (lowest SNR) and at t_min
        log_snr = log_snr_lo + ramp * (log_snr_hi - log_snr_lo)
    grid = process.t_from_log_snr(log_snr).to(F64)
    grid[0], grid[-1] = t_top, t_lo  # exact endpoints
    if m < n:  # capped: the first step goes from t_max straight to the cap
        grid = torch.cat([torch.tensor([t_max], dtype=F64), grid])
    return torch.cat([grid, zero])


def default_spacing(sampler: SamplerName | Callable, process: Process) -> Spacing:
    """The grid each sampler runs on unless told otherwise, chosen by measurement (benchmarks/README.md, "Default
    grids"):
    on a variance-preserving process uniform for ddpm, ddim and euler (Euler in DDIM's form is DDIM: on Karras it
    was 6.4x DDIM's energy distance at 10 steps on the swiss roll), Karras (capped at sigma/alpha = 80) for heun,
    log-SNR (capped) for dpmpp-2m; on a variance-exploding process geometric levels (logsnr) for langevin, pc and
    dpmpp-2m, Karras for the rest. At 10 steps every sampler is then within 5x of DDIM on the swiss roll
    (tests/test_toy_end_to_end.py). On images dpmpp-2m scored better on Karras (digits FD 1.14 against 1.48,
    Fashion-MNIST 0.77 against 1.40 at 10 steps) but worse on the swiss roll at 20 (2.9x the data floor
    against 1.9x): ``--spacing karras`` asks for it."""
    if sampler in ("langevin", "pc", "dpmpp-2m"):
        return "logsnr"
    if isinstance(process, VarianceExploding) or sampler == "heun":
        return "karras"
    return "uniform"


def device_of(denoiser) -> torch.device:
    """Where a denoiser's weights live (the CPU for one without any, e.g. the exact Gaussian denoiser)."""
    if isinstance(denoiser, torch.nn.Module):
        for t in (*denoiser.parameters(), *denoiser.buffers()):
            return t.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    denoiser,
    shape,
    steps: int,
    sampler: SamplerName | Callable = "ddim",
    spacing: Spacing | None = None,
    generator: torch.Generator | None = None,
    cond: dict | None = None,
    return_trajectory: bool = False,
    device=None,
    dtype: torch.dtype = torch.float32,
    sigma_tilde_cap: float | None = DEFAULT_SIGMA_CAP,
    x_start: Tensor | None = None,
    init: Tensor | None = None,
    t_start: float | None = None,
    **options,
):
    """Draw samples of ``shape`` (B, ...): build the grid, draw x ~ N(0, sigma(t_0)^2 I), run the sampler.

    The prior neglects alpha(t_0) x_0, as every sampler does. ``device`` defaults to the denoiser's.
    x_start  the state at the first grid time instead of the prior draw (e.g. DDIM-inverted noise)
    t_start  start the chain at this time: the grid's times below it, after it (SDEdit; Meng et al. 2022)
    init     clean x_0 (B, ...) noised to t_start with q(x_t | x_0), the noise drawn where the prior draw would be

    Args:
        sampler (`SamplerName` or a sampler function, defaults to `"ddim"`): one of SAMPLER_NAMES ("ddpm", "ddim",
            "euler", "heun", "dpmpp-2m", "langevin", "pc", "consistency"), or a function with the samplers' signature.
        spacing (`Spacing`, *optional*): the grid, one of SPACINGS (see ``timesteps``); None, the sampler's
            ``default_spacing`` on this process."""
    fn = get_sampler(sampler)
    check_options(sampler, options)
    process = denoiser.process
    ts = timesteps(process, steps, spacing or default_spacing(sampler, process), sigma_tilde_cap=sigma_tilde_cap)
    if t_start is not None:
        if not 0 < t_start <= process.t_max:
            raise ValueError(f"t_start must lie in (0, t_max = {process.t_max}], got {t_start}")
        ts = torch.cat([torch.tensor([float(t_start)], dtype=F64), ts[ts < t_start]])
    if device is None:
        device = device_of(denoiser)
    noise = randn(shape, generator, dtype, device)
    if init is not None:
        if t_start is None:
            raise ValueError("init (images to start from) needs t_start, the time they are noised to")
        x = process.q_sample(init.to(device=device, dtype=dtype), ts[:1].expand(shape[0]).to(device), noise)
    elif x_start is not None:
        x = x_start.to(device=device, dtype=dtype)
    else:
        x = noise * float(process.sigma(ts[0]))
    return fn(denoiser, x, ts, cond=cond, generator=generator, return_trajectory=return_trajectory, **options)
