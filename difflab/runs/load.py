"""``difflab.load``: any run folder, as the object of its kind; and the table of built-in kinds.

    run = difflab.load("runs/digits")                       # a DiffusionRun
    run = difflab.load("runs/t2i", lora=[("runs/sks", 0.8)])  # with LoRA adapters
    difflab.load("runs/ae").space                           # an AutoencoderRun's latent space

Each kind's entry (runs/kinds.py) is defined beside its run class; this module lists them, once."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..distill.student import DISTILLED
from ..evaluation.feature_training import FEATURES
from ..evaluation.identity import IDENTITY
from ..evaluation.instance import INSTANCE
from ..guidance.classifier import CLASSIFIER
from ..latent.autoencoder import AUTOENCODER
from ..personalize.method import PERSONALIZED
from ..text.clip import CLIP
from .config import load_config
from .diffusion import DIFFUSION, DiffusionRun
from .kinds import register
from .run import Run

BUILT_IN = (DIFFUSION, PERSONALIZED, DISTILLED, CLASSIFIER, AUTOENCODER, CLIP, FEATURES, IDENTITY, INSTANCE)
register(*BUILT_IN)


def load(
    path: str | Path,
    *,
    ema: bool = True,
    device: str | torch.device | None = None,
    lora: Sequence[tuple[str | Path, float]] = (),
) -> Run:
    """The run in ``path`` as the object of its kind (the kinds table says which), with its EMA weights unless
    ``ema=False``; ``lora`` adds LoRA adapters ((run, strength), ...) to a diffusion run."""
    cfg = load_config(path)
    cls = cfg.kind.run
    if lora:
        if not issubclass(cls, DiffusionRun):
            raise ValueError(f"LoRA adapters load over a diffusion run; {path} is {cfg.kind.what}")
        return cls.load(path, ema=ema, device=device, lora=lora)
    return cls.load(path, ema=ema, device=device)
