"""Zero-shot inverse problems with an unconditional (or conditional) denoiser: recover x from y = A(x) + sigma_y n.

Each method is a sampler with the samplers' one signature plus the operator; the measurement y travels
with the conditions, under ``cond["measurement"]`` (one row per sample), so ``generate`` batches, seeds
and shards restorations exactly as it does samples:

    x = generate(denoiser, cfg, n, sampler=repaint, steps=50, options={"operator": op},
                 cond={"measurement": y})

    replace   the known part re-noised with q(x_s | y) after every ancestral step (Song et al. 2021b,
              appendix I; the baseline): x_s <- x_s + A^+ (alpha_s y + sigma_s A eps - A x_s)
    repaint   Lugmayr et al. (2022): the same replacement with resampling: after every ``jump_length``
              reverse steps, go back up ``jump_length`` steps with q(x_t | x_s) and redo them, ``jump_n_sample``
              times in all (their defaults 10 and 10 cost about 10x the plain chain's evaluations)
    ddrm      Kawar et al. (2022), eq. 7-8, in the operator's SVD: unmeasured spectral coordinates follow a
              DDIM step with noise eta, measured ones are pulled to y with eta_b; needs an SVD
    dps       Chung et al. (2023), Algorithm 1: an ancestral step, then a gradient step
              x_s <- x_s - scale grad_{x_t} ||y - A(x0_hat(x_t))|| through the denoiser; any differentiable A

The operator acts in the data space; these methods assume the model's space is the data space (pixels).
``evaluations`` counts the network calls a method makes for one batch (RePaint's resampling included).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..core.operators import Operator, OperatorError
from ..core.parameterize import Prediction, expand_t
from ..core.processes import broadcast
from .samplers import _alpha_sigma, _check_grid, _Recorder, ddim_step, randn

MEASUREMENT = "measurement"


def _split(cond: dict | None) -> tuple[Tensor, dict]:
    cond = dict(cond or {})
    y = cond.pop(MEASUREMENT, None)
    if y is None:
        raise OperatorError(f"a restoration needs the measurement y in cond[{MEASUREMENT!r}]")
    return y, cond


def _noise(x: Tensor, generator) -> Tensor:
    return randn(x.shape, generator, x.dtype, x.device)


def noised_measurement(op: Operator, y: Tensor, alpha: Tensor, sigma: Tensor, noise: Tensor) -> Tensor:
    """A sample of A x_s given A x_0 = y: alpha_s y + sigma_s A eps (eps ~ N(0, I) in the data space)."""
    return broadcast(alpha, y) * y + broadcast(sigma, y) * op(noise)


def project(op: Operator, x: Tensor, y_s: Tensor) -> Tensor:
    """x with its measured part replaced: x + A^+ (y_s - A x) (for a mask: the known pixels set to y_s)."""
    return x + op.pinv(y_s - op(x))


def _ancestral(denoiser, x, t, s, cond, generator) -> tuple[Tensor, Prediction]:
    """One DDPM-like step x_t -> x_s (DDIM with eta = 1: the posterior variance) and the prediction at x_t."""
    pred = denoiser(x, expand_t(t, x), **cond)
    z = _noise(x, generator) if float(s) > 0 else None
    return ddim_step(denoiser.process, pred, t, s, 1.0, z), pred


def forward_step(process, x_s: Tensor, s, t, noise: Tensor) -> Tensor:
    """q(x_t | x_s) for t > s: (alpha_t / alpha_s) x_s + sqrt(sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2) noise."""
    (a_s, sg_s), (a_t, sg_t) = _alpha_sigma(process, s), _alpha_sigma(process, t)
    ratio = a_t / a_s
    return broadcast(ratio, x_s) * x_s + broadcast((sg_t**2 - ratio**2 * sg_s**2).clamp(min=0).sqrt(), x_s) * noise


@torch.no_grad()
def replace(
    denoiser,
    x: Tensor,
    ts,
    *,
    operator: Operator,
    cond: dict | None = None,
    generator=None,
    callback=None,
    return_trajectory: bool = False,
):
    """The replacement baseline: an ancestral step, then the measured part set to a fresh sample of q(A x_s | y)."""
    return repaint(
        denoiser,
        x,
        ts,
        operator=operator,
        jump_length=1,
        jump_n_sample=1,
        cond=cond,
        generator=generator,
        callback=callback,
        return_trajectory=return_trajectory,
    )


def repaint_schedule(n: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The visiting order of grid levels k = n (noise) ... 0 (data) (Lugmayr et al. 2022, the RePaint code's
    get_schedule_jump): down one level at a time; after every ``jump_length`` levels, back up ``jump_length``
    levels, ``jump_n_sample - 1`` times."""
    jumps = {k: jump_n_sample - 1 for k in range(0, n - jump_length, jump_length)}
    k, order = n, [n]
    while k > 0:
        k -= 1
        order.append(k)
        if jumps.get(k, 0) > 0:
            jumps[k] -= 1
            for _ in range(jump_length):
                k += 1
                order.append(k)
    return order


