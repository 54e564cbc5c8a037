"""One network, four readings: x_0, eps, v and the score, and the Denoiser interface.

For x_t = alpha x_0 + sigma eps (any process):
    eps   = (x_t - alpha x_0) / sigma
    x_0   = (x_t - sigma eps) / alpha
    v     = alpha eps - sigma x_0                          (Salimans & Ho 2022)
    x_0   = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
    eps   = (sigma x_t + alpha v) / (alpha^2 + sigma^2)
    score = grad log q(x_t) = -E[eps | x_t] / sigma
    x_0   = (x_t + sigma^2 score) / alpha                  (Tweedie's formula; VE: x_0 = x_t + sigma^2 score)

Every loss, sampler and guidance rule consumes one interface:

    denoiser(x_t, t, **cond) -> Prediction

where ``t`` is a (B,) float64 tensor of process times and the Prediction reads the
network's output as any of the four targets, exactly when it is the native one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from .conditions import check_accepted
from .processes import Process, broadcast

Target = Literal["x0", "eps", "v", "score"]  # what a network predicts: the clean signal, the noise, v or the score
TARGETS: tuple[Target, ...] = get_args(Target)


# --------------------------------------------------------------------------- conversions (pure)


def x0_from_eps(x_t, eps, alpha, sigma):
    return (x_t - sigma * eps) / alpha


def eps_from_x0(x_t, x0, alpha, sigma):
    return (x_t - alpha * x0) / sigma


def v_from_x0_eps(x0, eps, alpha, sigma):
    return alpha * eps - sigma * x0


def x0_from_v(x_t, v, alpha, sigma):
    return (alpha * x_t - sigma * v) / (alpha**2 + sigma**2)


def eps_from_v(x_t, v, alpha, sigma):
    return (sigma * x_t + alpha * v) / (alpha**2 + sigma**2)


def score_from_eps(eps, sigma):
    return -eps / sigma


def eps_from_score(score, sigma):
    return -sigma * score


def x0_from_score(x_t, score, alpha, sigma):
    """Tweedie's formula: E[x_0 | x_t] = (x_t + sigma^2 grad log q(x_t)) / alpha."""
    return (x_t + sigma**2 * score) / alpha


def convert(value: Tensor, source: Target, target: Target, x_t: Tensor, alpha: Tensor, sigma: Tensor) -> Tensor:
    """Read a prediction of ``source`` as ``target`` (both in TARGETS). alpha and sigma broadcast against x_t."""
    for name in (source, target):
        if name not in TARGETS:
            raise ValueError(f"unknown prediction target {name!r}; choose one of {TARGETS}")
    if source == target:
        return value
    # route through (x0, eps), which determine everything
    if source == "x0":
        x0, eps = value, None
    elif source == "eps":
        x0, eps = None, value
    elif source == "v":
        x0, eps = x0_from_v(x_t, value, alpha, sigma), eps_from_v(x_t, value, alpha, sigma)
    else:  # score
        x0, eps = None, eps_from_score(value, sigma)
    if target == "x0":
        return x0 if x0 is not None else x0_from_eps(x_t, eps, alpha, sigma)
    if eps is None:
        eps = eps_from_x0(x_t, x0, alpha, sigma)
    if target == "eps":
        return eps
    if target == "score":
        return score_from_eps(eps, sigma)
    if x0 is None:
        x0 = x0_from_eps(x_t, eps, alpha, sigma)
    return v_from_x0_eps(x0, eps, alpha, sigma)


# --------------------------------------------------------------------------- the interface


@dataclass
class Prediction:
    """What a denoiser says about x_t: one native ``value`` of kind ``target``, readable as any other.

    alpha and sigma are already broadcast against x_t (shape (B, 1, ...), x_t's dtype). A network that learns
    its reverse variance (Nichol & Dhariwal 2021) also gives ``var_frac`` (like x_t): the reverse step's log
    variance is var_frac log beta + (1 - var_frac) log beta_tilde (their eq. 15); None for a fixed variance."""

    x_t: Tensor
    alpha: Tensor
    sigma: Tensor
    target: Target
    value: Tensor
    var_frac: Tensor | None = None

    def as_(self, target: Target) -> Tensor:
        return convert(self.value, self.target, target, self.x_t, self.alpha, self.sigma)

    @property
    def x0(self) -> Tensor:
        return self.as_("x0")

    @property
    def eps(self) -> Tensor:
        return self.as_("eps")

    @property
    def v(self) -> Tensor:
        return self.as_("v")

    @property
    def score(self) -> Tensor:
        return self.as_("score")


