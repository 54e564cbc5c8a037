"""A feature net for any folder (evaluation/instance.py): its views, its linear probe, and the workflow: trained on
a folder, recorded by the run that --features names it, read by `difflab eval` by default, refused for other data
or once changed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.data.images import save_npz
from difflab.evaluation.features import images_digest, load_feature_net
from difflab.evaluation.instance import InstanceViews, instance_views, linear_probe
from difflab.runs.config import load_config

STILL = InstanceViews(crop=1.0, aspect=1.0, flip=False, jitter=0.0, grey=0.0, noise=0.0)


def test_a_view_that_changes_nothing_is_the_image_and_views_are_seeded():
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    assert torch.allclose(instance_views(x, STILL, torch.Generator().manual_seed(0)), x, atol=1e-5)
    a = instance_views(x, generator=torch.Generator().manual_seed(1))
    b = instance_views(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == x.shape and a.abs().max() <= 1
    assert not torch.allclose(a, instance_views(x, generator=torch.Generator().manual_seed(2)))


def test_flipped_views_are_the_image_or_its_mirror_half_the_time():
    x = torch.rand(400, 1, 6, 6) * 2 - 1
    v = instance_views(x, InstanceViews(**{**STILL.__dict__, "flip": True}), torch.Generator().manual_seed(0))
    same = (v - x).abs().flatten(1).amax(1) < 1e-5
    mirror = (v - x.flip(-1)).abs().flatten(1).amax(1) < 1e-5
    assert (same | mirror).all()
    assert 0.4 < mirror.float().mean().item() < 0.6


def test_linear_probe_reads_separable_classes_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(800) % 4
    feats = centres[labels] + torch.randn(800, 16, generator=g)
    assert linear_probe(feats[:600], labels[:600], feats[600:], labels[600:]) == 1.0
    shuffled = labels[torch.randperm(800, generator=g)]
    assert linear_probe(feats[:600], shuffled[:600], feats[600:], shuffled[600:]) < 0.45  # chance: 0.25


def npz_of(path, n, seed):
    """n 8x8 grey images of two kinds (a bright left or top half) with their labels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(n) % 2
    images[labels == 1, :, :, :4] += 150
    images[labels == 0, :, :4, :] += 150
    save_npz(path, images=images, labels=labels)
    return path


def test_a_folders_net_is_recorded_by_its_run_read_by_eval_and_refused_elsewhere(tmp_path, capsys):
    data = npz_of(tmp_path / "mine.npz", 200, 0)
    feats = tmp_path / "feats"
    assert main(["features", "train", str(data), "--steps", "6", "--batch-size", "32", "--run", str(feats)]) == 0
    out = capsys.readouterr().out
    assert "linear probe" in out and "random features" in out
    weights = feats / "mine-instance.safetensors"
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["kind"] == "instance" and meta["data"]["n"] == 180 and 0 <= meta["linear_probe"] <= 1
    net = load_feature_net(str(weights))
    from difflab.data.images import load_images

    assert meta["data"]["sha256"] == images_digest(load_images(str(data), "train").images)
    assert net.meta["kind"] == "instance"

    run = tmp_path / "run"
    argv = ["train", str(data), "--out", str(run), "--steps", "4", "--batch-size", "16", "--quiet"]
    assert main([*argv, "--eval-every", "4", "--eval-n", "16", "--features", str(weights)]) == 0
    record = load_config(run).features
    assert record.net == str(weights.resolve()) and record.eval_n == 16 and record.fingerprint == net.fingerprint()
    fd_training = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if '"fd"' in r][-1]["fd"]
    assert (
        main(
            [
                "eval",
                str(run),
                "-n",
                "16",
                "--bpd-n",
                "0",
                "--steps",
                "20",
                "--quiet",
                "--json",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["features"]["name"] == "mine-instance" and report["features"]["kind"] == "instance"
    assert report["fd"] == pytest.approx(fd_training, rel=1e-4)  # the same samples (dpmpp-2m, 20 steps, seeds 0..)
    assert report["classes"]["samples"] is None  # a projection head is not a classifier
    capsys.readouterr()

    # other images: refused in one line before anything is written
    other = npz_of(tmp_path / "other.npz", 200, 1)
    bad = ["train", str(other), "--out", str(tmp_path / "r2"), "--steps", "2", "--eval-every", "--features"]
    assert main([*bad, str(weights), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "trained on the 180 training images of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r2").exists()

    # a resumed run keeps its net; a changed net is refused by eval
    assert main(["train", "--out", str(run), "--resume", "--steps", "6", "--features", "random", "--quiet"]) == 2
    assert "the run is measured with" in capsys.readouterr().err
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["embed.bias"] += 1
    net.load_state_dict(state)
    from difflab.evaluation.features import save_feature_net

    save_feature_net(net, weights, meta)
    assert main(["eval", str(run), "-n", "16", "--bpd-n", "0", "--quiet"]) == 2
    assert "has changed since the run recorded it" in capsys.readouterr().err
