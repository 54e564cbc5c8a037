"""Forward processes q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I).

Every process is described by three functions of a time t, with t = 0 the data
(alpha = 1, sigma = 0) and t = t_max the most corrupted level:

    alpha(t)    signal scale
    sigma(t)    noise scale
    log_snr(t)  lambda(t) = log(alpha^2 / sigma^2)

Instances:
    DiscreteDDPM     Ho et al. (2020): T steps, beta schedule, t in {0, 1, ..., T}
                     (fractional t interpolates log(abar) between integer steps).
    ContinuousVP     continuous-time variance preserving (alpha^2 + sigma^2 = 1),
                     t in [0, 1]: Song et al.'s linear-beta VP SDE or a cosine log-SNR.
    VarianceExploding  x_t = x_0 + sigma_t eps, with t = sigma (EDM's convention);
                     training levels drawn from a geometric or a Karras schedule.
    LearnedVP        variance preserving, t in [0, 1], with a learned monotone gamma(t) = -lambda(t)
                     (Kingma et al. 2021, VDM): its parameters train with the denoiser.

Schedules are computed in float64 and cast by the caller (``.to(x)``).
Notation: abar_t = alpha_t^2 (the paper's bar-alpha), beta_tilde = posterior variance.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor, nn

F64 = torch.float64


# --------------------------------------------------------------------------- beta schedules


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Ho et al. (2020) linear schedule, endpoints rescaled by 1000/T so that any T
    spans the same amount of noise (Nichol & Dhariwal 2021, Sec. 3.2; the identity at T=1000)."""
    scale = 1000.0 / T
    return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=F64)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) eq. 17: abar(t) = cos^2(((t/T + s)/(1 + s)) pi/2), betas clipped at 0.999."""
    t = torch.arange(T + 1, dtype=F64) / T
    abar = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)


def sigmoid_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Sigmoid schedule (GeoDiff, Xu et al. 2022): betas = start + (end - start) sigmoid(linspace(-6, 6, T))."""
    scale = 1000.0 / T
    return torch.sigmoid(torch.linspace(-6, 6, T, dtype=F64)) * (beta_end - beta_start) * scale + beta_start * scale


BETA_SCHEDULES = {"linear": linear_betas, "cosine": cosine_betas, "sigmoid": sigmoid_betas}


# --------------------------------------------------------------------------- processes