@torch.no_grad()
def repaint(
    denoiser,
    x: Tensor,
    ts,
    *,
    operator: Operator,
    jump_length: int = 10,
    jump_n_sample: int = 10,
    cond: dict | None = None,
    generator=None,
    callback=None,
    return_trajectory: bool = False,
):
    """RePaint: replacement with resampling (see the module doc); jump_n_sample = 1 is plain replacement."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length}, {jump_n_sample}")
    y, cond = _split(cond)
    ts = _check_grid(ts)
    n, process, rec = len(ts) - 1, denoiser.process, _Recorder(return_trajectory)
    order = repaint_schedule(n, jump_length, jump_n_sample)
    time = lambda k: ts[n - k]  # noqa: E731  level k = n is t_max, k = 0 the data
    for step, (k, k_next) in enumerate(zip(order, order[1:])):
        t, s = time(k), time(k_next)
        if k_next < k:  # down: an ancestral step, then the known part from q(A x_s | y)
            x_unknown, pred = _ancestral(denoiser, x, t, s, cond, generator)
            if callback is not None:
                callback(step, t, x, pred)
            rec.step(t, x, pred.x0)
            a_s, sg_s = _alpha_sigma(process, s)
            y_s = noised_measurement(operator, y, a_s, sg_s, _noise(x, generator)) if float(s) > 0 else y
            x = project(operator, x_unknown, y_s)
        else:  # up from level k (time t) to k_next (time s > t): resample with q(x_s | x_t)
            x = forward_step(process, x, t, s, _noise(x, generator))
    return rec.finish(ts[-1], x)


@torch.no_grad()
def ddrm(
    denoiser,
    x: Tensor,
    ts,
    *,
    operator: Operator,
    eta: float = 0.85,
    eta_b: float = 1.0,
    cond: dict | None = None,
    generator=None,
    callback=None,
    return_trajectory: bool = False,
):
    """DDRM (Kawar et al. 2022, eq. 7-8) in the variance-exploding scale x / alpha, sigma_tilde = sigma / alpha."""
    if operator.svd is None:
        raise OperatorError(
            f"DDRM needs an operator with an SVD; {operator.name} has none (use replace, repaint or dps)"
        )
    if not (0.0 <= eta <= 1.0 and 0.0 <= eta_b <= 1.0):
        raise ValueError(f"DDRM's eta and eta_b must lie in [0, 1], got {eta}, {eta_b}")
    y, cond = _split(cond)
    ts = _check_grid(ts)
    svd, process, rec = operator.svd, denoiser.process, _Recorder(return_trajectory)
    s_i = svd.s.to(device=x.device, dtype=x.dtype)  # (r,)
    r = len(s_i)
    y_bar = svd.Ut(y.to(x.dtype)) / s_i  # (B, r): the measurement in spectral coordinates
    sy = operator.sigma_y / s_i  # (r,): the noise of y_bar
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        pred = denoiser(x, expand_t(t, x), **cond)
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        (a_t, sg_t), (a_s, sg_s) = _alpha_sigma(process, t), _alpha_sigma(process, s)
        st, ss = float(sg_t / a_t), float(sg_s / a_s)  # sigma_tilde of this level and the next
        xt_bar, x0_bar = svd.Vt(x / float(a_t)), svd.Vt(pred.x0)
        z = svd.Vt(_noise(x, generator)) if ss > 0 else torch.zeros_like(x0_bar)
        out = x0_bar + math.sqrt(1 - eta**2) * ss * (xt_bar - x0_bar) / st + eta * ss * z  # unmeasured directions
        m_x0, m_z = x0_bar[:, :r], z[:, :r]
        below = ss < sy  # measured directions whose measurement noise exceeds the next level
        pulled = (
            m_x0
            + math.sqrt(1 - eta**2) * ss * (y_bar - m_x0) / torch.where(below, sy, torch.ones_like(sy))
            + eta * ss * m_z
        )
        blended = (1 - eta_b) * m_x0 + eta_b * y_bar + (ss**2 - (sy * eta_b) ** 2).clamp(min=0).sqrt() * m_z
        out[:, :r] = torch.where(below, pulled, blended)
        x = float(a_s) * svd.V(out)
    return rec.finish(ts[-1], x)


@torch.no_grad()
def dps(
    denoiser,
    x: Tensor,
    ts,
    *,
    operator: Operator,
    scale: float = 1.0,
    cond: dict | None = None,
    generator=None,
    callback=None,
    return_trajectory: bool = False,
):
    """DPS (Chung et al. 2023, Algorithm 1, the official code's step: the gradient of the residual's norm)."""
    if not scale >= 0:
        raise ValueError(f"the DPS step scale must be >= 0, got {scale}")
    y, cond = _split(cond)
    ts = _check_grid(ts)
    process, rec = denoiser.process, _Recorder(return_trajectory)
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            pred = denoiser(x_in, expand_t(t, x_in), **cond)
            residual = (y - operator(pred.x0)).flatten(1).norm(dim=1)  # per sample
            (grad,) = torch.autograd.grad(residual.sum(), x_in)
        pred = Prediction(x, pred.alpha.detach(), pred.sigma.detach(), pred.target, pred.value.detach())
        if callback is not None:
            callback(i, t, x, pred)
        rec.step(t, x, pred.x0)
        z = _noise(x, generator) if float(s) > 0 else None
        x = ddim_step(process, pred, t, s, 1.0, z) - scale * grad
    return rec.finish(ts[-1], x)


METHODS = {"replace": replace, "repaint": repaint, "ddrm": ddrm, "dps": dps}


def evaluations(method: str, steps: int, options: dict | None = None) -> int:
    """Network evaluations of one restoration of ``steps`` grid steps (per batch)."""
    options = options or {}
    if method != "repaint":
        return steps
    order = repaint_schedule(steps, options.get("jump_length", 10), options.get("jump_n_sample", 10))
    return sum(b < a for a, b in zip(order, order[1:]))


class Counted(nn.Module):
    """A denoiser that counts its calls (``calls``), for reporting network evaluations."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser, self.process, self.calls = denoiser, denoiser.process, 0
        self.accepts = getattr(denoiser, "accepts", None)

    def forward(self, x_t, t, **cond):
        self.calls += 1
        return self.denoiser(x_t, t, **cond)
