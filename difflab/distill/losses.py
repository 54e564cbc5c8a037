"""Distillation losses: callables of the training loop's signature, loss(model, x0, t=, noise=, cond=) -> scalar.

Each holds its teacher (frozen) and reads the loop's draws: ``t`` (uniform over the process's times) picks the
student's step or the pair of levels, ``noise`` makes x_t, so a resumed or multi-process run sees the same
steps. A guided student's scale w is drawn from torch's global generator, which the loop seeds per step.

    ProgressiveLoss   one student DDIM step = two teacher DDIM steps (Salimans & Ho 2022, Algorithm 2)
    GuidedLoss        the student's one pass at w = the teacher's two-pass guided prediction at w (Meng et al. 2023,
    stage one)
    ConsistencyLoss   f(x_{t_{n+1}}) = f(ODE step of the teacher to t_n) (Song et al. 2023, Algorithm 2; the target
                      is the student itself without gradient, Song & Dhariwal 2023's mu = 0)"""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.conditions import drop_conditions
from ..core.parameterize import Prediction, expand_t
from ..core.processes import broadcast
from ..sampling.samplers import timesteps
from .targets import (
    consistency_x0,
    ddim_x0_target,
    ode_step,
    pseudo_huber,
    truncated_snr,
    two_ddim_steps,
)

GUIDANCE = "guidance_scale"  # the condition a guided student reads w from


class Teacher:
    """The teacher's prediction at guidance w, as a denoiser: ``Teacher(d, specs, mode).at(w)(x, t, **cond)``.

    mode 'plain'   d(x, t, **cond): no guidance
         'cfg'     classifier-free guidance with a per-sample w: x0_null + w (x0_cond - x0_null), one pass of 2B rows
         'input'   a guided student of an earlier stage: d(x, t, guidance_scale=w, **cond)"""

    def __init__(self, denoiser, specs=(), mode: str = "plain"):
        if mode not in ("plain", "cfg", "input"):
            raise ValueError(f"unknown teacher mode {mode!r}")
        self.denoiser, self.specs, self.mode = denoiser, list(specs), mode
        self.process = denoiser.process

    def at(self, w: Tensor | None):
        return _Bound(self, w)

    @torch.no_grad()
    def predict(self, x: Tensor, t: Tensor, cond: dict, w: Tensor | None) -> Prediction:
        t = expand_t(t, x)
        if self.mode == "plain" or w is None:
            return self.denoiser(x, t, **cond)
        if self.mode == "input":
            return self.denoiser(x, t, **cond, **{GUIDANCE: w})
        B = len(x)
        nulls = drop_conditions(
            cond,
            self.specs,
            masks={s.name: torch.ones(B, dtype=torch.bool, device=x.device) for s in self.specs if s.name in cond},
        )
        both = {k: torch.cat([nulls[k], cond[k]]) for k in cond}
        x0_null, x0_cond = self.denoiser(torch.cat([x, x]), t.repeat(2), **both).x0.chunk(2)
        process = self.process
        alpha, sigma = broadcast(process.alpha(t), x), broadcast(process.sigma(t), x)
        return Prediction(
            x, alpha.to(x.dtype), sigma.to(x.dtype), "x0", x0_null + broadcast(w, x).to(x.dtype) * (x0_cond - x0_null)
        )


class _Bound:
    """A Teacher at a fixed (per-sample) w, in the Denoiser interface."""

    def __init__(self, teacher: Teacher, w):
        self.teacher, self.w, self.process = teacher, w, teacher.process

    def __call__(self, x, t, **cond) -> Prediction:
        return self.teacher.predict(x, t, cond, self.w)


def draw_scale(n: int, guidance_range, device) -> Tensor | None:
    """w ~ U[lo, hi] per sample (torch's global generator, seeded per step by the loop), or None (unguided)."""
    if guidance_range is None:
        return None
    lo, hi = guidance_range
    return lo + (hi - lo) * torch.rand(n, device=device)


def _with_scale(cond: dict, w: Tensor | None) -> dict:
    return cond if w is None else {**cond, GUIDANCE: w}


def _index(t: Tensor, t_max: float, m: int) -> Tensor:
    """The loop's uniform time draws as uniform indices 0..m-1."""
    return torch.clamp((t / t_max * m).floor().long(), 0, m - 1)


