"""Noise-aware classifiers p(y | x_t, t) for classifier guidance: their run config, loading, accuracy by
noise level, and the check that one fits the run it is to guide.

A classifier run is an ordinary run (config.json, checkpoints, resume, the one training loop) whose network
is ``nets.classifier.NoisyClassifier`` and whose loss is ``core.losses.ClassifierLoss``; its process, shape and
dataset are copied from the diffusion run (or dataset preset) it is made for.

    run = difflab.load("runs/digits-clf")      # a ClassifierRun
    run.classifier(x_t, t)                      # logits (B, K)"""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.conditions import class_labels
from ..core.losses import ClassifierLoss
from ..core.parameterize import Denoiser
from ..data.images import ImageSet, to_model
from ..io import atomic_path
from ..nets.classifier import ClassifierConfig, NoisyClassifier
from ..runs.config import CheckpointError, RunConfig
from ..runs.kinds import RunKind
from ..runs.run import Run

NOISE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)  # fractions of t_max at which a classifier's accuracy is reported


def classifier_config(base: RunConfig, num_classes: int) -> RunConfig:
    """A classifier run for the data, shape and forward process of ``base`` (a diffusion run's config or a
    dataset preset): the encoder half of base's U-Net, a quarter of its training steps."""
    if base.net_kind != "unet":
        raise ValueError(
            f"a noise-aware classifier needs an image run; {base.dataset} trains an {base.net_kind.upper()}"
        )
    net = ClassifierConfig.like(base.net, num_classes)
    return replace(
        base,
        run_kind="classifier",
        net_kind="classifier",
        net=net,
        loss=ClassifierLoss(),
        conditions=[class_labels(num_classes, 0.0)],
        train=replace(base.train, steps=max(1, base.train.steps // 4)),
    )


class NoiseAwareClassifier(nn.Module):
    """classifier(x_t, t) -> logits (B, K): a trained classifier behind the denoiser's input scaling."""

    def __init__(self, wrapped: Denoiser):
        super().__init__()
        self.wrapped, self.process = wrapped, wrapped.process

    @property
    def num_classes(self) -> int:
        return self.wrapped.net.config.num_classes

    def forward(self, x_t: Tensor, t) -> Tensor:
        return self.wrapped(x_t, t).value


class ClassifierRun(Run):
    """A `difflab train-classifier` run: ``classifier`` is its network behind the denoiser's input scaling."""

    kinds = ("classifier",)
    what = "a classifier"

    @cached_property
    def classifier(self) -> NoiseAwareClassifier:
        return NoiseAwareClassifier(
            Denoiser(self.net, self.config.build_process(), self.config.target)
        )  # guidance differentiates in x only


def load_classifier(run_dir: str | Path) -> tuple[NoiseAwareClassifier, RunConfig]:
    """A classifier run's EMA network, ready for guidance, and its config."""
    run = ClassifierRun.load(run_dir)
    return run.classifier, run.config


def check_guides(classifier_cfg: RunConfig, run_cfg: RunConfig, where: str) -> None:
    """Raise one line unless the classifier was trained for the run's dataset, resolution and process."""
    for what, a, b in (
        ("dataset", classifier_cfg.dataset, run_cfg.dataset),
        ("shape", classifier_cfg.shape, run_cfg.shape),
        ("process", classifier_cfg.process, run_cfg.process),
    ):
        if a != b:
            raise CheckpointError(
                f"the classifier {where} was trained for {what} {a!r}, the run for {b!r}: train one with "
                f"`difflab train-classifier --for RUN`"
            )
    k = classifier_cfg.num_classes
    if run_cfg.num_classes is not None and run_cfg.num_classes != k:
        raise CheckpointError(f"the classifier {where} predicts {k} classes, the run has {run_cfg.num_classes}")


@torch.no_grad()
def accuracy_by_noise(
    classifier, x0: Tensor, labels: Tensor, levels=NOISE_LEVELS, seed: int = 0, batch: int = 500
) -> dict[float, float]:
    """Accuracy of ``classifier(x_t, t)`` on x_t ~ q(x_t | x_0) at t = level * t_max (fixed noise from ``seed``)."""
    process = classifier.process
    device = next(iter(classifier.parameters()), torch.empty(0)).device
    out = {}
    for level in levels:
        t = level * process.t_max
        t = float(round(t)) if process.discrete else t
        g = torch.Generator().manual_seed(seed)
        right = 0
        for lo in range(0, len(x0), batch):
            x = x0[lo : lo + batch].float()
            noise = torch.randn(x.shape, generator=g)
            tt = torch.full((len(x),), t, dtype=torch.float64)
            x_t = process.q_sample(x, tt, noise).to(device)
            right += int((classifier(x_t, tt.to(device)).argmax(1).cpu() == labels[lo : lo + batch]).sum())
        out[level] = right / max(1, len(x0))
    return out


ACCURACY = "accuracy.json"


def accuracy_report(
    classifier: NoiseAwareClassifier, step: int, run: str | Path, test: ImageSet, n: int = 2000
) -> dict:
    """Test accuracy by noise level (at most ``n`` test images), saved with its step in RUN/accuracy.json."""
    n = min(len(test), n)
    acc = accuracy_by_noise(classifier, to_model(test.images[:n]), test.labels[:n])
    result = {"step": step, "test_images": n, "accuracy": {str(k): v for k, v in acc.items()}}
    with atomic_path(Path(run) / ACCURACY) as tmp:
        Path(tmp).write_text(json.dumps(result, indent=1))
    return result


def _check(cfg: RunConfig, net, specs) -> None:
    if [s.name for s in specs] != ["class_labels"] or specs[0].p_drop != 0:
        raise CheckpointError("config: a classifier's conditions must be its labels: class_labels with p_drop 0")
    if specs[0].null_label != net.config.num_classes:
        raise CheckpointError(
            f"config: class_labels' null_label {specs[0].null_label} must be the classifier's num_classes "
            f"({net.config.num_classes})"
        )


CLASSIFIER = RunKind(
    "classifier",
    "a noise-aware classifier run",
    {"classifier": (ClassifierConfig, NoisyClassifier)},
    lambda cfg: cfg.loss,
    ClassifierRun,
    "train-classifier",
    use="use it with --classifier",
    check=_check,
    loss_config=ClassifierLoss,
)
