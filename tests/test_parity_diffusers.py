"""Our single steps and grids against diffusers' schedulers, given identical model outputs and noise.

Index map: our integer t = diffusers' timestep + 1, and diffusers' "previous timestep -1" is our t = 0.
Prediction types: epsilon -> "eps", sample -> "x0", v_prediction -> "v".

diffusers keeps alphas_cumprod in float32 (a cumulative product over 1000 float32 factors, relative drift up to
~1e-5 at the noisy end of the cosine schedule). The schedules are compared at that precision; the step tests
then load our float64 alphas_cumprod into the schedulers, so that they compare the update rules alone, to 1e-5
or better (DPMSolverMultistepScheduler rounds the sample to float32 inside `step`: ~1e-7 relative).
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler  # noqa: E402

from difflab.core.parameterize import make_prediction  # noqa: E402
from difflab.core.processes import DiscreteDDPM  # noqa: E402
from difflab.sampling.samplers import ddim_step, ddpm_step, dpmpp_2m_step, timesteps  # noqa: E402

# diffusers' own np.array(tensor) call under numpy 2, not ours
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

F64 = torch.float64
T = 1000
SCHEDULES = {"linear": "linear", "squaredcos_cap_v2": "cosine"}  # diffusers name -> ours
TARGETS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
SHAPE = (2, 3, 4, 4)


def abar(process):
    """Our alphas_cumprod in diffusers' indexing: abar at our t = 1..T, float64."""
    return process.log_abar[1:].exp()


def ours_t(t_d) -> torch.Tensor:
    """diffusers timestep (int, -1 for 'the data') -> our time."""
    return torch.tensor(float(t_d) + 1, dtype=F64)


def randn(g, n=1):
    return [torch.randn(SHAPE, generator=g, dtype=F64) for _ in range(n)]


def prediction(process, x, t, prediction_type, model_output):
    return make_prediction(process, x, t, TARGETS[prediction_type], model_output)


# --------------------------------------------------------------------------- schedules and grids


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_beta_schedules_match(name):
    process = DiscreteDDPM(T, SCHEDULES[name])
    theirs = DDPMScheduler(num_train_timesteps=T, beta_schedule=name)
    torch.testing.assert_close(process.betas, theirs.betas.to(F64), rtol=1e-6, atol=1e-9)  # float32 rounding
    torch.testing.assert_close(abar(process), theirs.alphas_cumprod.to(F64), rtol=2e-5, atol=0)  # float32 cumprod


@pytest.mark.parametrize("n", [1, 3, 7, 10, 20, 50, 100, 250, 999, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_integer_grids_match_set_timesteps(spacing, n):
    process = DiscreteDDPM(T, "linear")
    ours = timesteps(process, n, spacing)
    for cls in (DDPMScheduler, DDIMScheduler):
        s = cls(num_train_timesteps=T, timestep_spacing=spacing)
        s.set_timesteps(n)
        theirs = torch.cat([s.timesteps.to(F64) + 1, torch.zeros(1, dtype=F64)])
        assert torch.equal(ours, theirs), (cls.__name__, ours, theirs)
    if spacing == "trailing":  # our 'uniform' is the same grid as diffusers' 'trailing' on DiscreteDDPM
        assert torch.equal(timesteps(process, n, "uniform"), ours)
        s = DPMSolverMultistepScheduler(num_train_timesteps=T, timestep_spacing="trailing")
        s.set_timesteps(n)
        assert torch.equal(ours[:-1], s.timesteps.to(F64) + 1)


def test_diffusers_linspace_is_a_different_grid():
    """diffusers' 'linspace' puts n points on [0, T-1] and ends on timestep 0 (our t = 1); ours spans [T, 0]."""
    s = DDIMScheduler(num_train_timesteps=T, timestep_spacing="linspace")
    s.set_timesteps(4)
    assert (s.timesteps + 1).tolist() == [1000, 667, 334, 1]
    assert timesteps(DiscreteDDPM(T, "linear"), 4, "uniform").tolist() == [1000, 750, 500, 250, 0]


# --------------------------------------------------------------------------- DDPM


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("prediction_type", list(TARGETS))
@pytest.mark.parametrize("variance_type,variance", [("fixed_large", "beta"), ("fixed_small", "beta_tilde")])
def test_ddpm_step_matches(name, prediction_type, variance_type, variance, monkeypatch):
    process = DiscreteDDPM(T, SCHEDULES[name])
    s = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=name,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample=False,
    )
    s.alphas_cumprod = abar(process)
    g = torch.Generator().manual_seed(0)
    noise = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: noise["z"].clone())
    # the full chain near both ends, and a 25-step 'leading' subsequence (any subsequence of steps)
    pairs = [(t_d, t_d - 1) for t_d in (999, 998, 500, 2, 1, 0)]
    s_sub = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=name,
        prediction_type=prediction_type,
        variance_type=variance_type,
        clip_sample=False,
    )
    s_sub.alphas_cumprod = abar(process)
    s_sub.set_timesteps(25)
    for sched, t_list in ((s, pairs), (s_sub, [(int(t), int(s_sub.previous_timestep(t))) for t in s_sub.timesteps])):
        for t_d, prev_d in t_list:
            x, m, z = randn(g, 3)
            t, t_prev = ours_t(t_d), ours_t(prev_d)
            pred = prediction(process, x, t, prediction_type, m)
            noise["z"] = torch.zeros_like(z)  # deterministic part: the posterior mean
            theirs = sched.step(m, t_d, x).prev_sample
            torch.testing.assert_close(ddpm_step(process, pred, t, t_prev, variance), theirs, rtol=1e-5, atol=1e-5)
            noise["z"] = z  # with noise: mean + std z
            theirs = sched.step(m, t_d, x).prev_sample
            torch.testing.assert_close(ddpm_step(process, pred, t, t_prev, variance, z), theirs, rtol=1e-5, atol=1e-5)


