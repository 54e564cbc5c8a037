"""Guidance wrappers against closed-form truth: a Gaussian mixture (one Gaussian per class) has exact
conditional and unconditional denoisers and an exact classifier p(y | x_t)."""

import pytest
import torch
from torch import nn

from difflab.core.analytic import GaussianMixture, GaussianMixtureClassifier, GaussianMixtureDenoiser
from difflab.core.conditions import ConditionError, class_labels
from difflab.core.parameterize import Denoiser
from difflab.core.processes import ContinuousVP, DiscreteDDPM
from difflab.evaluation.metrics import energy_distance
from difflab.guidance.wrappers import ClassifierGuided, Guided, combine, rescale_std, scale_fn
from difflab.nets.unet import UNet, UNetConfig
from difflab.sampling.samplers import sample, timesteps

F64 = torch.float64
K = 3
SPECS = [class_labels(K)]
NULL = K


@pytest.fixture(scope="module")
def mixture():
    means = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
    covs = [[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.5, 0.0], [0.0, 0.1]]]
    return GaussianMixture([0.5, 0.3, 0.2], means, covs)


@pytest.fixture(scope="module")
def process():
    return ContinuousVP()


class Unconditional(nn.Module):
    """The mixture's exact denoiser with the labels hidden: an unconditional model."""

    accepts = frozenset()

    def __init__(self, inner):
        super().__init__()
        self.inner, self.process = inner, inner.process

    def forward(self, x_t, t):
        return self.inner(x_t, t)


