"""Training-time augmentation of image data: random horizontal flips (``--augment flip``) and EDM's non-leaking
augmentation (``--augment edm``).

Each image of a training batch is mirrored left-right with probability 1/2, drawn from the step's generator (so a
resumed run sees the same flips); an image condition (super-resolution's ``low_res``) is mirrored with its image.
A flip is refused where it changes what an image means: handwritten digits (a mirrored 3 is not a digit), the
captions of fashion-pairs (its "left" and "right"), 2-D points, and latent runs (the training set is the encoded
images, and a mirrored latent is not the latent of the mirrored image).

``--augment edm`` (Karras et al. 2022, after Karras et al. 2020's ADA; its pixel-exact transforms only): each
training image is, with probability ``p`` per transform, mirrored left-right, mirrored up-down, turned by a random
number of quarter turns (square images) and translated by a whole number of pixels (up to 1/8 of its size, the
edges reflected). The network is *told* what was done (``augment_labels``, six numbers per image, added to its time
embedding through a bias-free linear map), so it learns the transformed images as other conditions and never has
to draw them: sampling gives no labels, which is the label of the untransformed data. Nothing leaks, so the
transforms are allowed where a plain flip is not (digits, fashion-pairs), but not for 2-D points or latent runs, and
not yet for super-resolution (its low-res condition would have to move alike).

``--augment edm-geometric`` is the set EDM trains CIFAR-10 with (its ``xflip=1e8, yflip=1, scale=1,
rotate_frac=1, aniso=1, translate_frac=1``): every image mirrored left-right or not (labelled either way), then
with probability ``p`` each a y-flip, an isotropic scaling by 2^(0.2 N(0, 1)), a rotation by any angle, an
anisotropic scaling by 2^(+-0.2 N(0, 1)) (along a random axis half the time) and a translation by N(0, 1/8) of the
size, sub-pixel: nine labels, EDM's. The affine part is resampled bilinearly with reflected edges, at the image's
own size (EDM works at twice the size through wavelet filters, to alias less)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SPATIAL_CONDITIONS = ("low_res",)  # conditions that are images of the same scene, mirrored with it

FLIP_CHANGES_MEANING = {
    "digits": "a mirrored digit is not a digit",
    "fashion-pairs": "its captions and attributes say which item is on the left and which on the right",
}


def flip_refusal(dataset: str, data_kind: str, latent: bool) -> str | None:
    """Why ``--augment flip`` is refused for this run, or None where it is allowed."""
    if data_kind != "images":
        return f"--augment flip mirrors images; {dataset} is not an image set"
    if dataset in FLIP_CHANGES_MEANING:
        return f"--augment flip is off for {dataset}: {FLIP_CHANGES_MEANING[dataset]}"
    if latent:
        return "--augment flip is for pixel-space runs (a mirrored latent is not the latent of the mirrored image)"
    return None


EDM_P = 0.12  # the probability of each transform (EDM's CIFAR-10 setting)
EDM_TRANSLATE = 0.125  # translations up to this fraction of the size
AUGMENT_DIM = 6  # augment_labels: x-flip, y-flip, the quarter turn's two bits, tx and ty (in units of the largest)
# --augment edm-geometric: EDM's CIFAR-10 set (xflip, yflip, scale, rotate_frac, aniso, translate_frac)
GEOMETRIC_SCALE_STD = 0.2  # log2 standard deviation of the isotropic scaling
GEOMETRIC_ANISO_STD = 0.2  # log2 standard deviation of the anisotropic scaling
GEOMETRIC_ANISO_ROTATED = 0.5  # the probability that the anisotropic scaling is along a random axis, not x and y
GEOMETRIC_TRANSLATE_STD = 0.125  # standard deviation of the translation, in units of the size
GEOMETRIC_DIM = 9  # labels: x-flip, y-flip, the scale's draw, cos - 1 and sin of the turn, aniso (2), tx, ty
AUGMENT_DIMS = {"edm": AUGMENT_DIM, "edm-geometric": GEOMETRIC_DIM}  # the labels each non-leaking augmentation gives


def edm_refusal(dataset: str, data_kind: str, latent: bool, super_resolution: bool, name: str = "edm") -> str | None:
    """Why ``--augment NAME`` (one of AUGMENT_DIMS: edm, edm-geometric) is refused for this run, or None where it
    is allowed."""
    if data_kind != "images":
        return f"--augment {name} transforms images; {dataset} is not an image set"
    if latent:
        return f"--augment {name} is for pixel-space runs (the training set of a latent run is its encoded images)"
    if super_resolution:
        return f"--augment {name} is not built for super-resolution runs (the low-res condition would move alike)"
    return None


def edm_draw(n: int, height: int, width: int, generator: torch.Generator, p: float = EDM_P) -> Tensor:
    """(n, 5) int64: per image its x-flip and y-flip (0/1), quarter turns k (0..3; 0 unless square) and translation
    tx, ty in pixels; each transform is drawn with probability ``p`` (else its identity), on the generator's
    device."""
    dev = generator.device

    def apply(values: Tensor) -> Tensor:
        return torch.where(torch.rand(values.shape, generator=generator, device=dev) < p, values, 0)

    flips = apply(torch.randint(2, (n, 2), generator=generator, device=dev))
    turns = (
        apply(torch.randint(4, (n, 1), generator=generator, device=dev))
        if height == width
        else torch.zeros((n, 1), dtype=torch.long, device=dev)
    )
    limit = torch.tensor([width, height], device=dev) * EDM_TRANSLATE
    shift = ((2 * torch.rand((n, 2), generator=generator, device=dev) - 1) * limit).round().long()
    shift = torch.where(torch.rand((n, 1), generator=generator, device=dev) < p, shift, 0)
    return torch.cat([flips, turns, shift], dim=1)


def _reflect(i: Tensor, size: int) -> Tensor:
    """Indices outside [0, size) reflected back in, the edge not repeated (... 2 1 | 0 1 2 ... | size-2 ...)."""
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * size - 2
    return size - 1 - (size - 1 - i.remainder(period)).abs()


def edm_apply(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B, C, H, W) transformed by ``edm_draw``'s parameters (B, 5), and their augment_labels (B, 6):
    x-flip, y-flip, the quarter turn as the two flips and transpose it is made of, tx / (W / 8), ty / (H / 8).
    All-zero parameters leave an image as it is and give labels of zeros."""
    B, _, H, W = x.shape
    xf, yf, k, tx, ty = (params[:, i].to(x.device) for i in range(5))

    def where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return torch.where(mask.bool().view(B, 1, 1, 1), a, b)

    x = where(xf, x.flip(-1), x)
    x = where(yf, x.flip(-2), x)
    turn_x, turn_y = (k == 1) | (k == 2), (k == 2) | (k == 3)  # k quarter turns = these flips, then a transpose
    x = where(turn_x, x.flip(-1), x)
    x = where(turn_y, x.flip(-2), x)
    if H == W:
        x = where((k == 1) | (k == 3), x.transpose(-1, -2), x)
    rows = _reflect(torch.arange(H, device=x.device)[None, :] - ty[:, None], H)  # (B, H): source row of each row
    cols = _reflect(torch.arange(W, device=x.device)[None, :] - tx[:, None], W)  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(-1, x.shape[1], -1, W))
    x = x.gather(3, cols[:, None, None, :].expand(-1, x.shape[1], H, -1))
    unit = torch.tensor([W, H], device=x.device, dtype=torch.float32) * EDM_TRANSLATE
    labels = torch.cat(
        [torch.stack([xf, yf, turn_x, turn_y], 1).float(), torch.stack([tx, ty], 1).float() / unit], dim=1
    )
    return x, labels


