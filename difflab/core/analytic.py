"""Closed-form truth for Gaussian data x_0 ~ N(mu, Sigma) and Gaussian mixtures: exact denoisers, marginals,
classifiers.

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
        x0 = gaussian_x0(x_t.to(F64), a, s, self.mu, self.cov)
        return Prediction(x_t, broadcast(a, x_t), broadcast(s, x_t), "x0", x0.to(x_t.dtype))


def gaussian_nll(x: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """-log N(x; mu, cov) per row, in nats (float64)."""
    dist = torch.distributions.MultivariateNormal(mu.to(F64), covariance_matrix=cov.to(F64))
    return -dist.log_prob(x.to(F64))


# --------------------------------------------------------------------------- Gaussian mixtures (one Gaussian per class)


def gaussian_x0(x_t: Tensor, a: Tensor, s: Tensor, mu: Tensor, cov: Tensor) -> Tensor:
    """E[x_0 | x_t] for x_0 ~ N(mu, cov): x_t (B, d) float64, a and s (B,). Returns (B, d)."""
    eye = torch.eye(mu.shape[-1], dtype=F64, device=x_t.device)
    marg = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * eye  # (B, d, d)
    gain = torch.linalg.solve(marg, (x_t - a[:, None] * mu).unsqueeze(-1)).squeeze(-1)
    return mu + a[:, None] * (gain @ cov)


class GaussianMixture:
    """x_0 ~ sum_k pi_k N(mu_k, Sigma_k), the class y = k. At noise level t everything is closed form:

    q(x_t | k) = N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I),   p(k | x_t) = pi_k q(x_t | k) / sum_j pi_j q(x_t | j),
    E[x_0 | x_t, k] as for one Gaussian,                      E[x_0 | x_t] = sum_k p(k | x_t) E[x_0 | x_t, k]."""

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=F64)
        self.means = torch.as_tensor(means, dtype=F64)  # (K, d)
        self.covs = torch.as_tensor(covs, dtype=F64)  # (K, d, d)
        if not torch.allclose(self.weights.sum(), torch.tensor(1.0, dtype=F64)):
            raise ValueError("mixture weights must sum to 1")

    @property
    def num_classes(self) -> int:
        return len(self.weights)

    def sample(
        self, n: int, generator: torch.Generator | None = None, label: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """n draws (x (n, d) float64, y (n,)), from class ``label`` only when given."""
        if label is None:
            y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        else:
            y = torch.full((n,), label, dtype=torch.long)
        z = torch.randn(n, self.means.shape[1], dtype=F64, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[y]  # (n, d, d)
        return self.means[y] + (chol @ z.unsqueeze(-1)).squeeze(-1), y

    def log_posterior(self, process: Process, x_t: Tensor, t) -> Tensor:
        """log p(k | x_t) (B, K), differentiable in x_t."""
        t = expand_t(t, x_t)
        a, s = process.alpha(t).to(x_t.device), process.sigma(t).to(x_t.device)
        x = x_t.to(F64)
        eye = torch.eye(x.shape[1], dtype=F64, device=x.device)
        logs = []
        for mu, cov in zip(self.means, self.covs):
            marg = a[:, None, None] ** 2 * cov + s[:, None, None] ** 2 * eye
            dist = torch.distributions.MultivariateNormal(a[:, None] * mu, covariance_matrix=marg)
            logs.append(dist.log_prob(x))
        joint = torch.stack(logs, dim=1) + torch.log(self.weights)
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)

    def x0_per_class(self, process: Process, x_t: Tensor, t) -> Tensor:
        """E[x_0 | x_t, k] for every k: (B, K, d)."""
        t = expand_t(t, x_t)
        a, s = process.alpha(t).to(x_t.device), process.sigma(t).to(x_t.device)
        return torch.stack([gaussian_x0(x_t.to(F64), a, s, mu, cov) for mu, cov in zip(self.means, self.covs)], dim=1)


class GaussianMixtureDenoiser(nn.Module):
    """The exact denoiser of a GaussianMixture, conditional on ``class_labels`` (index K = null: the mixture)."""

    accepts = frozenset({"class_labels"})

    def __init__(self, process: Process, mixture: GaussianMixture):
        super().__init__()
        self.process, self.mixture = process, mixture

    def forward(self, x_t: Tensor, t, class_labels: Tensor | None = None) -> Prediction:
        t = expand_t(t, x_t)
        per_class = self.mixture.x0_per_class(self.process, x_t, t)  # (B, K, d)
        post = self.mixture.log_posterior(self.process, x_t, t).exp()  # (B, K)
        x0 = (post[:, :, None] * per_class).sum(1)
        if class_labels is not None:
            if class_labels.shape != (len(x_t),):
                raise ValueError(f"class_labels must have shape ({len(x_t)},), got {tuple(class_labels.shape)}")
            y = class_labels.long().to(x_t.device)
            known = y < self.mixture.num_classes
            picked = per_class[torch.arange(len(y)), y.clamp(max=self.mixture.num_classes - 1)]
            x0 = torch.where(known[:, None], picked, x0)
        a, s = self.process.alpha(t), self.process.sigma(t)
        return Prediction(x_t, broadcast(a, x_t), broadcast(s, x_t), "x0", x0.to(x_t.dtype))


class GaussianMixtureClassifier(nn.Module):
    """The exact noise-aware classifier of a GaussianMixture: classifier(x_t, t) -> log p(k | x_t) (B, K)."""

    def __init__(self, process: Process, mixture: GaussianMixture):
        super().__init__()
        self.process, self.mixture = process, mixture

    def forward(self, x_t: Tensor, t) -> Tensor:
        return self.mixture.log_posterior(self.process, x_t, t)
