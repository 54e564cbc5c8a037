"""Samplers against closed-form truth: Gaussian data, where E[x_0 | x_t] is exact (analytic.GaussianDenoiser).

With x_0 ~ N(mu, Sigma) and the exact denoiser, every sampler must return N(mu, Sigma), and the
probability-flow ODE has a closed-form solution (in y = x / alpha, sigma_tilde = sigma / alpha):
    y(st) - mu = (Sigma + st^2 I)^{1/2} (Sigma + st_T^2 I)^{-1/2} (y_T - mu),
which the ODE solvers (DDIM eta=0, Euler, Heun, DPM-Solver++) must converge to.
"""

import pytest
import torch

from difflab.core.analytic import GaussianDenoiser
from difflab.core.parameterize import Prediction
from difflab.core.processes import ContinuousVP, DiscreteDDPM, VarianceExploding
from difflab.sampling.samplers import (
    DEFAULT_SIGMA_CAP,
    SAMPLERS,
    SPACINGS,
    Trajectory,
    ddim,
    ddim_invert,
    ddim_step,
    ddpm_step,
    default_spacing,
    dpmpp_2m_step,
    euler,
    get_sampler,
    heun,
    sample,
    timesteps,
)

F64 = torch.float64
MU = torch.tensor([1.0, -0.5], dtype=F64)
COV = torch.tensor([[0.5, 0.3], [0.3, 0.4]], dtype=F64)
N_SAMPLES = 4000
# sample-moment tolerance: the standard error of the mean is ~0.014, of a covariance entry ~0.011, so 0.06 is
# about 5 standard errors, while a 10% error in x0 (0.1 in the mean, 0.1 in Sigma_11) or a sign error is far out
TOL = 0.06

PROCESSES = {
    "ddpm-linear": DiscreteDDPM(1000, "linear"),
    "ddpm-cosine": DiscreteDDPM(1000, "cosine"),
    "vp-cosine": ContinuousVP("cosine"),
    "vp-linear": ContinuousVP("linear"),
    "ve": VarianceExploding(sigma_min=0.01, sigma_max=20.0),
}


def marginal(process, t, n, generator):
    """Exact draws from q(x_t) = N(alpha mu, alpha^2 Sigma + sigma^2 I) (so only the sampler is under test)."""
    t = torch.as_tensor(float(t), dtype=F64)
    a, s = process.alpha(t), process.sigma(t)
    chol = torch.linalg.cholesky(a**2 * COV + s**2 * torch.eye(2, dtype=F64))
    return (a * MU + torch.randn(n, 2, generator=generator, dtype=F64) @ chol.T).float()


def moment_errors(x):
    """(max |mean - mu|, max |cov - Sigma|) of samples x (n, 2); nan if the sampler diverged."""
    x = x.to(F64)
    return float((x.mean(0) - MU).abs().max()), float((torch.cov(x.T) - COV).abs().max())


def moments_ok(x) -> bool:
    mean_err, cov_err = moment_errors(x)
    return mean_err < TOL and cov_err < TOL


def sqrtm(a):
    w, v = torch.linalg.eigh(a)
    return v @ torch.diag(w.sqrt()) @ v.T


def exact_flow(process, x_t, t):
    """The probability-flow ODE solution from (x_t, t) to t = 0 for Gaussian data (closed form)."""
    t = torch.as_tensor(float(t), dtype=F64)
    a, st = process.alpha(t), process.sigma(t) / process.alpha(t)
    m = sqrtm(COV) @ torch.linalg.inv(sqrtm(COV + st**2 * torch.eye(2, dtype=F64)))
    return MU + (x_t.to(F64) / a - MU) @ m.T


