"""How loose is the DDPM variational bound when the denoiser is exact?

Data x_0 ~ N(mu, Sigma) in a few dimensions, the exact denoiser E[x_0 | x_t] (analytic.GaussianDenoiser)
and the real-valued Gaussian decoder: the only slack left in Ho et al.'s bound is the fixed reverse
variance (beta_t or beta_tilde_t), the decoder variance beta_1 and the prior mismatch. The table
compares E[bound] with the true NLL E[-log q(x_0)] = entropy of N(mu, Sigma), in nats per example:

    'gap (MC)' is the mean of bound_i - (-log q(x_0^i)) over n examples (paired, so x_0's own spread
    cancels) with its standard error; 'gap (exact)' is the same expectation in closed form, where
    Cov[x_0 | x_t] has eigenvalues lambda_k sigma_t^2 / (alpha_t^2 lambda_k + sigma_t^2).

    .venv/bin/python benchmarks/vlb_gap.py [--n 20000] [--dims 2] [--schedule cosine] [--T 10 50 100 500 1000]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from difflab.core.analytic import GaussianDenoiser, gaussian_nll
from difflab.core.likelihood import VARIANCES, vlb_terms
from difflab.core.processes import BETA_SCHEDULES, DiscreteDDPM, posterior_coefficients

F64 = torch.float64


def gaussian_data_law(dims: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and Sigma at the scale of data in [-1, 1]: 2-D is a fixed correlated pair, more dims a random SPD matrix."""
    if dims == 2:
        return torch.tensor([0.3, -0.2], dtype=F64), torch.tensor([[0.3, 0.12], [0.12, 0.2]], dtype=F64)
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(dims, dims, generator=g, dtype=F64) / math.sqrt(dims)
    return 0.3 * torch.randn(dims, generator=g, dtype=F64), 0.25 * (A @ A.T) + 0.02 * torch.eye(dims, dtype=F64)


def exact_expected_bound(process: DiscreteDDPM, mu, cov, variance: str) -> float:
    """E[L_T + sum_t L_{t-1} + L_0] over x_0 ~ N(mu, Sigma) and x_t ~ q(x_t | x_0), in closed form."""
    lam = torch.linalg.eigvalsh(cov)
    d, T = lam.numel(), process.T
    ts = torch.arange(2, T + 1, dtype=F64)
    c_x0, _, var_q = posterior_coefficients(process, ts, ts - 1)
    var_p = var_q if variance == "beta_tilde" else process.betas[1:]
    a, s = process.alpha(ts)[:, None], process.sigma(ts)[:, None]
    r = var_q / var_p
    terms = 0.5 * (d * (r - 1 - torch.log(r)) + c_x0**2 / var_p * (lam * s**2 / (a**2 * lam + s**2)).sum(1))
    one, last = torch.tensor(1.0, dtype=F64), torch.tensor(float(T), dtype=F64)
    a1, s1, v1 = process.alpha(one), process.sigma(one), process.betas[0]
    decoder = 0.5 * d * torch.log(2 * math.pi * v1) + (lam * s1**2 / (a1**2 * lam + s1**2)).sum() / (2 * v1)
    aT, sT = process.alpha(last), process.sigma(last)
    prior = 0.5 * (d * (sT**2 - 1 - torch.log(sT**2)) + aT**2 * (mu @ mu + lam.sum()))
    return float(terms.sum() + decoder + prior)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="examples per row (default 20000)")
    parser.add_argument("--dims", type=int, default=2)
    parser.add_argument(
        "--schedule",
        choices=sorted(BETA_SCHEDULES),
        default="cosine",
        help="beta schedule (linear and sigmoid need T > 20)",
    )
    parser.add_argument("--T", type=int, nargs="+", default=[10, 50, 100, 500, 1000])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    mu, cov = gaussian_data_law(args.dims, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    x0 = mu + torch.randn(args.n, args.dims, generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T
    nll = gaussian_nll(x0, mu, cov)  # (n,)
    entropy = float(0.5 * torch.logdet(2 * math.pi * math.e * cov))

    print(
        f"x_0 ~ N(mu, Sigma), d = {args.dims}, n = {args.n} per row, {args.schedule} schedule, "
        f"exact denoiser, Gaussian decoder (variance beta_1); nats per example."
    )
    print(f"true NLL = entropy = {entropy:.4f} (MC mean over these x_0: {float(nll.mean()):.4f})\n")
    print("| T | variance | E[bound] (MC) | E[bound] (exact) | true NLL | gap (MC) ± s.e. | gap (exact) | seconds |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for T in args.T:
        process = DiscreteDDPM(T, args.schedule)
        denoiser = GaussianDenoiser(process, mu, cov)
        for variance in VARIANCES:
            start = time.perf_counter()
            v = vlb_terms(
                denoiser,
                x0,
                variance=variance,
                decoder="gaussian",
                generator=torch.Generator().manual_seed(args.seed + T),
            )
            seconds = time.perf_counter() - start
            gap = v.total - nll
            se = float(gap.std()) / math.sqrt(args.n)
            exact = exact_expected_bound(process, mu, cov, variance)
            print(
                f"| {T} | {variance} | {float(v.total.mean()):.4f} | {exact:.4f} | {entropy:.4f} "
                f"| {float(gap.mean()):.4f} ± {se:.4f} | {exact - entropy:.4f} | {seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
