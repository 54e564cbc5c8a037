"""The math of distillation: small pure functions of a process, a prediction and times.

Notation (x_t = alpha_t x_0 + sigma_t eps for every process; s < t the less noisy time):

    paper symbol                                   here
    z_t, x~ (Salimans & Ho 2022, Algorithm 2)      x_t, ``ddim_x0_target``
    w(lambda) = max(exp(lambda), 1) ("truncated SNR")    ``truncated_snr``
    f_theta, c_skip, c_out (Song et al. 2023, App. C)     ``consistency_x0``, ``consistency_coefficients``
    d(x, y) pseudo-Huber (Song & Dhariwal 2023)    ``pseudo_huber``
    w, the guidance strength (Meng et al. 2023)    w; the guided prediction x0_u + w (x0_c - x0_u)

Times may be (B,) tensors: every sample of a batch its own step (the samplers' single-step functions take them too)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.parameterize import Prediction, expand_t
from ..core.processes import Process, broadcast
from ..sampling.samplers import DEFAULT_SIGMA_CAP, ddim_step, euler_step

F64 = torch.float64


def _alpha_sigma(process: Process, t: Tensor) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(t, dtype=F64)
    return process.alpha(t), process.sigma(t)


def ddim_x0_target(process: Process, x_t: Tensor, x_s: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """The x_0 that takes one deterministic DDIM step from x_t at t exactly to x_s at s (Salimans & Ho 2022,
    Algorithm 2: x~ = (z'' - (sigma''/sigma) z) / (alpha'' - (sigma''/sigma) alpha)). A DDIM step is
    x_s = alpha_s x0 + (sigma_s / sigma_t)(x_t - alpha_t x0), linear in x0; into s = 0 it is x_s itself."""
    (a_t, s_t), (a_s, s_s) = _alpha_sigma(process, t), _alpha_sigma(process, s)
    r = s_s / s_t
    return (x_s - broadcast(r, x_t) * x_t) / broadcast(a_s - r * a_t, x_t)


def truncated_snr(process: Process, t: Tensor, like: Tensor) -> Tensor:
    """max(SNR_t, 1) per sample, broadcast against ``like``: the x_0 loss weight of progressive distillation
    (Salimans & Ho 2022, Sec. 4); on a VP process max(SNR, 1) |dx0|^2 = max(alpha^2, sigma^2) |dv|^2, bounded."""
    a, s = _alpha_sigma(process, t)
    return broadcast(torch.clamp((a / s) ** 2, min=1.0), like)


def sigma_tilde(process: Process, t: Tensor) -> Tensor:
    """EDM's noise level sigma_t / alpha_t."""
    a, s = _alpha_sigma(process, t)
    return s / a


def consistency_coefficients(
    process: Process, t: Tensor, t_min: float, sigma_data: float = 1.0
) -> tuple[Tensor, Tensor]:
    """(a, b) of f(x_t, t) = a(t) y_t + b(t) x0_hat(x_t, t), y_t = x_t / alpha_t: Song et al. (2023)'s
    f = c_skip y + c_out F, in EDM's sigma~ = sigma / alpha, with F the output of the teacher's own EDM
    preconditioning x0_hat = c_skip^EDM y + c_out^EDM F (a v-predicting network on a VP process is exactly that with
    sigma_data = 1). Eliminating F:

        b = c_out / c_out^EDM = (sigma~ - sigma~_min) / sigma~,     a = c_skip - b c_skip^EDM,
        c_skip = sigma_data^2 / ((sigma~ - sigma~_min)^2 + sigma_data^2),   c_skip^EDM = sigma_data^2 / (sigma~^2 +
        sigma_data^2)

    At t_min a = 1, b = 0 (the boundary condition); above it f is the teacher's x_0 reading up to a correction that
    fades like sigma~_min / sigma~, so a student initialised from its teacher starts as the teacher's one-step
    denoiser. float64, shape of t."""
    st, st_min = sigma_tilde(process, t), sigma_tilde(process, torch.tensor(float(t_min), dtype=F64))
    d2 = sigma_data**2
    b = (st - st_min) / st
    a = d2 / ((st - st_min) ** 2 + d2) - b * d2 / (st**2 + d2)
    return a, b


def consistency_x0(process: Process, pred: Prediction, t: Tensor, t_min: float, sigma_data: float = 1.0) -> Tensor:
    """A consistency model's output f(x_t, t) = a y_t + b x0_hat (``consistency_coefficients``): the boundary
    condition f(x, t_min) = x / alpha(t_min) (the data x is scaled from; x itself on a VE process) holds exactly
    whatever the network says."""
    t = expand_t(t, pred.x_t)
    a, b = consistency_coefficients(process, t, t_min, sigma_data)
    a_over_alpha = a / process.alpha(t).to(a.device)  # y = x / alpha: fold 1 / alpha into a (float64) before x_t
    x = pred.x_t
    return broadcast(a_over_alpha, x) * x + broadcast(b, x) * pred.x0


def pseudo_huber(a: Tensor, b: Tensor) -> Tensor:
    """d(a, b) = sqrt(|a - b|^2 + c^2) - c per sample, c = 0.00054 sqrt(dims) (Song & Dhariwal 2023, Sec. 3.3):
    squared error for small differences, absolute error for large ones, no network in the metric."""
    diff = (a - b).flatten(1).float()
    c = 0.00054 * math.sqrt(diff.shape[1])
    return torch.sqrt(diff.pow(2).sum(1) + c * c) - c


def ode_step(teacher, x: Tensor, t: Tensor, s: Tensor, cond: dict, solver: str = "heun") -> Tensor:
    """One step of the teacher's probability-flow ODE from x_t to x_s, per sample: 'ddim' (Euler in EDM's
    coordinates, which is DDIM) or 'heun' (Karras et al. 2022, Algorithm 1, lines 6-10: the trapezoid
    correction, except into s = 0 and out of sigma~ above the sampler's cap, where Euler = DDIM is exact and the
    correction would blow up; as ``samplers.heun``). ``teacher(x, t, **cond)`` is a Denoiser."""
    process = teacher.process
    pred = teacher(x, t, **cond)
    x_next = euler_step(process, pred, t, s)
    if solver == "ddim":
        return x_next
    correct = (s > 0) & (sigma_tilde(process, t) <= DEFAULT_SIGMA_CAP * (1 + 1e-9))
    if not bool(correct.any()):
        return x_next
    (a_t, s_t), (a_s, s_s) = _alpha_sigma(process, t), _alpha_sigma(process, s)
    s_safe = torch.where(s > 0, s, t)  # the rows not corrected are evaluated anywhere harmless, then dropped
    d_prime = teacher(x_next, s_safe, **cond).eps
    h = broadcast(s_s / a_s - s_t / a_t, x)
    corrected = x_next + broadcast(a_s, x).to(x.dtype) * h.to(x.dtype) * (d_prime - pred.eps) / 2
    return torch.where(correct.to(x.device).reshape(-1, *[1] * (x.ndim - 1)), corrected, x_next)


def two_ddim_steps(teacher, x_t: Tensor, t: Tensor, mid: Tensor, s: Tensor, cond: dict) -> Tensor:
    """The teacher's two deterministic DDIM steps t -> mid -> s (the target a progressive student makes in one)."""
    process = teacher.process
    x_mid = ddim_step(process, teacher(x_t, t, **cond), t, mid)
    return ddim_step(process, teacher(x_mid, mid, **cond), mid, s)
