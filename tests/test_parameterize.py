"""Forward processes and the x0 / eps / v / score readings, checked against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from difflab.core.analytic import GaussianDenoiser
from difflab.core.parameterize import TARGETS, Denoiser, convert, make_prediction
from difflab.core.processes import (
    ContinuousVP,
    DiscreteDDPM,
    VarianceExploding,
    broadcast,
    cosine_betas,
    linear_betas,
    posterior_coefficients,
    sigmoid_betas,
    transition_variance,
)

F64 = torch.float64

PROCESSES = {
    "ddpm-linear": DiscreteDDPM(1000, "linear"),
    "ddpm-cosine": DiscreteDDPM(1000, "cosine"),
    "ddpm-sigmoid": DiscreteDDPM(1000, "sigmoid"),
    "vp-linear": ContinuousVP("linear"),
    "vp-cosine": ContinuousVP("cosine"),
    "ve-geometric": VarianceExploding(schedule="geometric"),
    "ve-karras": VarianceExploding(schedule="karras"),
}
DDPMS = [name for name in PROCESSES if name.startswith("ddpm")]

names = st.sampled_from(sorted(PROCESSES))
targets = st.sampled_from(TARGETS)
# a fraction of the way from the least to the most corrupted level (t = 0, sigma = 0, is excluded)
fractions = st.floats(1e-3, 1.0)
values = st.lists(st.floats(-3, 3, allow_nan=False), min_size=6, max_size=6)


def time_at(process, u: float) -> torch.Tensor:
    """A (1,) time at fraction u of the process's range.

    DDPM: t in [1, T]; VP: t in (0, 1]; VE: sigma in [sigma_min, sigma_max], geometrically."""
    if isinstance(process, DiscreteDDPM):
        return torch.tensor([1 + u * (process.T - 1)], dtype=F64)
    if isinstance(process, VarianceExploding):
        return torch.tensor([process.sigma_min * (process.sigma_max / process.sigma_min) ** u], dtype=F64)
    return torch.tensor([u], dtype=F64)


def sample(name, u, x0_vals, eps_vals):
    """x0, eps (3, 2), the time (3,) and the process's alpha, sigma broadcast against x0."""
    process = PROCESSES[name]
    x0 = torch.tensor(x0_vals, dtype=F64).reshape(3, 2)
    eps = torch.tensor(eps_vals, dtype=F64).reshape(3, 2)
    t = time_at(process, u).expand(3)
    a, s = broadcast(process.alpha(t), x0), broadcast(process.sigma(t), x0)
    return process, x0, eps, t, a, s


def truth(x0, eps, a, s) -> dict:
    """Every target from its definition for x_t = alpha x0 + sigma eps."""
    return {"x0": x0, "eps": eps, "v": a * eps - s * x0, "score": -eps / s}


def close(actual, expected, scale=1.0):
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11 * scale)


# --------------------------------------------------------------------------- conversions


@settings(max_examples=200, deadline=None)
@given(names, fractions, values, values, targets, targets)
def test_convert_round_trip(name, u, x0_vals, eps_vals, source, target):
    process, x0, eps, t, a, s = sample(name, u, x0_vals, eps_vals)
    x_t = a * x0 + s * eps
    start = truth(x0, eps, a, s)[source]
    there = convert(start, source, target, x_t, a, s)
    back = convert(there, target, source, x_t, a, s)
    # an x0 read from eps is amplified by 1/alpha (alpha ~ 5e-4 at the end of the cosine VP)
    close(back, start, scale=float(start.abs().max()) + float(x_t.abs().max() / a.min()))


@settings(max_examples=200, deadline=None)
@given(names, fractions, values, values, targets)
def test_conversions_agree_with_forward_process(name, u, x0_vals, eps_vals, source):
    """From the true value of any target at x_t = alpha x0 + sigma eps, every other reading is its true value."""
    process, x0, eps, t, a, s = sample(name, u, x0_vals, eps_vals)
    x_t = process.q_sample(x0, t, eps)
    close(x_t, a * x0 + s * eps)
    true = truth(x0, eps, a, s)
    pred = make_prediction(process, x_t, t, source, true[source])
    amplification = float((1 + x_t.abs().max()) / (a.min() * s.min() ** 2))
    for target in TARGETS:
        close(pred.as_(target), true[target], scale=amplification)