class Process:
    """Base of every forward process. Subclasses define ``alpha`` and ``sigma`` (float64)."""

    t_max: float
    discrete: bool = False
    variance_preserving: bool = True

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2); +inf at t = 0."""
        return 2 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """Inverse of ``log_snr`` (used by the Karras and log-SNR step spacings)."""
        raise NotImplementedError

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Training times, drawn from the process's own distribution over noise levels (on the generator's device)."""
        return torch.rand(n, generator=generator, dtype=F64, device=_device(generator)) * self.t_max

    def prior_sample(self, shape, generator: torch.Generator | None = None, dtype=torch.float32) -> Tensor:
        """x_T ~ N(0, sigma(t_max)^2 I) (alpha(t_max) x_0 is neglected, as in every sampler)."""
        with torch.no_grad():
            s = float(self.sigma(torch.tensor(self.t_max, dtype=F64)))
        return torch.randn(shape, generator=generator, dtype=dtype) * s

    def q_sample(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_t = alpha(t) x_0 + sigma(t) eps, the closed form of q(x_t | x_0)."""
        a, s = broadcast(self.alpha(t), x0), broadcast(self.sigma(t), x0)
        return a * x0 + s * eps

    def noise_condition(self, t: Tensor) -> Tensor:
        """The scalar a network sees for time t: 1000 t / t_max, the same range for every process."""
        return 1000.0 * torch.as_tensor(t, dtype=F64) / self.t_max


def _device(generator: torch.Generator | None):
    return generator.device if generator is not None else None


def broadcast(coef: Tensor, x: Tensor) -> Tensor:
    """A per-sample (B,) or scalar coefficient reshaped to broadcast against x (B, ...), cast to x's dtype."""
    coef = torch.as_tensor(coef, dtype=F64).to(device=x.device, dtype=x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class DiscreteDDPM(Process):
    """Ho et al. (2020): q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 1..T,
    so q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with abar_t = prod_{s<=t} (1 - beta_s), abar_0 = 1."""

    T: int = 1000
    schedule: str = "linear"
    discrete: bool = field(default=True, init=False)

    def __post_init__(self):
        if self.schedule not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.schedule!r}; choose one of {sorted(BETA_SCHEDULES)}")
        if self.T < 1:
            raise ValueError(f"T must be >= 1, got {self.T}")
        betas = self.betas
        if not bool(((betas > 0) & (betas < 1)).all()):
            # the linear and sigmoid schedules rescale beta_end by 1000/T, which passes 1 for T <= 20
            raise ValueError(
                f"schedule {self.schedule!r} with T={self.T} has betas outside (0, 1) "
                f"(max {float(betas.max()):.3g}); use a larger T or the cosine schedule"
            )

    @property
    def t_max(self) -> float:
        return float(self.T)

    @cached_property
    def betas(self) -> Tensor:
        """beta_1..beta_T as a (T,) float64 tensor (index 0 is beta_1)."""
        return BETA_SCHEDULES[self.schedule](self.T)

    @cached_property
    def log_abar(self) -> Tensor:
        """log abar_t for t = 0..T, shape (T+1,), with abar_0 = 1."""
        return torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(torch.log1p(-self.betas), 0)])

    @cached_property
    def _tables(self) -> dict[torch.device, Tensor]:
        return {}

    def log_abar_on(self, device: torch.device) -> Tensor:
        """``log_abar`` on ``device``, copied there once and kept: a copy per call would make a GPU wait on the
        host several times a training step."""
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.log_abar.to(device)
        return table

    def _log_abar_at(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64).clamp(0, self.T)
        table = self.log_abar_on(t.device)  # follow t's device (the table is built on the CPU)
        lo = t.floor().long().clamp(max=self.T - 1)
        w = t - lo
        return torch.lerp(table[lo], table[lo + 1], w)

    def alpha(self, t):
        return torch.exp(0.5 * self._log_abar_at(t))

    def sigma(self, t):
        return torch.sqrt((-torch.expm1(self._log_abar_at(t))).clamp(min=0))

    def beta(self, t: Tensor) -> Tensor:
        """beta_t for integer t in 1..T."""
        return self.betas[torch.as_tensor(t).long() - 1]

    def t_from_log_snr(self, lam):
        log_abar = torch.nn.functional.logsigmoid(torch.as_tensor(lam, dtype=F64))
        table = self.log_abar  # decreasing in t
        # find the segment [k, k+1] with table[k] >= log_abar >= table[k+1], then invert the lerp
        flipped = -table
        k = (torch.searchsorted(flipped, -log_abar) - 1).clamp(0, self.T - 1)
        w = (log_abar - table[k]) / (table[k + 1] - table[k])
        return (k + w.clamp(0, 1)).to(F64)

    def sample_t(self, n, generator=None):
        """Uniform integer t in 1..T (Ho et al. Algorithm 1)."""
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=_device(generator)).to(F64)


@dataclass(frozen=True)
class ContinuousVP(Process):
    """Continuous-time variance preserving: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), t in [0, 1].

    schedule "linear": Song et al. (2021) VP SDE, beta(t) = beta_min + t (beta_max - beta_min),
        log abar(t) = -t beta_min - t^2 (beta_max - beta_min) / 2.
    schedule "cosine": lambda(t) = -2 log tan(a t) with a = atan(exp(-lambda_min / 2)),
        the cosine schedule without offset (alpha = cos(a t)), truncated at lambda(1) = lambda_min.
    """

    schedule: str = "cosine"
    beta_min: float = 0.1
    beta_max: float = 20.0
    lambda_min: float = -15.0
    t_max: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown continuous VP schedule {self.schedule!r}; choose 'linear' or 'cosine'")

    def _log_abar(self, t):
        t = torch.as_tensor(t, dtype=F64)
        if self.schedule == "linear":
            return -t * self.beta_min - 0.5 * t**2 * (self.beta_max - self.beta_min)
        a = math.atan(math.exp(-self.lambda_min / 2))
        return 2 * torch.log(torch.cos(a * t))

    def alpha(self, t):
        return torch.exp(0.5 * self._log_abar(t))

    def sigma(self, t):
        return torch.sqrt((-torch.expm1(self._log_abar(t))).clamp(min=0))

    def t_from_log_snr(self, lam):
        lam = torch.as_tensor(lam, dtype=F64)
        if self.schedule == "cosine":
            a = math.atan(math.exp(-self.lambda_min / 2))
            return torch.atan(torch.exp(-lam / 2)) / a
        # solve (beta_max - beta_min)/2 t^2 + beta_min t + log abar = 0 for t >= 0, in the rationalized
        # form -2 log abar / (beta_min + sqrt(beta_min^2 - 2 d log abar)), free of cancellation as t -> 0
        log_abar = torch.nn.functional.logsigmoid(lam)
        d = self.beta_max - self.beta_min
        return -2 * log_abar / (self.beta_min + torch.sqrt(self.beta_min**2 - 2 * d * log_abar))


