"""DreamBooth's prior-preservation loss (Ruiz et al. 2023, eq. 2) and the class images it preserves.

    L = E ||x_hat(x_t, c) - x||^2  +  lambda E ||x_hat(x'_t, c_pr) - x'||^2

x' are class images drawn once by the frozen base model for class prompts c_pr: the subject's captions without the
identifier ("a red sneaker on the left and ..."), or the base's own training captions that name the class
(personalize.method.prior_prompts), so the plain class word keeps its meaning. Each term is the run's
own loss (its target and weighting), each with its own times and noise; lambda = 0 is plain fine-tuning."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..io import cached_tensor
from ..runs.diffusion import DiffusionRun


@dataclass
class PriorPreservationLoss:
    """The subject's loss plus ``weight`` (lambda) times the same loss on class samples.

    Per call: the subject batch gets the times and noise of the training step; the class batch (as many
    rows) draws its rows, times and noise from torch's global generator, which the training loop seeds per
    step and rank, so a resumed run draws the same. weight = 0 is the subject's loss alone (no class pass)."""

    loss: object  # the run's loss: loss(model, x0, t=, noise=, cond=) -> scalar
    x: Tensor  # class samples in the model's space (M, ...)
    cond: dict[str, Tensor]  # their conditions (M rows each)
    weight: float = 1.0

    def __call__(self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        own = self.loss(model, x0, t=t, noise=noise, cond=cond)
        if self.weight == 0:
            return own
        return own + self.weight * self.prior_term(model, len(x0), x0.device, x0.dtype)

    def prior_term(self, model, n: int, device, dtype) -> Tensor:
        idx = torch.randint(len(self.x), (n,))
        t = model.process.sample_t(n).to(device)
        x = self.x[idx].to(device, dtype)
        noise = torch.randn(x.shape).to(device, dtype)
        return self.loss(model, x, t=t, noise=noise, cond={k: v[idx].to(device) for k, v in self.cond.items()})


def class_samples(
    base: DiffusionRun,
    prompts: Sequence[str],
    n: int,
    scale: float,
    cache: Path | None,
    progress: bool = True,
    seed: int = 0,
) -> Tensor:
    """n samples of the frozen base run in its own space (latents for a latent run) for ``prompts`` (cycled),
    guided at ``scale``; drawn once and cached in ``cache`` (keyed by the base weights, the prompts, n, scale, seed)."""
    captions = [prompts[i % len(prompts)] for i in range(n)]
    key = hashlib.sha256(json.dumps([base.fingerprint, captions, scale, seed]).encode()).hexdigest()[:16]

    def draw() -> Tensor:  # in the denoiser's space: the loss trains there
        return base.sample(
            n,
            prompt=captions,
            guidance=scale,
            sampler="dpmpp-2m",
            steps=20,
            seed=seed,
            batch=64,
            progress=progress,
            decoded=False,
        )

    return cached_tensor(cache, {"key": key}, draw)
