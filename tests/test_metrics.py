"""Sample-quality metrics against truth: hand-computed small cases, closed forms for Gaussians,
and the limits every metric must reach (identical sets, same law, growing shift)."""

import math

import pytest
import torch

from difflab.evaluation import metrics
from difflab.evaluation.metrics import (
    class_histogram,
    energy_distance,
    frechet_distance,
    frechet_from_stats,
    gaussian_stats,
    kid,
    precision_recall,
    sliced_wasserstein,
)

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    m = torch.randn(d, d, generator=g, dtype=F64)
    return m @ m.T / d + 0.2 * torch.eye(d, dtype=F64)


def sample_gaussian(n, mu, cov, g):
    return mu + torch.randn(n, len(mu), generator=g, dtype=F64) @ torch.linalg.cholesky(cov).T


def mean_abs_normal(delta: float, s: float) -> float:
    """E|Z| for Z ~ N(delta, s^2)."""
    return s * math.sqrt(2 / math.pi) * math.exp(-(delta**2) / (2 * s**2)) + delta * math.erf(
        delta / (s * math.sqrt(2))
    )


# --------------------------------------------------------------------------- Frechet distance


def test_gaussian_stats_match_torch_cov():
    x = torch.randn(500, 6, generator=gen(0), dtype=F64) * torch.arange(1, 7, dtype=F64)
    mu, cov = gaussian_stats(x)
    torch.testing.assert_close(mu, x.mean(0))
    torch.testing.assert_close(cov, torch.cov(x.T))  # unbiased (N - 1)


def test_frechet_of_a_set_with_itself_is_zero():
    x = torch.randn(1000, 16, generator=gen(1), dtype=F64) @ torch.randn(16, 16, generator=gen(2), dtype=F64)
    scale = torch.trace(torch.cov(x.T)).item()
    assert abs(frechet_distance(x, x)) <= 1e-6 * scale


def test_frechet_from_stats_diagonal_closed_form():
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0], dtype=F64), torch.tensor([1.0, 1.0, 0.5], dtype=F64)
    s1, s2 = torch.tensor([1.0, 4.0, 0.25], dtype=F64), torch.tensor([9.0, 1.0, 0.25], dtype=F64)
    # ||mu1 - mu2||^2 + sum (sqrt s1 - sqrt s2)^2 = (1 + 0 + 6.25) + (4 + 1 + 0)
    assert frechet_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(12.25, rel=1e-12)


def test_frechet_from_stats_commuting_covariances():
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen(3), dtype=F64))  # shared eigenbasis
    s1 = torch.tensor([0.1, 0.5, 1.0, 2.0, 7.0], dtype=F64)
    s2 = torch.tensor([3.0, 0.5, 0.2, 2.0, 1.0], dtype=F64)
    cov1, cov2 = q @ torch.diag(s1) @ q.T, q @ torch.diag(s2) @ q.T
    mu = torch.zeros(5, dtype=F64)
    expected = (s1.sqrt() - s2.sqrt()).pow(2).sum().item()
    assert frechet_from_stats(mu, cov1, mu, cov2) == pytest.approx(expected, rel=1e-10)


def test_frechet_from_stats_non_commuting_closed_form():
    # For B = T A T with T symmetric PD, (A^1/2 B A^1/2)^1/2 = A^1/2 T A^1/2, so
    # FD(N(0, A), N(0, B)) = tr(A) + tr(B) - 2 tr(T A) = tr((I - T) A (I - T)): A and B do not commute.
    g = gen(4)
    a_cov, t = random_spd(6, g), random_spd(6, g)
    b_cov = t @ a_cov @ t
    assert torch.linalg.matrix_norm(a_cov @ b_cov - b_cov @ a_cov) > 0.1
    eye = torch.eye(6, dtype=F64)
    expected = torch.trace((eye - t) @ a_cov @ (eye - t)).item()
    mu = torch.zeros(6, dtype=F64)
    assert frechet_from_stats(mu, a_cov, mu, b_cov) == pytest.approx(expected, rel=1e-9)
    assert frechet_from_stats(mu, b_cov, mu, a_cov) == pytest.approx(expected, rel=1e-9)  # symmetric


