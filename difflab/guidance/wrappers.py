"""Guidance: denoisers that wrap denoisers. Each takes a denoiser and returns one of the same interface,
``guided(x_t, t, **cond) -> Prediction``, so every sampler, the chain pictures, ``generate`` and the
evaluation run with it unchanged, and the wrappers nest (classifier guidance on top of CFG).

Classifier-free guidance (Ho & Salimans 2022) and its generalisation to a bag of conditions
(composable diffusion, Liu et al. 2022)::

    pred = pred_base + sum_i w_i (pred_{c_i} - pred_base)

* ``base`` is the null condition (the one condition dropout trained), or a *negative* condition that
  replaces it (the "negative prompt"): pred_neg + s (pred_c - pred_neg) moves away from the negative.
* The scale convention: **s = 1 is plain conditional sampling and s = 0 unconditional**. The CFG paper
  writes eps = (1 + w) eps_c - w eps_null, so w = s - 1; diffusers' ``guidance_scale`` is our s.
* The mix is an *affine* combination (its weights (1 - sum_i w_i) and w_i sum to 1). Every reading of a
  prediction (x_0, eps, v, score) is an affine function of the others at a fixed x_t, so an affine mix
  gives the same guided x_0, eps, v and score whichever one it is computed in: the result does not depend
  on the network's training target. We mix eps (the negative score times sigma), the papers' space.
* All the conditions (base, call-time condition, composed terms) go through the network in **one
  batched forward pass**.
* A guidance interval (Kynkäänniemi et al. 2024) guides only for t/t_max in [lo, hi]; outside it the
  prediction is the plain conditional one, at the cost of one forward pass instead of k + 1.
* ``rescale`` (Lin et al. 2024, Common Diffusion Noise Schedules and Sample Steps are Flawed, section 3.4) pulls the
  guided x_0's standard deviation back toward the conditional one's: x_0 <- phi x_0 std_c/std_cfg +
  (1 - phi) x_0, computed per sample on the predicted x_0 (the image whose over-exposure it corrects).

Classifier guidance (Dhariwal & Nichol 2021): with a noise-aware classifier p(y | x_t, t),

    score_guided = score + s grad_x log p(y | x_t)     i.e.     eps_guided = eps - sigma s grad_x log p(y | x_t)

s = 1 turns the exact unconditional score into the exact conditional one (Bayes' rule); s > 1 sharpens
p(y | x)^s. The gradient is taken inside the samplers' no-grad context with a local ``enable_grad``.

Scales may vary with time: a number, a callable f(u) of u = t / t_max in [0, 1] (returning a number or a
(B,) tensor), or a schedule name from ``SCHEDULES`` (each with mean s over u in [0, 1]).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.conditions import ConditionError, ConditionSpec
from ..core.parameterize import Prediction, expand_t
from ..core.processes import broadcast

# --------------------------------------------------------------------------- time-varying scales (pure)

SCHEDULES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "constant": lambda u, s: torch.full_like(u, s),
    # rising as the noise falls (Wang et al. 2024 found increasing schedules best): 0 at t_max, 2s at t = 0
    "linear": lambda u, s: 2 * s * (1 - u),
    "cosine": lambda u, s: s * (1 - torch.cos(math.pi * (1 - u))),
}


def scale_fn(scale, schedule: str = "constant") -> Callable[[Tensor], Tensor]:
    """A scale as a function of u = t / t_max (float64 (B,)) -> (B,): a number with a schedule name, or a callable."""
    if callable(scale):
        return lambda u: torch.as_tensor(scale(u), dtype=torch.float64, device=u.device).expand(u.shape)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown guidance schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"a guidance scale must be a finite number or a callable, got {scale!r}")
    rule, s = SCHEDULES[schedule], float(scale)
    return lambda u: rule(u, s)


def check_interval(interval) -> tuple[float, float] | None:
    """(lo, hi) with 0 <= lo < hi <= 1, as fractions of t_max, or None (guide everywhere)."""
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"a guidance interval needs 0 <= lo < hi <= 1 (fractions of t_max), got {lo}, {hi}")
    return lo, hi


# --------------------------------------------------------------------------- combining (pure)


def combine(base: Tensor, preds: Sequence[Tensor], weights: Sequence[Tensor]) -> Tensor:
    """base + sum_i w_i (pred_i - base); each w_i is (B,) and broadcasts over a sample's dimensions."""
    out = base
    for p, w in zip(preds, weights):
        out = out + broadcast(w, base) * (p - base)
    return out


def rescale_std(guided_x0: Tensor, cond_x0: Tensor, phi: float) -> Tensor:
    """Lin et al. (2024) eq. 15-16: phi * guided * std(cond) / std(guided) + (1 - phi) * guided, per sample."""
    if phi == 0:
        return guided_x0
    dims = tuple(range(1, guided_x0.ndim))
    ratio = cond_x0.std(dim=dims, keepdim=True) / guided_x0.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return phi * guided_x0 * ratio + (1 - phi) * guided_x0


# --------------------------------------------------------------------------- conditions of a batch


