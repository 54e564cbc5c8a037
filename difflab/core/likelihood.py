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
from .processes import DiscreteDDPM, Process, broadcast, posterior_coefficients, transition_variance

F64 = torch.float64
VARIANCES = ("beta", "beta_tilde", "learned")
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
    """The terms of the bound per example, in nats (float64), on a grid of K levels t_1 < ... < t_K = t_max
    (for DiscreteDDPM by default every step: K = T, t_k = k).

    prior    (B,)       L_T = KL(q(x_{t_K} | x_0) || prior)
    terms    (B, K-1)   terms[:, j] = KL(q(x_{t_{j+1}} | x_{t_{j+2}}, x_0) || p(x_{t_{j+1}} | x_{t_{j+2}})),
                        so on DDPM's full grid terms[:, 0] is L_1 and terms[:, -1] is L_{T-1}
    decoder  (B,)       L_0 = -log p(x_0 | x_{t_1})
    total    (B,)       prior + terms.sum(1) + decoder
    bits_per_dim (B,)   total / (D ln 2), D = number of dimensions of one example"""

    prior: Tensor
    terms: Tensor
    decoder: Tensor
    total: Tensor
    bits_per_dim: Tensor


def _check_options(denoiser, variance: str, decoder: str, ts) -> Tensor:
    """The increasing grid t_1 < ... < t_K of the bound (float64), after checking the options."""
    process = denoiser.process
    if variance not in VARIANCES:
        raise ValueError(f"unknown reverse variance {variance!r}; choose one of {VARIANCES}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
    if ts is None:
        if not isinstance(process, DiscreteDDPM):
            raise ValueError(
                f"the discrete-time bound of a {type(process).__name__} needs its grid ts (e.g. bound_grid(process, "
                "K)); DiscreteDDPM uses its own T steps"
            )
        return torch.arange(1, process.T + 1, dtype=F64)
    ts = torch.as_tensor(ts, dtype=F64).flatten().sort().values
    ts = ts[ts > 0]
    if len(ts) < 2 or bool((ts[1:] == ts[:-1]).any()) or float(ts[-1]) > process.t_max:
        raise ValueError(f"the bound's grid needs at least 2 distinct levels in (0, t_max={process.t_max}]")
    return ts


def _repeat_cond(cond: Mapping | None, B: int, k: int) -> dict:
    """Per-example tensors in cond (leading dim B) tiled k times, to match a batch of k blocks of B."""
    out = {}
    for key, value in (cond or {}).items():
        if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == B:
            value = value.repeat(k, *([1] * (value.ndim - 1)))
        out[key] = value
    return out


def bound_grid(process: Process, K: int) -> Tensor:
    """K levels for the discrete-time bound of any process, increasing: for DiscreteDDPM the K-step subsequence
    evenly spaced from 1 to T, rounded (Nichol & Dhariwal's respacing, improved-diffusion's space_timesteps:
    the first step stays t = 1, so the decoder L_0 reads x_1 as in the full chain), else K levels uniform in t
    from bound_t_min + (t_max - bound_t_min) / K to t_max (the decoder reads the lowest)."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"the bound needs at least 2 levels, got {K!r}")
    if isinstance(process, DiscreteDDPM):
        if K > process.T:
            raise ValueError(f"{K} levels exceed the T={process.T} steps of the process")
        levels, index, stride = [], 0.0, (process.T - 1) / (K - 1)
        for _ in range(K):  # space_timesteps' accumulated stride and Python's rounding, on our t = index + 1
            levels.append(1 + round(index))
            index += stride
        return torch.tensor(levels, dtype=F64)
    lo = bound_t_min(process)
    return lo + (process.t_max - lo) * torch.arange(1, K + 1, dtype=F64) / K


LOG_SNR_MAX = 13.3  # VDM's -gamma_min: the highest log-SNR of a continuous bound whose process reaches +inf


def bound_t_min(process: Process) -> float:
    """The lowest level of a continuous-time bound: t = 0 where the log-SNR is finite there (a learned schedule,
    gamma(0) = gamma_min), t = 1 for DiscreteDDPM (its first step), else the t of log-SNR = LOG_SNR_MAX, and
    never below a VE process's sigma_min (the lowest noise its network was trained on)."""
    if isinstance(process, DiscreteDDPM):
        return 1.0
    with torch.no_grad():
        lam0 = float(process.log_snr(torch.zeros(1, dtype=F64)))
    if math.isfinite(lam0):
        return 0.0
    lam = LOG_SNR_MAX
    sigma_min = getattr(process, "sigma_min", None)
    if sigma_min is not None:
        lam = min(lam, -2 * math.log(sigma_min))
    return float(process.t_from_log_snr(torch.tensor(lam, dtype=F64)))


def prior_log_variance(process: Process) -> float:
    """log of the prior's variance: N(0, I) for a variance-preserving process (Ho et al.), else N(0, sigma_max^2)."""
    if process.variance_preserving:
        return 0.0
    return 2 * math.log(float(process.sigma(torch.tensor(process.t_max, dtype=F64))))


def reverse_log_variance(process: Process, t: Tensor, s: Tensor, variance: str, var_frac: Tensor | None = None):
    """log var of p(x_s | x_t): log beta (sigma_{t|s}^2), log beta_tilde (the posterior's), or 'learned',
    var_frac log beta + (1 - var_frac) log beta_tilde (Nichol & Dhariwal 2021, eq. 15). t, s (N,) float64;
    var_frac (N, ...) for 'learned', whose result has its shape. Into s = 0 beta_tilde is 0: the caller
    handles the decoder."""
    log_beta = torch.log(transition_variance(process, t, s))
    log_tilde = torch.log(posterior_coefficients(process, t, s)[2])
    if variance == "beta":
        return log_beta
    if variance == "beta_tilde":
        return log_tilde
    if var_frac is None:
        raise ValueError("variance 'learned' needs a denoiser that predicts its variance (Prediction.var_frac)")
    f = var_frac.to(F64)
    return f * broadcast(log_beta, f).to(F64) + (1 - f) * broadcast(log_tilde, f).to(F64)


def reverse_kl(process: Process, x0: Tensor, x_t: Tensor, t: Tensor, s: Tensor, x0_hat: Tensor, log_var_p) -> Tensor:
    """KL(q(x_s | x_t, x_0) || N(mu_tilde(x_t, x0_hat), exp(log_var_p))) per example, summed over dimensions
    (nats, float64); t, s (N,); log_var_p (N,) or like x_t."""
    c_x0, c_xt, var_q = posterior_coefficients(process, t, s)
    x0, x_t, x0_hat = x0.to(F64), x_t.to(F64), x0_hat.to(F64)
    cx0, cxt = broadcast(c_x0, x0).to(F64), broadcast(c_xt, x0).to(F64)
    lvq = broadcast(torch.log(var_q), x0).to(F64)
    lvp = log_var_p if log_var_p.ndim == x0.ndim else broadcast(log_var_p, x0).to(F64)
    kl = normal_kl(cx0 * x0 + cxt * x_t, lvq, cx0 * x0_hat + cxt * x_t, lvp)
    return kl.flatten(1).sum(1)


def decoder_nll(x0: Tensor, mean: Tensor, log_var: Tensor, decoder: str) -> Tensor:
    """-log p(x_0 | x_{t_1}) per example (nats): the discretized Gaussian of 8-bit data or a density."""
    loglik = discretized_gaussian_log_likelihood if decoder == "discretized" else gaussian_log_likelihood
    lv = log_var if log_var.ndim == mean.ndim else broadcast(log_var, mean).to(F64)
    return -loglik(x0.to(F64), mean.to(F64), 0.5 * lv).flatten(1).sum(1)


def decoder_log_variance(process: Process, t1: Tensor, t2: Tensor, variance: str, var_frac=None):
    """The decoder's log variance at t_1: sigma_{t_1}^2 (Ho et al.'s beta_1), or for a learned variance
    var_frac log sigma_{t_1}^2 + (1 - var_frac) log beta_tilde(t_2 -> t_1) (iDDPM clips beta_tilde_1 = 0 to the
    next step's)."""
    log_hi = 2 * torch.log(process.sigma(t1))
    if variance != "learned":
        return log_hi
    log_lo = torch.log(posterior_coefficients(process, t2, t1)[2])
    f = var_frac.to(F64)
    return f * broadcast(log_hi, f).to(F64) + (1 - f) * broadcast(log_lo, f).to(F64)


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
    ts: Tensor | None = None,
) -> VLBTerms:
    """Every term of the bound (Ho et al.'s eq. 5) for the batch x0 (B, ...), with one x_t ~ q(x_t | x_0) per
    (example, level).

    variance: 'beta_tilde', 'beta' (fixed) or 'learned' (the denoiser's var_frac), the variance of p(x_s | x_t).
    decoder: 'discretized' (x0 on the 8-bit grid in [-1, 1]) or 'gaussian' (real-valued x0).
    ts: the levels (bound_grid(process, K): any process, any K; default a DiscreteDDPM's every step).
    t_batch: levels per denoiser call (each call sees B * t_batch inputs); by default as many as keep one call
        near 2^22 input numbers. cond is passed as denoiser(x_t, t, **cond), with its per-example tensors
        tiled along the batch."""
    grid = _check_options(denoiser, variance, decoder, ts)
    process = denoiser.process
    if decoder == "discretized" and (x0.min() < -1 - 1e-6 or x0.max() > 1 + 1e-6):
        raise ValueError("the discretized decoder needs x0 scaled to [-1, 1]; use decoder='gaussian' for real data")
    K, B = len(grid), x0.shape[0]
    D = x0[0].numel()
    device = x0.device
    gen_device = generator.device if generator is not None else device
    x0_64 = x0.to(F64)

    def noise_like(shape):
        return torch.randn(shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)

    # L_T = KL(q(x_{t_K} | x_0) || N(0, prior variance))
    t_K = torch.full((B,), float(grid[-1]), dtype=F64)
    a_T, s_T = broadcast(process.alpha(t_K), x0_64).to(F64), broadcast(process.sigma(t_K), x0_64).to(F64)
    prior = normal_kl(a_T * x0_64, torch.log(s_T**2), 0.0, prior_log_variance(process)).flatten(1).sum(1)  # (B,)

    # the denoising terms x_{t_k} -> x_{t_{k-1}}, k = 2..K, in blocks of t_batch levels: a block is k copies of
    # the batch, flattened to (k*B, ...)
    ts_hi, ts_lo = grid[1:], grid[:-1]  # (K-1,)
    if t_batch is None:
        t_batch = max(1, 2**22 // (B * D))
    terms = torch.empty(B, K - 1, dtype=F64, device=device)
    for start in range(0, K - 1, t_batch):
        idx = slice(start, min(start + t_batch, K - 1))
        k = idx.stop - idx.start
        t = ts_hi[idx].repeat_interleave(B)  # (k*B,) block-major: t[j*B + b] = ts_hi[start + j]
        s = ts_lo[idx].repeat_interleave(B)
        x0_rep = x0.repeat(k, *([1] * (x0.ndim - 1)))  # (k*B, ...)
        x_t = process.q_sample(x0_rep, t, noise_like(x0_rep.shape))
        pred = denoiser(x_t, expand_t(t, x_t), **_repeat_cond(cond, B, k))
        log_var_p = reverse_log_variance(process, t, s, variance, pred.var_frac)
        kl = reverse_kl(process, x0_rep, x_t, t, s, pred.x0, log_var_p)  # (k*B,)
        terms[:, idx] = kl.reshape(k, B).T  # (B, k)

    # L_0 = -log p(x_0 | x_{t_1}): mean pred.x0 at t_1, variance sigma_{t_1}^2 (DDPM: beta_1) or learned
    t_1 = torch.full((B,), float(grid[0]), dtype=F64)
    x_1 = process.q_sample(x0, t_1, noise_like(x0.shape))
    pred = denoiser(x_1, expand_t(t_1, x_1), **(cond or {}))
    log_var = decoder_log_variance(process, t_1, torch.full_like(t_1, float(grid[1])), variance, pred.var_frac)
    dec = decoder_nll(x0, pred.x0, log_var.to(device), decoder)  # (B,)

    total = prior + terms.sum(1) + dec
    return VLBTerms(prior=prior, terms=terms, decoder=dec, total=total, bits_per_dim=total / (D * math.log(2)))


# --------------------------------------------------------------------------- the continuous-time bound (VDM)


@dataclass
class ContinuousTerms:
    """The continuous-time bound per example (Kingma et al. 2021, eq. 11 and 17), nats (float64):

    prior      (B,)  KL(q(z_1 | x) || N(0, I))
    decoder    (B,)  -log p(x | z_{t_min}), p a Gaussian at z / alpha with std sigma / alpha (discretized for
                     8-bit data), no network: VDM's decoder at high SNR
    diffusion  (B,)  L_inf = 1/2 int_{t_min}^1 -lambda'(t) ||eps - eps_hat(z_t; t)||^2 dt
                           = 1/2 int_{lambda(1)}^{lambda(t_min)} ||eps - eps_hat||^2 dlambda,
                     estimated with ``k`` draws per example uniform in lambda (stratified), each with its own
                     eps: the same estimator for every schedule (the bound depends on the schedule's end
                     points alone, VDM eq. 13), free of the weight -lambda'(t) that makes draws uniform in t
                     noisy where the log-SNR moves fast (the cosine schedule's low-noise end)
    total, bits_per_dim (B,)"""

    prior: Tensor
    decoder: Tensor
    diffusion: Tensor
    total: Tensor
    bits_per_dim: Tensor


def continuous_decoder_nll(process: Process, x0: Tensor, t_min: float, eps: Tensor, decoder: str) -> Tensor:
    """-log p(x | z_{t_min}) per example for z = alpha x + sigma eps (nats)."""
    t = torch.full((len(x0),), t_min, dtype=F64, device=x0.device)
    a, s = broadcast(process.alpha(t), x0).to(F64), broadcast(process.sigma(t), x0).to(F64)
    z = a * x0.to(F64) + s * eps.to(F64)
    return decoder_nll(x0, z / a, 2 * torch.log(s / a), decoder)


def continuous_prior_kl(process: Process, x0: Tensor) -> Tensor:
    """KL(q(z_{t_max} | x) || N(0, prior variance)) per example (nats)."""
    t = torch.full((len(x0),), float(process.t_max), dtype=F64, device=x0.device)
    a, s = broadcast(process.alpha(t), x0).to(F64), broadcast(process.sigma(t), x0).to(F64)
    return normal_kl(a * x0.to(F64), 2 * torch.log(s), 0.0, prior_log_variance(process)).flatten(1).sum(1)


def diffusion_term(process: Process, pred_eps: Tensor, eps: Tensor, slope: Tensor, t_span: float) -> Tensor:
    """One draw of L_inf per example: (t_span / 2) (-lambda'(t)) ||eps - eps_hat||^2 (nats), t ~ U on the span."""
    err = ((eps - pred_eps).float() ** 2).flatten(1).sum(1)  # (B,)
    return 0.5 * t_span * (-slope).to(err.dtype) * err


@torch.no_grad()
def continuous_terms(
    denoiser,
    x0: Tensor,
    *,
    k: int = 8,
    decoder: str = "discretized",
    generator: torch.Generator | None = None,
    cond: Mapping | None = None,
) -> ContinuousTerms:
    """The continuous-time bound of x0 (B, ...) with ``k`` stratified draws of the log-SNR per example: draw j of
    example b lies in the j-th of k equal parts of [lambda(1), lambda(t_min)] (an unbiased estimate with less
    variance than k independent draws)."""
    process = denoiser.process
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (time draws per example) must be a positive integer, got {k!r}")
    B, D, device = x0.shape[0], x0[0].numel(), x0.device
    gen_device = generator.device if generator is not None else device
    t_min, t_max = bound_t_min(process), float(process.t_max)
    with torch.no_grad():
        lam_lo, lam_hi = process.log_snr(torch.tensor([t_max, t_min], dtype=F64)).tolist()
        u = (torch.arange(k, dtype=F64) + torch.rand(B, k, generator=generator, dtype=F64, device=gen_device).cpu()) / k
        lam = lam_lo + (lam_hi - lam_lo) * u.T.reshape(-1)  # (k*B,) block-major
        t = process.t_from_log_snr(lam).clamp(t_min, t_max).to(device)
    x0_rep = x0.repeat(k, *([1] * (x0.ndim - 1)))
    eps = torch.randn(x0_rep.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
    x_t = process.q_sample(x0_rep, t, eps)
    pred = denoiser(x_t, t, **_repeat_cond(cond, B, k))
    err = ((eps - pred.eps).to(F64) ** 2).flatten(1).sum(1)
    diff = (0.5 * (lam_hi - lam_lo) * err).reshape(k, B).mean(0)
    eps0 = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(device)
    dec = continuous_decoder_nll(process, x0, t_min, eps0, decoder)
    prior = continuous_prior_kl(process, x0)
    total = prior + dec + diff
    return ContinuousTerms(prior, dec, diff, total, total / (D * math.log(2)))


def log_snr_slope(process: Process, t: Tensor, create_graph: bool = False) -> Tensor:
    """lambda'(t) = d log SNR / dt (float64, negative): the process's own when it has one, else by autograd."""
    own = getattr(process, "log_snr_slope", None)
    if own is not None:
        return own(t)
    t = torch.as_tensor(t, dtype=F64).detach().requires_grad_(True)
    with torch.enable_grad():
        lam = process.log_snr(t)
        (slope,) = torch.autograd.grad(lam.sum(), t, create_graph=create_graph)
    return slope


@torch.no_grad()
def bits_per_dim(
    denoiser,
    batches: Iterable,
    *,
    variance: str = "beta_tilde",
    decoder: str = "discretized",
    generator: torch.Generator | None = None,
    t_batch: int | None = None,
    ts: Tensor | None = None,
    continuous: bool = False,
    k: int = 8,
    progress: bool = True,
) -> dict:
    """The bound averaged over a dataset, every term in bits/dim: the discrete-time bound (vlb_terms on the
    levels ``ts``, a DiscreteDDPM's every step by default) or with ``continuous`` the continuous-time one
    (continuous_terms, ``k`` draws of t per example).

    batches: an iterable of x0 tensors, of (x0, cond) pairs with cond a dict of keyword tensors, or of
    other tuples whose first element is x0 (labels ignored). Returns
        {'prior': L_T, 'terms': sum_t L_{t-1} (continuous: the diffusion loss L_inf), 'decoder': L_0,
         'total': the bound, 'total_stderr': standard error of 'total' over examples, 'per_t': (K-1,) mean
         L_{t-1} (index as VLBTerms.terms; discrete only), 'n': number of examples, 'per_example': the (n,)
         totals, for paired comparisons}, all in bits/dim."""
    if not continuous:
        _check_options(denoiser, variance, decoder, ts)
    sums: dict = {}
    sq_total, n = 0.0, 0
    per_example = []
    for batch in tqdm(batches, desc="bits/dim", disable=not progress):
        cond = None
        if isinstance(batch, (tuple, list)):
            batch, rest = batch[0], batch[1:]
            if len(rest) == 1 and isinstance(rest[0], Mapping):
                cond = rest[0]
        to_bpd = 1 / (batch[0].numel() * math.log(2))
        if continuous:
            c = continuous_terms(denoiser, batch, k=k, decoder=decoder, generator=generator, cond=cond)
            parts = {"prior": c.prior, "terms": c.diffusion, "decoder": c.decoder}
            bpd = c.bits_per_dim
        else:
            v = vlb_terms(
                denoiser, batch, variance=variance, decoder=decoder, generator=generator, t_batch=t_batch, cond=cond,
                ts=ts,
            )  # fmt: skip
            parts = {"prior": v.prior, "terms": v.terms.sum(1), "decoder": v.decoder, "per_t": v.terms}
            bpd = v.bits_per_dim
        parts = {key: value * to_bpd for key, value in parts.items()} | {"total": bpd}
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value.sum(0).cpu()
        sq_total += float((bpd**2).sum())
        per_example.append(bpd.detach().cpu())
        n += batch.shape[0]
    if n == 0:
        raise ValueError("no batches to evaluate")
    out = {key: (value / n if key == "per_t" else float(value) / n) for key, value in sums.items()}
    out["total_stderr"] = _stderr(sq_total, out["total"], n)
    out["n"] = n
    out["per_example"] = torch.cat(per_example)
    return out


def _stderr(sum_sq: float, mean: float, n: int) -> float:
    """The standard error of a mean of n values from their sum of squares (the unbiased variance)."""
    var = max(sum_sq / n - mean**2, 0.0) * n / max(n - 1, 1)
    return math.sqrt(var / n)
