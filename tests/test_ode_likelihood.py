"""The probability-flow ODE's log-likelihood against closed-form truth: Gaussian data and the exact denoiser have
Gaussian marginals at every t, so log q_t(x) is known exactly; Hutchinson's estimator on linear fields."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from difflab.core.analytic import GaussianDenoiser
from difflab.core.likelihood import BIN_HALF_WIDTH
from difflab.core.ode_likelihood import (
    dequantize,
    divergence_of,
    dormand_prince,
    ode_bits_per_dim,
    ode_log_likelihood,
    rademacher,
)
from difflab.core.processes import ContinuousVP, DiscreteDDPM, LearnedVP, VarianceExploding

F64 = torch.float64
MU = torch.tensor([0.3, -0.5], dtype=F64)
COV = torch.tensor([[0.5, 0.1], [0.1, 0.2]], dtype=F64)


def marginal_log_density(process, t: float, x):
    """log q_t(x) = log N(x; alpha mu, alpha^2 Sigma + sigma^2 I) for x_0 ~ N(mu, Sigma)."""
    t = torch.tensor(t, dtype=F64)
    a, s = process.alpha(t).detach(), process.sigma(t).detach()
    cov = a * a * COV + s * s * torch.eye(2, dtype=F64)
    return torch.distributions.MultivariateNormal(a * MU, cov).log_prob(x)


def data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(COV).T


@pytest.mark.parametrize(
    "process",
    [
        ContinuousVP("cosine"),
        ContinuousVP("linear"),
        DiscreteDDPM(1000, "linear"),
        VarianceExploding(0.002, 80.0),
        LearnedVP(hidden=16),
    ],
    ids=["vp-cosine", "vp-linear", "ddpm-linear", "ve", "learned"],
)
def test_flow_carries_the_exact_marginal(process):
    """int div dr + log q_T(x_T) = log q_{t_min}(x) to 1e-4 nats/dim: the flow and its divergence are exact (the
    prior N(0, I) differs from q_T only by what the schedule leaves of the data at t_max)."""
    x = data()
    with torch.no_grad():
        den = GaussianDenoiser(process, MU, COV)
        r = ode_log_likelihood(den, x, divergence="exact", rtol=1e-6, atol=1e-6, dtype=F64)
    got = r.delta + marginal_log_density(process, process.t_max, r.x_T)
    assert (got - marginal_log_density(process, r.t_min, x)).abs().max() / 2 < 1e-4
    assert r.nfe > 0 and r.per_probe.shape == (len(x), 1)


def test_log_likelihood_equals_the_closed_form():
    """With a schedule that forgets the data at t_max (alpha_T^2 = sigmoid(-30)), the whole estimate, prior
    included, is log q_{t_min}(x) to 1e-4 nats/dim."""
    process = ContinuousVP("cosine", lambda_min=-30.0)
    x = data(seed=1)
    r = ode_log_likelihood(GaussianDenoiser(process, MU, COV), x, divergence="exact", rtol=1e-6, atol=1e-6, dtype=F64)
    assert (r.log_p - marginal_log_density(process, r.t_min, x)).abs().max() / 2 < 1e-4


def test_hutchinson_is_unbiased_on_a_linear_field():
    A = torch.tensor([[1.5, -2.0, 0.3], [0.7, -0.4, 1.1], [2.0, 0.2, 0.9]], dtype=F64)
    y = torch.randn(1, 3, dtype=F64, requires_grad=True)
    out = y @ A.T
    exact = divergence_of(out, y, None)
    assert torch.allclose(exact, torch.trace(A).reshape(1, 1))
    # every sign vector once: the average is the trace exactly (the off-diagonal terms cancel in pairs)
    z = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=F64)[:, None, :]  # (8, 1, 3)
    assert torch.allclose(divergence_of(out, y, z).mean(), torch.trace(A))
    # random probes: within 4 standard errors, and each draw is z^T A z (not the trace)
    z = rademacher((20000, 1, 3), torch.Generator().manual_seed(0))
    draws = divergence_of(out, y, z)[0]
    assert draws.std() > 0.5
    assert abs(draws.mean() - torch.trace(A)) < 4 * draws.std() / math.sqrt(len(draws))


def test_hutchinson_through_the_ode_agrees_with_the_exact_divergence():
    process = ContinuousVP("cosine")
    den = GaussianDenoiser(process, MU, COV)
    x = data(4)
    exact = ode_log_likelihood(den, x, divergence="exact", dtype=F64)
    h = ode_log_likelihood(den, x, probes=64, generator=torch.Generator().manual_seed(0), dtype=F64)
    stderr = h.per_probe.std(1) / 8
    assert (stderr > 0).all() and ((h.log_p - exact.log_p).abs() < 4 * stderr).all()


def test_dormand_prince_integrates_to_tolerance():
    y0 = (torch.ones(3, dtype=F64), torch.ones(1, dtype=F64))
    for tol in (1e-5, 1e-8):  # the local error is held to tol; the global one stays within a few times it
        sol = dormand_prince(lambda t, y: (-y[0], math.cos(t) * y[1]), y0, 0, 2, rtol=tol, atol=tol)
        assert torch.allclose(sol.y[0], torch.full((3,), math.exp(-2), dtype=F64), rtol=5 * tol, atol=0)
        assert torch.allclose(sol.y[1], torch.tensor([math.exp(math.sin(2))], dtype=F64), rtol=5 * tol, atol=0)
    assert sol.nfe == 6 * (sol.steps + sol.rejected) + 1
    with pytest.raises(ValueError, match="integrate forward"):
        dormand_prince(lambda t, y: y, (torch.ones(1),), 1.0, 0.0)
    with pytest.raises(RuntimeError, match="loosen rtol/atol"):
        dormand_prince(lambda t, y: (100 * y[0],), (torch.ones(1),), 0, 1, rtol=1e-12, atol=1e-12, max_steps=20)


def test_uniform_dequantisation_stays_in_the_pixel_bin():
    x = torch.linspace(-1, 1, 256, dtype=torch.float32).reshape(1, 1, 16, 16)
    y, offset = dequantize(x, "uniform", torch.Generator().manual_seed(0))
    assert offset == pytest.approx(math.log2(255 / 2))
    assert ((y - x).abs() <= BIN_HALF_WIDTH).all() and (y != x).all()
    assert dequantize(x, "none")[0] is x
    with pytest.raises(ValueError, match="unknown dequantization 'variational'"):
        dequantize(x, "variational")


def test_bits_per_dim_of_real_valued_data_is_the_density():
    """dequantization 'none': bits/dim = -log2 q(x) / D of the points themselves."""
    process = ContinuousVP("cosine", lambda_min=-30.0)
    x = data(8)
    r = ode_bits_per_dim(
        GaussianDenoiser(process, MU, COV), [x.float()], dequantization="none", divergence="exact",
        rtol=1e-6, atol=1e-6, progress=False,
    )  # fmt: skip
    truth = -marginal_log_density(process, 0.0, x).mean() / (2 * math.log(2))
    assert r["total"] == pytest.approx(float(truth), abs=2e-3)  # float32 network
    assert r["n"] == 8 and r["offset"] == 0 and r["hutchinson_stderr"] is None and r["total_stderr"] > 0


def test_bad_options():
    den = GaussianDenoiser(ContinuousVP(), MU, COV)
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        ode_log_likelihood(den, data(2), divergence="trace")
    with pytest.raises(ValueError, match="probes >= 1"):
        ode_log_likelihood(den, data(2), probes=0)
