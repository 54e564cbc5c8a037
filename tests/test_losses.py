"""SimpleLoss: targets, weightings as effective weights on the x0-error, and the exact denoiser's zero loss."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from difflab.core.analytic import GaussianDenoiser
from difflab.core.losses import SimpleLoss, loss_weight
from difflab.core.parameterize import TARGETS, Denoiser
from difflab.core.processes import ContinuousVP, DiscreteDDPM, VarianceExploding

F64 = torch.float64
PROCESSES = [DiscreteDDPM(1000, "linear"), DiscreteDDPM(1000, "cosine"), ContinuousVP("cosine"), VarianceExploding()]
IDS = ["ddpm-linear", "ddpm-cosine", "vp-cosine", "ve"]


class TinyNet(nn.Module):
    """A small random network net(x_in, c_noise): its predictions are wrong, which is what the identities need."""

    def __init__(self, dim: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(dim + 1, dim).double()
        with torch.no_grad():
            for p in self.lin.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))

    def forward(self, x_in, c_noise):
        return self.lin(torch.cat([x_in, c_noise.to(x_in)[:, None] / 1000], dim=1))


def batch(process, n=64, seed=0):
    """x0, t spread over the whole range of the process, noise."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 3, generator=g, dtype=F64)
    t = process.sample_t(n, g)
    noise = torch.randn(n, 3, generator=g, dtype=F64)
    return x0, t, noise


def per_example(loss, denoiser, x0, t, noise):
    return loss(denoiser, x0, t=t, noise=noise, reduction="none").detach()


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("native", ["x0", "eps", "v"])
def test_eps_mse_is_snr_times_x0_mse(process, native):
    """Same t and noise: ||eps_hat - eps||^2 = SNR ||x0_hat - x0||^2 per example, whatever the network predicts."""
    denoiser = Denoiser(TinyNet(), process, native)
    x0, t, noise = batch(process)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    eps_mse = per_example(SimpleLoss("eps"), denoiser, x0, t, noise)
    x0_mse = per_example(SimpleLoss("x0"), denoiser, x0, t, noise)
    torch.testing.assert_close(eps_mse, snr * x0_mse, rtol=1e-7, atol=0)
    v_mse = per_example(SimpleLoss("v"), denoiser, x0, t, noise)
    a2, s2 = process.alpha(t) ** 2, process.sigma(t) ** 2
    torch.testing.assert_close(v_mse, (a2 + s2) ** 2 / s2 * x0_mse, rtol=1e-7, atol=0)
    assert bool((x0_mse > 0).all()) and float(x0_mse.mean()) > 1e-2  # the identities are not 0 == 0


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
def test_snr_weighting_makes_every_target_the_same_loss(process):
    denoiser = Denoiser(TinyNet(), process, "v")
    x0, t, noise = batch(process)
    losses = {target: per_example(SimpleLoss(target, "snr"), denoiser, x0, t, noise) for target in TARGETS}
    plain_eps = per_example(SimpleLoss("eps", "none"), denoiser, x0, t, noise)
    for target in TARGETS:
        torch.testing.assert_close(losses[target], plain_eps, rtol=1e-6, atol=0)


@pytest.mark.parametrize("process", PROCESSES[:3], ids=IDS[:3])
@pytest.mark.parametrize("target", TARGETS)
def test_min_snr_clamps_the_x0_weight_at_gamma(process, target):
    gamma = 5.0
    denoiser = Denoiser(TinyNet(), process, "eps")
    x0, t, noise = batch(process, n=256)
    snr = (process.alpha(t) / process.sigma(t)) ** 2
    assert bool((snr > 4 * gamma).any()) and bool((snr < gamma / 4).any())  # both regimes present
    x0_mse = per_example(SimpleLoss("x0", "none"), denoiser, x0, t, noise)
    min_snr = per_example(SimpleLoss(target, "min_snr", gamma), denoiser, x0, t, noise)
    torch.testing.assert_close(min_snr, torch.clamp(snr, max=gamma) * x0_mse, rtol=1e-6, atol=1e-12)
    # where SNR < gamma, Min-SNR is the SNR weighting; above, it is gamma times the x0-MSE
    snr_loss = per_example(SimpleLoss(target, "snr"), denoiser, x0, t, noise)
    low = snr < gamma
    torch.testing.assert_close(min_snr[low], snr_loss[low], rtol=1e-6, atol=0)
    torch.testing.assert_close(min_snr[~low], gamma * x0_mse[~low], rtol=1e-6, atol=0)


