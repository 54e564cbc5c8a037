"""CUDA paths: run only where a GPU is present (skipped, saying so, elsewhere)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from difflab.data.images import load_images
from difflab.data.loader import TensorDataset
from difflab.runs.presets import PRESETS as IMAGE_PRESETS
from difflab.runs.store import load_training_state, load_weights
from difflab.training.loop import train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the CUDA training path is not exercised here"
)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_gives_finite_losses_and_a_checkpoint_that_resumes_on_cpu(tmp_path, precision):
    cfg = IMAGE_PRESETS["digits"]
    cfg = replace(
        cfg, train=replace(cfg.train, steps=6, batch_size=16, checkpoint_every=3, precision=precision, sample_every=0)
    )
    data = TensorDataset(load_images("digits", "train").images)
    train(tmp_path / "run", cfg, data, device="cuda", progress=False)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert all(v.device.type == "cpu" for v in load_weights(tmp_path / "run", "net").values())
    step, opt, _ = load_training_state(tmp_path / "run")
    assert step == 6
    cpu_cfg = replace(cfg, train=replace(cfg.train, steps=8, precision="bf16" if precision == "fp16" else precision))
    train(tmp_path / "run", cpu_cfg, data, device="cpu", resume=True, progress=False)
    assert load_training_state(tmp_path / "run")[0] == 8
