"""The variational bound of a DDPM (Ho et al. 2020, eq. 5), term by term, and bits/dim.

    -log p(x_0) <= L_T + sum_{t=2}^{T} L_{t-1} + L_0, with
    L_T     = KL(q(x_T | x_0) || N(0, I))                       the prior term
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))     t = 2..T, the denoising terms
    L_0     = -log p(x_0 | x_1)                                 the decoder

The reverse step p(x_{t-1} | x_t) = N(mu_tilde(x_t, x0_hat), var_t I) takes its mean from the
posterior (eq. 7) with x_0 replaced by the denoiser's pred.x0, and one of two fixed variances
(Ho et al. Sec. 3.2): var_t = beta_t ('beta') or beta_tilde_t ('beta_tilde').

The decoder p(x_0 | x_1) has mean pred.x0 at t = 1 and variance beta_1 (Ho et al.'s sigma_1^2 = beta_1;
beta_tilde_1 = 0 cannot be used), and is either
    'discretized'  8-bit data scaled to [-1, 1]: the Gaussian mass of the bin [x - 1/255, x + 1/255],
                   with the outermost edges at -inf and +inf (Ho et al. Sec. 3.3), or
    'gaussian'     real-valued data: the Gaussian density.

Every term is evaluated exactly given x_t; only x_t ~ q(x_t | x_0) is sampled, once per (example, t).
All terms are in nats and summed over the dimensions of an example.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .parameterize import expand_t
from .processes import DiscreteDDPM, broadcast, posterior_coefficients

F64 = torch.float64
VARIANCES = ("beta", "beta_tilde")
DECODERS = ("discretized", "gaussian")
BIN_HALF_WIDTH = 1 / 255  # 8-bit data scaled to [-1, 1]: 256 bins of width 2/255


# --------------------------------------------------------------------------- pure helpers (elementwise)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats (arguments broadcast)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a, dtype=F64) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log N(x; mean, exp(log_scale)^2) elementwise (a density), in nats."""
    x, mean, log_scale = (torch.as_tensor(a, dtype=F64) for a in (x, mean, log_scale))
    z = (x - mean) * torch.exp(-log_scale)
    return -0.5 * math.log(2 * math.pi) - log_scale - 0.5 * z**2


