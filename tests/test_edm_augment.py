"""EDM's non-leaking augmentation (data/augment.py, --augment edm): the transforms are the dihedral group and
reflected whole-pixel shifts, labelled so the identity reads zero; --augment edm-geometric's affine maps agree
with the exact transforms where they meet them and map a ramp to the ramp they should; the U-Net with labels of
zeros (what sampling gives) is the U-Net without them; runs train, sample, resume and export with it, and it is
refused where it cannot apply."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.cli import main
from difflab.data.augment import (
    AUGMENT_DIM,
    EDM_P,
    GEOMETRIC_DIM,
    GEOMETRIC_TRANSLATE_STD,
    edm_apply,
    edm_draw,
    geometric_apply,
    geometric_draw,
)
from difflab.nets.unet import UNet, UNetConfig
from difflab.runs.config import load_config
from difflab.runs.diffusion import DiffusionRun


def dihedral(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 images of x (C, H, W) under quarter turns and mirrors."""
    turns = [torch.rot90(x, k, dims=(-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def test_zero_parameters_are_the_identity_and_read_zero():
    x = torch.randn(3, 2, 6, 6)
    y, labels = edm_apply(x, torch.zeros(3, 5, dtype=torch.long))
    assert torch.equal(y, x) and torch.equal(labels, torch.zeros(3, AUGMENT_DIM))


def test_flips_and_turns_are_the_dihedral_group_and_each_label_says_which():
    x = torch.randn(1, 1, 5, 5).expand(8, -1, -1, -1)
    params = torch.tensor([[xf, yf, k, 0, 0] for xf in (0, 1) for yf in (0, 1) for k in (0, 2)])
    y, labels = edm_apply(x, params)
    group = dihedral(x[0])
    for yi in y:
        assert sum(torch.equal(yi, g) for g in group) == 1
    assert len({tuple(lab.tolist()) for lab in labels}) == 8  # different parameters, different labels
    turned, _ = edm_apply(x[:4], torch.tensor([[0, 0, k, 0, 0] for k in range(4)]))
    members = [next(i for i, g in enumerate(group) if torch.equal(t, g)) for t in turned]
    assert sorted(members) == [0, 1, 2, 3]  # the four quarter turns, each once


def test_a_shift_moves_every_pixel_and_reflects_at_the_edge():
    x = torch.arange(6.0).reshape(1, 1, 1, 6).expand(1, 1, 3, 6).contiguous()
    y, labels = edm_apply(x, torch.tensor([[0, 0, 0, 2, 0]]))
    assert y[0, 0, 0].tolist() == [2, 1, 0, 1, 2, 3]  # out[c] = in[reflect(c - 2)]
    assert labels[0, 4].item() == pytest.approx(2 / (6 * 0.125))
    down, _ = edm_apply(x.transpose(-1, -2).contiguous(), torch.tensor([[0, 0, 0, 0, -1]]))
    assert down[0, 0, :, 0].tolist() == [1, 2, 3, 4, 5, 4]


def test_each_transform_is_drawn_with_probability_p():
    params = edm_draw(20000, 16, 16, torch.Generator().manual_seed(0))
    assert params[:, 0].float().mean().item() == pytest.approx(EDM_P / 2, abs=0.01)  # drawn, then flipped 1/2
    assert (params[:, 2] != 0).float().mean().item() == pytest.approx(EDM_P * 3 / 4, abs=0.01)
    assert (params[:, 3:] != 0).any(1).float().mean().item() <= EDM_P + 0.01
    assert params[:, 3:].abs().max().item() == 2  # 16 / 8
    assert (edm_draw(1000, 8, 16, torch.Generator().manual_seed(0))[:, 2] == 0).all()  # no turns unless square


def test_the_unet_with_labels_of_zeros_is_the_unet_without_them():
    small = dict(
        image_size=8, in_channels=1, base_channels=8, channel_mults=(1, 2), norm_groups=4, attention_resolutions=()
    )
    cfg = UNetConfig(**small, augment_dim=6)
    net = UNet(cfg).eval()
    with torch.no_grad():  # every weight random (zero-initialised layers would hide the embedding)
        for p in net.parameters():
            p.normal_(0, 0.3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 400.0])
    assert torch.equal(net(x, t), net(x, t, augment_labels=torch.zeros(2, 6)))
    assert not torch.allclose(net(x, t), net(x, t, augment_labels=torch.ones(2, 6)))
    assert "augment_labels" in net.accepts
    with pytest.raises(ValueError, match="augment_dim=0"):
        UNet(UNetConfig(**small))(x, t, augment_labels=torch.zeros(2, 6))


def test_a_digits_run_trains_samples_resumes_and_exports_with_it(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "digits", "--out", str(run), "--augment", "edm", "--batch-size", "16", "--quiet"]
    assert main([*argv, "--steps", "3", "--checkpoint-every", "3"]) == 0
    cfg = load_config(run)
    assert cfg.train.augment == "edm" and cfg.net.augment_dim == AUGMENT_DIM  # allowed for digits: nothing leaks
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]) == 0
    assert DiffusionRun.load(run).sample(2, steps=2, sampler="ddim").shape == (2, 1, 8, 8)
    assert main(["export", str(run), "--format", "torch-export", "--out", str(tmp_path / "x")]) == 0
    capsys.readouterr()
    for bad, says in (
        (["train", "moons", "--augment", "edm", "--out", str(tmp_path / "m")], "needs an image run"),
        (
            ["train", "digits", "--cond", "low-res", "--augment", "edm", "--out", str(tmp_path / "s")],
            "super-resolution",
        ),
    ):
        assert main([*bad, "--quiet"]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()
    pytest.importorskip("diffusers")  # the mapped UNet2DModel is checked against the run while exporting
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0


def geometric(**values) -> torch.Tensor:
    """geometric_draw's parameters (1, 8) with the named ones set and the rest the identity."""
    names = ("xflip", "yflip", "scale", "turn", "aniso", "axis", "tx", "ty")
    return torch.tensor([[float(values.get(n, 0.0)) for n in names]])


def test_geometric_zero_parameters_are_the_identity_and_read_zero():
    x = torch.randn(3, 2, 6, 10)
    y, labels = geometric_apply(x, torch.zeros(3, 8))
    assert torch.equal(y, x) and torch.equal(labels, torch.zeros(3, GEOMETRIC_DIM))


def test_geometric_maps_meet_the_exact_transforms_and_say_edms_labels():
    x = torch.randn(1, 3, 8, 8)
    turned, labels = geometric_apply(x, geometric(turn=math.pi / 2))
    torch.testing.assert_close(turned, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)  # a quarter turn
    torch.testing.assert_close(labels[0, 3:5], torch.tensor([-1.0, 1.0]))  # cos - 1, sin
    shift = 2 / (8 * GEOMETRIC_TRANSLATE_STD)  # the draw that moves two pixels: as the pixel-exact shift, edges too
    moved, labels = geometric_apply(x, geometric(tx=shift, ty=-shift / 2))
    exact, _ = edm_apply(x, torch.tensor([[0, 0, 0, 2, -1]]))
    torch.testing.assert_close(moved, exact, atol=1e-5, rtol=0)
    assert labels[0, 7:].tolist() == pytest.approx([shift, -shift / 2])
    flipped, _ = geometric_apply(x, geometric(xflip=1, yflip=1))
    assert torch.equal(flipped, x.flip(-1).flip(-2))


def test_scaling_maps_a_ramp_to_the_ramp_it_should():
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 1, 16, 16).contiguous()
    centre = (16 - 1) / 2
    zoomed, labels = geometric_apply(ramp, geometric(scale=5))  # 2^(0.2 * 5) = 2: read at half the distance
    torch.testing.assert_close(zoomed[0, 0, 8], centre + (torch.arange(16.0) - centre) / 2)
    assert labels[0, 2].item() == 5
    stretched, labels = geometric_apply(torch.cat([ramp, ramp.transpose(-1, -2)], 1), geometric(aniso=5))
    torch.testing.assert_close(stretched[0, 0, 8], centre + (torch.arange(16.0) - centre) / 2)  # x by 2
    torch.testing.assert_close(stretched[0, 1, 4:12, 8], centre + (torch.arange(4.0, 12.0) - centre) * 2)  # y by 1/2
    assert labels[0, 5:7].tolist() == [5.0, 0.0]  # the draw along the x axis


