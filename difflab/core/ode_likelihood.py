"""The exact log-likelihood of the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

The ODE dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat carries q(x_t) to q(x_s) for every pair of times when
the denoiser is exact. It is integrated here in EDM's coordinates (Karras et al. 2022, eq. 4 with
s(t) = alpha_t): y = x / alpha, sigma_tilde = sigma / alpha, where it reads dy/dsigma_tilde = eps_hat, and in
the variable r = log sigma_tilde = -lambda / 2:

    dy/dr = sigma_tilde eps_hat(alpha y, t(r)).

Every process is smooth in r (a DDPM's alpha(t) has a kink at each integer t; its alpha(r) does not), and r
spreads the low-noise end where the flow changes fastest. It is a continuous normalising flow, so by the
instantaneous change of variables (Chen et al. 2018), with y(r_min) = x / alpha(t_min),

    log p_{t_min}(x) = log p_T(x(T)) + int_{r_min}^{r_max} div_y (dy/dr) dr + D log(alpha_T / alpha_{t_min}),

the last term from x = alpha y at both ends; p_T is the prior, N(0, I) (variance preserving) or
N(0, sigma_max^2 I). The divergence is either

    exact        the trace of the Jacobian from D vector-Jacobian products (small dimensions), or
    hutchinson   Hutchinson's estimator z^T (d/dy) z with Rademacher z, K probes per example fixed along the
                 trajectory (FFJORD); unbiased, each probe's integral is reported so its spread gives a
                 standard error.

The solver is Dormand-Prince 5(4) with an adaptive step (rtol, atol on the RMS norm, as scipy's RK45, which
Song et al. use); the number of function evaluations (NFE) is reported.

Discrete data. 8-bit images scaled to [-1, 1] live on a grid of spacing 2/255; a density needs them made
continuous. 'uniform' dequantisation (Song et al.; Theis et al. 2016) adds u ~ U(-1/255, 1/255) per pixel, and
    -log2 P(pixels) <= E_u[-log2 p(x + u)] + D log2(255/2),
so bits/dim = -log p / (D ln 2) + log2(255/2): an upper bound, like the variational bound's discretised
decoder. Variational dequantisation (Ho et al. 2019, Flow++; Song et al.'s tighter figures) learns q(u | x)
with a flow of its own and is not built here. 'none' is for real-valued data (2-D points): bits per dimension
of the density itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .likelihood import BIN_HALF_WIDTH, bound_t_min, prior_log_variance
from .parameterize import expand_t

F64 = torch.float64
Divergence = Literal["exact", "hutchinson"]
DIVERGENCES: tuple[Divergence, ...] = get_args(Divergence)
Dequantization = Literal["uniform", "none"]
DEQUANTIZATIONS: tuple[Dequantization, ...] = get_args(Dequantization)
DEFAULT_TOL = 1e-5  # Song et al.'s rtol = atol

# Dormand & Prince (1980) 5(4): nodes, stages, the 5th-order weights (also the last stage: FSAL) and the
# difference between the 5th- and 4th-order weights (the error estimate)
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4, strict=True))


# --------------------------------------------------------------------------- pure helpers


def prior_log_density(x: Tensor, log_var: float) -> Tensor:
    """log N(x; 0, e^{log_var} I) summed over each example's dimensions, (B,) float64."""
    x = x.to(F64).flatten(1)
    D = x.shape[1]
    return -0.5 * (x.pow(2).sum(1) * math.exp(-log_var) + D * (math.log(2 * math.pi) + log_var))


def rademacher(shape, generator: torch.Generator | None = None, dtype=F64) -> Tensor:
    """A tensor of independent +-1 entries."""
    device = generator.device if generator is not None else "cpu"
    return (torch.randint(0, 2, shape, generator=generator, device=device) * 2 - 1).to(dtype)


def dequantize(x: Tensor, how: Dequantization, generator: torch.Generator | None = None) -> tuple[Tensor, float]:
    """x made continuous and the bits/dim offset that goes with it: uniform noise within each pixel's bin of
    the 8-bit grid (offset log2(255/2) = -log2 of the bin width), or x itself ('none', offset 0)."""
    if how == "none":
        return x, 0.0
    if how != "uniform":
        raise ValueError(f"unknown dequantization {how!r}; choose one of {DEQUANTIZATIONS}")
    u = torch.rand(x.shape, generator=generator, dtype=F64).to(x.device)
    return x.to(F64) + (2 * u - 1) * BIN_HALF_WIDTH, -math.log2(2 * BIN_HALF_WIDTH)


