"""Degradation operators: adjoints, SVDs and hand-computed values."""

import pytest
import torch

from difflab.core.operators import Blur, Compose, Downsample, Grey, Mask, OperatorError, box_mask, random_mask

F64 = torch.float64


def operators():
    return [
        Mask(box_mask((1, 4, 4)), (1, 4, 4)),
        Mask(random_mask((3, 4, 4), 0.7, seed=1), (3, 4, 4)),
        Downsample(2, (1, 4, 4)),
        Downsample(4, (3, 8, 8)),
        Grey((3, 4, 4)),
        Blur(1.0, (1, 6, 6)),
        Blur(0.7, (3, 5, 7)),
    ]


@pytest.mark.parametrize("op", operators(), ids=lambda op: op.name)
def test_transpose_and_svd(op):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *op.shape, generator=g, dtype=F64)
    y = torch.randn(op(x).shape, generator=g, dtype=F64)
    # <A x, y> = <x, A^T y>
    assert torch.allclose((op(x) * y).sum(), (x * op.T(y)).sum(), atol=1e-10)
    svd = op.svd
    # V is orthonormal: V(Vt(x)) = x and |Vt x| = |x|
    assert torch.allclose(svd.V(svd.Vt(x)), x, atol=1e-10)
    assert torch.allclose(svd.Vt(x).norm(dim=1), x.flatten(1).norm(dim=1), atol=1e-10)
    # A = U diag(s) V^T (blur: up to the truncated directions, whose singular values are < 1 % of the largest)
    r = len(svd.s)
    recon = svd.U(svd.s * svd.Vt(x)[:, :r])
    tol = 1e-10 if not isinstance(op, Blur) else 1e-2 * float(x.abs().max()) * 10
    assert torch.allclose(recon, op(x), atol=tol), (recon - op(x)).abs().max()
    # the pseudo-inverse is consistent: A A^+ y = y on measurable y
    y_clean = op(x)
    assert torch.allclose(op(op.pinv(y_clean)), y_clean, atol=tol)


def test_hand_computed_values():
    x = torch.arange(16, dtype=F64).reshape(1, 1, 4, 4)
    assert Downsample(2, (1, 4, 4))(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    keep = box_mask((1, 4, 4))  # the right half missing
    assert keep.tolist() == [[True, True, False, False]] * 4
    assert Mask(keep, (1, 4, 4))(x).flatten().tolist() == [0, 1, 4, 5, 8, 9, 12, 13]
    assert Mask(keep, (1, 4, 4)).T(Mask(keep, (1, 4, 4))(x))[0, 0, :, 2:].abs().sum() == 0
    rgb = torch.tensor([1.0, 0.5, 0.0], dtype=F64).reshape(1, 3, 1, 1).expand(1, 3, 2, 2)
    assert torch.allclose(Grey((3, 2, 2))(rgb), torch.full((1, 1, 2, 2), 0.299 + 0.5 * 0.587, dtype=F64))
    m = random_mask((1, 10, 10), 0.7, seed=3)
    assert int((~m).sum()) == 70 and torch.equal(m, random_mask((1, 10, 10), 0.7, seed=3))
    blur = Blur(1.0, (1, 9, 9))  # kernel radius 3
    flat = torch.ones(1, 1, 9, 9, dtype=F64)
    assert (
        abs(float(blur(flat)[0, 0, 4, 4]) - 1.0) < 1e-12 and float(blur(flat)[0, 0, 0, 0]) < 0.8
    )  # an interior pixel of a constant image keeps its value


def test_composition_and_errors():
    op = Compose(Blur(1.0, (1, 8, 8)), Downsample(2, (1, 8, 8)))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1, 8, 8, generator=g, dtype=F64), torch.randn(2, 1, 4, 4, generator=g, dtype=F64)
    assert torch.allclose((op(x) * y).sum(), (x * op.T(y)).sum(), atol=1e-10)
    assert op.svd is None
    with pytest.raises(OperatorError, match="has no SVD"):
        op.pinv(y)
    with pytest.raises(OperatorError, match="factor 3 must divide the image size 8x8"):
        Downsample(3, (1, 8, 8))
    with pytest.raises(OperatorError, match="works on images of shape"):
        Downsample(2, (1, 8, 8))(torch.zeros(1, 1, 6, 6))
    with pytest.raises(OperatorError, match="the mask is"):
        Mask(torch.ones(3, 3, dtype=torch.bool), (1, 4, 4))
    with pytest.raises(OperatorError, match="needs 3-channel images"):
        Grey((1, 4, 4))