def test_frechet_distance_of_large_gaussian_samples_approaches_closed_form():
    g = gen(5)
    mu1, mu2 = torch.zeros(4, dtype=F64), torch.tensor([0.5, -0.5, 0.0, 1.0], dtype=F64)
    cov1 = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.0], dtype=F64))
    cov2 = torch.diag(torch.tensor([2.0, 2.0, 1.0, 0.25], dtype=F64))
    exact = frechet_from_stats(mu1, cov1, mu2, cov2)
    assert exact == pytest.approx(1.5 + (1 - math.sqrt(2)) ** 2 + (math.sqrt(0.5) - 1) ** 2 + 0.25, rel=1e-12)
    fd = frechet_distance(sample_gaussian(40_000, mu1, cov1, g), sample_gaussian(40_000, mu2, cov2, g))
    assert fd == pytest.approx(exact, rel=0.04)


def test_frechet_grows_with_added_noise():
    g = gen(6)
    x = torch.randn(2000, 8, generator=g, dtype=F64) @ torch.randn(8, 8, generator=g, dtype=F64)
    z = torch.randn(2000, 8, generator=g, dtype=F64)
    fds = [frechet_distance(x, x + s * z) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert abs(fds[0]) < 1e-8
    assert all(lo < hi for lo, hi in zip(fds, fds[1:])), fds
    assert fds[-1] > 1.0


def test_frechet_accepts_images_and_rejects_width_mismatch():
    imgs = torch.rand(64, 1, 4, 4, generator=gen(7))
    assert frechet_distance(imgs, imgs.reshape(64, 16)) == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError):
        frechet_distance(torch.zeros(10, 3), torch.zeros(10, 4))


# --------------------------------------------------------------------------- KID


def test_kid_hand_computed_case():
    # k(x, y) = (x y + 1)^3 in 1-D: k_xx(0,1) = 1; k_yy(2,3) = 343; k_xy = 1, 1, 27, 64.
    # MMD_u^2 = 1 + 343 - 2 * 93 / 4 = 297.5; one subset of all samples every time -> std_err 0.
    mean, err = kid(torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]]), n_subsets=5, subset_size=10)
    assert mean == pytest.approx(297.5, rel=1e-12)
    assert err == pytest.approx(0.0, abs=1e-10)


def test_kid_of_point_masses_is_the_population_mmd():
    # X = 0, Y = c (d = 2): MMD^2 = k(0,0) + k(c,c) - 2 k(0,c) = (|c|^2 / 2 + 1)^3 - 1 exactly.
    c = torch.tensor([1.0, 2.0])
    mean, _ = kid(torch.zeros(50, 2), c.expand(60, 2), n_subsets=3, subset_size=20, generator=gen(0))
    assert mean == pytest.approx((5.0 / 2 + 1) ** 3 - 1, rel=1e-12)


def test_kid_same_law_is_near_zero_and_shift_is_clearly_positive():
    g = gen(8)
    a = torch.randn(2000, 16, generator=g, dtype=F64)
    b = torch.randn(2000, 16, generator=g, dtype=F64)
    for seed in range(3):
        mean, err = kid(a, b, n_subsets=50, subset_size=200, generator=gen(seed))
        assert err > 0
        assert abs(mean) < 3 * err, (mean, err)
    m_small, e_small = kid(a, b + 0.15, n_subsets=50, subset_size=200, generator=gen(0))
    m_big, e_big = kid(a, b + 0.3, n_subsets=50, subset_size=200, generator=gen(0))
    assert m_small > 5 * e_small
    assert m_big > 10 * e_big and m_big > 2 * m_small


def test_kid_is_reproducible_with_a_generator_and_caps_subset_size():
    a = torch.randn(300, 4, generator=gen(9))
    b = torch.randn(150, 4, generator=gen(10))
    assert kid(a, b, n_subsets=10, generator=gen(1)) == kid(a, b, n_subsets=10, generator=gen(1))
    assert kid(a, b, n_subsets=10, subset_size=150, generator=gen(1)) == kid(a, b, n_subsets=10, generator=gen(1))


# --------------------------------------------------------------------------- precision and recall


def test_precision_recall_hand_computed_case():
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # k = 1 radii: 1, 1, 1, 8
    assert precision_recall(real, torch.tensor([[5.0], [-5.0]]), k=1)[0] == 0.5  # |5 - 10| = 5 <= 8; -5 outside
    # closed balls: -1 and 18 lie exactly on the spheres of 0 and 10
    assert precision_recall(real, torch.tensor([[2.5], [-1.0], [18.0], [18.5], [-1.5]]), k=1)[0] == 0.6
    # recall: fake = {0, 3} with k = 1 radii 3, 3 -> real 0, 1, 2 covered, 10 not
    assert precision_recall(real, torch.tensor([[0.0], [3.0]]), k=1)[1] == 0.75