def divergence_of(out: Tensor, inp: Tensor, z: Tensor | None) -> Tensor:
    """The divergence of out = f(inp) per example, (B, K) float64 (inp a leaf that requires grad, f acting on
    each example alone): exact (z None: K = 1, the trace from D vector-Jacobian products) or Hutchinson's
    z_k^T (df/dinp) z_k for each of the K probes z (K, *inp.shape)."""
    B, D = inp.shape[0], inp[0].numel()
    if z is None:
        flat, eye = out.flatten(1), torch.eye(D, dtype=out.dtype, device=out.device)
        total = torch.zeros(B, dtype=F64, device=out.device)
        for i in range(D):
            (g,) = torch.autograd.grad(flat, inp, eye[i].expand(B, D), retain_graph=True)
            total = total + g.flatten(1)[:, i].to(F64)
        return total[:, None]
    divs = []
    for k in range(len(z)):
        (g,) = torch.autograd.grad(out, inp, z[k], retain_graph=True)
        divs.append((g * z[k]).flatten(1).sum(1).to(F64))
    return torch.stack(divs, 1)


# --------------------------------------------------------------------------- the solver


@dataclass
class ODESolution:
    y: tuple[Tensor, ...]  # the state at t1
    nfe: int  # function evaluations
    steps: int  # accepted steps
    rejected: int


def _rms_error(err: tuple[Tensor, ...], y0: tuple[Tensor, ...], y1: tuple[Tensor, ...], rtol, atol) -> float:
    total, count = 0.0, 0
    for e, a, b in zip(err, y0, y1, strict=True):
        scale = atol + rtol * torch.maximum(a.abs(), b.abs())
        total += float((e / scale).pow(2).sum())
        count += e.numel()
    return math.sqrt(total / count)


def dormand_prince(
    fn: Callable[[float, tuple[Tensor, ...]], tuple[Tensor, ...]],
    y0: tuple[Tensor, ...],
    t0: float,
    t1: float,
    *,
    rtol: float = DEFAULT_TOL,
    atol: float = DEFAULT_TOL,
    max_steps: int = 10_000,
) -> ODESolution:
    """Integrate dy/dt = fn(t, y) from t0 to t1 (t1 > t0) with the adaptive Dormand-Prince 5(4) pair.

    The state is a tuple of float64 tensors; the step is accepted when the RMS of err / (atol + rtol |y|) over
    all of them is <= 1, and the next one is scaled by 0.9 err^(-1/5), within [0.2, 10] (Hairer et al.)."""
    if not t1 > t0:
        raise ValueError(f"integrate forward: need t1 > t0, got {t0}, {t1}")
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"tolerances must be positive, got rtol={rtol}, atol={atol}")
    span = t1 - t0
    h = 1e-2 * span
    t, y = t0, y0
    k1 = fn(t, y)
    nfe, steps, rejected = 1, 0, 0
    while t < t1:
        if steps + rejected >= max_steps:
            raise RuntimeError(f"the ODE solver took {max_steps} steps without reaching t={t1}: loosen rtol/atol")
        h = min(h, t1 - t)
        ks = [k1]
        for i in range(1, 7):
            yi = tuple(
                y_j + h * sum(a * k[j] for a, k in zip(_A[i], ks, strict=False) if a != 0) for j, y_j in enumerate(y)
            )
            ks.append(fn(t + _C[i] * h, yi))
        nfe += 6
        y_new = yi  # the last stage's weights are the 5th-order solution's (FSAL)
        err = tuple(h * sum(e * k[j] for e, k in zip(_E, ks, strict=True) if e != 0) for j in range(len(y)))
        norm = _rms_error(err, y, y_new, rtol, atol)
        if norm <= 1.0:
            t = t1 if t1 - (t + h) <= 1e-12 * span else t + h
            y, k1 = y_new, ks[6]
            steps += 1
        else:
            rejected += 1
        h *= min(10.0, max(0.2, 0.9 * (norm + 1e-12) ** -0.2))
    return ODESolution(y, nfe, steps, rejected)


# --------------------------------------------------------------------------- the likelihood


@dataclass
class ODELikelihood:
    """Per example (B,), float64 nats (summed over dimensions): the estimate and its parts."""

    log_p: Tensor  # log p_{t_min}(x): prior + delta, the mean over probes
    prior: Tensor  # log p_T(x(T))
    delta: Tensor  # int div dr (the mean over probes) + D log(alpha_T / alpha_{t_min})
    per_probe: Tensor  # (B, K) the divergence's integral under each probe (exact divergence: K = 1)
    x_T: Tensor
    nfe: int
    t_min: float