class ProgressiveLoss:
    """Salimans & Ho (2022), Algorithm 2 on the uniform grid: the student, at its step j from t = g[2j] to
    s = g[2j+2] of the teacher's 2M-step grid g, predicts the x~ that lands one DDIM step on the teacher's two
    steps through g[2j+1]; loss max(SNR_t, 1) |x0_hat - x~|^2 (their truncated-SNR weighting)."""

    def __init__(self, teacher: Teacher, student_steps: int, guidance_range=None):
        self.teacher, self.m, self.guidance_range = teacher, int(student_steps), guidance_range
        self.grid = timesteps(teacher.process, 2 * self.m, "uniform")  # float64, decreasing, 2M + 1 times

    def __call__(self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        process = model.process
        j = _index(t.cpu(), float(process.t_max), self.m)
        t_hi, t_mid, t_lo = (self.grid[2 * j + k].to(x0.device) for k in range(3))
        x_t = process.q_sample(x0, t_hi, noise).to(x0.dtype)
        w = draw_scale(len(x0), self.guidance_range, x0.device)
        with torch.no_grad():
            x_s = two_ddim_steps(self.teacher.at(w), x_t, t_hi, t_mid, t_lo, cond)
            target = ddim_x0_target(process, x_t, x_s, t_hi, t_lo).to(x0.dtype)
        pred = model(x_t, t_hi, **_with_scale(cond, w)).x0
        return (truncated_snr(process, t_hi, x0).to(x0.dtype) * (pred - target) ** 2).mean()


class GuidedLoss:
    """Meng et al. (2023), stage one: the student takes w as an input and its one pass matches the teacher's
    two-pass guided x_0 at w ~ U[lo, hi], at the loop's times; loss max(SNR_t, 1) |x0_student - x0_guided|^2."""

    def __init__(self, teacher: Teacher, guidance_range):
        self.teacher, self.guidance_range = teacher, guidance_range

    def __call__(self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        process = model.process
        t = t.to(x0.device)
        x_t = process.q_sample(x0, t, noise).to(x0.dtype)
        w = draw_scale(len(x0), self.guidance_range, x0.device)
        target = self.teacher.predict(x_t, t, cond, w).x0.to(x0.dtype)
        pred = model(x_t, t, **_with_scale(cond, w)).x0
        return (truncated_snr(process, t, x0).to(x0.dtype) * (pred - target) ** 2).mean()


class ConsistencyLoss:
    """Consistency distillation (Song et al. 2023, Algorithm 2) on the teacher's capped Karras grid of ``levels``
    positive times t_max = l_0 > ... > l_{N-1} = t_min: for the pair (l_j, l_{j+1}), x_hi = q(x | x0) at l_j,
    x_lo = one teacher ODE step (``solver``) to l_{j+1}, loss d(f(x_hi, l_j), sg f(x_lo, l_{j+1})) with the
    pseudo-Huber d and f = consistency_x0 (boundary f(x, t_min) = x)."""

    def __init__(
        self,
        teacher: Teacher,
        levels: Tensor,
        t_min: float,
        sigma_data: float = 1.0,
        solver: str = "heun",
        guidance_range=None,
    ):
        self.teacher, self.levels, self.t_min, self.sigma_data = teacher, levels, float(t_min), sigma_data
        self.solver, self.guidance_range = solver, guidance_range

    def f(self, model, x: Tensor, t: Tensor, cond: dict) -> Tensor:
        return consistency_x0(model.process, model(x, t, **cond), t, self.t_min, self.sigma_data)

    def __call__(self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        process = model.process
        j = _index(t.cpu(), float(process.t_max), len(self.levels) - 1)
        t_hi, t_lo = self.levels[j].to(x0.device), self.levels[j + 1].to(x0.device)
        x_hi = process.q_sample(x0, t_hi, noise).to(x0.dtype)
        w = draw_scale(len(x0), self.guidance_range, x0.device)
        with torch.no_grad():
            x_lo = ode_step(self.teacher.at(w), x_hi, t_hi, t_lo, cond, self.solver).to(x0.dtype)
            target = self.f(model, x_lo, t_lo, _with_scale(cond, w))
        return pseudo_huber(self.f(model, x_hi, t_hi, _with_scale(cond, w)), target).mean()