def geometric_draw(n: int, generator: torch.Generator, p: float = EDM_P) -> Tensor:
    """(n, 8) float: per image its x-flip (drawn for every image: EDM mirrors half of them), y-flip (0/1), the
    scale's standard-normal draw w (the scale is 2^(0.2 w)), the turn's angle in (-pi, pi), the anisotropic
    scaling's draw and axis angle, and the translation's two standard-normal draws (in units of 1/8 of the size);
    each transform but the x-flip drawn with probability ``p`` (else its identity), on the generator's device."""
    dev = generator.device

    def rand(*shape) -> Tensor:
        return torch.rand(shape, generator=generator, device=dev)

    def randn(*shape) -> Tensor:
        return torch.randn(shape, generator=generator, device=dev)

    def apply(values: Tensor) -> Tensor:
        return torch.where(rand(n, 1) < p, values, 0.0)

    xflip = torch.randint(2, (n, 1), generator=generator, device=dev).float()
    yflip = apply(torch.randint(2, (n, 1), generator=generator, device=dev).float())
    scale = apply(randn(n, 1))
    turn = apply((2 * rand(n, 1) - 1) * math.pi)
    aniso = apply(randn(n, 1))
    axis = torch.where(rand(n, 1) < GEOMETRIC_ANISO_ROTATED, (2 * rand(n, 1) - 1) * math.pi, 0.0)
    shift = apply(randn(n, 2))
    return torch.cat([xflip, yflip, scale, turn, aniso, axis, shift], dim=1)


