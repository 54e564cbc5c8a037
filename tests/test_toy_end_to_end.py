"""The 2-D job end to end: the default swiss-roll recipe, trained by the CLI, samples the data law."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.data.toy2d import make_toy
from difflab.metrics import energy_distance


@pytest.fixture(scope="module")
def swissroll_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("e2e") / "swissroll"
    assert main(["train", "swissroll", "--out", str(run), "--quiet"]) == 0  # the default recipe, as `make demo` runs it
    return run


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("dpmpp-2m", 20)])
def test_default_swissroll_samples_match_heldout_data(swissroll_run, tmp_path, sampler, steps):
    out = tmp_path / "s.npz"
    assert main(["sample", str(swissroll_run), "--sampler", sampler, "--steps", str(steps), "--n", "5000", "--seed", "0", "--save", str(out), "--quiet"]) == 0
    samples = torch.from_numpy(np.load(out)["points"])
    heldout = make_toy("swissroll", 5000, seed=100)
    baseline = energy_distance(make_toy("swissroll", 5000, seed=101), heldout)  # two independent data draws
    model = energy_distance(samples, heldout)
    print(f"{sampler} {steps}: energy distance {model:.5f} vs data-data {baseline:.5f} (ratio {model / baseline:.2f})")
    assert model <= 2 * baseline
    # and an untrained-looking answer would fail: the prior itself is far away
    assert energy_distance(torch.randn(5000, 2), heldout) > 20 * baseline


def test_trajectory_figure_and_pictures(swissroll_run, tmp_path):
    assert main(["trajectories", str(swissroll_run), "--out", str(tmp_path / "t.png"), "--steps", "100"]) == 0
    from PIL import Image

    img = Image.open(tmp_path / "t.png")
    assert img.width > 2 * img.height  # two rows of six panels
    assert (swissroll_run / "loss.png").exists() and (swissroll_run / "samples.png").exists()