class Counting(nn.Module):
    """Counts forward passes of the wrapped denoiser."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.process, self.accepts, self.calls, self.rows = inner, inner.process, inner.accepts, 0, 0

    def forward(self, x_t, t, **cond):
        self.calls += 1
        self.rows += len(x_t)
        return self.inner(x_t, t, **cond)


def draw(denoiser, n, label=None, steps=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = None if label is None else {"class_labels": torch.full((n,), label)}
    return sample(denoiser, (n, 2), steps, sampler="ddim", generator=g, cond=cond, dtype=F64)


def noisy_points(mixture, process, n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0, _ = mixture.sample(n, g)
    t = torch.rand(n, generator=g, dtype=F64) * 0.98 + 0.01
    eps = torch.randn(n, 2, generator=g, dtype=F64)
    return process.q_sample(x0, t, eps), t


# --------------------------------------------------------------------------- laws of the guided samplers


def test_cfg_at_one_is_the_conditional_law_and_at_zero_the_mixture(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    n = 1500
    truth_1 = mixture.sample(n, torch.Generator().manual_seed(7), label=1)[0]
    truth_mix = mixture.sample(n, torch.Generator().manual_seed(8))[0]
    fresh_1 = mixture.sample(n, torch.Generator().manual_seed(9), label=1)[0]
    floor = energy_distance(truth_1, fresh_1)  # two exact samples of the same law
    s1 = energy_distance(draw(Guided(exact, SPECS, scale=1.0), n, label=1), truth_1)
    s0 = energy_distance(draw(Guided(exact, SPECS, scale=0.0), n, label=1), truth_mix)
    wrong = energy_distance(draw(Guided(exact, SPECS, scale=-1.0), n, label=1), truth_1)  # a sign error
    mixed_up = energy_distance(draw(Guided(exact, SPECS, scale=0.0), n, label=1), truth_1)  # s = 0 is not class 1
    assert s1 < 3 * floor + 2e-3 and s0 < 3 * floor + 2e-3, (s1, s0, floor)
    assert wrong > 20 * s1 and mixed_up > 20 * s1, (wrong, mixed_up, s1)


def test_exact_classifier_guidance_at_one_is_bayes_rule(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    guided = ClassifierGuided(
        Unconditional(exact), GaussianMixtureClassifier(process, mixture), scale=1.0, max_sigma_tilde=None
    )
    x_t, t = noisy_points(mixture, process)
    y = torch.arange(len(x_t)) % K
    # grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t): the guided x_0 is the conditional one
    got = guided(x_t, t, class_labels=y).x0
    want = exact(x_t, t, class_labels=y).x0
    assert torch.allclose(got, want, atol=1e-8, rtol=0), (got - want).abs().max()
    n = 1500
    truth = mixture.sample(n, torch.Generator().manual_seed(3), label=2)[0]
    fresh = mixture.sample(n, torch.Generator().manual_seed(4), label=2)[0]
    ed = energy_distance(draw(guided, n, label=2), truth)
    assert ed < 3 * energy_distance(truth, fresh) + 2e-3, ed


def test_classifier_guidance_nests_on_cfg(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    clf = GaussianMixtureClassifier(process, mixture)
    x_t, t = noisy_points(mixture, process)
    y = torch.arange(len(x_t)) % K
    nested = ClassifierGuided(Guided(exact, SPECS, scale=2.0), clf, scale=0.5, max_sigma_tilde=None)(
        x_t, t, class_labels=y
    )
    a = exact(x_t, t, class_labels=y).eps
    null = exact(x_t, t, class_labels=torch.full_like(y, NULL)).eps
    grad = ClassifierGuided(exact, clf).grad_log_prob(x_t, t, y)
    sigma = process.sigma(t)[:, None]
    want = null + 2.0 * (a - null) - sigma * 0.5 * grad
    assert torch.allclose(nested.eps, want, atol=1e-9)


# --------------------------------------------------------------------------- the rules, exactly


def test_composing_c_and_not_c_with_equal_weights_is_the_null_prediction(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    x_t, t = noisy_points(mixture, process)
    c = {"class_labels": torch.tensor([1])}
    composed = Guided(exact, SPECS, scale=0.0, terms=[(c, 1.5), (c, -1.5)])(x_t, t)
    null = exact(x_t, t, class_labels=torch.full((len(x_t),), NULL))
    assert torch.allclose(composed.eps, null.eps, atol=1e-12)


def test_composition_and_negative_follow_their_formulas(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    x_t, t = noisy_points(mixture, process)
    n = len(x_t)
    e = {k: exact(x_t, t, class_labels=torch.full((n,), k)).eps for k in range(K + 1)}
    got = Guided(exact, SPECS, scale=0.0, terms=[({"class_labels": 0}, 1.0), ({"class_labels": 2}, -0.5)])(x_t, t).eps
    assert torch.allclose(got, e[NULL] + 1.0 * (e[0] - e[NULL]) - 0.5 * (e[2] - e[NULL]), atol=1e-12)
    neg = Guided(exact, SPECS, scale=3.0, negative={"class_labels": 2})(
        x_t, t, class_labels=torch.ones(n, dtype=torch.long)
    ).eps
    assert torch.allclose(neg, e[2] + 3.0 * (e[1] - e[2]), atol=1e-12)


def small_unet_denoiser(target):
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(
            image_size=8,
            base_channels=16,
            channel_mults=(1, 2),
            num_res_blocks=1,
            attention_resolutions=(4,),
            num_classes=K,
        )
    )
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layers would make every prediction 0
            p.add_(0.05 * torch.randn_like(p))
    return Denoiser(net, DiscreteDDPM(), target).eval()


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_one_batched_pass_equals_separate_passes_and_the_mix_space_does_not_matter(target):
    den = Counting(small_unet_denoiser(target))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(5, 1, 8, 8, generator=g)
    t = torch.full((5,), 400.0, dtype=F64)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        guided = Guided(den, SPECS, scale=2.5)(x_t, t, class_labels=y)
        assert den.calls == 1  # conditional and null in one forward pass
        cond, null = den(x_t, t, class_labels=y), den(x_t, t, class_labels=torch.full_like(y, NULL))
    for space in ("eps", "x0", "v", "score"):  # an affine mix: the same whichever space it is done in
        want = null.as_(space) + 2.5 * (cond.as_(space) - null.as_(space))
        assert torch.allclose(guided.as_(space), want, atol=2e-5, rtol=1e-4), space
    den.calls = 0
    with torch.no_grad():
        separate = Guided(den, SPECS, scale=2.5, batched=False)(x_t, t, class_labels=y)
    assert den.calls == 2 and torch.allclose(separate.eps, guided.eps, atol=2e-5, rtol=1e-4)


def test_guidance_interval_costs_one_pass_outside_and_is_conditional_there(mixture, process):
    den = Counting(GaussianMixtureDenoiser(process, mixture))
    guided = Guided(den, SPECS, scale=4.0, interval=(0.2, 0.6))
    x_t, _ = noisy_points(mixture, process, n=8)
    y = torch.arange(8) % K
    for t_frac, inside in ((0.1, False), (0.4, True), (0.9, False)):
        den.calls = 0
        t = torch.full((8,), t_frac, dtype=F64)
        got = guided(x_t, t, class_labels=y)
        assert den.calls == 1
        plain = den.inner(x_t, t, class_labels=y)
        assert torch.equal(got.x0, plain.x0) != inside
    # a whole chain: one call per step, of 2B rows inside the interval and B rows outside
    den.calls, den.rows = 0, 0
    draw(guided, 16, label=1, steps=50)
    ts = timesteps(process, 50, "uniform")[:-1] / process.t_max
    inside = int(((ts >= 0.2) & (ts <= 0.6)).sum())
    assert 0 < inside < 50 and den.calls == 50 and den.rows == 16 * (50 + inside)
    # a batch with samples on both sides: each gets its own rule
    t = torch.tensor([0.1, 0.4, 0.9, 0.5, 0.1, 0.3, 0.7, 0.2], dtype=F64)
    got = guided(x_t, t, class_labels=y).eps
    full = Guided(den.inner, SPECS, scale=4.0)(x_t, t, class_labels=y).eps
    plain = den.inner(x_t, t, class_labels=y).eps
    on = (t >= 0.2) & (t <= 0.6)
    assert torch.equal(got[on], full[on]) and torch.equal(got[~on], plain[~on])


def test_scales_vary_with_time_and_rescale_matches_the_conditional_std(mixture, process):
    u = torch.linspace(0, 1, 101, dtype=F64)
    for name in ("constant", "linear", "cosine"):
        assert abs(float(scale_fn(3.0, name)(u).mean()) - 3.0) < 0.05  # mean s over u
    assert float(scale_fn(3.0, "linear")(torch.tensor([1.0], dtype=F64))) == 0.0
    assert torch.equal(scale_fn(lambda u: 1 + u)(u), 1 + u)
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        scale_fn(2.0, "exponential")
    g = torch.Generator().manual_seed(0)
    guided, cond = 3 * torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    out = rescale_std(guided, cond, 1.0)
    assert torch.allclose(out.flatten(1).std(1), cond.flatten(1).std(1), rtol=1e-5)
    assert torch.equal(rescale_std(guided, cond, 0.0), guided)
    # a time-varying scale is applied per sample
    exact = GaussianMixtureDenoiser(process, mixture)
    x_t, t = noisy_points(mixture, process)
    y = torch.zeros(len(x_t), dtype=torch.long)
    got = Guided(exact, SPECS, scale=2.0, schedule="linear")(x_t, t, class_labels=y).eps
    c, null = exact(x_t, t, class_labels=y).eps, exact(x_t, t, class_labels=torch.full_like(y, NULL)).eps
    w = (2 * 2.0 * (1 - t / process.t_max))[:, None]
    assert torch.allclose(got, null + w * (c - null), atol=1e-12)
    assert torch.equal(combine(null, [c], [torch.ones(len(t), dtype=F64)]), null + (c - null))


def test_bad_guidance_is_one_clear_error(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    x_t, t = noisy_points(mixture, process, n=4)
    with pytest.raises(ConditionError, match="needs a conditional model"):
        Guided(Unconditional(exact), [], scale=2.0)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        Guided(exact, SPECS, interval=(0.8, 0.2))
    with pytest.raises(ConditionError, match="guidance needs a condition"):
        Guided(exact, SPECS, scale=2.0)(x_t, t)
    with pytest.raises(ConditionError, match="3 rows for a batch of 4"):
        Guided(exact, SPECS, scale=0.0, terms=[({"class_labels": torch.tensor([0, 1, 2])}, 1.0)])(x_t, t)
    with pytest.raises(ConditionError, match="needs 'class_labels'"):
        ClassifierGuided(Unconditional(exact), GaussianMixtureClassifier(process, mixture))(x_t, t)


def test_one_row_conditions_rescale_and_nesting_either_way(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    clf = GaussianMixtureClassifier(process, mixture)
    x_t, t = noisy_points(mixture, process, n=6)
    full = torch.full((6,), 2)
    one = torch.tensor([2])
    # one row stands for every sample, for CFG and for the classifier's labels
    assert torch.equal(
        Guided(exact, SPECS, scale=2.0)(x_t, t, class_labels=one).eps,
        Guided(exact, SPECS, scale=2.0)(x_t, t, class_labels=full).eps,
    )
    cg = ClassifierGuided(Unconditional(exact), clf, scale=1.5, max_sigma_tilde=None)
    assert torch.equal(cg(x_t, t, class_labels=one).eps, cg(x_t, t, class_labels=full).eps)
    # a CFG wrapper above classifier guidance sends the null class: it gets no gradient, so at s = 1 the
    # composition is classifier guidance alone
    outer = Guided(ClassifierGuided(exact, clf, scale=1.5, max_sigma_tilde=None), SPECS, scale=1.0)(
        x_t, t, class_labels=full
    )
    assert torch.allclose(
        outer.eps,
        ClassifierGuided(exact, clf, scale=1.5, max_sigma_tilde=None)(x_t, t, class_labels=full).eps,
        atol=1e-12,
    )
    null_grad = ClassifierGuided(exact, clf).grad_log_prob(x_t, t, torch.full((6,), NULL))
    assert torch.equal(null_grad, torch.zeros_like(null_grad))
    # classifier guidance with a schedule and an interval
    sched = ClassifierGuided(
        Unconditional(exact), clf, scale=2.0, schedule="linear", interval=(0.0, 0.5), max_sigma_tilde=None
    )(x_t, t, class_labels=full).eps
    grad = ClassifierGuided(exact, clf).grad_log_prob(x_t, t, full)
    w = torch.where(t <= 0.5, 2 * 2.0 * (1 - t), torch.zeros_like(t))[:, None]
    assert torch.allclose(sched, exact(x_t, t).eps - process.sigma(t)[:, None] * w * grad, atol=1e-10)
    # rescale phi = 1: the guided x_0 has the conditional x_0's standard deviation, per sample
    img = small_unet_denoiser("v")
    xi = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ti = torch.full((3,), 300.0, dtype=F64)
    yi = torch.tensor([0, 1, 2])
    with torch.no_grad():
        res = Guided(img, SPECS, scale=4.0, rescale=1.0)(xi, ti, class_labels=yi).x0
        cond_x0 = img(xi, ti, class_labels=yi).x0
        plain_cfg = Guided(img, SPECS, scale=4.0)(xi, ti, class_labels=yi).x0
    assert torch.allclose(res.flatten(1).std(1), cond_x0.flatten(1).std(1), rtol=1e-4)
    assert not torch.allclose(plain_cfg.flatten(1).std(1), cond_x0.flatten(1).std(1), rtol=1e-2)
    # separate passes with a negative and composed terms equal the batched pass
    kw = dict(scale=2.0, negative={"class_labels": 0}, terms=[({"class_labels": 1}, 0.5)])
    with torch.no_grad():
        a = Guided(img, SPECS, **kw)(xi, ti, class_labels=yi).eps
        b = Guided(img, SPECS, batched=False, **kw)(xi, ti, class_labels=yi).eps
    assert torch.allclose(a, b, atol=2e-5, rtol=1e-4)


def test_classifier_guidance_skips_the_levels_above_its_sigma_cap(mixture, process):
    exact = GaussianMixtureDenoiser(process, mixture)
    clf = GaussianMixtureClassifier(process, mixture)
    x_t, _ = noisy_points(mixture, process, n=4)
    y = torch.zeros(4, dtype=torch.long)
    high = torch.full((4,), 0.999, dtype=F64)  # sigma/alpha far above 80 on this schedule
    assert float(process.sigma(high[0]) / process.alpha(high[0])) > 80
    assert torch.equal(
        ClassifierGuided(exact, clf, 2.0)(x_t, high, class_labels=y).eps, exact(x_t, high, class_labels=y).eps
    )
    assert not torch.equal(
        ClassifierGuided(exact, clf, 2.0, max_sigma_tilde=None)(x_t, high, class_labels=y).eps,
        exact(x_t, high, class_labels=y).eps,
    )