def test_diffusers_fixed_large_adds_noise_on_a_final_step_from_t_above_1(monkeypatch):
    """A difference, pinned: with 'trailing' the last step leaves diffusers timestep 19 for 'the data'. diffusers
    (fixed_large) still adds noise of variance 1 - abar_19 there (it skips noise only when timestep == 0); our
    ancestral step into t = 0 is always noise-free, as in Ho et al. (the final x_0 is the mean)."""
    process = DiscreteDDPM(T, "linear")
    s = DDPMScheduler(
        num_train_timesteps=T, variance_type="fixed_large", clip_sample=False, timestep_spacing="trailing"
    )
    s.alphas_cumprod = abar(process)
    s.set_timesteps(50)
    t_d = int(s.timesteps[-1])
    assert t_d == 19 and int(s.previous_timestep(t_d)) == -1
    x, m, z = randn(torch.Generator().manual_seed(1), 3)
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: z.clone())
    theirs = s.step(m, t_d, x).prev_sample
    pred = prediction(process, x, ours_t(t_d), "epsilon", m)
    ours = ddpm_step(process, pred, ours_t(t_d), 0.0, "beta", z)
    assert torch.equal(ours, ddpm_step(process, pred, ours_t(t_d), 0.0, "beta"))  # noise-free
    torch.testing.assert_close(theirs - ours, (1 - abar(process)[t_d]).sqrt() * z)


# --------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("prediction_type", list(TARGETS))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches(name, prediction_type, eta, spacing):
    process = DiscreteDDPM(T, SCHEDULES[name])
    n = 20
    s = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule=name,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=spacing,
    )
    s.alphas_cumprod, s.final_alpha_cumprod = abar(process), torch.tensor(1.0, dtype=F64)
    s.set_timesteps(n)
    ts = timesteps(process, n, spacing)
    assert torch.equal(ts[:-1], s.timesteps.to(F64) + 1)
    g = torch.Generator().manual_seed(0)
    for i, t_d in enumerate(s.timesteps):
        x, m, z = randn(g, 3)
        pred = prediction(process, x, ts[i], prediction_type, m)
        zero = torch.zeros_like(z)
        theirs_mean = s.step(m, t_d, x, eta=eta, variance_noise=zero).prev_sample
        torch.testing.assert_close(ddim_step(process, pred, ts[i], ts[i + 1], eta), theirs_mean, rtol=1e-5, atol=1e-5)
        theirs = s.step(m, t_d, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(ddim_step(process, pred, ts[i], ts[i + 1], eta, z), theirs, rtol=1e-5, atol=1e-5)
        if eta > 0 and i < n - 1:  # the noise term is really there
            assert (theirs - theirs_mean).abs().max() > 1e-3


# --------------------------------------------------------------------------- DPM-Solver++(2M)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("prediction_type", list(TARGETS))
@pytest.mark.parametrize("spacing,n", [("trailing", 10), ("linspace", 7), ("leading", 20)])
def test_dpmpp_2m_matches(name, prediction_type, spacing, n):
    process = DiscreteDDPM(T, SCHEDULES[name])
    s = DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        beta_schedule=name,
        prediction_type=prediction_type,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
        lower_order_final=True,
        timestep_spacing=spacing,
    )
    a = abar(process)
    s.alphas_cumprod = a
    s.set_timesteps(n)
    # diffusers' sigma = sigma/alpha at its timesteps, then 0; loaded in float64 from our schedule
    s.sigmas = torch.cat([((1 - a) / a).sqrt()[s.timesteps], torch.zeros(1, dtype=F64)])
    ts = torch.cat([s.timesteps.to(F64) + 1, torch.zeros(1, dtype=F64)])
    g = torch.Generator().manual_seed(0)
    t_prev = x0_prev = None
    for i, t_d in enumerate(s.timesteps):
        x, m = randn(g, 2)  # the same x_t fed to both, so each step is compared on its own
        theirs = s.step(m, t_d, x).prev_sample
        pred = prediction(process, x, ts[i], prediction_type, m)
        ours = dpmpp_2m_step(process, pred, ts[i], ts[i + 1], t_prev, x0_prev)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        if i == 0 or i == n - 1:  # first order at the start; the data prediction into sigma = 0
            first = dpmpp_2m_step(process, pred, ts[i], ts[i + 1])
            torch.testing.assert_close(first, ours)
            if i == n - 1:
                torch.testing.assert_close(ours, pred.x0)
        else:  # second order in between: differs from a first-order step
            assert (dpmpp_2m_step(process, pred, ts[i], ts[i + 1]) - ours).abs().max() > 1e-4
        t_prev, x0_prev = ts[i], pred.x0


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_stock_diffusers_float32_agrees_at_float32_precision(name):
    """Without loading our float64 schedule, diffusers' own float32 scheduler still agrees to ~1e-4."""
    process = DiscreteDDPM(T, SCHEDULES[name])
    s = DDIMScheduler(num_train_timesteps=T, beta_schedule=name, clip_sample=False)
    s.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    for t_d in s.timesteps[::7]:
        x, m = (v.float() for v in randn(g, 2))
        t = ours_t(t_d)
        ours = ddim_step(process, prediction(process, x, t, "epsilon", m), t, ours_t(max(int(t_d) - T // 50, -1)))
        torch.testing.assert_close(ours, s.step(m, t_d, x).prev_sample, rtol=2e-4, atol=2e-4)