def _rows(cond: Mapping[str, Tensor], n: int, where: str) -> dict[str, Tensor]:
    """Every tensor of ``cond`` with n rows: one row is repeated, n rows kept, anything else refused."""
    out = {}
    for k, v in cond.items():
        if v is None:
            continue
        v = torch.as_tensor(v)
        if v.ndim == 0:
            v = v.reshape(1)
        if len(v) == 1:
            v = v.expand(n, *v.shape[1:])
        elif len(v) != n:
            raise ConditionError(f"{where}: condition {k!r} has {len(v)} rows for a batch of {n} (give 1 or {n})")
        out[k] = v
    return out


def _nulls(specs: Sequence[ConditionSpec], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The null condition for every condition in ``like`` (the specs' null values; companions zero)."""
    out = {}
    for s in specs:
        if s.name in like:
            out[s.name] = s.null_like(like[s.name])
            for c in s.companions:
                if c in like:
                    out[c] = torch.zeros_like(like[c])
    missing = sorted(set(like) - set(out))
    if missing:
        raise ConditionError(
            f"no null value for {', '.join(map(repr, missing))}: the model's conditions are {[s.name for s in specs]}"
        )
    return out


def _stack(conds: Sequence[dict[str, Tensor]], nulls: dict[str, Tensor], device) -> dict[str, Tensor]:
    """One condition dict for the k conditions of a batch stacked along the batch (k*B rows); a condition a
    branch does not name is null in that branch."""
    keys = sorted(set().union(*conds))
    return {k: torch.cat([c.get(k, nulls[k]).to(device) for c in conds]) for k in keys}


# --------------------------------------------------------------------------- wrappers


class Guided(nn.Module):
    """Classifier-free guidance with negative and composed conditions, as a denoiser.

        guided = Guided(denoiser, specs, scale=3.0)                       # CFG: guided(x, t, class_labels=y)
        guided = Guided(denoiser, specs, scale=3.0, negative={"class_labels": 5})
        guided = Guided(denoiser, specs, scale=0.0, terms=[({"class_labels": 3}, 1.0), ({"class_labels": 5}, -0.5)])

    specs     the run's ConditionSpecs (they give the null values)
    scale     weight of the call-time condition (a number, a callable of u = t/t_max, or with ``schedule``)
    terms     extra (condition, weight) pairs, each condition with 1 row (shared) or B rows
    negative  the base condition instead of the null one (1 row or B rows)
    interval  (lo, hi) fractions of t_max: guide there, plain conditional prediction elsewhere
    rescale   phi of Lin et al. (2024), 0 (off) to 1
    batched   all conditions in one forward pass of k*B rows (default); False: k passes of B rows (less
              memory; benchmarks/guidance_cost.py measures both)
    """

    def __init__(
        self,
        denoiser,
        specs: Sequence[ConditionSpec],
        scale=1.0,
        *,
        schedule: str = "constant",
        terms: Sequence[tuple[Mapping[str, Tensor], float]] = (),
        negative: Mapping[str, Tensor] | None = None,
        interval: tuple[float, float] | None = None,
        rescale: float = 0.0,
        batched: bool = True,
    ):
        super().__init__()
        if not specs:
            raise ConditionError("guidance needs a conditional model; this one takes no conditions (use a classifier)")
        if not 0.0 <= float(rescale) <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        self.denoiser, self.specs = denoiser, list(specs)
        self.process = denoiser.process
        self.accepts = getattr(denoiser, "accepts", None)
        self.scale = scale_fn(scale, schedule)
        self.terms = [(dict(c), scale_fn(w)) for c, w in terms]
        self.negative = dict(negative) if negative is not None else None
        self.interval = check_interval(interval)
        self.rescale = float(rescale)
        self.batched = batched
        self.evaluations = 0  # calls of the wrapped denoiser (a batched call of k*B rows counts once)

    def _inside(self, t: Tensor) -> Tensor:
        u = t / self.process.t_max
        if self.interval is None:
            return torch.ones_like(u, dtype=torch.bool)
        lo, hi = self.interval
        return (u >= lo) & (u <= hi)

    def forward(self, x_t: Tensor, t, **cond) -> Prediction:
        t = expand_t(t, x_t)
        B, u = len(x_t), t / self.process.t_max
        cond = _rows(cond, B, "the condition")
        if (self.interval is not None or self.rescale) and not cond:
            raise ConditionError(
                "a guidance interval and rescale need the plain conditional prediction: give a condition at call time"
            )
        inside = self._inside(t)
        if not inside.any():  # outside the interval: the plain conditional prediction, one pass
            self.evaluations += 1
            return self.denoiser(x_t, t, **cond)
        branches, weights = [], []
        if cond:
            branches.append(cond)
            weights.append(self.scale(u))
        for c, w in self.terms:
            branches.append(_rows(c, B, "a composed condition"))
            weights.append(w(u))
        if not branches:
            raise ConditionError("guidance needs a condition: give one at call time or as a composed term")
        negative = _rows(self.negative, B, "the negative condition") if self.negative is not None else {}
        nulls = _nulls(self.specs, {k: v for b in (*branches, negative) for k, v in b.items()})
        base = negative or nulls
        k = len(branches) + 1
        if self.batched:
            big = _stack([base, *branches], nulls, x_t.device)
            self.evaluations += 1
            eps = self.denoiser(x_t.repeat(k, *([1] * (x_t.ndim - 1))), t.repeat(k), **big).eps.chunk(k)
        else:
            self.evaluations += k
            eps = [self.denoiser(x_t, t, **_stack([c], nulls, x_t.device)).eps for c in (base, *branches)]
        guided = combine(eps[0], eps[1:], weights)
        alpha, sigma = broadcast(self.process.alpha(t), x_t), broadcast(self.process.sigma(t), x_t)
        out = Prediction(x_t, alpha, sigma, "eps", guided)
        if self.rescale:
            ref = Prediction(x_t, alpha, sigma, "eps", eps[1]).x0  # the call-time condition's own x_0
            out = Prediction(x_t, alpha, sigma, "x0", rescale_std(out.x0, ref, self.rescale))
        if not inside.all():  # some samples outside the interval (mixed times): their conditional prediction
            plain = Prediction(x_t, alpha, sigma, "eps", eps[1])
            out = Prediction(x_t, alpha, sigma, "eps", torch.where(broadcast(inside, x_t).bool(), out.eps, plain.eps))
        return out


class ClassifierGuided(nn.Module):
    """Classifier guidance: eps - sigma * s * grad_x log p(y | x_t, t), as a denoiser.

        guided = ClassifierGuided(denoiser, classifier, scale=2.0)     # guided(x, t, class_labels=y)

    classifier(x_t, t) -> logits (B, K), trained on the same forward process. The labels y come in the call's
    ``label`` condition (1 row or B rows); they reach the wrapped denoiser only when it takes them (a
    conditional model). A label >= K (the null class, as a CFG wrapper above it sends) gets no gradient.
    ``interval`` (lo, hi): the gradient only for t/t_max in [lo, hi].

    ``max_sigma_tilde``: no gradient where sigma/alpha exceeds it (default 80, the samplers' grid cap). The
    x_0 the guided score implies moves by s sigma^2 grad / alpha, i.e. the eps-shift times sigma/alpha. An
    exact classifier's gradient vanishes like alpha there; a trained one keeps a small residual gradient on
    pure noise, and at the top of the cosine schedule (sigma/alpha = 2e4) that residual became a shift of
    hundreds in x_0: on a digits run, guidance at s = 3 gave FD 74 and 49 % class accuracy with it and FD 12.4
    and 77 % without the levels above sigma/alpha = 64. None applies the gradient everywhere."""

    def __init__(
        self,
        denoiser,
        classifier,
        scale=1.0,
        *,
        schedule: str = "constant",
        label: str = "class_labels",
        interval: tuple[float, float] | None = None,
        max_sigma_tilde: float | None = 80.0,
    ):
        super().__init__()
        self.denoiser, self.classifier, self.label = denoiser, classifier, label
        self.process = denoiser.process
        inner = getattr(denoiser, "accepts", None)
        self.accepts = None if inner is None else frozenset(inner) | {label}
        self._passes_label = inner is None or label in inner
        self.scale = scale_fn(scale, schedule)
        self.interval = check_interval(interval)
        self.max_sigma_tilde = max_sigma_tilde

    def grad_log_prob(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """grad_x log p(y | x_t, t) per sample; zero for labels outside the classifier's classes (null)."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            logits = self.classifier(x, t)
            logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
            y = y.long().reshape(-1, 1).to(logp.device)
            known = y < logp.shape[1]
            picked = (logp.gather(1, y.clamp(max=logp.shape[1] - 1)) * known).sum()
            (grad,) = torch.autograd.grad(picked, x)
        return grad

    def forward(self, x_t: Tensor, t, **cond) -> Prediction:
        t = expand_t(t, x_t)
        cond = _rows(cond, len(x_t), "the condition")
        y = cond.get(self.label)
        if y is None:
            raise ConditionError(f"classifier guidance needs {self.label!r}: the class to guide toward")
        inner = cond if self._passes_label else {k: v for k, v in cond.items() if k != self.label}
        pred = self.denoiser(x_t, t, **inner)
        u = t / self.process.t_max
        s = self.scale(u)
        if self.interval is not None:
            lo, hi = self.interval
            s = torch.where((u >= lo) & (u <= hi), s, torch.zeros_like(s))
        if self.max_sigma_tilde is not None:
            sigma_tilde = self.process.sigma(t) / self.process.alpha(t)
            s = torch.where(sigma_tilde.to(s.device) <= self.max_sigma_tilde, s, torch.zeros_like(s))
        if not bool((s != 0).any()):
            return pred
        eps = pred.eps - pred.sigma * broadcast(s, x_t) * self.grad_log_prob(x_t, t, y).to(x_t.dtype)
        return Prediction(x_t, pred.alpha, pred.sigma, "eps", eps)
