"""Training on a user's folder: flips (data/augment.py), quality while training and the best checkpoint
(evaluation/watch.py, --eval-every), the loss picture with the FD beside it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import build_parser, main
from difflab.cli.train import new_config
from difflab.data.augment import flip, flip_mask
from difflab.data.images import to_model
from difflab.evaluation.watch import nearest_distance
from difflab.runs.data import training_data
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.store import best_record
from difflab.training.loop import train
from difflab.viz.plots import loss_curve


def folder_of_colour_images(root, n=60, size=8):
    """n asymmetric RGB images in two class folders (a bright left half in class a, a bright top half in b)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        im = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        if i % 2:
            im[:, : size // 2] += 150
        else:
            im[: size // 2] += 150
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / "ab"[i % 2] / f"{i:03d}.png")
    return root


def config_of(*argv, steps=None):
    """The config ``difflab train ARGV`` starts (``--steps`` is applied when a run begins, so it is set here)."""
    cfg = new_config(build_parser().parse_args(["train", *map(str, argv), "--out", "unused"]))
    return cfg if steps is None else replace(cfg, train=replace(cfg.train, steps=steps, checkpoint_every=steps))


def test_flip_mirrors_the_marked_images():
    x = torch.arange(2 * 3 * 2 * 4.0).reshape(2, 3, 2, 4)
    y = flip(x, torch.tensor([True, False]))
    assert torch.equal(y[0], x[0, :, :, [3, 2, 1, 0]]) and torch.equal(y[1], x[1])
    m = flip_mask(4000, torch.Generator().manual_seed(0))
    assert abs(m.float().mean().item() - 0.5) < 0.03


def test_training_sees_each_image_or_its_mirror_with_its_low_res_mirrored_alike(tmp_path):
    folder = folder_of_colour_images(tmp_path / "imgs")
    cfg = config_of(folder, "--cond", "low-res", "--factor", "2", "--augment", "flip", "--batch-size", "16", steps=6)
    data = training_data(cfg)
    seen = []

    def loss_fn(model, x, t, noise, cond):
        seen.append((x.clone(), cond["low_res"].clone()))
        return (model.net(x, t, **cond) - noise).square().mean()

    train(tmp_path / "run", cfg, data, loss_fn=loss_fn, progress=False)
    images = to_model(data.x)
    mirrored = 0
    for x, low in seen:
        for xi, li in zip(x, low):
            same = (images - xi).abs().flatten(1).amax(1) < 1e-6
            mirror = (images.flip(-1) - xi).abs().flatten(1).amax(1) < 1e-6
            assert same.any() or mirror.any()
            j = int((same | mirror).nonzero()[0])
            expected = data.cond["low_res"][j].flip(-1) if mirror.any() else data.cond["low_res"][j]
            assert torch.allclose(li, expected)
            mirrored += bool(mirror.any())
    total = sum(len(x) for x, _ in seen)
    assert 0.3 < mirrored / total < 0.7


@pytest.mark.parametrize(
    "argv, says",
    [
        (("digits",), "a mirrored digit is not a digit"),
        (("swissroll",), "swissroll is not an image set"),
    ],
)
def test_flip_is_refused_where_it_changes_the_meaning(argv, says, tmp_path, capsys):
    assert main(["train", *argv, "--augment", "flip", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (tmp_path / "r").exists()


def test_nearest_distance_is_the_brute_force_one():
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 256, (7, 3, 4, 4), generator=g, dtype=torch.uint8)
    s = torch.randint(0, 256, (11, 3, 4, 4), generator=g, dtype=torch.uint8)
    expected = torch.cdist(q.flatten(1).double() / 255, s.flatten(1).double() / 255).min(1).values / (48**0.5)
    assert torch.allclose(nearest_distance(q, s).double(), expected, atol=1e-5)
    assert nearest_distance(s[:3], s).abs().max() < 1e-3  # a training image is at distance 0 from itself


def test_eval_every_keeps_the_best_checkpoint_as_a_run(tmp_path):
    folder = folder_of_colour_images(tmp_path / "imgs")
    run = tmp_path / "run"
    argv = [
        "train",
        str(folder),
        "--out",
        str(run),
        "--steps",
        "30",
        "--eval-every",
        "10",
        "--eval-n",
        "16",
        "--batch-size",
        "16",
    ]
    assert main([*argv, "--checkpoint-every", "10", "--quiet", "--augment", "flip"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fd" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    for r in evals:
        assert r["fd"] >= 0 and r["nn_train"] > 0 and r["nn_ratio"] > 0 and r["eval_seconds"] > 0
    best = min(evals, key=lambda r: r["fd"])
    assert best_record(run)["step"] == best["step"] == evals[-1]["best_step"]
    assert best_record(run)["fd"] == pytest.approx(best["fd"])
    model = DiffusionRun.load(run / "best")  # the best weights are a run: every command takes them
    assert model.step == best["step"]
    assert model.sample(2, steps=2, sampler="ddim").shape == (2, 3, 8, 8)
    loss_curve(run / "metrics.jsonl", tmp_path / "loss.png")
    assert Image.open(tmp_path / "loss.png").size[0] > Image.open(run / "samples.png").size[0] // 2


def test_eval_every_refusals(tmp_path, capsys):
    assert main(["train", "digits", "--eval-every", "-5", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "eval_every must be 0 (never) or positive" in capsys.readouterr().err
    argv = ["train", "digits", "--cond", "low-res", "--eval-every", "5", "--out", str(tmp_path / "s"), "--quiet"]
    assert main(argv) == 2
    assert "does not evaluate super-resolution runs" in capsys.readouterr().err


def test_net_sizes_and_the_size_a_budget_picks(tmp_path, monkeypatch, capsys):
    from difflab.runs import presets

    folder = folder_of_colour_images(tmp_path / "imgs", size=16)
    base = config_of(folder).net.base_channels
    assert config_of(folder, "--net", "small").net.base_channels == base // 2
    assert config_of(folder, "--net", "large").net.base_channels == 2 * base
    monkeypatch.setattr(presets, "BUDGET_SIZES", {10.0: "small", 60.0: "large"})
    assert presets.size_for_budget(10) == ("small", 10.0) and presets.size_for_budget(18) == ("small", 10.0)
    assert presets.size_for_budget(45) == ("large", 60.0) and presets.size_for_budget(200) == ("medium", None)
    assert presets.size_for_budget(3) == ("medium", None)
    assert config_of(folder, "--max-minutes", "12").net.base_channels == base // 2
    assert config_of(folder, "--max-minutes", "12", "--net", "medium").net.base_channels == base  # --net wins
    assert config_of("digits", "--max-minutes", "12").net == presets.preset_for("digits").net  # built-ins keep theirs
    run = tmp_path / "run"
    argv = ["train", str(folder), "--out", str(run), "--steps", "1", "--batch-size", "4", "--max-minutes", "12"]
    assert main(argv) == 0
    assert "--max-minutes 12: the small U-Net, measured best after 10 CPU-minutes" in capsys.readouterr().out
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--net", "large", "--quiet"]) == 2
    assert "--net (a resumed run keeps its network)" in capsys.readouterr().err
