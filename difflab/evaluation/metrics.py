"""Sample-quality metrics: pure functions on feature matrices.

Every function takes two sets of samples, each an array of shape (N, ...) that is
flattened to (N, D) features (2-D points, pixels, or a feature network's outputs),
and computes in float64 on the input's device. Randomness comes only from an
explicit ``torch.Generator``.

| function | quantity |
| --- | --- |
| ``energy_distance``    | 2 E|X-Y| - E|X-X'| - E|Y-Y'|  (Szekely & Rizzo 2013) |
| ``sliced_wasserstein`` | (E_theta W_p^p(theta.X, theta.Y))^{1/p}, theta uniform on the sphere |
| ``frechet_distance``   | ||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa^{1/2} Sb Sa^{1/2})^{1/2})  (FID, Heusel et al. 2017) |
| ``kid``                | unbiased MMD^2, kernel k(x, y) = (x.y / D + 1)^3, over random subsets (Binkowski et al. 2018)
|
| ``precision_recall``   | k-NN manifold precision and recall (Kynkaanniemi et al. 2019) |
| ``class_histogram``    | how often a classifier picks each class (mode coverage) |

Pairwise distances are computed in row blocks, so 10k x 10k sets of any width fit in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

F64 = torch.float64
_BLOCK_ELEMENTS = (
    2**23
)  # entries of one (rows, M) distance block: 64 MiB in float64 (a few such temporaries live at once)


def _features(x) -> Tensor:
    """(N, ...) array -> (N, D) float64 tensor."""
    x = torch.as_tensor(x).to(F64)
    if x.ndim == 0:
        raise ValueError("features must have a sample axis")
    return x.reshape(x.shape[0], -1)  # (N, D)


def _pair(a, b) -> tuple[Tensor, Tensor]:
    a, b = _features(a), _features(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: {a.shape[1]} vs {b.shape[1]}")
    if len(a) == 0 or len(b) == 0:
        raise ValueError("both sets need at least one sample")
    return a, b.to(a.device)


def _centred(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Move both sets by their joint mean: distances are unchanged, and |x|^2 + |y|^2 - 2 x.y loses less to
    cancellation."""
    centre = (a.sum(0) + b.sum(0)) / (len(a) + len(b))  # (D,)
    return a - centre, b - centre


