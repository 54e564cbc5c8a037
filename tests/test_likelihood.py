"""The variational bound, term by term, against closed forms on Gaussian data."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from difflab.core.analytic import GaussianDenoiser, gaussian_nll
from difflab.core.likelihood import (
    VLBTerms,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
    vlb_terms,
)
from difflab.core.parameterize import Denoiser, make_prediction
from difflab.core.processes import ContinuousVP, DiscreteDDPM, posterior_coefficients

F64 = torch.float64
MU = torch.tensor([0.3, -0.2], dtype=F64)
COV = torch.tensor([[0.3, 0.12], [0.12, 0.2]], dtype=F64)


def gaussian_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + torch.randn(n, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(COV).T


def expected_bound(process: DiscreteDDPM, variance: str):
    """E[L_{t-1}] for t = 2..T (T-1,), E[L_0] and E[L_T] for x_0 ~ N(MU, COV) with the exact denoiser,
    the Gaussian decoder of variance beta_1 (closed forms, written independently of difflab.likelihood).

    With lambda_k the eigenvalues of COV, Cov[x_0 | x_t] has eigenvalues lambda_k s^2 / (a^2 lambda_k + s^2), and
    L_{t-1} = 0.5 [d (r - 1 - log r) + c_x0^2 ||x_0 - E[x_0 | x_t]||^2 / var_p],  r = beta_tilde_t / var_p."""
    lam = torch.linalg.eigvalsh(COV)
    d, T = lam.numel(), process.T
    ts = torch.arange(2, T + 1, dtype=F64)
    c_x0, _, var_q = posterior_coefficients(process, ts, ts - 1)
    var_p = var_q if variance == "beta_tilde" else process.betas[1:]
    a, s = process.alpha(ts)[:, None], process.sigma(ts)[:, None]
    posterior_var = (lam * s**2 / (a**2 * lam + s**2)).sum(1)
    r = var_q / var_p
    terms = 0.5 * (d * (r - 1 - torch.log(r)) + c_x0**2 * posterior_var / var_p)
    one = torch.tensor(1.0, dtype=F64)
    a1, s1, v1 = float(process.alpha(one)), float(process.sigma(one)), float(process.betas[0])
    decoder = 0.5 * d * math.log(2 * math.pi * v1) + float((lam * s1**2 / (a1**2 * lam + s1**2)).sum()) / (2 * v1)
    aT, sT = float(process.alpha(torch.tensor(float(T)))), float(process.sigma(torch.tensor(float(T))))
    prior = 0.5 * (d * (sT**2 - 1 - math.log(sT**2)) + aT**2 * float(MU @ MU + lam.sum()))
    return terms, decoder, prior


def entropy() -> float:
    return float(0.5 * torch.logdet(2 * math.pi * math.e * COV))


def exact_gap(T: int, variance: str) -> float:
    """E[bound] - E[-log q(x_0)] in closed form (cosine schedule)."""
    terms, decoder, prior = expected_bound(DiscreteDDPM(T, "cosine"), variance)
    return float(terms.sum()) + decoder + prior - entropy()


# --------------------------------------------------------------------------- pure helpers


def test_normal_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(100, generator=g, dtype=F64), torch.randn(100, generator=g, dtype=F64)
    lv1, lv2 = 2 * torch.randn(100, generator=g, dtype=F64), 2 * torch.randn(100, generator=g, dtype=F64)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, torch.exp(0.5 * lv1)), torch.distributions.Normal(m2, torch.exp(0.5 * lv2))
    )
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert float(normal_kl(m1, lv1, m1, lv1).abs().max()) < 1e-12


def test_gaussian_log_likelihood_matches_torch():
    g = torch.Generator().manual_seed(1)
    x, mean, log_scale = (torch.randn(50, generator=g, dtype=F64) for _ in range(3))
    expected = torch.distributions.Normal(mean, torch.exp(log_scale)).log_prob(x)
    torch.testing.assert_close(gaussian_log_likelihood(x, mean, log_scale), expected)


GRID = torch.arange(256, dtype=F64) / 127.5 - 1  # the 8-bit values scaled to [-1, 1]


@pytest.mark.parametrize("mean", [-1.7, -1.0, -0.3, 0.0, 0.51, 1.0, 2.5])
@pytest.mark.parametrize("log_scale", [-8.0, -4.0, -1.0, 0.0, 1.5])
def test_discretized_likelihood_sums_to_one_over_256_bins(mean, log_scale):
    logp = discretized_gaussian_log_likelihood(GRID, torch.tensor(mean), torch.tensor(log_scale))
    assert bool(torch.isfinite(logp).all())
    assert float(torch.logsumexp(logp, 0)) == pytest.approx(0.0, abs=1e-10)


def test_discretized_likelihood_is_the_bin_mass():
    """Interior bins: Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s); the end bins reach -inf and +inf."""
    mean, scale = 0.1, 0.3
    normal = torch.distributions.Normal(torch.tensor(mean, dtype=F64), torch.tensor(scale, dtype=F64))
    mass = normal.cdf(GRID + 1 / 255) - normal.cdf(GRID - 1 / 255)
    mass[0], mass[-1] = normal.cdf(GRID[0] + 1 / 255), 1 - normal.cdf(GRID[-1] - 1 / 255)
    mean_, log_scale = torch.tensor(mean, dtype=F64), torch.tensor(math.log(scale), dtype=F64)
    logp = discretized_gaussian_log_likelihood(GRID, mean_, log_scale)
    torch.testing.assert_close(logp, torch.log(mass), rtol=1e-10, atol=1e-12)
    # far in either tail the log mass stays finite and is the Gaussian tail, not log(0)
    far = discretized_gaussian_log_likelihood(
        torch.tensor([1.0, -1.0], dtype=F64), torch.tensor(-1.0, dtype=F64), torch.tensor(math.log(0.01), dtype=F64)
    )
    tail = torch.special.log_ndtr(torch.tensor(-(2 - 1 / 255) / 0.01, dtype=F64))
    assert float(far[0]) == pytest.approx(float(tail), rel=1e-12)
    assert float(far[1]) == pytest.approx(math.log(0.5 + 0.5 * math.erf(1 / 255 / 0.01 / math.sqrt(2))), rel=1e-12)


# --------------------------------------------------------------------------- the bound on Gaussian data


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_every_term_matches_its_gaussian_expectation(variance):
    """Mean over 4000 examples of each L_{t-1}, of L_0 and of L_T vs the closed-form expectation (z-scores)."""
    process = DiscreteDDPM(50, "cosine")
    n = 4000
    x0 = gaussian_data(n, seed=0)
    v = vlb_terms(
        GaussianDenoiser(process, MU, COV),
        x0,
        variance=variance,
        decoder="gaussian",
        generator=torch.Generator().manual_seed(1),
    )
    assert v.terms.shape == (n, 49) and v.prior.shape == v.decoder.shape == v.total.shape == (n,)
    terms, decoder, prior = expected_bound(process, variance)
    z = (v.terms.mean(0) - terms) / (v.terms.std(0) / math.sqrt(n))
    assert float(z.abs().max()) < 5, z
    z_dec = (float(v.decoder.mean()) - decoder) / (float(v.decoder.std()) / math.sqrt(n))
    assert abs(z_dec) < 5
    # the prior term is deterministic given x_0: check it example by example
    aT, sT = process.alpha(torch.tensor(50.0)), process.sigma(torch.tensor(50.0))
    exact_prior = 0.5 * (2 * (sT**2 - 1 - torch.log(sT**2)) + aT**2 * (x0**2).sum(1))
    torch.testing.assert_close(v.prior, exact_prior)
    assert abs(float(v.prior.mean()) - prior) < 5 * float(v.prior.std()) / math.sqrt(n)
    torch.testing.assert_close(v.total, v.prior + v.terms.sum(1) + v.decoder)


@pytest.mark.parametrize("variance", ["beta", "beta_tilde"])
def test_bound_is_above_the_true_nll(variance):
    """E[bound - (-log q(x_0))] > 0 beyond Monte Carlo error, for T = 10, 100, 1000 (cosine schedule)."""
    x0 = gaussian_data(1500, seed=2)
    nll = gaussian_nll(x0, MU, COV)
    for T in (10, 100, 1000):
        process = DiscreteDDPM(T, "cosine")
        v = vlb_terms(
            GaussianDenoiser(process, MU, COV),
            x0,
            variance=variance,
            decoder="gaussian",
            generator=torch.Generator().manual_seed(T),
        )
        gap = v.total - nll
        se = float(gap.std()) / math.sqrt(gap.numel())
        expected_gap = exact_gap(T, variance)
        assert expected_gap > 0
        assert abs(float(gap.mean()) - expected_gap) < 4 * se, (T, float(gap.mean()), expected_gap, se)
        if variance == "beta_tilde" or T == 10:  # the gap is wider than the MC error there (~0.03 nats)
            assert float(gap.mean()) > 4 * se, (T, float(gap.mean()), se)


def test_gap_shrinks_as_T_grows_with_beta_variance():
    """With var_p = beta_t the gap closes like 1/T: 0.16 nats (T=10), 0.018 (T=100), 0.0018 (T=1000).

    Monte Carlo resolves T=10 vs T=100; the closed form (checked against Monte Carlo above) the rest.
    With var_p = beta_tilde it does not close: the first steps, where sigma_t^2 << Var[x_0], keep
    beta_tilde_t / beta_t = sigma_{t-1}^2 / sigma_t^2 far from 1 for any T."""
    x0 = gaussian_data(4000, seed=3)
    nll = gaussian_nll(x0, MU, COV)
    gaps = {}
    for T in (10, 100):
        process = DiscreteDDPM(T, "cosine")
        v = vlb_terms(
            GaussianDenoiser(process, MU, COV),
            x0,
            variance="beta",
            decoder="gaussian",
            generator=torch.Generator().manual_seed(10 + T),
        )
        gaps[T] = v.total - nll
    diff = float(gaps[10].mean() - gaps[100].mean())
    se = math.sqrt(float(gaps[10].var() + gaps[100].var()) / 4000)
    assert diff > 4 * se, (diff, se)

    beta = [exact_gap(T, "beta") for T in (10, 100, 1000)]
    assert beta[0] > beta[1] > beta[2] > 0 and beta[2] < 0.01
    assert exact_gap(1000, "beta_tilde") > 0.5


# --------------------------------------------------------------------------- exact models: deterministic terms


class OracleDenoiser(nn.Module):
    """Knows x_0 through its conditioning (cond={'x0': x0}): checks that cond is tiled with the batch."""

    def __init__(self, process):
        super().__init__()
        self.process = process

    def forward(self, x_t, t, x0):
        assert x0.shape == x_t.shape
        return make_prediction(self.process, x_t, t, "x0", x0)


@pytest.mark.parametrize("t_batch", [1, 7, None])
def test_exact_x0_leaves_only_the_variance_mismatch(t_batch):
    """With pred.x0 = x_0 the means agree, so L_{t-1} = 0.5 D (r - 1 - log r), r = beta_tilde_t / var_p:
    zero for beta_tilde, known for beta. Checks the t indexing of VLBTerms.terms and the tiling of cond."""
    process = DiscreteDDPM(40, "linear")
    x0 = torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    oracle = OracleDenoiser(process)
    ts = torch.arange(2, 41, dtype=F64)
    r = posterior_coefficients(process, ts, ts - 1)[2] / process.betas[1:]
    for variance, expected in (("beta_tilde", torch.zeros(39, dtype=F64)), ("beta", 0.5 * 12 * (r - 1 - torch.log(r)))):
        v = vlb_terms(
            oracle,
            x0,
            variance=variance,
            decoder="gaussian",
            t_batch=t_batch,
            cond={"x0": x0},
            generator=torch.Generator().manual_seed(1),
        )
        torch.testing.assert_close(v.terms, expected.expand(5, 39), rtol=1e-9, atol=1e-12)
    # decoder N(x_0, beta_1) evaluated at its mean
    at_mean = 6 * math.log(2 * math.pi * float(process.betas[0]))  # 12 dims of -log N(m; m, beta_1)
    torch.testing.assert_close(v.decoder, torch.full((5,), at_mean, dtype=F64))


def test_discretized_decoder_of_the_oracle():
    """Mean exactly on the data, scale sqrt(beta_1) = 0.01: interior pixels cost -log P(|z| < 0.392),
    pixels at +-1 cost -log P(z < 0.392)."""
    process = DiscreteDDPM(1000, "linear")
    x0 = torch.tensor([[[-1.0, 1.0, 0.0, 3 / 127.5 - 1]]], dtype=F64)  # (1, 1, 4)
    v = vlb_terms(OracleDenoiser(process), x0, cond={"x0": x0}, generator=torch.Generator().manual_seed(0))
    h = (1 / 255) / 0.01
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = -2 * math.log(phi(h)) - 2 * math.log(phi(h) - phi(-h))
    assert float(v.decoder[0]) == pytest.approx(expected, rel=1e-10)


def test_prior_term_vanishes_for_linear_schedule_at_T1000():
    process = DiscreteDDPM(1000, "linear")
    x0 = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64) * 2 - 1
    v = vlb_terms(OracleDenoiser(process), x0, cond={"x0": x0}, decoder="gaussian")
    prior_bpd = v.prior / (48 * math.log(2))
    assert float(prior_bpd.max()) < 5e-5
    abar_T = float(torch.exp(process.log_abar[-1]))
    assert 1e-5 < abar_T < 1e-4  # small, but the term is not identically zero
    assert float(v.prior.min()) > 0


# --------------------------------------------------------------------------- bits/dim


class ZeroNet(nn.Module):
    def forward(self, x_in, c_noise, **cond):
        return torch.zeros_like(x_in)


def test_bits_per_dim_conversion_and_dataset_summary():
    process = DiscreteDDPM(30, "cosine")
    denoiser = Denoiser(ZeroNet(), process, "eps")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 256, (6, 3, 2, 2), generator=g).to(F64) / 127.5 - 1
    v = vlb_terms(denoiser, x0, generator=torch.Generator().manual_seed(5))
    assert isinstance(v, VLBTerms) and v.terms.shape == (6, 29)
    torch.testing.assert_close(v.bits_per_dim, v.total / (12 * math.log(2)))
    torch.testing.assert_close(v.total, v.prior + v.terms.sum(1) + v.decoder)

    # the summary over batches (a bare tensor, then an (x0, labels) pair) equals the per-example average
    batches = [x0[:4], (x0[4:], torch.tensor([1, 2]))]
    summary = bits_per_dim(denoiser, batches, generator=torch.Generator().manual_seed(5), progress=False)
    first = vlb_terms(denoiser, x0[:4], generator=(gen := torch.Generator().manual_seed(5)))
    second = vlb_terms(denoiser, x0[4:], generator=gen)
    bpd = torch.cat([first.bits_per_dim, second.bits_per_dim])
    assert summary["n"] == 6
    assert summary["total"] == pytest.approx(float(bpd.mean()), rel=1e-12)
    assert summary["total_stderr"] == pytest.approx(float(bpd.std()) / math.sqrt(6), rel=1e-9)
    assert summary["prior"] + summary["terms"] + summary["decoder"] == pytest.approx(summary["total"], rel=1e-12)
    assert summary["per_t"].shape == (29,)
    assert float(summary["per_t"].sum()) == pytest.approx(summary["terms"], rel=1e-12)
    to_bpd = 1 / (12 * math.log(2))
    decoders = torch.cat([first.decoder, second.decoder])
    assert summary["decoder"] == pytest.approx(float(decoders.mean()) * to_bpd, rel=1e-12)


def test_invalid_inputs_raise():
    x0 = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="DiscreteDDPM"):
        vlb_terms(GaussianDenoiser(ContinuousVP("cosine"), MU, COV), x0)
    with pytest.raises(ValueError, match="DiscreteDDPM"):
        bits_per_dim(GaussianDenoiser(ContinuousVP("linear"), MU, COV), [x0], progress=False)
    ddpm = GaussianDenoiser(DiscreteDDPM(20, "cosine"), MU, COV)
    with pytest.raises(ValueError, match="reverse variance"):
        vlb_terms(ddpm, x0, variance="sideways")
    with pytest.raises(ValueError, match="predicts its variance"):
        vlb_terms(ddpm, x0, variance="learned")
    with pytest.raises(ValueError, match="decoder"):
        vlb_terms(ddpm, x0, decoder="logistic")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        vlb_terms(ddpm, x0 + 2.0, decoder="discretized")
    with pytest.raises(ValueError, match="no batches"):
        bits_per_dim(ddpm, [], progress=False)
