"""Editing with the exact Gaussian denoiser: DDIM inversion round trips, interpolation ends, SDEdit strength."""

import pytest
import torch
from test_inverse import ImageGaussian, problem  # noqa: F401  (the fixture)

from difflab.sampling.edit import img2img, interpolate, slerp
from difflab.sampling.samplers import ddim, ddim_invert, timesteps

F64 = torch.float64


def draws(mu, cov, n, seed):
    g = torch.Generator().manual_seed(seed)
    return (mu + (torch.linalg.cholesky(cov) @ torch.randn(4, n, generator=g, dtype=F64)).T).reshape(n, 1, 2, 2)


@pytest.mark.parametrize("steps, iters, tol", [(50, 0, 0.3), (50, 3, 0.02), (200, 3, 0.002)])
def test_ddim_inversion_round_trip(problem, steps, iters, tol):  # noqa: F811
    den, mu, cov, _ = problem
    x0 = draws(mu, cov, 64, 0)
    ts = timesteps(den.process, steps, "uniform")
    back = ddim(den, ddim_invert(den, x0, ts, fixed_point_iters=iters), ts)
    # measured largest errors: 50 steps 0.24 (no refinement), 0.014 (3 fixed-point iterations); 200 steps 0.0009
    assert float((back - x0).abs().max()) < tol


def test_interpolation_ends_and_slerp(problem):  # noqa: F811
    den, mu, cov, _ = problem
    a, b = draws(mu, cov, 2, 1).float().split(1)
    frames = interpolate(den, a, b, frames=5, method="ddim", steps=100)
    assert frames.shape == (5, 1, 2, 2)
    assert float((frames[0] - a[0]).abs().max()) < 0.01 and float((frames[-1] - b[0]).abs().max()) < 0.01
    # the DDPM way at a small depth keeps each frame near the pixel mix
    shallow = interpolate(den, a, b, frames=3, method="ddpm", t=0.05, steps=50)
    assert float((shallow[1] - (a[0] + b[0]) / 2).abs().max()) < 0.3
    u, v = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = slerp(u, v, 0.5)
    assert torch.allclose(mid, torch.tensor([[2**-0.5, 2**-0.5]]), atol=1e-6)  # on the circle, not the chord
    assert torch.allclose(slerp(u, u * 2, 0.25), u * 1.25)  # parallel: linear
    with pytest.raises(ValueError, match="unknown interpolation method"):
        interpolate(den, a, b, method="linear")


def test_img2img_strength_and_seed(problem):  # noqa: F811
    den, mu, cov, _ = problem
    x = draws(mu, cov, 200, 2).float()
    dist = [float((img2img(den, x, s, steps=50) - x).pow(2).mean()) for s in (0.05, 0.3, 0.8)]
    assert dist[0] < dist[1] < dist[2], dist  # the deeper the noise, the further from the input
    assert torch.equal(img2img(den, x[:3], 0.3, seed=4), img2img(den, x, 0.3, seed=4)[:3])  # per-sample seeds
    with pytest.raises(ValueError, match="strength in"):
        img2img(den, x, 1.5)