@settings(max_examples=40, deadline=None)
@given(names, fractions, st.integers(0, 2**31 - 1))
def test_tweedie_score_is_gradient_of_log_marginal(name, u, seed):
    """GaussianDenoiser's score equals grad_x log N(x_t; alpha mu, alpha^2 Sigma + sigma^2 I) (autograd)."""
    process = PROCESSES[name]
    g = torch.Generator().manual_seed(seed)
    d = 3
    mu = torch.randn(d, generator=g, dtype=F64)
    L = torch.randn(d, d, generator=g, dtype=F64)
    cov = L @ L.T + 0.1 * torch.eye(d, dtype=F64)
    t = time_at(process, u).expand(4)
    a, s = process.alpha(t[:1]), process.sigma(t[:1])
    marginal = torch.distributions.MultivariateNormal(a * mu, a**2 * cov + s**2 * torch.eye(d, dtype=F64))
    x_t = marginal.sample((4,)).requires_grad_(True)
    (grad,) = torch.autograd.grad(marginal.log_prob(x_t).sum(), x_t)
    score = GaussianDenoiser(process, mu, cov)(x_t.detach(), t).score
    close(score, grad, scale=float(grad.abs().max()) + 1 / float(s) ** 2)


class OracleNet(nn.Module):
    """A 'network' that knows the answer: returns the true target for the batch it was built for,
    after checking that it received the preconditioned input and the noise condition."""

    def __init__(self, expected_x_in, expected_c_noise, answer):
        super().__init__()
        self.expected_x_in, self.expected_c_noise, self.answer = expected_x_in, expected_c_noise, answer

    def forward(self, x_in, c_noise):
        torch.testing.assert_close(x_in, self.expected_x_in, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c_noise, self.expected_c_noise)
        assert c_noise.dtype == torch.float32
        return self.answer


@settings(max_examples=100, deadline=None)
@given(names, fractions, values, values, targets)
def test_denoiser_wrapper_with_exact_network(name, u, x0_vals, eps_vals, native):
    process, x0, eps, t, a, s = sample(name, u, x0_vals, eps_vals)
    x_t = process.q_sample(x0, t, eps)
    true = truth(x0, eps, a, s)
    x_in = x_t / torch.sqrt(a**2 + s**2)
    net = OracleNet(x_in, process.noise_condition(t).float(), true[native])
    pred = Denoiser(net, process, native)(x_t, t)
    assert pred.target == native
    assert float(x_in.std()) < 10  # unit scale for every process, VE at sigma = 80 included
    amplification = float((1 + x_t.abs().max()) / (a.min() * s.min() ** 2))
    for target in TARGETS:
        close(pred.as_(target), true[target], scale=amplification)


def test_denoiser_accepts_scalar_time():
    process = PROCESSES["vp-cosine"]
    x_t = torch.randn(5, 2, dtype=F64)
    net = lambda x_in, c_noise: torch.zeros_like(x_in)  # noqa: E731
    pred = Denoiser(net, process, "eps")(x_t, 0.5)
    torch.testing.assert_close(pred.x0, x_t / process.alpha(torch.tensor(0.5, dtype=F64)))


# --------------------------------------------------------------------------- processes


