"""The one generation path: per-sample seeds, batching, shapes from the config, options checked."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from difflab.core.conditions import class_labels
from difflab.nets.unet import UNetConfig
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.presets import PRESETS as IMAGE_PRESETS
from difflab.sampling.generate import generate

TINY = UNetConfig(
    image_size=8,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    norm_groups=4,
    num_heads=2,
)


@pytest.fixture(scope="module")
def image_model():
    """An untrained class-conditional U-Net with random (non-zero) weights: any sample it makes depends on
    its noise, its label and the network, so equal samples mean equal inputs."""
    cfg = replace(IMAGE_PRESETS["digits"], net=replace(TINY, num_classes=10), conditions=[class_labels(10)])
    torch.manual_seed(0)
    denoiser = cfg.build_denoiser().eval()
    for p in denoiser.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return denoiser, cfg


@pytest.mark.parametrize("sampler, steps", [("ddpm", 12), ("ddim", 8), ("dpmpp-2m", 6)])
def test_same_seed_same_samples_for_any_batch_size(image_model, sampler, steps):
    denoiser, cfg = image_model
    labels = torch.arange(64) % 10
    runs = {
        b: generate(
            denoiser, cfg.shape, 64, sampler=sampler, steps=steps, seed=3, batch=b, cond={"class_labels": labels}
        )
        for b in (1, 7, 64)
    }
    assert runs[64].shape == (64, 1, 8, 8)
    for b in (1, 7):
        gap = float((runs[b] - runs[64]).abs().max())
        assert gap < 1e-5, (b, gap)  # equal up to float32 rounding of the batched network
    # sample i has seed seed + i: samples 10.. of seed 3 are samples 0.. of seed 13
    shifted = generate(
        denoiser, cfg.shape, 54, sampler=sampler, steps=steps, seed=13, batch=20, cond={"class_labels": labels[10:]}
    )
    assert float((shifted - runs[64][10:]).abs().max()) < 1e-5
    other = generate(
        denoiser, cfg.shape, 64, sampler=sampler, steps=steps, seed=4, batch=64, cond={"class_labels": labels}
    )
    assert float((other - runs[64]).abs().max()) > 0.1


def test_shape_comes_from_the_config_and_options_are_checked(tiny_toy_run):
    run = DiffusionRun.load(tiny_toy_run)
    denoiser, cfg = run.denoiser, run.config
    assert generate(denoiser, cfg.shape, 5, steps=3).shape == (5, *cfg.shape) == (5, 2)
    with pytest.raises(ValueError, match="sampler 'euler' takes no options; it has no option 'eta'"):
        generate(denoiser, cfg.shape, 5, sampler="euler", steps=3, options={"eta": 0.5})
    with pytest.raises(ValueError, match="one row per sample"):
        generate(denoiser, cfg.shape, 5, steps=3, cond={"class_labels": torch.zeros(4, dtype=torch.long)})
    with pytest.raises(ValueError, match="MLP takes no conditions"):
        generate(denoiser, cfg.shape, 5, steps=3, cond={"class_labels": torch.zeros(5, dtype=torch.long)})
    with pytest.raises(ValueError, match="n must be a positive integer"):
        generate(denoiser, cfg.shape, 0, steps=3)
    x, traj = generate(denoiser, cfg.shape, 4, sampler="ddim", steps=3, return_trajectory=True)
    assert torch.equal(traj.x_t[-1], x)