def _rotation(angle: Tensor) -> Tensor:
    c, s = angle.cos(), angle.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # (B, 2, 2)


def _reflect_float(u: Tensor, size: Tensor) -> Tensor:
    """Coordinates (..., 2) in pixels reflected into [0, size - 1] (the edge not repeated: _reflect's rule)."""
    top = (size - 1).clamp(min=1e-6)
    return top - (top - u.remainder(2 * top)).abs()


def geometric_apply(x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """Images (B, C, H, W) transformed by ``geometric_draw``'s parameters (B, 8), and their augment_labels (B, 9):
    x-flip, y-flip, the scale's draw, cos - 1 and sin of the turn, the anisotropic draw times the cos and sin of
    its axis, and the translation's two draws (EDM's labels). The flips are exact; the rest is one affine map
    about the image centre, resampled bilinearly with the edges reflected (EDM resamples at twice the size
    through wavelet filters; not done here). Parameters of zeros leave an image exactly as it is, labels zero."""
    B, _, H, W = x.shape
    params = params.to(x.device, torch.float32)
    xf, yf, w_scale, turn, w_aniso, axis, tx, ty = params.unbind(1)
    x = torch.where(xf.bool().view(B, 1, 1, 1), x.flip(-1), x)
    x = torch.where(yf.bool().view(B, 1, 1, 1), x.flip(-2), x)
    moved = (params[:, 2:5] != 0).any(1) | (params[:, 6:] != 0).any(1)
    if moved.any():
        # the inverse map: where in the input each output pixel (centred coordinates) is read from
        s = (w_scale * GEOMETRIC_SCALE_STD).exp2()
        a = (w_aniso * GEOMETRIC_ANISO_STD).exp2()
        inv = torch.eye(2, device=x.device).expand(B, 2, 2) / s.view(B, 1, 1)
        inv = inv @ _rotation(turn)  # EDM's rotate2d_inv(-turn)
        stretch = torch.diag_embed(torch.stack([1 / a, a], -1))
        inv = inv @ _rotation(-axis) @ stretch @ _rotation(axis)
        shift = torch.stack([tx * W, ty * H], -1) * GEOMETRIC_TRANSLATE_STD  # pixels
        ys, xs = torch.meshgrid(
            torch.arange(H, device=x.device, dtype=torch.float32) - (H - 1) / 2,
            torch.arange(W, device=x.device, dtype=torch.float32) - (W - 1) / 2,
            indexing="ij",
        )
        points = torch.stack([xs, ys], -1).view(1, H * W, 2) - shift.view(B, 1, 2)
        size = torch.tensor([W, H], device=x.device, dtype=torch.float32)
        source = (points @ inv.transpose(1, 2)).view(B, H, W, 2) + (size - 1) / 2  # pixel coordinates
        source = _reflect_float(source, size)  # inside the image: bilinear reads no padding
        grid = source * 2 / (size - 1).clamp(min=1) - 1  # align_corners=True: -1 and 1 are the edge pixels
        warped = nn.functional.grid_sample(x.float(), grid, mode="bilinear", align_corners=True).to(x.dtype)
        x = torch.where(moved.view(B, 1, 1, 1), warped, x)
    labels = torch.stack(
        [xf, yf, w_scale, turn.cos() - 1, turn.sin(), w_aniso * axis.cos(), w_aniso * axis.sin(), tx, ty], 1
    )
    return x, labels


def non_leaking_draw(name: str, n: int, height: int, width: int, generator: torch.Generator) -> Tensor:
    """The parameters of ``n`` images' transforms under the non-leaking augmentation ``name`` (AUGMENT_DIMS)."""
    return edm_draw(n, height, width, generator) if name == "edm" else geometric_draw(n, generator)


def non_leaking_apply(name: str, x: Tensor, params: Tensor) -> tuple[Tensor, Tensor]:
    """The images transformed by ``non_leaking_draw(name, ...)``'s parameters, and their augment_labels."""
    return edm_apply(x, params) if name == "edm" else geometric_apply(x, params)


def flip_mask(n: int, generator: torch.Generator) -> Tensor:
    """(n,) bool: which images of a batch are mirrored (probability 1/2 each), on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def flip(x: Tensor, mask: Tensor) -> Tensor:
    """The images (B, C, H, W) with those marked by ``mask`` (B,) mirrored left-right (the last axis)."""
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)