def log_normal_mass(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails (a may be -inf, b may be +inf)."""
    flip = a > 0  # by symmetry Phi(b) - Phi(a) = Phi(-a) - Phi(-b): keep the interval's bulk at or below 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(bin of x) under N(mean, exp(log_scale)^2), for x on the 8-bit grid scaled to [-1, 1].

    The bin of x is [x - 1/255, x + 1/255], except that the bin of -1 extends to -inf and the
    bin of 1 to +inf, so the 256 bins carry all the mass (Ho et al. 2020, Sec. 3.3). Elementwise, in nats."""
    x, mean, log_scale = (torch.as_tensor(a, dtype=F64) for a in (x, mean, log_scale))
    x, mean, log_scale = torch.broadcast_tensors(x, mean, log_scale)
    inv_scale = torch.exp(-log_scale)
    inf = torch.full_like(x, math.inf)
    lo = torch.where(x < -1 + BIN_HALF_WIDTH, -inf, (x - BIN_HALF_WIDTH - mean) * inv_scale)
    hi = torch.where(x > 1 - BIN_HALF_WIDTH, inf, (x + BIN_HALF_WIDTH - mean) * inv_scale)
    return log_normal_mass(lo, hi)


# --------------------------------------------------------------------------- the bound


@dataclass
class VLBTerms:
    """The terms of the bound per example, in nats (float64).

    prior    (B,)       L_T
    terms    (B, T-1)   terms[:, j] = L_{j+1} = KL(q(x_{j+1} | x_{j+2}, x_0) || p(x_{j+1} | x_{j+2})),
                        i.e. the KL at step t = j + 2, so terms[:, 0] is L_1 and terms[:, -1] is L_{T-1}
    decoder  (B,)       L_0 = -log p(x_0 | x_1)
    total    (B,)       prior + terms.sum(1) + decoder
    bits_per_dim (B,)   total / (D ln 2), D = number of dimensions of one example"""

    prior: Tensor
    terms: Tensor
    decoder: Tensor
    total: Tensor
    bits_per_dim: Tensor


def _check_options(denoiser, variance: str, decoder: str) -> DiscreteDDPM:
    process = denoiser.process
    if not isinstance(process, DiscreteDDPM):
        raise ValueError(f"the discrete-time bound needs a DiscreteDDPM process, got {type(process).__name__}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; choose one of {VARIANCES}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
    return process


def _repeat_cond(cond: Mapping | None, B: int, k: int) -> dict:
    """Per-example tensors in cond (leading dim B) tiled k times, to match a batch of k blocks of B."""
    out = {}
    for key, value in (cond or {}).items():
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == B:
            value = value.repeat(k, *([1] * (value.ndim - 1)))
        out[key] = value
    return out


@torch.no_grad()
def vlb_terms(
    denoiser,
    x0: Tensor,
    *,
    variance: str = "beta_tilde",
    decoder: str = "discretized",
    generator: torch.Generator | None = None,
    t_batch: int | None = None,
    cond: Mapping | None = None,
) -> VLBTerms:
    """Every term of Ho et al.'s eq. 5 for the batch x0 (B, ...), with one x_t ~ q(x_t | x_0) per (example, t).

    variance: 'beta_tilde' or 'beta', the fixed variance of p(x_{t-1} | x_t).
    decoder: 'discretized' (x0 on the 8-bit grid in [-1, 1]) or 'gaussian' (real-valued x0).
    t_batch: time steps per denoiser call (each call sees B * t_batch inputs); by default as many
        as keep one call near 2^22 input numbers. cond is passed as denoiser(x_t, t, **cond), with its
        per-example tensors tiled along the batch."""
    process = _check_options(denoiser, variance, decoder)
    if decoder == "discretized" and (x0.min() < -1 - 1e-6 or x0.max() > 1 + 1e-6):
        raise ValueError("the discretized decoder needs x0 scaled to [-1, 1]; use decoder='gaussian' for real data")
    T, B = process.T, x0.shape[0]
    D = x0[0].numel()
    device = x0.device
    gen_device = generator.device if generator is not None else device
    x0_64 = x0.to(F64)

    def noise_like(shape):
        return torch.randn(shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)

    # L_T = KL(q(x_T | x_0) || N(0, I))
    t_T = torch.full((B,), float(T), dtype=F64)
    a_T, s_T = broadcast(process.alpha(t_T), x0_64), broadcast(process.sigma(t_T), x0_64)
    prior = normal_kl(a_T * x0_64, torch.log(s_T**2), 0.0, 0.0).flatten(1).sum(1)  # (B,)

    # L_{t-1}, t = 2..T, in blocks of t_batch steps: a block is k copies of the batch, flattened to (k*B, ...)
    ts = torch.arange(2, T + 1, dtype=F64)  # (T-1,)
    c_x0, c_xt, var_q = posterior_coefficients(process, ts, ts - 1)  # (T-1,) each
    var_p = var_q if variance == "beta_tilde" else process.beta(ts)
    if t_batch is None:
        t_batch = max(1, 2**22 // (B * D))
    terms = torch.empty(B, T - 1, dtype=F64, device=device)
    for start in range(0, T - 1, t_batch):
        idx = slice(start, min(start + t_batch, T - 1))
        k = idx.stop - idx.start
        t = ts[idx].repeat_interleave(B)  # (k*B,) block-major: t[j*B + b] = ts[start + j]
        x0_rep = x0.repeat(k, *([1] * (x0.ndim - 1)))  # (k*B, ...)
        x_t = process.q_sample(x0_rep, t, noise_like(x0_rep.shape))
        x0_hat = denoiser(x_t, expand_t(t, x_t), **_repeat_cond(cond, B, k)).x0.to(F64)
        cx0, cxt = broadcast(c_x0[idx].repeat_interleave(B), x0_hat), broadcast(c_xt[idx].repeat_interleave(B), x0_hat)
        lvq = broadcast(torch.log(var_q[idx]).repeat_interleave(B), x0_hat)
        lvp = broadcast(torch.log(var_p[idx]).repeat_interleave(B), x0_hat)
        x_t64, x0_rep64 = x_t.to(F64), x0_rep.to(F64)
        kl = normal_kl(cx0 * x0_rep64 + cxt * x_t64, lvq, cx0 * x0_hat + cxt * x_t64, lvp)  # (k*B, ...)
        terms[:, idx] = kl.flatten(1).sum(1).reshape(k, B).T  # (B, k)

    # L_0 = -log p(x_0 | x_1), decoder mean pred.x0 at t = 1, variance beta_1
    t_1 = torch.ones(B, dtype=F64)
    x_1 = process.q_sample(x0, t_1, noise_like(x0.shape))
    mean = denoiser(x_1, expand_t(t_1, x_1), **(cond or {})).x0.to(F64)
    log_scale = 0.5 * torch.log(process.beta(t_1[:1]))  # (1,)
    loglik = discretized_gaussian_log_likelihood if decoder == "discretized" else gaussian_log_likelihood
    dec = -loglik(x0_64, mean, broadcast(log_scale.to(device), mean)).flatten(1).sum(1)  # (B,)

    total = prior + terms.sum(1) + dec
    return VLBTerms(prior=prior, terms=terms, decoder=dec, total=total, bits_per_dim=total / (D * math.log(2)))


@torch.no_grad()
def bits_per_dim(
    denoiser,
    batches: Iterable,
    *,
    variance: str = "beta_tilde",
    decoder: str = "discretized",
    generator: torch.Generator | None = None,
    t_batch: int | None = None,
    progress: bool = True,
) -> dict:
    """The bound averaged over a dataset, every term in bits/dim.

    batches: an iterable of x0 tensors, of (x0, cond) pairs with cond a dict of keyword tensors, or of
    other tuples whose first element is x0 (labels ignored). Returns
        {'prior': L_T, 'terms': sum_t L_{t-1}, 'decoder': L_0, 'total': the bound,
         'total_stderr': standard error of 'total' over examples, 'per_t': (T-1,) mean L_{t-1} (index as
         VLBTerms.terms), 'n': number of examples}, all in bits/dim."""
    _check_options(denoiser, variance, decoder)
    sums: dict = {}
    sq_total, n = 0.0, 0
    for batch in tqdm(batches, desc="bits/dim", disable=not progress):
        cond = None
        if isinstance(batch, (tuple, list)):
            batch, rest = batch[0], batch[1:]
            if len(rest) == 1 and isinstance(rest[0], Mapping):
                cond = rest[0]
        v = vlb_terms(
            denoiser, batch, variance=variance, decoder=decoder, generator=generator, t_batch=t_batch, cond=cond
        )
        to_bpd = 1 / (batch[0].numel() * math.log(2))
        parts = {
            "prior": v.prior * to_bpd,
            "terms": v.terms.sum(1) * to_bpd,
            "decoder": v.decoder * to_bpd,
            "total": v.bits_per_dim,
            "per_t": v.terms * to_bpd,
        }
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.sum(0).cpu()
        sq_total += float((v.bits_per_dim**2).sum())
        n += batch.shape[0]
    if n == 0:
        raise ValueError("no batches to evaluate")
    out = {key: (value / n if key == "per_t" else float(value) / n) for key, value in sums.items()}
    var = max(sq_total / n - out["total"] ** 2, 0.0) * n / max(n - 1, 1)
    out["total_stderr"] = math.sqrt(var / n)
    out["n"] = n
    return out
