"""Closed-form truth for Gaussian data x_0 ~ N(mu, Sigma): the exact denoiser and exact marginals.

q(x_t) = N(alpha mu, alpha^2 Sigma + sigma^2 I) and
E[x_0 | x_t] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (x_t - alpha mu),
so every sampler driven by ``GaussianDenoiser`` must reproduce N(mu, Sigma), and the
variational bound of this model can be compared with the true NLL."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .parameterize import Prediction, expand_t
from .processes import Process, broadcast

F64 = torch.float64


class GaussianDenoiser(nn.Module):
    """The exact E[x_0 | x_t] for x_0 ~ N(mu, Sigma), in the Denoiser interface (vectors of dimension d)."""

    def __init__(self, process: Process, mu: Tensor, cov: Tensor):
        super().__init__()
        self.process = process
        self.register_buffer("mu", torch.as_tensor(mu, dtype=F64))
        self.register_buffer("cov", torch.as_tensor(cov, dtype=F64))

    def forward(self, x_t: Tensor, t, **cond) -> Prediction:
        t = expand_t(t, x_t)
        a = self.process.alpha(t).to(x_t.device)  # (B,)
        s = self.process.sigma(t).to(x_t.device)
        d = self.mu.shape[0]
        eye = torch.eye(d, dtype=F64, device=x_t.device)
        marg = a[:, None, None] ** 2 * self.cov + s[:, None, None] ** 2 * eye  # (B, d, d)
        resid = x_t.to(F64) - a[:, None] * self.mu  # (B, d)
        gain = torch.linalg.solve(marg, resid.unsqueeze(-1)).squeeze(-1)  # (B, d)
        x0 = self.mu + a[:, None] * (gain @ self.cov)  # cov symmetric
        return Prediction(x_t, broadcast(a, x_t), broadcast(s, x_t), "x0", x0.to(x_t.dtype))


def gaussian_nll(x: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """-log N(x; mu, cov) per row, in nats (float64)."""
    dist = torch.distributions.MultivariateNormal(mu.to(F64), covariance_matrix=cov.to(F64))
    return -dist.log_prob(x.to(F64))
