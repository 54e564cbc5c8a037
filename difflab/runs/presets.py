"""Default run configurations: a dict of real RunConfig objects per dataset (no strings resolved at run time)."""

from __future__ import annotations

from dataclasses import asdict, replace

from .store import RunConfig, TrainConfig, process_to_dict
from ..data.toy2d import TOY_DATASETS
from ..core.losses import SimpleLoss
from ..nets.mlp import MLPConfig
from ..core.processes import DiscreteDDPM


def _toy(name: str) -> RunConfig:
    return RunConfig(
        dataset=name,
        process=process_to_dict(DiscreteDDPM(T=1000, schedule="cosine")),
        net_kind="mlp",
        net=MLPConfig(dim=2, hidden=128, depth=4, time_dim=64).to_dict(),
        shape=[2],
        kind="points",
        target="v",
        loss=asdict(SimpleLoss(weighting="min_snr", gamma=5.0)),
        train=TrainConfig(steps=4000, batch_size=256, lr=2e-3, warmup=100, ema_decay=0.995, checkpoint_every=1000, log_every=50),
        data={"n": 20000, "seed": 1},
    )


TOY_PRESETS: dict[str, RunConfig] = {name: _toy(name) for name in TOY_DATASETS}


def preset_for(dataset: str) -> RunConfig:
    """A fresh copy of the default RunConfig for a dataset name (2-D sets and image sets)."""
    if dataset in TOY_PRESETS:
        base = TOY_PRESETS[dataset]
    else:
        from .image_presets import IMAGE_PRESETS, image_preset  # images: the U-Net presets

        base = IMAGE_PRESETS[dataset] if dataset in IMAGE_PRESETS else image_preset(dataset)
    return replace(base, train=replace(base.train), process=dict(base.process), net=dict(base.net), loss=dict(base.loss),
                   data=dict(base.data), shape=list(base.shape), conditions=[dict(c) for c in base.conditions])