class ScaledX0(torch.nn.Module):
    """A wrong denoiser: the exact x0 scaled by 1.1."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.process = inner, inner.process

    def forward(self, x_t, t, **cond):
        p = self.inner(x_t, t, **cond)
        return Prediction(p.x_t, p.alpha, p.sigma, "x0", 1.1 * p.x0)


class FlippedEps(ScaledX0):
    """A wrong denoiser: the exact eps with its sign flipped."""

    def forward(self, x_t, t, **cond):
        p = self.inner(x_t, t, **cond)
        return Prediction(p.x_t, p.alpha, p.sigma, "eps", -p.eps)


# (sampler, steps, spacing (None: the sampler's default), options): enough steps that the discretization bias
# of the covariance (computed exactly in test_exact_output_law_*) stays below 0.025, well inside TOL
CASES = {
    "ddpm-beta": ("ddpm", 200, None, {"variance": "beta"}),
    "ddpm-beta_tilde": ("ddpm", 200, None, {"variance": "beta_tilde"}),
    "ddim-eta0": ("ddim", 200, None, {}),
    "ddim-eta1": ("ddim", 200, None, {"eta": 1.0}),
    "euler": ("euler", 200, "logsnr", {}),
    "heun": ("heun", 80, None, {}),
    "dpmpp-2m": ("dpmpp-2m", 40, None, {}),
    "langevin": ("langevin", 20, None, {"n_steps_each": 30, "step_lr": 1e-4}),
    "pc": ("pc", 100, None, {"snr": 0.16}),
}
VE_ONLY = ("langevin", "pc")
DETERMINISTIC = ("ddim-eta0", "euler", "heun", "dpmpp-2m")


def grid(case, process):
    name, steps, spacing, _ = CASES[case]
    return timesteps(process, steps, spacing or default_spacing(name, process))


def run_case(case, process, denoiser=None, seed=0):
    name, _, _, options = CASES[case]
    denoiser = denoiser or GaussianDenoiser(process, MU, COV)
    ts = grid(case, process)
    g = torch.Generator().manual_seed(seed)
    x = marginal(process, ts[0], N_SAMPLES, g)
    return get_sampler(name)(denoiser, x, ts, generator=g, **options)


def applies(case, proc):
    return (CASES[case][0] in VE_ONLY) == (proc == "ve") or CASES[case][0] not in VE_ONLY


MATRIX = [(c, p) for c in CASES for p in PROCESSES if applies(c, p)]


@pytest.mark.parametrize("case,proc", MATRIX)
def test_gaussian_data_law_is_reproduced(case, proc):
    out = run_case(case, PROCESSES[proc])
    mean_err, cov_err = moment_errors(out)
    assert mean_err < TOL and cov_err < TOL, (mean_err, cov_err)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("wrong", [ScaledX0, FlippedEps])
def test_the_moment_check_catches_a_wrong_denoiser(case, wrong):
    process = PROCESSES["ve" if CASES[case][0] in VE_ONLY else "ddpm-linear"]
    out = run_case(case, process, wrong(GaussianDenoiser(process, MU, COV)))
    assert not moments_ok(out), moment_errors(out)


# --------------------------------------------------------------------------- exact output laws
# With the exact Gaussian denoiser every step is affine in x_t plus independent Gaussian noise, so the law of
# the output is Gaussian and can be propagated exactly: no sampling error, only the discretization bias.

I2 = torch.eye(2, dtype=F64)
PROBES = torch.stack([torch.zeros(2, dtype=F64), I2[0], I2[1]])  # (3, 2): the origin and the unit vectors


def start_law(process, t):
    a, s = process.alpha(t), process.sigma(t)
    return a * MU, a**2 * COV + s**2 * I2


def law_errors(m, c):
    return float((m - MU).abs().max()), float((c - COV).abs().max())


def deterministic_law(sampler, denoiser, ts, **options):
    """Push N(m, C) at ts[0] through the (affine) deterministic sampler: read the map off three probe points."""
    out = sampler(denoiser, PROBES, ts, **options)  # (3, 2)
    b, A = out[0], (out[1:] - out[0]).T
    m, c = start_law(denoiser.process, ts[0])
    return A @ m + b, A @ c @ A.T


def stochastic_law(step, denoiser, ts):
    """Push N(m, C) through x_s = step(pred(x_t), t, s, noise): A x_t + b + std * noise, one step at a time."""
    m, c = start_law(denoiser.process, ts[0])
    for t, s in zip(ts[:-1], ts[1:]):
        pred = denoiser(PROBES, t.expand(3))
        mean = step(pred, t, s, None)
        b, A = mean[0], (mean[1:] - mean[0]).T
        std = (step(pred, t, s, torch.ones(3, 2, dtype=F64)) - mean)[0, 0]
        m, c = A @ m + b, A @ c @ A.T + std**2 * I2
    return m, c


STEP_FNS = {
    "ddpm-beta": lambda p: lambda pred, t, s, z: ddpm_step(p, pred, t, s, "beta", z),
    "ddpm-beta_tilde": lambda p: lambda pred, t, s, z: ddpm_step(p, pred, t, s, "beta_tilde", z),
    "ddim-eta1": lambda p: lambda pred, t, s, z: ddim_step(p, pred, t, s, 1.0, z),
}


@pytest.mark.parametrize("case", DETERMINISTIC + tuple(STEP_FNS))
@pytest.mark.parametrize("proc", list(PROCESSES))
def test_exact_output_law(case, proc):
    process = PROCESSES[proc]
    ts = grid(case, process)
    name, _, _, options = CASES[case]

    def law(D):
        if case in DETERMINISTIC:
            return deterministic_law(get_sampler(name), D, ts, **options)
        return stochastic_law(STEP_FNS[case](process), D, ts)

    exact = GaussianDenoiser(process, MU, COV)
    mean_err, cov_err = law_errors(*law(exact))
    assert mean_err < 1e-6 and cov_err < 0.026, (mean_err, cov_err)  # the mean is a fixed point of every step
    if proc not in ("ddpm-linear", "ve"):
        return  # (the wrong denoisers are checked on one VP and the VE process)
    for wrong in (ScaledX0(exact), FlippedEps(exact)):
        mean_err, cov_err = law_errors(*law(wrong))
        assert not (mean_err < 0.05 and cov_err < 0.05), (wrong, mean_err, cov_err)


def test_ddim_eta1_has_the_law_of_ddpm_with_posterior_variance():
    """DDIM with eta = 1 is DDPM with beta_tilde (Song et al. 2021a, Sec. 4.1): the same exact law on any grid."""
    process = PROCESSES["vp-cosine"]
    D = GaussianDenoiser(process, MU, COV)
    ts = timesteps(process, 15, "karras")
    m1, c1 = stochastic_law(STEP_FNS["ddim-eta1"](process), D, ts)
    m2, c2 = stochastic_law(STEP_FNS["ddpm-beta_tilde"](process), D, ts)
    torch.testing.assert_close((m1, c1), (m2, c2))
    assert law_errors(m1, c1)[1] > 0.1  # 15 steps: a visible bias, so the equality is not trivial


# --------------------------------------------------------------------------- ODE samplers


@pytest.mark.parametrize("proc", list(PROCESSES))
def test_ddim_eta0_is_deterministic_and_equals_euler(proc):
    process = PROCESSES[proc]
    D = GaussianDenoiser(process, MU, COV)
    ts = timesteps(process, 20, "karras")
    x = marginal(process, ts[0], 500, torch.Generator().manual_seed(1))
    a = ddim(D, x, ts, generator=torch.Generator().manual_seed(0))
    b = ddim(D, x, ts, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, b)
    torch.testing.assert_close(euler(D, x, ts), a, rtol=1e-5, atol=1e-5)
    # and DDIM with eta > 0 does use the generator
    c = ddim(D, x, ts, eta=0.5, generator=torch.Generator().manual_seed(0))
    d = ddim(D, x, ts, eta=0.5, generator=torch.Generator().manual_seed(123))
    assert (c - d).abs().max() > 0.1


@pytest.mark.parametrize("proc", ["ddpm-linear", "vp-cosine", "ve"])
def test_ddim_inversion_round_trip(proc):
    process = PROCESSES[proc]
    D = GaussianDenoiser(process, MU, COV)
    x0 = marginal(process, 0.0, 500, torch.Generator().manual_seed(2)).double()

    def round_trip(n, iters):
        # uncapped: the capped grid's one step from sigma_tilde 80 to t_max is too long for the fixed point to contract
        ts = timesteps(process, n, "logsnr", sigma_tilde_cap=None)
        return float((ddim(D, ddim_invert(D, x0, ts, fixed_point_iters=iters), ts) - x0).abs().max())

    # plain inversion (eps_hat read at the start of each step) is a first-order approximation of the inverse
    plain_50, plain_200 = round_trip(50, 0), round_trip(200, 0)
    assert plain_50 < 0.35 and plain_200 < plain_50 / 3
    # fixed-point refinement solves each decoding step for its input: encode-then-decode is exact
    assert round_trip(50, 12) < 1e-6
    # the increasing grid through ddim() is the same encoder, and the codes follow q(x_T)
    ts = timesteps(process, 50, "logsnr")
    x_T = ddim_invert(D, x0, ts)
    torch.testing.assert_close(ddim(D, x0, ts.flip(0)), x_T)
    a, s = process.alpha(ts[0]), process.sigma(ts[0])
    assert torch.allclose(x_T.mean(0), a * MU, atol=0.15 * float(s))
    assert torch.allclose(x_T.std(0), s.expand(2).to(F64), rtol=0.15)


@pytest.mark.parametrize("proc", ["ve", "ddpm-linear"])
def test_heun_beats_euler_at_equal_evaluations(proc):
    process = PROCESSES[proc]
    D = GaussianDenoiser(process, MU, COV)
    g = torch.Generator().manual_seed(3)
    ts_heun, ts_euler = timesteps(process, 40, "karras"), timesteps(process, 79, "karras")  # 79 evaluations each
    x = marginal(process, ts_heun[0], 1000, g).double()
    truth = exact_flow(process, x, ts_heun[0])
    err_heun = float((heun(D, x, ts_heun) - truth).pow(2).mean().sqrt())
    err_euler = float((euler(D, x, ts_euler) - truth).pow(2).mean().sqrt())
    assert err_heun < 0.3 * err_euler, (err_heun, err_euler)
    # and Heun converges to the closed-form flow
    assert float((heun(D, x, timesteps(process, 200, "karras")) - truth).abs().max()) < 2e-3


def test_heun_evaluation_count_and_dpmpp_first_and_last_steps():
    process = PROCESSES["ve"]
    D = GaussianDenoiser(process, MU, COV)
    calls = []

    def counting(x_t, t, **cond):
        calls.append(float(t[0]))
        return D(x_t, t, **cond)

    counting.process = process
    ts = timesteps(process, 10, "karras")
    x = marginal(process, ts[0], 8, torch.Generator().manual_seed(0))
    heun(counting, x, ts)
    assert len(calls) == 2 * 10 - 1 and 0.0 not in calls
    # DPM-Solver++: the first-order step is DDIM (eta = 0), and the step into sigma = 0 returns x0_hat
    pred = D(x, ts[0].expand(8))
    torch.testing.assert_close(dpmpp_2m_step(process, pred, ts[0], ts[1]), ddim_step(process, pred, ts[0], ts[1]))
    assert torch.equal(dpmpp_2m_step(process, pred, ts[0], torch.tensor(0.0, dtype=F64), ts[1], x), pred.x0)


# --------------------------------------------------------------------------- DDPM step variances


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddpm_step_variances_are_beta_and_beta_tilde(schedule):
    process = DiscreteDDPM(1000, schedule)
    D = GaussianDenoiser(process, MU, COV)
    x = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    z = torch.randn(4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    abar = process.log_abar.exp()
    for t in (1000, 500, 2):
        pred = D(x, torch.full((4,), float(t), dtype=F64))
        mean = ddpm_step(process, pred, t, t - 1)
        beta = 1 - abar[t] / abar[t - 1]
        beta_tilde = (1 - abar[t - 1]) / (1 - abar[t]) * beta
        torch.testing.assert_close(ddpm_step(process, pred, t, t - 1, "beta", z) - mean, beta.sqrt() * z)
        torch.testing.assert_close(ddpm_step(process, pred, t, t - 1, "beta_tilde", z) - mean, beta_tilde.sqrt() * z)
        # Ho et al. eq. 7: mu_tilde = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0
        #                            + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
        c_x0 = abar[t - 1].sqrt() * beta / (1 - abar[t])
        c_xt = (1 - beta).sqrt() * (1 - abar[t - 1]) / (1 - abar[t])
        mu_tilde = c_x0 * pred.x0 + c_xt * x
        torch.testing.assert_close(mean, mu_tilde)
    # no noise on the final step into t = 0
    pred = D(x, torch.full((4,), 1.0, dtype=F64))
    assert torch.equal(ddpm_step(process, pred, 1, 0, "beta", z), ddpm_step(process, pred, 1, 0))


# --------------------------------------------------------------------------- spacings


@pytest.mark.parametrize("proc", list(PROCESSES))
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [1, 7, 50])
def test_spacings_are_decreasing_grids_from_t_max_to_zero(proc, spacing, n):
    process = PROCESSES[proc]
    if spacing in ("leading", "trailing") and proc.startswith(("vp", "ve")):
        with pytest.raises(ValueError, match="DiscreteDDPM only"):
            timesteps(process, n, spacing)
        return
    ts = timesteps(process, n, spacing)
    assert ts.dtype == F64 and ts.shape == (n + 1,)
    assert bool((ts[1:] < ts[:-1]).all()) and ts[-1] == 0
    first = (1000 // n) * (n - 1) + 1 if spacing == "leading" else process.t_max
    assert float(ts[0]) == first
    if spacing in ("uniform", "leading", "trailing") and proc.startswith("ddpm"):
        assert torch.equal(ts, ts.round())
    body = ts[:-1]
    capped = (
        n > 1
        and spacing in ("karras", "logsnr")
        and process.variance_preserving
        and float(process.sigma(ts[0]) / process.alpha(ts[0])) > DEFAULT_SIGMA_CAP
    )
    if capped:  # the default cap: the second level sits at sigma_tilde = 80 and the spread starts there
        assert float(process.sigma(ts[1]) / process.alpha(ts[1])) == pytest.approx(DEFAULT_SIGMA_CAP, rel=1e-6)
        body = ts[1:-1]
    if spacing == "karras" and len(body) > 1:  # Karras eq. 5 in sigma_tilde: st^(1/rho) is linear in the index
        root = (process.sigma(body) / process.alpha(body)) ** (1 / 7)
        torch.testing.assert_close(root, torch.linspace(float(root[0]), float(root[-1]), len(body), dtype=F64))
    if spacing == "logsnr" and len(body) > 1:  # uniform in log-SNR
        lam = process.log_snr(body)
        torch.testing.assert_close(lam, torch.linspace(float(lam[0]), float(lam[-1]), len(body), dtype=F64))


def test_known_grids():
    ddpm = DiscreteDDPM(1000, "linear")
    assert timesteps(ddpm, 4, "uniform").tolist() == [1000, 750, 500, 250, 0]
    assert timesteps(ddpm, 4, "leading").tolist() == [751, 501, 251, 1, 0]
    assert timesteps(ddpm, 3, "trailing").tolist() == [1000, 667, 333, 0]
    assert timesteps(ddpm, 1000, "uniform").tolist() == list(range(1000, -1, -1))
    ve = VarianceExploding(sigma_min=0.01, sigma_max=100.0)
    torch.testing.assert_close(timesteps(ve, 3, "logsnr"), torch.tensor([100.0, 1.0, 0.01, 0.0], dtype=F64))
    assert timesteps(ve, 3, "karras", t_min=1.0)[-2] == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n": 10, "spacing": "cosine"}, "unknown spacing 'cosine'; choose one of: uniform, leading"),
        ({"n": 0}, "positive integer, got 0"),
        ({"n": -3, "spacing": "karras"}, "positive integer, got -3"),
        ({"n": 2.5}, "positive integer"),
        ({"n": 1001}, "1001 steps exceed the T=1000"),
        ({"n": 1001, "spacing": "leading"}, "exceed"),
        ({"n": 10, "spacing": "karras", "t_min": 0.0}, "t_min must lie in"),
    ],
)
def test_spacing_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timesteps(DiscreteDDPM(1000, "linear"), **kwargs)


def test_fractional_grids_above_T_steps_are_allowed():
    ts = timesteps(DiscreteDDPM(1000, "linear"), 2000, "logsnr")
    assert len(ts) == 2001 and ts[0] == 1000 and ts[-2] == 1


# --------------------------------------------------------------------------- errors and plumbing


def test_sampler_errors():
    with pytest.raises(ValueError, match="unknown sampler 'foo'; choose one of: ddpm, ddim, euler"):
        get_sampler("foo")
    process = PROCESSES["vp-cosine"]
    D = GaussianDenoiser(process, MU, COV)
    ts = timesteps(process, 5)
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="eta must lie in"):
        ddim(D, x, ts, eta=1.5)
    with pytest.raises(ValueError, match="unknown DDPM variance 'large'"):
        get_sampler("ddpm")(D, x, ts, variance="large")
    for name in ("langevin", "pc"):
        with pytest.raises(ValueError, match="needs a VarianceExploding process"):
            get_sampler(name)(D, x, ts)
    ve = PROCESSES["ve"]  # sigma_L = 0.01: steps of 4 sigma_L^2 or more diverge at the top levels
    with pytest.raises(ValueError, match="step_lr < 4 sigma_L"):
        get_sampler("langevin")(GaussianDenoiser(ve, MU, COV), x, timesteps(ve, 5, "logsnr"), step_lr=4e-4)
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler(D, x, ts.flip(0))
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(D, x, ts.flip(0), eta=0.5)  # inversion only with eta = 0


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_trajectory_shapes_callback_and_cond(name):
    process = PROCESSES["ve"]
    seen_cond = []

    class Conditioned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.process = GaussianDenoiser(process, MU, COV), process

        def forward(self, x_t, t, label=None):
            seen_cond.append(label)
            return self.inner(x_t, t)

    n, shape = 6, (5, 2)
    options = {"n_steps_each": 2} if name == "langevin" else {}
    steps_seen = []
    out, traj = sample(
        Conditioned(),
        shape,
        n,
        sampler=name,
        generator=torch.Generator().manual_seed(0),
        cond={"label": 7},
        return_trajectory=True,
        callback=lambda i, t, x, pred: steps_seen.append((i, float(t))),
        **options,
    )
    assert isinstance(traj, Trajectory)
    assert traj.t.shape == (n + 1,) and traj.x_t.shape == (n + 1, *shape) and traj.x0.shape == (n, *shape)
    assert traj.t[-1] == 0 and bool((traj.t[1:] < traj.t[:-1]).all())
    assert torch.equal(traj.x_t[-1], out)
    assert [i for i, _ in steps_seen] == list(range(n)) and [t for _, t in steps_seen] == traj.t[:-1].tolist()
    assert set(seen_cond) == {7}
    # x0[i] is the prediction at (x_t[i], t[i])
    D = GaussianDenoiser(process, MU, COV)
    torch.testing.assert_close(traj.x0[2], D(traj.x_t[2], traj.t[2].expand(5)).x0)


def test_sample_end_to_end_from_the_prior():
    process = PROCESSES["ddpm-linear"]
    D = GaussianDenoiser(process, MU, COV)
    a = sample(D, (N_SAMPLES, 2), 30, sampler="dpmpp-2m", generator=torch.Generator().manual_seed(5))
    b = sample(D, (N_SAMPLES, 2), 30, sampler="dpmpp-2m", generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert moments_ok(a), moment_errors(a)


def test_sigma_tilde_cap_spreads_a_short_grid_below_the_cap():
    """Cosine DDPM has sigma/alpha = 2e4 at t = T; with the cap, every level after the first lies at or below 80."""
    process = DiscreteDDPM(1000, "cosine")
    for spacing in ("karras", "logsnr"):
        plain = timesteps(process, 10, spacing, sigma_tilde_cap=None)
        capped = timesteps(process, 10, spacing, sigma_tilde_cap=80.0)
        assert torch.equal(capped, timesteps(process, 10, spacing))  # the cap is the default
        assert len(capped) == 11 and capped[0] == 1000 and capped[-1] == 0 and bool((capped[1:] < capped[:-1]).all())
        st = process.sigma(capped[1:-1]) / process.alpha(capped[1:-1])
        assert float(st[0]) == pytest.approx(80.0, rel=1e-6) and bool((st <= 80.0 + 1e-6).all())
        assert int((plain > 980).sum()) > int((capped > 980).sum())  # fewer levels wasted at the top
    # a process already below the cap is unchanged
    ve = VarianceExploding(sigma_min=0.01, sigma_max=50.0)
    torch.testing.assert_close(timesteps(ve, 5, "karras", sigma_tilde_cap=80.0), timesteps(ve, 5, "karras"))
