"""The continuous-time bound, a learned schedule (VDM) and learned variances (iDDPM) against closed-form truth.

For x_0 ~ N(mu, diag s^2) and the exact denoiser, x0_hat - x_0 = (1 - k alpha)(mu - x_0) + k sigma eps with
k = alpha s^2 / (alpha^2 s^2 + sigma^2), so every expected term of the bound is a one-dimensional integral."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difflab.cli import main
from difflab.core.analytic import GaussianDenoiser
from difflab.core.likelihood import (
    bound_grid,
    bound_t_min,
    continuous_prior_kl,
    continuous_terms,
    reverse_log_variance,
    vlb_terms,
)
from difflab.core.losses import ContinuousVLBLoss, HybridLoss, SimpleLoss
from difflab.core.parameterize import Denoiser, Prediction
from difflab.core.processes import (
    ContinuousVP,
    DiscreteDDPM,
    LearnedVP,
    posterior_coefficients,
    transition_variance,
)
from difflab.nets.mlp import MLP, MLPConfig
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.store import load_weights
from difflab.sampling.samplers import ddim, ddpm, ddpm_step, dpmpp_2m, euler, heun, timesteps

F64 = torch.float64
MU = torch.tensor([0.3, -0.5], dtype=F64)
VAR = torch.tensor([0.5, 0.2], dtype=F64)
X0 = torch.tensor([[0.9, -0.1], [-0.4, -0.8], [0.3, 0.2]], dtype=F64)


def expected_error(lam: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """E_eps ||x_0 - x0_hat(x_t)||^2 at log-SNR lam (N,), for each x0 (B, 2): (N, B)."""
    a2, s2 = torch.sigmoid(lam)[:, None, None], torch.sigmoid(-lam)[:, None, None]
    k = a2.sqrt() * VAR / (a2 * VAR + s2)
    return ((1 - k * a2.sqrt()) ** 2 * (x0 - MU) ** 2 + k**2 * s2).sum(-1)


def diffusion_closed_form(lam_lo: float, lam_hi: float, x0: torch.Tensor) -> torch.Tensor:
    """L_inf = 1/2 int_{lam_lo}^{lam_hi} SNR E||x_0 - x0_hat||^2 dlambda per example (VDM eq. 13), by quadrature."""
    lam = torch.linspace(lam_lo, lam_hi, 200_001, dtype=F64)
    return 0.5 * torch.trapezoid(lam.exp()[:, None] * expected_error(lam, x0), lam, dim=0)


def perturbed_learned(seed: int = 0) -> LearnedVP:
    process = LearnedVP(gamma_min=-10.0, gamma_max=6.0, hidden=8, learn_endpoints=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in process.gamma.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return process


@pytest.mark.parametrize("process", [ContinuousVP("cosine"), perturbed_learned()], ids=["cosine", "learned"])
def test_continuous_bound_equals_the_closed_form(process):
    """The diffusion term's estimate (16384 stratified draws of the log-SNR) is the closed-form integral over
    log-SNR, the same for any schedule between the same end points (VDM's invariance), and the prior term is the KL."""
    den = GaussianDenoiser(process, MU, torch.diag(VAR))
    c = continuous_terms(den, X0, k=16384, decoder="gaussian", generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # from the bound's lowest level (log-SNR 13.3, or gamma_min's) to t = 1
        lam_hi, lam_lo = process.log_snr(torch.tensor([bound_t_min(process), 1.0], dtype=F64)).tolist()
    truth = diffusion_closed_form(lam_lo, lam_hi, X0)
    assert torch.allclose(c.diffusion, truth, rtol=0.03)  # the estimate's relative standard error: 0.8 %
    a2 = torch.sigmoid(torch.tensor(lam_lo, dtype=F64))
    kl = 0.5 * (a2 * X0**2 + (1 - a2) - 1 - torch.log(1 - a2)).sum(1)
    assert torch.allclose(continuous_prior_kl(process, X0), kl, rtol=1e-9)


def test_a_few_step_bound_keeps_both_ends_of_the_chain():
    """iDDPM's respacing: K levels from t = 1 (the decoder reads x_1) to T (the prior), evenly spaced."""
    process = DiscreteDDPM(1000, "cosine")
    ts = bound_grid(process, 50)
    assert len(ts) == 50 and ts[0] == 1 and ts[-1] == 1000 and (ts.diff() > 0).all()
    assert set(ts.diff().tolist()) <= {20.0, 21.0}
    assert torch.equal(bound_grid(process, 1000), torch.arange(1, 1001, dtype=F64))


def test_the_discrete_bound_tends_to_the_continuous_one():
    """VDM eq. 14: with K levels between the same end points the denoising terms' sum exceeds L_inf by O(1/K);
    the library's discrete terms (beta_tilde: the KL is the mean's alone), on grids uniform in log-SNR, approach
    the closed-form integral from above, first order in 1/K."""
    process = ContinuousVP("cosine")
    den = GaussianDenoiser(process, MU, torch.diag(VAR))
    x0 = X0[:1].repeat(1024, 1)
    lam_hi, lam_lo = process.log_snr(torch.tensor([bound_t_min(process), 1.0], dtype=F64)).tolist()
    truth = float(diffusion_closed_form(lam_lo, lam_hi, X0[:1])[0])
    gaps = []
    for K in (10, 100, 1000):
        ts = process.t_from_log_snr(torch.linspace(lam_hi, lam_lo, K + 1, dtype=F64))  # increasing t, K steps
        v = vlb_terms(
            den, x0, variance="beta_tilde", decoder="gaussian", ts=ts, generator=torch.Generator().manual_seed(K)
        )
        total = v.terms.sum(1)
        gaps.append((float(total.mean()) - truth, float(total.std()) / math.sqrt(len(total))))
    (g10, _), (g100, se100), (g1000, se1000) = gaps
    assert g10 > g100 > g1000 > 0
    assert 5 < g100 / g1000 < 20  # first order: ten times the levels, a tenth of the gap
    assert g1000 < 0.02 * truth and se1000 < g1000 / 4


def test_the_learned_schedule_is_monotone_with_exact_ends_and_slope():
    process = perturbed_learned(1)
    t = torch.linspace(0, 1, 1001, dtype=F64)
    gamma = process.gamma_at(t).detach()
    assert (gamma.diff() > 0).all()
    assert float(gamma[0]) == pytest.approx(-10.0, abs=1e-9) and float(gamma[-1]) == pytest.approx(6.0, abs=1e-9)
    tt = t.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(process.log_snr(tt).sum(), tt)
    assert torch.allclose(process.log_snr_slope(t), auto, rtol=1e-9, atol=1e-9)
    assert torch.allclose(process.alpha(t) ** 2 + process.sigma(t) ** 2, torch.ones_like(t))
    assert torch.allclose(process.t_from_log_snr(-gamma[::50]), t[::50], atol=1e-9)


def test_the_schedule_interior_trains_on_the_variance_and_the_ends_on_the_bound():
    """VDM Sec. 5.3: d E[L^2] = E[2 L dL] for the interior parameters, the plain gradient of the bound for the end
    points: the loss's backward pass gives both at once."""
    torch.manual_seed(0)  # the schedule network's initialisation
    process = LearnedVP(gamma_min=-10.0, gamma_max=6.0, hidden=8, learn_endpoints=True)
    process.gamma.double()  # float64 parameters: float32 gradients would sum large cancelling parts to ~1e-4
    den = GaussianDenoiser(process, MU, torch.diag(VAR))
    x0 = X0.repeat(4, 1).double()
    t = torch.rand(len(x0), generator=torch.Generator().manual_seed(0), dtype=F64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    D = 2 * math.log(2)

    def grads(fn):
        process.gamma.zero_grad()
        torch.manual_seed(2)  # the decoder's noise
        fn().backward()
        return {n: p.grad.clone() for n, p in process.gamma.named_parameters()}

    loss = ContinuousVLBLoss(decoder="gaussian")
    got = grads(lambda: loss(den, x0, t=t, noise=noise))
    per_example = lambda: loss(den, x0, t=t, noise=noise, reduction="none")  # noqa: E731

    # the reference, outside the variance context: the same pieces without hooks
    from difflab.core.likelihood import continuous_decoder_nll, diffusion_term, log_snr_slope

    def parts():
        x_t = process.q_sample(x0, t, noise)  # the learned schedule's t_min is 0: the loss's t as drawn
        diff = diffusion_term(process, den(x_t, t).eps, noise, log_snr_slope(process, t), 1.0)
        rest = continuous_prior_kl(process, x0) + continuous_decoder_nll(
            process, x0, 0.0, torch.randn_like(x0), "gaussian"
        )
        return diff, rest

    interior = grads(lambda: ((parts()[0] / D) ** 2).mean())  # E[L^2], L the loss in bits/dim
    ends = grads(lambda: sum(parts()).mean() / D)
    assert torch.allclose(got["ends"], ends["ends"], rtol=1e-6)
    for name in ("l1.weight", "l1.bias", "l2.weight", "l2.bias", "l3.weight"):
        assert torch.allclose(got[name], interior[name], rtol=1e-6, atol=1e-12), name
    assert per_example().shape == (len(x0),)


@pytest.mark.parametrize("sampler", [ddim, euler, heun, dpmpp_2m], ids=lambda f: f.__name__)
def test_samplers_reproduce_the_data_on_a_learned_schedule(sampler):
    """Every deterministic sampler of a continuous process, on a learned (perturbed) schedule with the exact
    denoiser of Gaussian data, carries the prior to N(mu, Sigma)."""
    process = perturbed_learned(2)
    cov = torch.diag(VAR)
    den = GaussianDenoiser(process, MU, cov)
    x = process.prior_sample((20000, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    with torch.no_grad():
        out = sampler(den, x, timesteps(process, 100))
    assert torch.allclose(out.mean(0), MU, atol=0.02)
    assert torch.allclose(torch.cov(out.T), cov, atol=0.02)


def learned_variance_denoiser(var_frac: float | None = None):
    net = MLP(MLPConfig(dim=2, hidden=16, depth=1, time_dim=8, out_dim=4))
    return Denoiser(net, DiscreteDDPM(100, "cosine"), target="v", learned_variance=True)


def test_learned_variance_interpolates_beta_tilde_and_beta():
    process = DiscreteDDPM(100, "cosine")
    t, s = torch.tensor([50.0], dtype=F64), torch.tensor([49.0], dtype=F64)
    x = torch.randn(1, 2, dtype=F64)
    noise = torch.randn(1, 2, dtype=F64)
    a, sg = process.alpha(t), process.sigma(t)
    step = {}
    for name, frac in (("beta_tilde", 0.0), ("beta", 1.0)):
        pred = Prediction(x, a, sg, "x0", torch.zeros_like(x), var_frac=torch.full_like(x, frac))
        step[name] = ddpm_step(process, pred, t, s, "learned", noise)
        assert torch.allclose(step[name], ddpm_step(process, pred, t, s, name, noise))
    half = torch.full((1, 2), 0.5, dtype=F64)
    log_var = reverse_log_variance(process, t, s, "learned", half)
    lb, lt = torch.log(transition_variance(process, t, s)), torch.log(posterior_coefficients(process, t, s)[2])
    assert torch.allclose(log_var, (0.5 * (lb + lt)).expand(1, 2))
    with pytest.raises(ValueError, match="predicts its variance"):
        reverse_log_variance(process, t, s, "learned", None)


def test_the_hybrid_loss_trains_the_mean_on_l_simple_and_the_variance_on_the_bound():
    den = learned_variance_denoiser()
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    t = torch.randint(1, 101, (64,), generator=torch.Generator().manual_seed(1)).to(F64)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))
    simple = SimpleLoss(target="v", objective="hybrid")
    out = {}
    for name, loss in (("hybrid", HybridLoss(simple, decoder="gaussian")), ("simple", simple)):
        captured = {}
        hook = den.net.out.register_forward_hook(lambda m, i, o, captured=captured: captured.setdefault("out", o))
        value = loss(den, x0, t=t, noise=noise)
        hook.remove()
        (g,) = torch.autograd.grad(value, captured["out"])
        out[name] = g
    assert torch.allclose(out["hybrid"][:, :2], out["simple"][:, :2], atol=1e-7)  # the mean: L_simple alone
    assert out["simple"][:, 2:].abs().max() == 0 and out["hybrid"][:, 2:].abs().max() > 0  # the variance: L_vlb


def test_ancestral_sampling_uses_the_learned_variance():
    den = learned_variance_denoiser()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    ts = timesteps(den.process, 10)
    with torch.no_grad():
        default = ddpm(den, x, ts, generator=torch.Generator().manual_seed(1))
        learned = ddpm(den, x, ts, variance="learned", generator=torch.Generator().manual_seed(1))
        fixed = ddpm(den, x, ts, variance="beta", generator=torch.Generator().manual_seed(1))
    assert torch.equal(default, learned) and not torch.allclose(learned, fixed)


def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip()


@pytest.mark.parametrize(
    "flags",
    [["--variance", "learned"], ["--process", "vp", "--schedule", "learned"]],
    ids=["learned-variance", "learned-schedule"],
)
def test_a_run_trains_resumes_exactly_samples_and_evaluates(tmp_path, capsys, flags):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    base = ["train", "swissroll", "--n", "500", "--batch-size", "32", "--quiet", *flags]
    assert run_cli(capsys, *base, "--out", straight, "--steps", "8")[0] == 0
    assert run_cli(capsys, *base, "--out", broken, "--steps", "4")[0] == 0
    assert run_cli(capsys, "train", "--out", broken, "--resume", "--steps", "8", "--quiet")[0] == 0
    a, b = load_weights(straight, "net"), load_weights(broken, "net")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((straight / "config.json").read_text())
    run = DiffusionRun.load(straight)
    if "--variance" in flags:
        assert cfg["variance"] == "learned" and cfg["loss"]["objective"] == "hybrid" and run.denoiser.learned_variance
        assert cfg["net"]["out_dim"] == 4
    else:
        assert cfg["process"]["kind"] == "learned" and any(k.startswith("schedule.") for k in a)
        ema = load_weights(straight, "ema")  # the run loads its EMA weights, and its process reads their schedule
        assert torch.equal(run.process.gamma.l2.weight, ema["schedule.l2.weight"])
    for sampler in ("ddpm", "ddim", "dpmpp-2m"):
        x = run.sample(16, sampler=sampler, steps=5, seed=0, progress=False)
        assert torch.isfinite(x).all() and torch.equal(
            x, run.sample(16, sampler=sampler, steps=5, seed=0, progress=False)
        )
    code, out, _ = run_cli(
        capsys,
        "eval",
        straight,
        "-n",
        "20",
        "--steps",
        "3",
        "--bpd",
        "ode",
        "--bpd-n",
        "8",
        "--rtol",
        "1e-3",
        "--quiet",
    )
    assert code == 0 and "ODE bits/dim of 8 fresh points" in out and "exact divergence" in out


@pytest.mark.parametrize("ends", ["learned", "fixed"])
def test_the_schedule_ends_train_or_stay(tmp_path, capsys, ends):
    out = tmp_path / ends
    argv = ["train", "swissroll", "--n", "200", "--batch-size", "32", "--steps", "3", "--quiet", "--out", out]
    assert run_cli(capsys, *argv, "--process", "vp", "--schedule", "learned", "--schedule-ends", ends)[0] == 0
    got = load_weights(out, "net")["schedule.ends"]
    assert torch.equal(got, LearnedVP().gamma.ends) == (ends == "fixed")  # learned ends take the bound's gradient


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--variance", "learned", "--process", "vp"], "variance"),
        (["--objective", "hybrid"], "hybrid"),
        (["--objective", "vlb"], "vlb"),
        (["--schedule", "learned", "--process", "ddpm"], "--schedule learned"),
        (["--schedule", "learned", "--process", "vp", "--objective", "simple"], "vlb"),
        (["--schedule-ends", "fixed"], "--schedule-ends"),
    ],
)
def test_contradicting_likelihood_options_are_refused_in_one_line(tmp_path, capsys, flags, needle):
    code, _, err = run_cli(capsys, "train", "swissroll", "--out", tmp_path / "r", "--steps", "2", "--quiet", *flags)
    assert code == 2 and needle in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()