def ode_log_likelihood(
    denoiser,
    x: Tensor,
    *,
    cond: Mapping | None = None,
    divergence: Divergence = "hutchinson",
    probes: int = 1,
    rtol: float = DEFAULT_TOL,
    atol: float = DEFAULT_TOL,
    t_min: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> ODELikelihood:
    """log p(x) of each example of x (continuous data) under the denoiser's probability-flow ODE.

    The network runs in ``dtype`` (its own, float32 for difflab's networks); the state and the integrals are
    float64. With 'hutchinson' every example gets ``probes`` Rademacher vectors, drawn once from ``generator``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if divergence == "hutchinson" and probes < 1:
        raise ValueError(f"Hutchinson's estimator needs probes >= 1, got {probes}")
    process = denoiser.process
    t_lo = bound_t_min(process) if t_min is None else float(t_min)  # the bound's lowest level
    t_hi = float(process.t_max)
    B, D = x.shape[0], x[0].numel()
    cond = dict(cond or {})
    z = None
    if divergence == "hutchinson":
        z = rademacher((probes, *x.shape), generator).to(device=x.device, dtype=dtype)

    def at(r: float) -> tuple[Tensor, Tensor]:
        """(t, alpha) at log sigma_tilde = r."""
        t = process.t_from_log_snr(torch.tensor(-2 * r, dtype=F64)).clamp(t_lo, t_hi)
        return t, process.alpha(t).detach()

    def field(r: float, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        t, alpha = at(r)
        y = state[0].to(dtype).detach().requires_grad_(True)
        with torch.enable_grad():
            pred = denoiser(y * alpha.to(dtype), expand_t(t, y), **cond)
            dy = pred.eps * math.exp(r)
            divs = divergence_of(dy, y, z)
        return dy.detach().to(F64), divs.detach().to(F64)

    with torch.no_grad():
        ends = torch.tensor([t_lo, t_hi], dtype=F64)
        r_lo, r_hi = (-0.5 * process.log_snr(ends)).tolist()
    alpha_lo, alpha_hi = at(r_lo)[1], at(r_hi)[1]
    K = probes if divergence == "hutchinson" else 1
    y0 = (x.detach().to(F64) / alpha_lo.to(x.device), torch.zeros(B, K, dtype=F64, device=x.device))
    sol = dormand_prince(field, y0, r_lo, r_hi, rtol=rtol, atol=atol)
    y_T, per_probe = sol.y
    x_T = y_T * alpha_hi.to(y_T.device)
    prior = prior_log_density(x_T, prior_log_variance(process))
    delta = per_probe.mean(1) + D * float(torch.log(alpha_hi / alpha_lo))
    return ODELikelihood(prior + delta, prior, delta, per_probe, x_T, sol.nfe, t_lo)


def ode_bits_per_dim(
    denoiser,
    batches: Iterable,
    *,
    dequantization: Dequantization = "uniform",
    divergence: Divergence = "hutchinson",
    probes: int = 1,
    rtol: float = DEFAULT_TOL,
    atol: float = DEFAULT_TOL,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> dict:
    """The ODE's negative log-likelihood averaged over a dataset, in bits/dim (of the density itself when
    dequantization is 'none', for real-valued data).

    batches: x0 tensors, or tuples whose first element is x0 and whose second, if a mapping, is the condition.
    Returns {'total', 'total_stderr' (over examples, probe and dequantisation noise included),
    'hutchinson_stderr' (the probes' share, None with one probe or the exact divergence), 'prior' (the
    -log p_T(x_T) part), 'offset' (dequantisation's log2(255/2)), 'nfe' (mean per batch), 'n', 'per_example'
    (the (n,) values, for paired comparisons of two models on the same data) and the options}."""
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {dequantization!r}; choose one of {DEQUANTIZATIONS}")
    total = sq = prior_sum = probe_var = 0.0
    nfe, n, calls = 0, 0, 0
    offset = 0.0
    per_example = []
    for batch in tqdm(batches, desc="ODE log-likelihood", disable=not progress):
        cond = None
        if isinstance(batch, (tuple, list)):
            batch, rest = batch[0], batch[1:]
            if len(rest) >= 1 and isinstance(rest[0], Mapping):
                cond = rest[0]
        x, offset = dequantize(batch, dequantization, generator)
        r = ode_log_likelihood(
            denoiser, x, cond=cond, divergence=divergence, probes=probes, rtol=rtol, atol=atol, generator=generator
        )
        scale = 1 / (x[0].numel() * math.log(2))
        value = -r.log_p * scale + offset
        per_example.append(value.detach().cpu())
        total += float(value.sum())
        sq += float((value**2).sum())
        prior_sum += float((-r.prior * scale).sum())
        if r.per_probe.shape[1] > 1:
            probe_var += float((r.per_probe * scale).var(1).sum() / r.per_probe.shape[1])
        nfe += r.nfe
        n += x.shape[0]
        calls += 1
    if n == 0:
        raise ValueError("no batches to evaluate")
    mean = total / n
    var = max(sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    return {
        "total": mean,
        "total_stderr": math.sqrt(var / n),
        "hutchinson_stderr": math.sqrt(probe_var) / n if probes > 1 and divergence == "hutchinson" else None,
        "prior": prior_sum / n,
        "offset": offset,
        "nfe": nfe / calls,
        "n": n,
        "per_example": torch.cat(per_example),
        "divergence": divergence,
        "probes": probes if divergence == "hutchinson" else None,
        "rtol": rtol,
        "atol": atol,
        "dequantization": dequantization,
    }