def test_precision_recall_self_exclusion_with_duplicates():
    # radius = k-th neighbour excluding self by index: a duplicate is a neighbour at distance 0.
    real = torch.tensor([[0.0], [0.0], [5.0], [6.0]])  # k = 1 radii: 0, 0, 1, 1
    fake = torch.tensor([[0.5], [0.4], [0.3]])
    assert precision_recall(real, fake, k=1)[0] == 0.0
    assert precision_recall(real, fake, k=2)[0] == 1.0  # radii 5, 5, 5, 6
    with pytest.raises(ValueError):
        precision_recall(real, fake, k=3)  # 3 fake points have only 2 neighbours each


def test_precision_recall_of_a_set_with_itself_is_one():
    x = torch.randn(500, 32, generator=gen(11))
    assert precision_recall(x, x, k=3) == (1.0, 1.0)


def test_precision_recall_same_law_is_high():
    g = gen(12)
    real = torch.randn(2000, 2, generator=g, dtype=F64)
    fake = torch.randn(2000, 2, generator=g, dtype=F64)
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.95 and r > 0.95


def test_precision_recall_fall_as_fake_slides_off_the_manifold():
    # Uniform on the unit square (a manifold with sharp edges, unlike Gaussian tails whose outliers
    # get huge k-NN balls): shifting fake by s along x leaves a fraction 1 - s of it on the real square.
    g = gen(13)
    real = torch.rand(2000, 2, generator=g, dtype=F64)
    fake = torch.rand(2000, 2, generator=g, dtype=F64)
    precisions = []
    for s in (0.25, 0.5, 0.75):
        p, r = precision_recall(real, fake + torch.tensor([s, 0.0], dtype=F64), k=3)
        assert p == pytest.approx(1 - s, abs=0.05)
        assert r == pytest.approx(1 - s, abs=0.05)
        precisions.append(p)
    assert precisions[0] > precisions[1] > precisions[2]


def test_collapsed_fake_keeps_precision_but_loses_recall():
    # Mode collapse: fake samples all in the real data's core -> precision stays high, recall falls
    # (to about P(|N(0, I)| < 0.7) = 0.22, against > 0.95 for a fake set from the same law).
    g = gen(14)
    real = torch.randn(2000, 2, generator=g, dtype=F64)
    fake = 0.2 * torch.randn(2000, 2, generator=g, dtype=F64)
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.95
    assert r < 0.35


# --------------------------------------------------------------------------- energy distance


def test_energy_distance_hand_cases_and_identity():
    assert energy_distance(torch.tensor([[0.0]]), torch.tensor([[1.0]])) == pytest.approx(2.0)
    # a = {0, 1}, b = {3}: 2 * mean(3, 2) - mean(0, 1, 1, 0) - 0 = 5 - 0.5
    assert energy_distance(torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0]])) == pytest.approx(4.5)
    x = torch.randn(300, 5, generator=gen(14))
    assert energy_distance(x, x) == 0.0
    assert energy_distance(x, x.flip(0)) == pytest.approx(0.0, abs=1e-12)  # equal as multisets


