"""Images end to end: a small digits run trained through the CLI beats an untrained network by a wide margin."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DIGITS_STEPS, QUALITY
from PIL import Image

from difflab.cli import main
from difflab.data.images import load_images, to_model
from difflab.evaluation.metrics import energy_distance
from difflab.runs.diffusion import DiffusionRun
from difflab.sampling.samplers import sample


@pytest.fixture(scope="module")
def digits_run(digits_runs, tmp_path_factory):
    """The shared class-conditional digits run (conftest.py) continued with --resume: to 400 steps in quality mode,
    asked for every class in turn (measured: energy distance 0.24 at 300 steps, 0.11 at 400, against the 0.19
    asserted); by 10 steps otherwise (what the pictures' and --no-ema's plumbing needs)."""
    import shutil

    run = tmp_path_factory.mktemp("img") / "digits"
    shutil.copytree(digits_runs / "dc", run)
    steps = 400 if QUALITY else DIGITS_STEPS + 10
    assert main(["train", "--out", str(run), "--resume", "--steps", str(steps), "--quiet"]) == 0
    return run


CLASSES = [str(k) for k in range(10)]


@pytest.mark.quality
def test_trained_digits_beat_an_untrained_network(digits_run, tmp_path):
    out = tmp_path / "s.npz"
    assert (
        main(
            [
                "sample",
                str(digits_run),
                "--n",
                "400",
                "--class",
                *CLASSES,
                "--sampler",
                "dpmpp-2m",
                "--steps",
                "20",
                "--seed",
                "0",
                "--save",
                str(out),
                "--out",
                str(tmp_path / "g.png"),
                "--quiet",
            ]
        )
        == 0
    )
    samples = np.load(out)["images"]
    assert samples.dtype == np.uint8 and samples.shape == (400, 1, 8, 8)
    heldout = to_model(load_images("digits", split="test").images).flatten(1)
    trained = energy_distance(to_model(torch.from_numpy(samples)).flatten(1), heldout)

    untrained_denoiser = DiffusionRun.load(digits_run).denoiser
    for p in untrained_denoiser.net.parameters():  # the same architecture at its initialisation
        torch.nn.init.normal_(p, std=0.02)
    labels = torch.arange(400) % 10
    x = sample(
        untrained_denoiser,
        (400, 1, 8, 8),
        20,
        sampler="dpmpp-2m",
        generator=torch.Generator().manual_seed(0),
        cond={"class_labels": labels},
    ).clamp(-1, 1)
    untrained = energy_distance(x.flatten(1), heldout)
    train_split = to_model(load_images("digits", split="train").images[:400]).flatten(1)
    floor = energy_distance(train_split, heldout)
    print(
        f"energy distance to held-out digits: trained {trained:.3f}, untrained {untrained:.3f}, real train images "
        f"{floor:.3f}"
    )
    assert trained < 0.1 * untrained
    assert trained < 4 * floor


def test_sample_grid_and_chain_pictures(digits_run, tmp_path):
    gif, strip, fwd = tmp_path / "c.gif", tmp_path / "c.png", tmp_path / "f.png"
    assert (
        main(
            [
                "trajectories",
                str(digits_run),
                "--out",
                str(strip),
                "--gif",
                str(gif),
                "--forward",
                str(fwd),
                "--steps",
                "10",
                "--n",
                "4",
            ]
        )
        == 0
    )
    frames = Image.open(gif)
    assert frames.n_frames == 10  # one frame per reverse step
    assert Image.open(strip).size[0] > Image.open(strip).size[1]
    assert Image.open(fwd).size[0] > 0
    assert (digits_run / "loss.png").exists() and (digits_run / "samples.png").exists()


def test_no_ema_differs_from_ema(digits_run, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    assert (
        main(["sample", str(digits_run), "--n", "8", "--class", "3", "--steps", "5", "--save", str(a), "--quiet"]) == 0
    )
    assert (
        main(
            [
                "sample",
                str(digits_run),
                "--n",
                "8",
                "--class",
                "3",
                "--steps",
                "5",
                "--save",
                str(b),
                "--no-ema",
                "--quiet",
            ]
        )
        == 0
    )
    assert not np.array_equal(np.load(a)["images"], np.load(b)["images"])
