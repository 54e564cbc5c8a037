"""Degradation operators y = A(x) + sigma_y n for inverse problems, in the data space (images (B, C, H, W)).

One interface drives every restoration method and the consistency metric ||A(x_hat) - y||:

    op(x)          A x                        (B, ...) in the operator's measurement shape
    op.T(y)        A^T y                      (B, C, H, W)
    op.measure(x)  A x + sigma_y n            with n ~ N(0, I) from an explicit generator
    op.pinv(y)     A^+ y                      (through the SVD)
    op.show(y)     the measurement as an image, for pictures (A^T y rescaled, or upsampled)
    op.svd         an ``SVD`` of A when it has one (DDRM needs it), else None

An ``SVD`` works on flattened samples (D = C H W numbers): A = U diag(s) V^T with the r measured
directions first, s (r,) > 0,

    svd.Vt(x) -> (B, D)   spectral coordinates of x      svd.V(c) -> (B, C, H, W)   the inverse
    svd.Ut(y) -> (B, r)   spectral coordinates of y      svd.U(c) -> y

Operators: ``Mask`` (box, random pixels, a user's mask), ``Downsample`` (average pooling by k),
``Grey`` (colour to luminance), ``Blur`` (separable Gaussian, zero padding) and ``Compose`` (A2 after A1,
no SVD). Blur's singular values below ``BLUR_CUTOFF`` times the largest are treated as zero (those
directions are not measured), the truncation every SVD-based method applies to a blur.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

BLUR_CUTOFF = 1e-2
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's convert("L")


class OperatorError(ValueError):
    """An operator that cannot be built or applied: wrong shapes, a factor that does not divide the size, ..."""


@dataclass
class SVD:
    """A = U diag(s) V^T on flattened samples; see the module doc."""

    Vt: callable
    V: callable
    Ut: callable
    U: callable
    s: Tensor  # (r,) > 0


class Operator:
    """Base: subclasses define ``forward`` (A), ``T`` (A^T), ``shape`` (C, H, W) and optionally ``svd``."""

    shape: tuple[int, int, int]
    sigma_y: float = 0.0
    svd: SVD | None = None
    name: str = "operator"

    def __call__(self, x: Tensor) -> Tensor:
        self.check(x)
        return self.forward(x)

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def T(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def check(self, x: Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.shape):
            raise OperatorError(f"{self.name} works on images of shape {tuple(self.shape)}, got {tuple(x.shape[1:])}")

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        y = self(x)
        if self.sigma_y:
            y = y + self.sigma_y * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        return y

    def pinv(self, y: Tensor) -> Tensor:
        """A^+ y = V diag(1/s) U^T y (zero on the unmeasured directions)."""
        if self.svd is None:
            raise OperatorError(f"{self.name} has no SVD, so no pseudo-inverse")
        c = self.svd.Ut(y) / self.svd.s.to(y)
        full = torch.zeros(len(y), math.prod(self.shape), dtype=y.dtype, device=y.device)
        full[:, : c.shape[1]] = c
        return self.svd.V(full)

    def show(self, y: Tensor) -> Tensor:
        """The measurement as an image of the operator's shape (for pictures)."""
        return self.pinv(y) if self.svd is not None else self.T(y)

    def consistency(self, x_hat: Tensor, y: Tensor) -> Tensor:
        """||A(x_hat) - y|| per sample, divided by sqrt(number of measurements) (an RMS error)."""
        d = (self(x_hat) - y).flatten(1)
        return d.norm(dim=1) / math.sqrt(d.shape[1])


def _flat(x: Tensor) -> Tensor:
    return x.reshape(len(x), -1)


# --------------------------------------------------------------------------- masking


class Mask(Operator):
    """Keep the pixels where ``keep`` (C, H, W) (or (H, W), all channels) is True: y = x[keep] (B, m)."""

    name = "mask"

    def __init__(self, keep: Tensor, shape: tuple[int, int, int], sigma_y: float = 0.0):
        C, H, W = shape
        keep = torch.as_tensor(keep, dtype=torch.bool)
        if keep.shape == (H, W):
            keep = keep.expand(C, H, W)
        if tuple(keep.shape) != (C, H, W):
            raise OperatorError(f"the mask is {tuple(keep.shape)}; the images are {C}x{H}x{W} (give HxW or CxHxW)")
        if not keep.any():
            raise OperatorError("the mask keeps no pixel")
        self.shape, self.sigma_y, self.keep = (C, H, W), float(sigma_y), keep.clone()
        flat = self.keep.flatten()
        self.kept = flat.nonzero().squeeze(1)
        self.order = torch.cat([self.kept, (~flat).nonzero().squeeze(1)])  # measured first
        self.inverse = torch.argsort(self.order)
        m = len(self.kept)
        self.svd = SVD(
            Vt=lambda x: _flat(x)[:, self.order.to(x.device)],
            V=lambda c: c[:, self.inverse.to(c.device)].reshape(len(c), *self.shape),
            Ut=lambda y: y,
            U=lambda c: c,
            s=torch.ones(m, dtype=torch.float64),
        )

    def forward(self, x):
        return _flat(x)[:, self.kept.to(x.device)]

    def T(self, y):
        out = torch.zeros(len(y), math.prod(self.shape), dtype=y.dtype, device=y.device)
        out[:, self.kept.to(y.device)] = y
        return out.reshape(len(y), *self.shape)

    @property
    def missing_fraction(self) -> float:
        return 1.0 - len(self.kept) / self.keep.numel()