def test_geometric_transforms_are_drawn_as_edm_draws_them():
    params = geometric_draw(20000, torch.Generator().manual_seed(0))
    assert params[:, 0].mean().item() == pytest.approx(0.5, abs=0.015)  # every image mirrored or not, labelled
    for column, share in ((1, EDM_P / 2), (2, EDM_P), (3, EDM_P), (4, EDM_P), (5, 0.5), (6, EDM_P)):
        assert (params[:, column] != 0).float().mean().item() == pytest.approx(share, abs=0.01)
    assert params[:, 3].abs().max().item() <= math.pi
    again = geometric_draw(20000, torch.Generator().manual_seed(0))
    assert torch.equal(params, again)  # a resumed run draws the same


def test_a_digits_run_trains_and_samples_with_edm_geometric(tmp_path):
    run = tmp_path / "run"
    argv = ["train", "digits", "--out", str(run), "--augment", "edm-geometric", "--batch-size", "16", "--quiet"]
    assert main([*argv, "--steps", "2"]) == 0
    cfg = load_config(run)
    assert cfg.train.augment == "edm-geometric" and cfg.net.augment_dim == GEOMETRIC_DIM
    assert DiffusionRun.load(run).sample(2, steps=2, sampler="ddim").shape == (2, 1, 8, 8)