@pytest.mark.parametrize("name", DDPMS)
def test_ddpm_closed_form_equals_composed_chain(name):
    """Composing q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t) t times gives mean sqrt(abar_t) x0
    and variance 1 - abar_t; the closed form q_sample must say the same."""
    process = PROCESSES[name]
    betas = process.betas
    mean_coef, var = torch.tensor(1.0, dtype=F64), torch.tensor(0.0, dtype=F64)
    means, variances = [mean_coef], [var]
    for beta in betas:
        mean_coef = torch.sqrt(1 - beta) * mean_coef
        var = (1 - beta) * var + beta
        means.append(mean_coef)
        variances.append(var)
    ts = torch.arange(process.T + 1, dtype=F64)
    torch.testing.assert_close(process.alpha(ts), torch.stack(means), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(process.sigma(ts) ** 2, torch.stack(variances), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(transition_variance(process, ts[1:], ts[:-1]), betas, rtol=1e-7, atol=1e-12)


def test_ddpm_chain_simulation_matches_q_sample_in_distribution():
    """Monte Carlo: running the T-step chain from a fixed x0 lands on N(sqrt(abar_T) x0, 1 - abar_T)."""
    process = DiscreteDDPM(50, "linear")
    g = torch.Generator().manual_seed(0)
    n, x0 = 40_000, 1.5
    x = torch.full((n,), x0, dtype=F64)
    for beta in process.betas:
        x = torch.sqrt(1 - beta) * x + torch.sqrt(beta) * torch.randn(n, generator=g, dtype=F64)
    T = torch.tensor(float(process.T), dtype=F64)
    mean, var = float(process.alpha(T)) * x0, float(process.sigma(T)) ** 2
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n)
    assert abs(float(x.var()) - var) < 5 * var * math.sqrt(2 / n)
    direct = process.q_sample(torch.full((n,), x0, dtype=F64), T.expand(n), torch.randn(n, generator=g, dtype=F64))
    assert abs(float(direct.mean()) - float(x.mean())) < 5 * math.sqrt(2 * var / n)


@pytest.mark.parametrize("name", DDPMS)
def test_posterior_coefficients_are_ho_eq7(name):
    process = PROCESSES[name]
    betas = process.betas
    abar = torch.cumprod(1 - betas, 0)  # abar_1..abar_T
    abar_prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])  # abar_0..abar_{T-1}
    ts = torch.arange(1, process.T + 1, dtype=F64)
    c_x0, c_xt, var = posterior_coefficients(process, ts, ts - 1)
    torch.testing.assert_close(c_x0, torch.sqrt(abar_prev) * betas / (1 - abar), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(c_xt, torch.sqrt(1 - betas) * (1 - abar_prev) / (1 - abar), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(var, (1 - abar_prev) / (1 - abar) * betas, rtol=1e-7, atol=1e-14)
    assert float(var[0]) == 0.0  # beta_tilde_1 = 0: q(x_0 | x_1, x_0) is a point mass


@settings(max_examples=100, deadline=None)
@given(names, fractions, fractions)
def test_posterior_is_bayes_rule(name, u1, u2):
    """q(x_s | x_t, x_0) ∝ q(x_s | x_0) q(x_t | x_s): precision and mean of the product of Gaussians."""
    process = PROCESSES[name]
    lo, hi = sorted((u1, u2))
    assume(hi - lo > 1e-3)
    s, t = time_at(process, lo), time_at(process, hi)
    a_s, sig_s, a_t, sig_t = process.alpha(s), process.sigma(s), process.alpha(t), process.sigma(t)
    a_ts = a_t / a_s
    var_ts = sig_t**2 - a_ts**2 * sig_s**2
    precision = 1 / sig_s**2 + a_ts**2 / var_ts
    c_x0, c_xt, var = posterior_coefficients(process, t, s)
    torch.testing.assert_close(var, 1 / precision, rtol=1e-6, atol=1e-14)
    torch.testing.assert_close(c_x0, a_s / sig_s**2 / precision, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(c_xt, a_ts / var_ts / precision, rtol=1e-6, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(names, st.floats(0.0, 1.0))
def test_t_from_log_snr_inverts_log_snr(name, u):
    process = PROCESSES[name]
    t = time_at(process, u)
    lam = process.log_snr(t)
    torch.testing.assert_close(process.t_from_log_snr(lam), t, rtol=1e-7, atol=1e-7 * process.t_max)
    torch.testing.assert_close(process.log_snr(process.t_from_log_snr(lam)), lam, rtol=1e-6, atol=1e-6)


def test_log_snr_decreases_from_data_to_noise():
    for name, process in PROCESSES.items():
        t = time_at(process, 0.0) + (process.t_max - time_at(process, 0.0)) * torch.linspace(0, 1, 201, dtype=F64)
        assert bool((process.log_snr(t).diff() < 0).all()), name


# --------------------------------------------------------------------------- schedules


def test_linear_betas_definition():
    torch.testing.assert_close(linear_betas(1000), torch.linspace(1e-4, 0.02, 1000, dtype=F64))
    torch.testing.assert_close(linear_betas(250), torch.linspace(4e-4, 0.08, 250, dtype=F64))  # rescaled by 1000/T


def test_cosine_betas_definition():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    abar = torch.cumprod(1 - cosine_betas(T), 0)
    expected = torch.tensor([f(t) / f(0) for t in range(1, T + 1)], dtype=F64)
    # betas are clipped at 0.999 only at the very end
    torch.testing.assert_close(abar[:-1], expected[:-1], rtol=1e-9, atol=1e-15)
    assert float(cosine_betas(T).max()) == pytest.approx(0.999)


def test_sigmoid_betas_definition():
    x = torch.linspace(-6, 6, 1000, dtype=F64)
    expected = 1e-4 + (0.02 - 1e-4) / (1 + torch.exp(-x))
    torch.testing.assert_close(sigmoid_betas(1000), expected)


def test_ddpm_time_zero_and_fractional_times():
    process = PROCESSES["ddpm-linear"]
    assert float(process.alpha(torch.tensor(0.0))) == 1.0 and float(process.sigma(torch.tensor(0.0))) == 0.0
    # fractional t interpolates log(abar) linearly
    la = torch.log(process.alpha(torch.tensor([10.0, 10.25, 11.0], dtype=F64)) ** 2)
    assert float(la[1]) == pytest.approx(0.75 * float(la[0]) + 0.25 * float(la[2]), rel=1e-12)
    t = process.sample_t(20_000, torch.Generator().manual_seed(0))
    assert float(t.min()) == 1 and float(t.max()) == process.T and bool((t == t.round()).all())


def test_continuous_vp_schedules_definition():
    t = torch.linspace(0, 1, 11, dtype=F64)
    lin = ContinuousVP("linear", beta_min=0.1, beta_max=20.0)
    torch.testing.assert_close(lin.alpha(t), torch.exp(-0.25 * t**2 * 19.9 - 0.5 * t * 0.1))
    cos = ContinuousVP("cosine", lambda_min=-15.0)
    a = math.atan(math.exp(7.5))
    torch.testing.assert_close(cos.alpha(t), torch.cos(a * t))
    assert float(cos.log_snr(torch.tensor(1.0, dtype=F64))) == pytest.approx(-15.0, abs=1e-9)
    for p in (lin, cos):  # variance preserving
        torch.testing.assert_close(p.alpha(t) ** 2 + p.sigma(t) ** 2, torch.ones_like(t))


@pytest.mark.parametrize("schedule", ["geometric", "karras"])
def test_variance_exploding_schedule_law(schedule):
    process = VarianceExploding(0.002, 80.0, schedule)
    t = torch.tensor([0.002, 1.0, 80.0], dtype=F64)
    torch.testing.assert_close(process.sigma(t), t)
    torch.testing.assert_close(process.alpha(t), torch.ones_like(t))
    n = 40_000
    sig = process.sample_t(n, torch.Generator().manual_seed(0))
    assert float(sig.min()) >= 0.002 and float(sig.max()) <= 80.0
    # map back to the uniform variable of the schedule's definition
    if schedule == "geometric":
        u = (torch.log(sig) - math.log(0.002)) / (math.log(80.0) - math.log(0.002))
    else:
        r = 1 / 7.0
        u = (sig**r - 80.0**r) / (0.002**r - 80.0**r)
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 0.004


def test_invalid_names_raise():
    with pytest.raises(ValueError, match="beta schedule"):
        DiscreteDDPM(100, "quadratic")
    with pytest.raises(ValueError, match="T must be"):
        DiscreteDDPM(0)
    with pytest.raises(ValueError, match="outside"):
        DiscreteDDPM(10, "linear")  # beta_end rescaled to 2.0
    with pytest.raises(ValueError, match="continuous VP"):
        ContinuousVP("sigmoid")
    with pytest.raises(ValueError, match="VE sigma schedule"):
        VarianceExploding(schedule="linear")
    with pytest.raises(ValueError, match="sigma_min"):
        VarianceExploding(sigma_min=1.0, sigma_max=0.5)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="prediction target"):
        convert(x, "noise", "x0", x, torch.ones(()), torch.ones(()))
    with pytest.raises(ValueError, match="prediction target"):
        convert(x, "x0", "epsilon", x, torch.ones(()), torch.ones(()))
    with pytest.raises(ValueError, match="prediction target"):
        Denoiser(nn.Identity(), PROCESSES["vp-cosine"], "sample")