@dataclass(frozen=True)
class VarianceExploding(Process):
    """x_t = x_0 + sigma_t eps with t = sigma (alpha = 1), as in SMLD/NCSN and EDM.

    The schedule is the law of training noise levels and the default sampling grid:
    "geometric": log sigma uniform on [log sigma_min, log sigma_max] (Song & Ermon 2019);
    "karras": sigma = (sigma_max^(1/rho) + u (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, u ~ U(0, 1)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    schedule: str = "geometric"
    rho: float = 7.0
    variance_preserving: bool = field(default=False, init=False)

    def __post_init__(self):
        if self.schedule not in ("geometric", "karras"):
            raise ValueError(f"unknown VE sigma schedule {self.schedule!r}; choose 'geometric' or 'karras'")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @property
    def t_max(self) -> float:
        return float(self.sigma_max)

    def alpha(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=F64))

    def sigma(self, t):
        return torch.as_tensor(t, dtype=F64).clone()

    def t_from_log_snr(self, lam):
        return torch.exp(-torch.as_tensor(lam, dtype=F64) / 2)

    def sample_t(self, n, generator=None):
        u = torch.rand(n, generator=generator, dtype=F64, device=_device(generator))
        if self.schedule == "geometric":
            return self.sigma_min * (self.sigma_max / self.sigma_min) ** u
        r = 1 / self.rho
        return (self.sigma_max**r + u * (self.sigma_min**r - self.sigma_max**r)) ** self.rho

    def noise_condition(self, t):
        """EDM's c_noise = log(sigma) / 4, rescaled to roughly [0, 1000] for the sinusoidal embedding."""
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return 1000.0 * (torch.log(torch.as_tensor(t, dtype=F64).clamp(min=self.sigma_min * 1e-3)) - lo) / (hi - lo)