def test_min_snr_is_hang_et_al_for_eps_and_v():
    """Hang et al. (2023): eps-prediction weight min(SNR, gamma) / SNR, v-prediction min(SNR, gamma) / (SNR + 1)."""
    process = DiscreteDDPM(1000, "cosine")
    t = torch.arange(1, 1001, dtype=F64)
    a, s = process.alpha(t), process.sigma(t)
    snr = (a / s) ** 2
    torch.testing.assert_close(loss_weight("eps", "min_snr", a, s, 5.0), torch.clamp(snr, max=5.0) / snr)
    torch.testing.assert_close(loss_weight("v", "min_snr", a, s, 5.0), torch.clamp(snr, max=5.0) / (snr + 1))
    # finite where SNR is 0 or infinite
    edge = loss_weight("eps", "min_snr", torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([1.0, 0.0], dtype=F64))
    assert edge.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("target", TARGETS)
def test_plain_loss_is_the_mse_of_the_target(target):
    process = ContinuousVP("linear")
    denoiser = Denoiser(TinyNet(), process, "x0")
    x0, t, noise = batch(process, n=16)
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x_t = a * x0 + s * noise
    pred = denoiser(x_t, t)
    true = {"x0": x0, "eps": noise, "v": a * noise - s * x0, "score": -noise / s}[target]
    expected = ((pred.as_(target) - true) ** 2).mean(1)
    got = per_example(SimpleLoss(target), denoiser, x0, t, noise)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(SimpleLoss(target)(denoiser, x0, t=t, noise=noise), expected.mean())


@pytest.mark.parametrize("target", [None, *TARGETS])
def test_exact_denoiser_on_point_mass_has_zero_loss(target):
    """Data = a point mass at mu: the exact denoiser returns mu, so every target is predicted exactly."""
    process = DiscreteDDPM(1000, "linear")
    mu = torch.tensor([0.5, -0.25, 0.1], dtype=F64)
    exact = GaussianDenoiser(process, mu, 1e-12 * torch.eye(3, dtype=F64))
    wrong = GaussianDenoiser(process, mu + 0.1, 1e-12 * torch.eye(3, dtype=F64))
    x0 = mu.expand(128, 3).clone()
    g = torch.Generator().manual_seed(1)
    t = process.sample_t(128, g)
    noise = torch.randn(128, 3, generator=g, dtype=F64)
    loss = SimpleLoss(target)
    assert float(loss(exact, x0, t=t, noise=noise)) < 1e-10
    assert float(loss(wrong, x0, t=t, noise=noise)) > 1e-3


def test_native_target_default_and_generator_reproducibility():
    process = DiscreteDDPM(1000, "linear")
    denoiser = Denoiser(TinyNet(), process, "v")
    x0 = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    a = SimpleLoss()(denoiser, x0, generator=torch.Generator().manual_seed(7)).detach()
    b = SimpleLoss("v")(denoiser, x0, generator=torch.Generator().manual_seed(7)).detach()
    c = SimpleLoss("v")(denoiser, x0, generator=torch.Generator().manual_seed(8)).detach()
    assert float(a) == float(b) and float(a) != float(c)


def test_loss_trains_the_network():
    """Gradients reach every parameter and are finite; a few SGD steps reduce the loss at fixed t and noise."""
    process = DiscreteDDPM(1000, "linear")
    net = TinyNet()
    denoiser = Denoiser(net, process, "eps")
    x0, t, noise = batch(process, n=256)
    loss_fn = SimpleLoss(weighting="min_snr")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    start = float(loss_fn(denoiser, x0, t=t, noise=noise).detach())
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(denoiser, x0, t=t, noise=noise)
        loss.backward()
        assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in net.parameters())
        opt.step()
    assert float(loss_fn(denoiser, x0, t=t, noise=noise).detach()) < 0.9 * start


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("weighting", ["none", "snr", "min_snr"])
def test_score_target_is_finite_at_the_first_step(schedule, weighting):
    """At t = 1 sigma is small (0.01 or less) but nonzero: the score loss must stay finite in float32."""
    process = DiscreteDDPM(1000, schedule)
    denoiser = Denoiser(TinyNet().float(), process, "x0")
    x0 = torch.randn(64, 3, generator=torch.Generator().manual_seed(3))
    t = torch.ones(64, dtype=F64)
    value = SimpleLoss("score", weighting)(denoiser, x0, t=t, generator=torch.Generator().manual_seed(4)).detach()
    assert bool(torch.isfinite(value)) and float(value) > 0


def test_bad_names_raise():
    with pytest.raises(ValueError, match="loss target"):
        SimpleLoss("noise")
    with pytest.raises(ValueError, match="weighting"):
        SimpleLoss("eps", "p2")
    with pytest.raises(ValueError, match="gamma"):
        SimpleLoss("eps", "min_snr", gamma=0.0)
    with pytest.raises(ValueError, match="weighting"):
        loss_weight("eps", "truncated_snr", torch.ones(1), torch.ones(1))
    denoiser = Denoiser(TinyNet(), DiscreteDDPM(100, "linear"), "eps")
    with pytest.raises(ValueError, match="reduction"):
        SimpleLoss()(denoiser, torch.zeros(2, 3, dtype=F64), reduction="sum")