class DenoiserFn(Protocol):
    """The one interface: D(x_t, t, **cond) -> Prediction, with t a (B,) float64 tensor of process times."""

    process: Process

    def __call__(self, x_t: Tensor, t: Tensor, **cond) -> Prediction: ...


def make_prediction(process: Process, x_t: Tensor, t: Tensor, target: Target, value: Tensor) -> Prediction:
    """Wrap a raw prediction of ``target`` at times t into a Prediction."""
    t = expand_t(t, x_t)
    return Prediction(x_t, broadcast(process.alpha(t), x_t), broadcast(process.sigma(t), x_t), target, value)


def expand_t(t, x: Tensor) -> Tensor:
    """A scalar or (B,) time as a (B,) float64 tensor on x's device."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


class Denoiser(nn.Module):
    """Wraps a network net(x_in, c_noise, **cond) that predicts ``target`` into the Denoiser interface.

    Preconditioning (in the spirit of EDM): the network sees x_in = x_t / sqrt(alpha^2 + sigma^2),
    unit-scale for every process (the identity for variance-preserving ones), and c_noise =
    process.noise_condition(t), so networks never know which schedule trained them.

    Args:
        net (`nn.Module`): the network, called as net(x_in, c_noise, **cond).
        process (`Process`): the forward process it was trained on (core/processes.py).
        target (`Target`, defaults to `"eps"`): what the network predicts, one of `"x0"` (the clean signal),
            `"eps"` (the noise), `"v"` (alpha eps - sigma x_0) or `"score"` (grad log p(x_t)).
        learned_variance (`bool`, defaults to `False`): the network's output has twice the channels of x_t: the
            prediction, then v in iDDPM's parameterisation, read as ``Prediction.var_frac = (v + 1) / 2``."""

    def __init__(self, net: nn.Module, process: Process, target: Target = "eps", learned_variance: bool = False):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
        self.net, self.process, self.target = net, process, target
        self.learned_variance = learned_variance
        inner = getattr(net, "module", net)  # DistributedDataParallel keeps the network in .module
        accepts = getattr(inner, "accepts", None)  # difflab's networks declare it; a foreign one is not checked
        self.accepts: frozenset[str] | None = None if accepts is None else frozenset(accepts)
        self._name = type(inner).__name__

    def forward(self, x_t: Tensor, t, **cond) -> Prediction:
        cond = {k: v for k, v in cond.items() if v is not None}  # None means "not given"
        if self.accepts is not None:
            check_accepted(cond, self.accepts, f"this {self._name}")
        t = expand_t(t, x_t)
        alpha, sigma = broadcast(self.process.alpha(t), x_t), broadcast(self.process.sigma(t), x_t)
        c_in = torch.rsqrt(alpha**2 + sigma**2)
        c_noise = self.process.noise_condition(t).to(device=x_t.device, dtype=torch.float32)
        out = self.net(x_t * c_in, c_noise, **cond)
        if not self.learned_variance:
            return Prediction(x_t, alpha, sigma, self.target, out.to(x_t.dtype))
        value, v = out.to(x_t.dtype).chunk(2, dim=1)  # (B, C, ...) each: the prediction, the variance's v
        return Prediction(x_t, alpha, sigma, self.target, value, var_frac=(v + 1) / 2)


class WithSchedule(nn.Module):
    """A network and a learned schedule's network trained, averaged and saved together (``net.*`` and
    ``schedule.*`` in the weights): calls go to the network; the schedule is read through the process."""

    def __init__(self, net: nn.Module, schedule: nn.Module):
        super().__init__()
        self.net, self.schedule = net, schedule
        if hasattr(net, "accepts"):
            self.accepts = net.accepts

    def forward(self, x: Tensor, c_noise: Tensor, **cond) -> Tensor:
        return self.net(x, c_noise, **cond)