def box_mask(shape: tuple[int, int, int], box: tuple[int, int, int, int] | None = None) -> Tensor:
    """(H, W) True outside the box (top, left, height, width); default: the right half is missing."""
    _, H, W = shape
    top, left, h, w = box if box is not None else (0, W // 2, H, W - W // 2)
    keep = torch.ones(H, W, dtype=torch.bool)
    keep[top : top + h, left : left + w] = False
    return keep


def random_mask(shape: tuple[int, int, int], missing: float, seed: int = 0) -> Tensor:
    """(H, W) True where a pixel is kept; a fraction ``missing`` of the pixels (exactly, rounded) is dropped."""
    if not 0.0 <= missing < 1.0:
        raise OperatorError(f"the missing fraction must be in [0, 1), got {missing}")
    _, H, W = shape
    n_drop = round(missing * H * W)
    perm = torch.randperm(H * W, generator=torch.Generator().manual_seed(seed))
    keep = torch.ones(H * W, dtype=torch.bool)
    keep[perm[:n_drop]] = False
    return keep.reshape(H, W)


# --------------------------------------------------------------------------- one linear functional per group


def _completion(w: Tensor) -> Tensor:
    """An orthonormal (n, n) matrix whose first column is w / |w| (QR of [w, I])."""
    n = len(w)
    q, r = torch.linalg.qr(torch.cat([w[:, None], torch.eye(n, dtype=w.dtype)], dim=1))
    q = q[:, :n]
    return q * torch.sign(r[0, 0])  # first column +w/|w|


class _Grouped(Operator):
    """y_g = <w, x_g> for groups g of n numbers each: A = U diag(|w|) V^T with V's first rows w / |w| per group."""

    def _setup(self, w: Tensor) -> None:
        self.w = w.to(torch.float64)
        self.Q = _completion(self.w)  # (n, n)
        s = self.w.norm()
        m = self.num_groups
        self.svd = SVD(
            Vt=self._Vt,
            V=self._V,
            Ut=lambda y: _flat(y),
            U=lambda c: c.reshape(len(c), *self.y_shape),
            s=torch.full((m,), float(s), dtype=torch.float64),
        )

    def _Vt(self, x):
        g = self.groups(x)  # (B, G, n)
        c = g @ self.Q.to(g)  # (B, G, n)
        return torch.cat([c[..., 0], c[..., 1:].reshape(len(x), -1)], dim=1)

    def _V(self, c):
        B, G, n = len(c), self.num_groups, len(self.w)
        coeffs = torch.cat([c[:, :G, None], c[:, G:].reshape(B, G, n - 1)], dim=2)
        return self.ungroup(coeffs @ self.Q.to(c).T)

    def forward(self, x):
        return (self.groups(x) @ self.w.to(x)).reshape(len(x), *self.y_shape)

    def T(self, y):
        return self.ungroup(_flat(y)[..., None] * self.w.to(y))


class Downsample(_Grouped):
    """Average pooling by k: (B, C, H, W) -> (B, C, H/k, W/k)."""

    name = "downsample"

    def __init__(self, k: int, shape: tuple[int, int, int], sigma_y: float = 0.0):
        C, H, W = shape
        if k < 1 or H % k or W % k:
            raise OperatorError(f"the factor {k} must divide the image size {H}x{W}")
        self.k, self.shape, self.sigma_y = k, (C, H, W), float(sigma_y)
        self.y_shape = (C, H // k, W // k)
        self.num_groups = C * (H // k) * (W // k)
        self.name = f"downsample x{k}"
        self._setup(torch.full((k * k,), 1.0 / (k * k)))

    def groups(self, x):
        B, (C, H, W), k = len(x), self.shape, self.k
        return x.reshape(B, C, H // k, k, W // k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, -1, k * k)

    def ungroup(self, g):
        B, (C, H, W), k = len(g), self.shape, self.k
        return g.reshape(B, C, H // k, W // k, k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)

    def show(self, y):
        return torch.nn.functional.interpolate(y, scale_factor=self.k, mode="nearest")


class Grey(_Grouped):
    """Colour to luminance: (B, 3, H, W) -> (B, 1, H, W) with the BT.601 weights."""

    name = "grey"

    def __init__(self, shape: tuple[int, int, int], sigma_y: float = 0.0):
        C, H, W = shape
        if C != 3:
            raise OperatorError(f"colour-to-grey needs 3-channel images, these have {C}")
        self.shape, self.sigma_y, self.y_shape, self.num_groups = (C, H, W), float(sigma_y), (1, H, W), H * W
        self._setup(torch.tensor(LUMA))

    def groups(self, x):
        return x.permute(0, 2, 3, 1).reshape(len(x), -1, 3)

    def ungroup(self, g):
        _, H, W = self.shape
        return g.reshape(len(g), H, W, 3).permute(0, 3, 1, 2)

    def show(self, y):
        return y.expand(-1, 3, -1, -1)


# --------------------------------------------------------------------------- blur


def gaussian_kernel(sigma: float, radius: int | None = None) -> Tensor:
    radius = radius if radius is not None else max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def conv_matrix(kernel: Tensor, n: int) -> Tensor:
    """(n, n) matrix of a 1-D 'same' convolution with zero padding."""
    r = len(kernel) // 2
    M = torch.zeros(n, n, dtype=torch.float64)
    for i in range(n):
        for j, kv in enumerate(kernel):
            col = i + j - r
            if 0 <= col < n:
                M[i, col] = kv
    return M


class Blur(Operator):
    """Separable Gaussian blur with zero padding: Y = A_r X A_c^T per channel, y of the image's shape."""

    def __init__(self, sigma: float, shape: tuple[int, int, int], sigma_y: float = 0.0):
        if not sigma > 0:
            raise OperatorError(f"the blur width must be positive, got {sigma}")
        C, H, W = shape
        self.shape, self.sigma_y, self.name = (C, H, W), float(sigma_y), f"blur sigma {sigma:g}"
        k = gaussian_kernel(sigma)
        self.Ar, self.Ac = conv_matrix(k, H), conv_matrix(k, W)
        Ur, sr, Vrt = torch.linalg.svd(self.Ar)
        Uc, sc, Vct = torch.linalg.svd(self.Ac)
        s = torch.outer(sr, sc).flatten()  # (H W,) singular values of A_r (x) A_c, per channel
        s_all = s.repeat(C)
        order = torch.argsort(s_all, descending=True)
        r = int((s_all > BLUR_CUTOFF * s_all.max()).sum())
        self.Ur, self.Vr, self.Uc, self.Vc = Ur, Vrt.T, Uc, Vct.T
        self.order, self.inverse = order, torch.argsort(order)
        self.svd = SVD(
            Vt=self._Vt,
            V=self._V,
            Ut=lambda y: self._spectral(y, self.Ur, self.Uc)[:, :r],
            U=self._U,
            s=s_all[order][:r],
        )
        self.r = r

    def _spectral(self, x, L, R):
        c = L.T.to(x) @ x @ R.to(x)  # (B, C, H, W)
        return _flat(c)[:, self.order.to(x.device)]

    def _unspectral(self, c, L, R):
        full = c[:, self.inverse.to(c.device)].reshape(len(c), *self.shape)
        return L.to(c) @ full @ R.T.to(c)

    def _Vt(self, x):
        return self._spectral(x, self.Vr, self.Vc)

    def _V(self, c):
        return self._unspectral(c, self.Vr, self.Vc)

    def _U(self, c):
        full = torch.zeros(len(c), math.prod(self.shape), dtype=c.dtype, device=c.device)
        full[:, : c.shape[1]] = c
        return self._unspectral(full, self.Ur, self.Uc)

    def forward(self, x):
        return self.Ar.to(x) @ x @ self.Ac.T.to(x)

    def T(self, y):
        return self.Ar.T.to(y) @ y @ self.Ac.to(y)

    def show(self, y):
        return y


# --------------------------------------------------------------------------- composition


class Compose(Operator):
    """A2 after A1 (no SVD: methods that need one refuse it)."""

    def __init__(self, first: Operator, second: Operator):
        self.first, self.second = first, second
        self.shape, self.sigma_y = first.shape, second.sigma_y
        self.name = f"{second.name} after {first.name}"

    def forward(self, x):
        return self.second(self.first(x))

    def T(self, y):
        return self.first.T(self.second.T(y))

    def show(self, y):
        return self.first.show(self.second.show(y))


class Decoded(Operator):
    """A data-space operator seen from a latent space: A(D(z)) for a decoder D (latent diffusion). It is
    differentiable but nonlinear, with no transpose or SVD, so of the zero-shot methods only DPS takes it:
    its gradient step runs through the decoder. ``show`` is the data-space operator's."""

    def __init__(self, op: Operator, decode, latent_shape):
        self.op, self.decode = op, decode
        self.shape, self.sigma_y = tuple(latent_shape), op.sigma_y
        self.name = f"{op.name} after decoding"

    def forward(self, z):
        return self.op(self.decode(z))

    def T(self, y):
        raise OperatorError(f"{self.name} is nonlinear: it has no transpose (use DPS)")

    def show(self, y):
        return self.op.show(y)