def _sq_dist_blocks(a: Tensor, b: Tensor) -> Iterator[tuple[int, Tensor]]:
    """Yield (start row, ||a_i - b_j||^2 for a block of rows of a), each block (rows, len(b)).

    |x|^2 + |y|^2 - 2 x.y is off by round-off of order D eps (|x|^2 + |y|^2); values below that
    are set to 0, so duplicate points are exactly 0 apart whatever the block shapes."""
    rows = max(1, _BLOCK_ELEMENTS // len(b))
    b_sq = (b * b).sum(1)  # (M,)
    tol = 4.0 * a.shape[1] * torch.finfo(F64).eps
    for start in range(0, len(a), rows):
        blk = a[start : start + rows]  # (rows, D)
        norms = (blk * blk).sum(1)[:, None] + b_sq[None, :]  # (rows, M)
        d2 = norms - 2.0 * (blk @ b.T)  # (rows, M)
        yield start, d2.masked_fill_(d2 <= tol * norms, 0.0)


def _mean_pairwise_distance(a: Tensor, b: Tensor, exclude_diagonal: bool = False) -> float:
    """Mean of ||a_i - b_j|| over all (i, j), or over i != j (pass b = a; the U-statistic)."""
    total = 0.0
    for start, d2 in _sq_dist_blocks(a, b):
        if exclude_diagonal:
            idx = torch.arange(len(d2), device=d2.device)
            d2[idx, start + idx] = 0.0
        total += d2.sqrt_().sum().item()
    pairs = len(a) * len(b) - (len(a) if exclude_diagonal else 0)
    return total / pairs


# --------------------------------------------------------------------------- distances between sample sets


class EnergyTo:
    """Energy distances (the V-statistic of ``energy_distance``) of many sample sets to one reference b, its
    within-set term E|Y-Y'| computed once: ``EnergyTo(b)(a) == energy_distance(a, b)`` to round-off."""

    def __init__(self, b):
        self.b = _features(b)
        self.centre = self.b.mean(0)
        self.e_bb = _mean_pairwise_distance(self.b - self.centre, self.b - self.centre)

    def __call__(self, a) -> float:
        a, b = _pair(a, self.b)
        a, b = a - self.centre, b - self.centre
        return 2.0 * _mean_pairwise_distance(a, b) - _mean_pairwise_distance(a, a) - self.e_bb


def energy_distance(a, b, unbiased: bool = False) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| between the samples a (N, ...) and b (M, ...).

    Default: the V-statistic (all pairs, i = j included), i.e. the energy distance between the
    two empirical distributions: always >= 0, and exactly 0 when the sets are equal as multisets.
    ``unbiased=True``: the U-statistic (within-set pairs i != j), unbiased for the population
    value but can be slightly negative when both sets come from the same law.
    This is the squared form (no square root), as in Szekely & Rizzo (2013)."""
    a, b = _centred(*_pair(a, b))
    if unbiased and (len(a) < 2 or len(b) < 2):
        raise ValueError("the U-statistic needs at least two samples per set")
    e_ab = _mean_pairwise_distance(a, b)
    e_aa = _mean_pairwise_distance(a, a, exclude_diagonal=unbiased)
    e_bb = _mean_pairwise_distance(b, b, exclude_diagonal=unbiased)
    return 2.0 * e_ab - e_aa - e_bb


def _wasserstein_1d_sorted(xs: Tensor, ys: Tensor, p: float) -> Tensor:
    """W_p^p between 1-D empirical laws, rows already sorted: xs (P, N), ys (P, M) -> (P,).

    W_p^p = int_0^1 |F^-1(u) - G^-1(u)|^p du; both quantile functions are step functions,
    constant between the merged breakpoints {i/N} U {j/M}, so the integral is an exact sum."""
    n, m = xs.shape[1], ys.shape[1]
    if n == m:
        return (xs - ys).abs().pow(p).mean(1)
    u = torch.cat([torch.arange(1, n + 1, dtype=F64) / n, torch.arange(1, m + 1, dtype=F64) / m])
    u = u.sort().values.to(xs.device)  # (N+M,) right ends of the segments
    width = torch.diff(u, prepend=u.new_zeros(1))  # (N+M,)
    mid = u - 0.5 * width
    ix = (mid * n).long().clamp_(max=n - 1)  # quantile index of each segment
    iy = (mid * m).long().clamp_(max=m - 1)
    gap = (xs[:, ix] - ys[:, iy]).abs().pow(p)  # (P, N+M)
    return (gap * width).sum(1)


def sliced_wasserstein(
    a, b, n_projections: int = 256, p: float = 2.0, generator: torch.Generator | None = None
) -> float:
    """Sliced p-Wasserstein distance (E_theta W_p^p(theta.a, theta.b))^{1/p}.

    theta: ``n_projections`` directions uniform on the unit sphere (Monte Carlo over theta;
    each 1-D W_p between the projected empirical laws is exact, sets may differ in size).
    For 1-D data every direction is +-1, so this is the exact W_p; for a pure shift s of
    d-dimensional data, SW_2 -> |s| / sqrt(d)."""
    a, b = _pair(a, b)
    theta = torch.randn(n_projections, a.shape[1], generator=generator, dtype=F64).to(a.device)  # (P, D)
    theta = theta / theta.norm(dim=1, keepdim=True)
    xs = (theta @ a.T).sort(dim=1).values  # (P, N)
    ys = (theta @ b.T).sort(dim=1).values  # (P, M)
    return _wasserstein_1d_sorted(xs, ys, p).mean().pow(1.0 / p).item()


# --------------------------------------------------------------------------- Frechet distance (FID on features)


def gaussian_stats(feats) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, ...), float64; cache them for a reference set."""
    x = _features(feats)
    if len(x) < 2:
        raise ValueError("a covariance needs at least two samples")
    mu = x.mean(0)  # (D,)
    xc = x - mu
    cov = xc.T @ xc / (len(x) - 1)  # (D, D)
    return mu, cov


def _psd_sqrt(s: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix via eigh; tiny negative eigenvalues (round-off) are clipped."""
    w, v = torch.linalg.eigh(0.5 * (s + s.T))
    return (v * w.clamp(min=0.0).sqrt()) @ v.T


def frechet_from_stats(mu1, cov1, mu2, cov2) -> float:
    """Frechet (2-Wasserstein^2) distance between N(mu1, cov1) and N(mu2, cov2).

    Tr (cov1^{1/2} cov2 cov1^{1/2})^{1/2} is the sum of square roots of the eigenvalues of a
    symmetric PSD matrix, so two symmetric eigendecompositions suffice (no sqrtm, no complex parts)."""
    mu1, mu2 = torch.as_tensor(mu1).to(F64), torch.as_tensor(mu2).to(F64)
    cov1, cov2 = torch.as_tensor(cov1).to(F64), torch.as_tensor(cov2).to(F64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape:
        raise ValueError("statistics of different feature widths")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2.to(root1.device) @ root1  # (D, D) symmetric PSD
    eig = torch.linalg.eigvalsh(0.5 * (middle + middle.T)).clamp(min=0.0)
    trace_cross = eig.sqrt().sum()
    mean_term = (mu1 - mu2.to(mu1.device)).pow(2).sum()
    return (mean_term + torch.trace(cov1) + torch.trace(cov2).to(mean_term.device) - 2.0 * trace_cross).item()


def frechet_distance(feats_a, feats_b) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D) and (M, D): FID on Inception features."""
    mu_a, cov_a = gaussian_stats(feats_a)
    mu_b, cov_b = gaussian_stats(feats_b)
    return frechet_from_stats(mu_a, cov_a, mu_b, cov_b)


# --------------------------------------------------------------------------- kernel inception distance


def _polynomial_mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of equal-size sets x, y (m, D) with k(x, y) = (x.y / D + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1.0) ** 3  # (m, m)
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2.0 * k_xy.mean()


def kid(
    feats_a, feats_b, n_subsets: int = 100, subset_size: int = 1000, generator: torch.Generator | None = None
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and standard error of the unbiased MMD^2 over random subsets.

    Each subset draws ``m = min(subset_size, N, M)`` rows of each set without replacement
    (independently per subset). The standard error is std(subset values) / sqrt(n_subsets), the
    Monte Carlo error of the average; subsets overlap when n_subsets * m exceeds N or M, so it
    understates the sampling error of the sets themselves (it is 0 when m = N = M)."""
    a, b = _pair(feats_a, feats_b)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least two samples per set")
    values = torch.empty(n_subsets, dtype=F64)
    for i in range(n_subsets):
        ia = torch.randperm(len(a), generator=generator)[:m].to(a.device)
        ib = torch.randperm(len(b), generator=generator)[:m].to(b.device)
        values[i] = _polynomial_mmd2_unbiased(a[ia], b[ib])
    std_err = values.std().item() / math.sqrt(n_subsets) if n_subsets > 1 else float("nan")
    return values.mean().item(), std_err


# --------------------------------------------------------------------------- precision and recall


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Squared distance from each row of x (N, D) to its k-th nearest neighbour, itself excluded: (N,)."""
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in [1, {len(x) - 1}] for {len(x)} samples, got {k}")
    radii = torch.empty(len(x), dtype=F64, device=x.device)
    for start, d2 in _sq_dist_blocks(x, x):
        idx = torch.arange(len(d2), device=d2.device)
        d2[idx, start + idx] = float("inf")  # exclude self by index, so duplicates still count
        radii[start : start + len(d2)] = d2.kthvalue(k, dim=1).values
    return radii


def _inside_manifold(queries: Tensor, support: Tensor, radii2: Tensor) -> Tensor:
    """Whether each query lies in some ball B(support_j, radius_j) (closed balls): (Q,) bool."""
    inside = torch.empty(len(queries), dtype=torch.bool, device=queries.device)
    for start, d2 in _sq_dist_blocks(queries, support):
        inside[start : start + len(d2)] = (d2 <= radii2[None, :]).any(1)
    return inside


def precision_recall(real_feats, fake_feats, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The real manifold is the union of balls around each real sample with radius the distance to
    its k-th nearest real neighbour (itself excluded); precision is the fraction of fake samples
    inside it. Recall swaps the roles: the fraction of real samples inside the fake manifold.
    A set scored against itself has precision = recall = 1 exactly."""
    real, fake = _centred(*_pair(real_feats, fake_feats))
    precision = _inside_manifold(fake, real, _knn_radii(real, k)).double().mean().item()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k)).double().mean().item()
    return precision, recall


# --------------------------------------------------------------------------- class coverage


def class_histogram(logits_or_labels, num_classes: int, normalize: bool = False) -> Tensor:
    """Counts (int64) or, with ``normalize``, fractions (float64) of each class, shape (num_classes,).

    Accepts integer labels (N,) or classifier logits/probabilities (N, num_classes), read by argmax."""
    x = torch.as_tensor(logits_or_labels)
    if x.ndim == 2:
        if x.shape[1] != num_classes:
            raise ValueError(f"logits have {x.shape[1]} classes, expected {num_classes}")
        labels = x.argmax(1)
    elif x.ndim == 1:
        if x.is_floating_point():
            raise ValueError("1-D input must hold integer labels")
        labels = x.long()
    else:
        raise ValueError("expected labels (N,) or logits (N, num_classes)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    counts = torch.bincount(labels.cpu(), minlength=num_classes)
    if normalize:
        return counts.to(F64) / max(len(labels), 1)
    return counts


def psnr(images, reference, peak: float = 255.0) -> Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(peak^2 / MSE) (uint8 images: peak 255)."""
    a, b = torch.as_tensor(images).double(), torch.as_tensor(reference).double()
    mse = (a - b).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-12))