class GammaNet(nn.Module):
    """VDM's monotone network for gamma(t) = -log SNR(t) on [0, 1] (Kingma et al. 2021, appendix H):

        gamma_tilde(t) = l1(t) + l3(phi(l2(l1(t)))),   phi(u) = 2 (sigmoid(u) - 1/2),
        gamma(t) = gamma_0 + (gamma_1 - gamma_0) (gamma_tilde(t) - gamma_tilde(0)) / (gamma_tilde(1) - gamma_tilde(0))

    with every weight of l1, l2, l3 made positive (its absolute value), so gamma_tilde increases in t, and the
    end points gamma_0 = gamma(0), gamma_1 = gamma(1) fixed or learned. ``shape(t)`` is the normalised interior
    (0 at t = 0, 1 at t = 1): the end points alone set the continuous-time bound, the interior only its variance.
    Evaluated in float64 (the parameters are cast), like every schedule."""

    def __init__(self, gamma_min: float, gamma_max: float, hidden: int, learn_endpoints: bool):
        super().__init__()
        self.l1 = nn.Linear(1, 1)
        self.l2 = nn.Linear(1, hidden)
        self.l3 = nn.Linear(hidden, 1, bias=False)
        with torch.no_grad():  # start near the linear schedule: a unit slope and a small bumpy part
            self.l1.weight.fill_(1.0)
            self.l1.bias.zero_()
            self.l3.weight.mul_(1e-2)
        ends = torch.tensor([gamma_min, gamma_max])
        if learn_endpoints:
            self.ends = nn.Parameter(ends)
        else:
            self.register_buffer("ends", ends)

    def _tilde(self, t: Tensor, slope: bool = False):
        """gamma_tilde(t), and with ``slope`` also d gamma_tilde / dt (in closed form). Where no gradient is
        taken, each distinct t is evaluated once (a sampler asks for one t repeated over the whole batch, and
        the hidden layer is ``hidden`` wide)."""
        if t.numel() > 1 and not (torch.is_grad_enabled() and self.l1.weight.requires_grad):
            distinct, index = torch.unique(t, return_inverse=True)
            if distinct.numel() < t.numel():
                out = self._tilde_of(distinct, slope)
                return tuple(o[index] for o in out) if slope else out[index]
        return self._tilde_of(t, slope)

    def _tilde_of(self, t: Tensor, slope: bool):
        w1, b1 = self.l1.weight.double().abs()[:, 0], self.l1.bias.double()
        w2, b2 = self.l2.weight.double().abs()[:, 0], self.l2.bias.double()
        w3 = self.l3.weight.double().abs()[0]
        h = t[..., None] * w1 + b1  # (..., 1)
        sig = torch.sigmoid(h * w2 + b2)  # (..., hidden)
        value = (h + 2 * (sig - 0.5) @ w3[:, None])[..., 0]
        if not slope:
            return value
        return value, w1 * (1 + (2 * sig * (1 - sig) * w2) @ w3)

    def shape(self, t: Tensor, slope: bool = False):
        """The normalised interior (gamma_tilde(t) - gamma_tilde(0)) / (gamma_tilde(1) - gamma_tilde(0)) in [0, 1]
        (and with ``slope`` its derivative in t). Inside ``variance_gradient`` their gradients are scaled."""
        ends = self._tilde(torch.tensor([0.0, 1.0], dtype=F64, device=t.device))
        span = ends[1] - ends[0]
        if not slope:
            return self._hooked((self._tilde(t) - ends[0]) / span)
        value, d = self._tilde(t, slope=True)
        return self._hooked((value - ends[0]) / span), self._hooked(d / span)

    def _hooked(self, x: Tensor) -> Tensor:
        holder = getattr(self, "_variance_holder", None)
        if holder is not None and x.requires_grad:
            x.register_hook(lambda g: g if holder.get("w") is None else g * holder["w"].to(g))
        return x

    @contextlib.contextmanager
    def variance_gradient(self):
        """VDM's variance minimisation (Kingma et al. 2021, Sec. 5.3): the end points alone set the bound's
        expectation, so the interior trains on its variance, d E[L^2] = E[2 L dL]. Inside this context every
        interior value computed is marked; set ``holder['w'] = 2 L`` (per example, detached) before the backward
        pass and their gradients are multiplied by it (the end points' are not)."""
        holder: dict = {}
        self._variance_holder = holder
        try:
            yield holder
        finally:
            self._variance_holder = None

    def endpoints(self) -> tuple[Tensor, Tensor]:
        g = self.ends.double()
        return g[0], g[1]

    def forward(self, t: Tensor) -> Tensor:
        g0, g1 = self.endpoints()
        return g0 + (g1 - g0) * self.shape(t)

    def slope(self, t: Tensor) -> Tensor:
        """d gamma / dt."""
        g0, g1 = self.endpoints()
        return (g1 - g0) * self.shape(t, slope=True)[1]