def test_energy_distance_symmetric_positive_and_increasing_with_shift():
    g = gen(15)
    a = torch.randn(800, 3, generator=g, dtype=F64)
    b = torch.randn(600, 3, generator=g, dtype=F64)
    shift = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    values = [energy_distance(a, b + s * shift) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(v > 0 for v in values)
    assert all(lo < hi for lo, hi in zip(values, values[1:])), values
    assert energy_distance(b + shift, a) == pytest.approx(values[2], rel=1e-12)


def test_energy_distance_matches_gaussian_closed_form():
    # 1-D N(0,1) vs N(delta,1): 2 E|N(delta, 2)| - 2 E|N(0, 2)|.
    g = gen(16)
    for delta in (1.0, 2.0):
        exact = 2 * mean_abs_normal(delta, math.sqrt(2)) - 2 * mean_abs_normal(0.0, math.sqrt(2))
        a = torch.randn(3000, 1, generator=g, dtype=F64)
        b = torch.randn(3000, 1, generator=g, dtype=F64) + delta
        assert energy_distance(a, b) == pytest.approx(exact, rel=0.1)  # ~4 sampling std devs
        assert energy_distance(a, b, unbiased=True) == pytest.approx(exact, rel=0.1)


def test_energy_distance_unbiased_version_centres_on_zero():
    g = gen(17)
    same = [
        energy_distance(torch.randn(200, 2, generator=g), torch.randn(200, 2, generator=g), unbiased=True)
        for _ in range(20)
    ]
    biased = energy_distance(
        torch.zeros(10, 2) + torch.arange(10.0)[:, None], torch.arange(10.0)[:, None].expand(10, 2)
    )
    assert min(same) < 0 < max(same)  # the U-statistic can be negative ...
    assert abs(sum(same) / len(same)) < 0.01  # ... and is unbiased for 0
    assert biased == 0.0  # the V-statistic of equal sets is exactly 0


# --------------------------------------------------------------------------- sliced Wasserstein


def test_sliced_wasserstein_1d_shift_of_a_gaussian():
    g = gen(18)
    a = torch.randn(5000, 1, generator=g, dtype=F64)
    assert sliced_wasserstein(a, a + 3.0, generator=gen(0)) == pytest.approx(3.0, rel=1e-10)
    b = torch.randn(5000, 1, generator=g, dtype=F64) + 3.0
    assert sliced_wasserstein(a, b, generator=gen(0)) == pytest.approx(3.0, abs=0.06)
    assert sliced_wasserstein(a, b, p=1.0, generator=gen(0)) == pytest.approx(3.0, abs=0.06)


def test_sliced_wasserstein_unequal_sizes_exact_1d():
    # Quantiles of {0, 1} and {0, .5, 1} differ by .5 on u in (1/3, 2/3]: W_2^2 = 1/12, W_1 = 1/6.
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert sliced_wasserstein(a, b, n_projections=4, generator=gen(0)) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    assert sliced_wasserstein(b, a, n_projections=4, p=1.0, generator=gen(0)) == pytest.approx(1 / 6, rel=1e-12)


def test_sliced_wasserstein_shift_in_d_dimensions():
    # A pure shift s moves every projection by theta.s: SW_2^2 = E (theta.s)^2 = |s|^2 / d.
    a = torch.randn(1000, 8, generator=gen(19), dtype=F64)
    s = torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0], dtype=F64)
    sw = sliced_wasserstein(a, a + s, n_projections=4000, generator=gen(1))
    assert sw == pytest.approx(2.0 / math.sqrt(8), rel=0.05)
    assert sliced_wasserstein(a, a, generator=gen(1)) == 0.0


# --------------------------------------------------------------------------- blocked pairwise distances


def test_row_blocks_give_the_same_answers(monkeypatch):
    # Pairwise distances go in row blocks of _BLOCK_ELEMENTS entries; force many uneven blocks.
    g = gen(20)
    a = torch.randn(97, 3, generator=g, dtype=F64)
    b = torch.randn(61, 3, generator=g, dtype=F64) + 0.5
    whole = (precision_recall(a, b, k=2), energy_distance(a, b), energy_distance(a, b, unbiased=True))
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 7 * 61)  # 7 rows per block against b, 4 against a
    blocked = (precision_recall(a, b, k=2), energy_distance(a, b), energy_distance(a, b, unbiased=True))
    assert blocked[0] == whole[0]
    assert blocked[1] == pytest.approx(whole[1], rel=1e-12)
    assert blocked[2] == pytest.approx(whole[2], rel=1e-12)
    # and against a direct evaluation of the U-statistic
    d_ab, d_aa, d_bb = torch.cdist(a, b), torch.cdist(a, a), torch.cdist(b, b)
    direct = 2 * d_ab.mean() - d_aa.sum() / (97 * 96) - d_bb.sum() / (61 * 60)
    assert blocked[2] == pytest.approx(direct.item(), rel=1e-9)


# --------------------------------------------------------------------------- class histogram


def test_class_histogram_labels_and_logits():
    labels = torch.tensor([0, 2, 2, 3, 3, 3])
    assert class_histogram(labels, 5).tolist() == [1, 0, 2, 3, 0]
    torch.testing.assert_close(class_histogram(labels, 5, normalize=True), torch.tensor([1, 0, 2, 3, 0], dtype=F64) / 6)
    logits = torch.nn.functional.one_hot(labels, 5).float() * 3.0 - 1.0
    assert class_histogram(logits, 5).tolist() == [1, 0, 2, 3, 0]
    with pytest.raises(ValueError):
        class_histogram(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError):
        class_histogram(logits, 4)


def test_energy_to_one_reference_is_the_energy_distance():
    from difflab.evaluation.metrics import EnergyTo

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(700, 3, generator=g, dtype=torch.float64) + 5.0
    to_ref = EnergyTo(ref)
    for shift in (0.0, 0.3, 2.0):
        a = torch.randn(400, 3, generator=g, dtype=torch.float64) + 5.0 + shift
        assert to_ref(a) == pytest.approx(energy_distance(a, ref), rel=1e-9, abs=1e-12)