@dataclass(frozen=True)
class LearnedVP(Process):
    """Variance preserving with a learned schedule (Kingma et al. 2021, VDM): sigma^2 = sigmoid(gamma(t)),
    alpha^2 = sigmoid(-gamma(t)), t in [0, 1], gamma = ``GammaNet`` (monotone, end points gamma_min and
    gamma_max, learned when ``learn_endpoints``). The process owns the network (``.gamma``); a run's config
    builds it into the denoiser's network (runs/config.py), so it is trained, averaged and saved with the
    weights. The network is conditioned on gamma(t), scaled to [0, 1000] over (gamma_min, gamma_max), so a
    change of the schedule's interior moves no expected loss (VDM, Sec. 5.1)."""

    gamma_min: float = -13.3
    gamma_max: float = 5.0
    learn_endpoints: bool = True
    hidden: int = 1024
    t_max: float = 1.0
    gamma: GammaNet = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        if not self.gamma_min < self.gamma_max:
            raise ValueError(f"need gamma_min < gamma_max, got {self.gamma_min}, {self.gamma_max}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        object.__setattr__(self, "gamma", self.fresh_gamma())

    def fresh_gamma(self) -> GammaNet:
        """A newly initialised schedule network of this config (a run's own, built beside its network)."""
        return GammaNet(self.gamma_min, self.gamma_max, self.hidden, self.learn_endpoints)

    def bound_to(self, gamma: GammaNet) -> LearnedVP:
        """This process reading ``gamma`` (a run's trained schedule network)."""
        process = copy.copy(self)
        object.__setattr__(process, "gamma", gamma)
        return process

    def gamma_at(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=F64)
        return self.gamma(t.to(self.gamma.l1.weight.device)).to(t.device)

    def alpha(self, t):
        return torch.sqrt(torch.sigmoid(-self.gamma_at(t)))

    def sigma(self, t):
        return torch.sqrt(torch.sigmoid(self.gamma_at(t)))

    def log_snr(self, t):
        return -self.gamma_at(t)

    def log_snr_slope(self, t):
        """lambda'(t) = -gamma'(t), in closed form (differentiable in the schedule's parameters)."""
        t = torch.as_tensor(t, dtype=F64)
        return -self.gamma.slope(t.to(self.gamma.l1.weight.device)).to(t.device)

    def t_from_log_snr(self, lam):
        """gamma^{-1}(-lambda) by bisection (gamma increases), clamped to [0, 1]."""
        target = -torch.as_tensor(lam, dtype=F64)
        lo, hi = torch.zeros_like(target), torch.ones_like(target)
        with torch.no_grad():
            for _ in range(60):  # 2^-60: float64's resolution on [0, 1]
                mid = (lo + hi) / 2
                below = self.gamma_at(mid) < target
                lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        return (lo + hi) / 2

    def noise_condition(self, t):
        return 1000.0 * (self.gamma_at(t) - self.gamma_min) / (self.gamma_max - self.gamma_min)


def has_parameters(process: Process) -> bool:
    """Whether the process trains with the network (a learned schedule)."""
    return isinstance(process, LearnedVP)


# --------------------------------------------------------------------------- posterior


def posterior_coefficients(process: Process, t: Tensor, s: Tensor):
    """q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var) for s < t.

    With a_ts = alpha_t / alpha_s and sigma_ts^2 = sigma_t^2 - a_ts^2 sigma_s^2 (the variance of q(x_t|x_s)):
        c_x0 = alpha_s sigma_ts^2 / sigma_t^2,  c_xt = a_ts sigma_s^2 / sigma_t^2,  var = sigma_ts^2 sigma_s^2 /
        sigma_t^2.
    For DDPM with s = t - 1 these are Ho et al. eq. 7: mu_tilde and beta_tilde_t = (1 - abar_{t-1}) / (1 - abar_t)
    beta_t.
    Returns (c_x0, c_xt, var) in float64."""
    a_t, s_t = process.alpha(t), process.sigma(t)
    a_s, s_s = process.alpha(s), process.sigma(s)
    a_ts = a_t / a_s
    var_ts = s_t**2 - a_ts**2 * s_s**2
    c_x0 = a_s * var_ts / s_t**2
    c_xt = a_ts * s_s**2 / s_t**2
    var = var_ts * s_s**2 / s_t**2
    return c_x0, c_xt, var


def transition_variance(process: Process, t: Tensor, s: Tensor) -> Tensor:
    """sigma_{t|s}^2 = sigma_t^2 - (alpha_t/alpha_s)^2 sigma_s^2: for DDPM with s = t-1 this is beta_t."""
    a_ts = process.alpha(t) / process.alpha(s)
    return process.sigma(t) ** 2 - a_ts**2 * process.sigma(s) ** 2


PROCESSES_BY_NAME: dict[str, type[Process]] = {
    "ddpm": DiscreteDDPM,
    "vp": ContinuousVP,
    "ve": VarianceExploding,
    "learned": LearnedVP,
}


def process_name(process: Process) -> str:
    """The process's name in PROCESSES_BY_NAME ('ddpm', 'vp' or 've'), the ``kind`` a config.json gives it."""
    for name, cls in PROCESSES_BY_NAME.items():
        if type(process) is cls:
            return name
    raise ValueError(f"{type(process).__name__} is not one of the processes {', '.join(PROCESSES_BY_NAME)}")
