"""Default run configurations, and the variants a diffusion run can be made into.

    preset_for("digits")                          the dataset's default RunConfig (a fresh copy)
    with_class_labels(cfg, 10)                    p(x | class), with the null class for guidance
    with_low_res(cfg, factor=4)                   p(x | its downsampled image) (SR3)
    with_latent(cfg, space)                       in an autoencoder's latent space
    with_text(cfg, "minilm", captions)            conditioned on captions through a text encoder
    with_edm_augment(cfg)                         trained with EDM's non-leaking augmentation (data/augment.py)
    with_net_size(cfg, "small")                   the preset's U-Net with half (small) or twice (large) the channels
    size_for_budget(10)                           the size measured best for a folder run of that many minutes

The presets are real RunConfig objects, per dataset (no strings resolved at run time): 2-D sets get a residual
MLP, image sets U-Nets sized for 2 CPU cores, all with our default recipe (cosine beta schedule,
v-prediction, min-SNR-5 weighting, EMA). Each ``with_*`` returns a new config and raises ``PresetError`` (one
line) for a variant the run cannot take. The other kinds' configs are made beside their run classes
(classifier_config, autoencoder_config, clip_config, personalized_config, the features' and students')."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from ..core.conditions import ConditionSpec, class_labels
from ..core.losses import SimpleLoss
from ..core.processes import DiscreteDDPM
from ..data.augment import AUGMENT_DIMS
from ..data.images import DATASETS, load_images
from ..data.toy2d import TOY_DATASETS
from ..nets.mlp import MLPConfig
from ..nets.unet import PRESETS as UNET_PRESETS
from ..nets.unet import UNetConfig, preset_for_size
from .config import AUG_MAX, DataSpec, LatentRecord, RunConfig, SuperResolution, TextRecord, TrainConfig

RECIPE_PROCESS = DiscreteDDPM(T=1000, schedule="cosine")
RECIPE_LOSS = SimpleLoss(weighting="min_snr", gamma=5.0)


class PresetError(ValueError):
    """A variant a run cannot take (class labels for an MLP, a factor that does not divide the size, ...)."""


def _toy(name: str) -> RunConfig:
    return RunConfig(
        dataset=name,
        process=RECIPE_PROCESS,
        net_kind="mlp",
        net=MLPConfig(dim=2, hidden=128, depth=4, time_dim=64),
        shape=[2],
        data_kind="points",
        target="v",
        loss=replace(RECIPE_LOSS),
        train=TrainConfig(
            steps=4000, batch_size=256, lr=2e-3, warmup=100, ema_decay=0.995, checkpoint_every=1000, log_every=50
        ),
        data=DataSpec(n=20000, seed=1),
    )


def _image(name: str, net: UNetConfig, shape: list[int], train: TrainConfig) -> RunConfig:
    return RunConfig(
        dataset=name,
        process=RECIPE_PROCESS,
        net_kind="unet",
        net=net,
        shape=shape,
        data_kind="images",
        target="v",
        loss=replace(RECIPE_LOSS),
        train=train,
    )


FASHION_TRAIN = TrainConfig(
    steps=20000,
    batch_size=64,
    lr=1e-3,
    warmup=500,
    ema_decay=0.999,
    ema_warmup=True,
    precision="auto",  # bf16 where native (2x on an AMX CPU), fp32 where emulated (11-16x slower steps on an AVX2 CPU)
    checkpoint_every=250,
    sample_every=1000,
    log_every=25,
)

PRESETS: dict[str, RunConfig] = {
    **{name: _toy(name) for name in TOY_DATASETS},
    "digits": _image(
        "digits",
        UNET_PRESETS["digits"],
        [1, 8, 8],
        TrainConfig(
            steps=1500,
            batch_size=64,
            lr=2e-3,
            warmup=100,
            ema_decay=0.995,
            checkpoint_every=500,
            sample_every=500,
            log_every=25,
        ),
    ),
    "fashion-mnist": _image("fashion-mnist", UNET_PRESETS["fashion-mnist"], [1, 28, 28], FASHION_TRAIN),
    "fashion-pairs": _image("fashion-pairs", preset_for_size(32, 3, 64), [3, 32, 64], FASHION_TRAIN),
}


def image_preset(source: str) -> RunConfig:
    """A run for a user's own folder or .npz: the shape is read from the data and the U-Net is sized like the
    built-in preset for that resolution (nets.unet.preset_for_size); the training recipe is the one of the
    preset of the nearest size (digits up to 16 pixels, fashion-mnist above)."""
    data = load_images(source, split="train")  # raises DataError for unknown names and bad files
    _, c, h, w = data.images.shape
    recipe = PRESETS["digits" if h <= 16 else "fashion-mnist"]
    cfg = _image(source, preset_for_size(h, c, w), [c, h, w], recipe.train)
    return replace(cfg, data=DataSpec(size=h, channels=c))


def check_dataset(name: str) -> None:
    """A dataset is a built-in name or an existing folder / .npz file."""
    if name not in TOY_DATASETS and name not in DATASETS and not Path(name).exists():
        raise PresetError(
            f"unknown dataset {name!r}: choose one of {', '.join([*TOY_DATASETS, *DATASETS])}, or give a folder of "
            "images or an .npz file"
        )


def preset_for(dataset: str) -> RunConfig:
    """A fresh copy of the default RunConfig for a dataset name (2-D sets and image sets) or a folder / .npz."""
    return copy.deepcopy(PRESETS[dataset]) if dataset in PRESETS else image_preset(dataset)


# --------------------------------------------------------------------------- variants of a diffusion run


def _unet(cfg: RunConfig, what: str) -> None:
    if cfg.net_kind != "unet":
        raise PresetError(f"{what} needs an image run (a U-Net); {cfg.dataset} trains an {cfg.net_kind.upper()}")


def with_class_labels(cfg: RunConfig, num_classes: int | None, p_drop: float | None = None) -> RunConfig:
    """The run conditioned on class labels: the U-Net gets a class embedding (plus its null row)."""
    _unet(cfg, "--cond class")
    if not num_classes:
        raise PresetError(
            f"--cond class needs class labels, and {cfg.dataset} has none (use class subfolders or an npz 'labels' "
            "array)"
        )
    spec = class_labels(num_classes, ConditionSpec.p_drop if p_drop is None else p_drop)
    others = [c for c in cfg.conditions if c.name != "class_labels"]  # a text condition stays
    return replace(cfg, net=replace(cfg.net, num_classes=num_classes), conditions=[*others, spec])


NET_SIZES = {"small": 0.5, "medium": 1.0, "large": 2.0}  # the preset U-Net's base channels, times

# `difflab train FOLDER --max-minutes M` without --net: the size that scored the best FD after that many minutes
# on 2 CPU cores (benchmarks/budget_ab.py on the 32x32 colour folder; benchmarks/README.md). A budget within a
# factor of 2 of a measured one takes its winner; others keep the preset's size (not measured).
BUDGET_SIZES: dict[float, str] = {
    10.0: "medium",  # FD 0.96 (2231 steps) against small 3.58 (2769 steps) and large 1.15 (1036 steps)
    30.0: "medium",  # FD 0.63 (4094 steps) against large 0.68 (1689 steps); small not run (last at 10 minutes)
}


def with_net_size(cfg: RunConfig, size: str) -> RunConfig:
    """The run with its U-Net's channels scaled: ``size`` one of NET_SIZES (medium: the preset itself)."""
    _unet(cfg, "--net")
    if size not in NET_SIZES:
        raise PresetError(f"unknown network size {size!r}; choose one of {', '.join(NET_SIZES)}")
    base = max(4, round(cfg.net.base_channels * NET_SIZES[size]))
    return replace(cfg, net=replace(cfg.net, base_channels=base))


def size_for_budget(minutes: float) -> tuple[str, float | None]:
    """(the network size for a folder run of ``minutes``, the measured budget it comes from, or None when no
    measured budget lies within a factor of 2: then the preset's own size, 'medium')."""
    near = [b for b in BUDGET_SIZES if b / 2 <= minutes <= 2 * b]
    if not near:
        return "medium", None
    budget = min(near, key=lambda b: abs(math.log(minutes / b)))
    return BUDGET_SIZES[budget], budget


def with_edm_augment(cfg: RunConfig, name: str = "edm") -> RunConfig:
    """The run trained with EDM's non-leaking augmentation ``name`` (edm: pixel-exact transforms; edm-geometric:
    EDM's CIFAR-10 set, data/augment.py): its U-Net reads that augmentation's labels."""
    _unet(cfg, f"--augment {name}")
    return replace(cfg, net=replace(cfg.net, augment_dim=AUGMENT_DIMS[name]), train=replace(cfg.train, augment=name))


def with_low_res(cfg: RunConfig, factor: int, aug_max: float | None = None) -> RunConfig:
    """The run conditioned on its images downsampled by ``factor`` (SR3, Saharia et al. 2022): the U-Net takes
    the bilinearly upsampled low-resolution image as extra input channels and its augmentation noise level."""
    _unet(cfg, "--cond low-res")
    C, H, W = cfg.shape
    if factor < 2 or H % factor or W % factor:
        raise PresetError(f"--factor {factor} must be at least 2 and divide the image size {H}x{W}")
    spec = ConditionSpec("low_res", "tensor", p_drop=0.0)
    return replace(
        cfg,
        net=replace(cfg.net, cond_channels=C, low_res_noise=True),
        conditions=[spec],
        super_resolution=SuperResolution(factor, AUG_MAX if aug_max is None else aug_max),
    )


def with_latent(cfg: RunConfig, latent: LatentRecord, latent_shape: Sequence[int]) -> RunConfig:
    """A run of ``cfg``'s data in an autoencoder's latent space (``latent``: its record; ``latent_shape``: one
    latent's shape): the U-Net sized to the latent, its class embedding and cross-attention kept."""
    if cfg.data_kind != "images" or cfg.net_kind != "unet":
        raise PresetError(f"latent diffusion needs an image run; {cfg.dataset} trains an {cfg.net_kind.upper()}")
    if list(cfg.shape) != list(latent.image_shape):
        raise PresetError(
            f"the autoencoder {latent.autoencoder} encodes {'x'.join(map(str, latent.image_shape))} images; "
            f"{cfg.dataset} holds {'x'.join(map(str, cfg.shape))}"
        )
    c, h, w = latent_shape
    keep = cfg.net
    net = replace(preset_for_size(h, c, w), num_classes=keep.num_classes, context_dim=keep.context_dim, text=keep.text)
    return replace(cfg, shape=[c, h, w], net=net, latent=latent)


def with_text(
    cfg: RunConfig, record: TextRecord, context_dim: int, joint: dict | None = None, p_drop: float | None = None
) -> RunConfig:
    """The run (a U-Net config) conditioned on captions through the encoder ``record`` names (text/encoders.py:
    text_record), with caption dropout ``p_drop`` (default 0.1) to the empty caption; ``joint`` is the joint
    encoder's TextConfig (a dict), which then lives inside the network."""
    _unet(cfg, "--text")
    if not cfg.net.attention_resolutions:
        raise PresetError("--text needs a U-Net with attention resolutions (cross-attention runs there)")
    p = ConditionSpec.p_drop if p_drop is None else p_drop  # the dataclass default, 0.1
    net = replace(cfg.net, context_dim=context_dim, **({"text": joint} if joint is not None else {}))
    if joint is not None:
        spec = ConditionSpec("tokens", "tensor", p, companions=("token_mask",))
    else:
        spec = ConditionSpec("context", "tensor", p, companions=("context_mask",))
    others = [c for c in cfg.conditions if c.name not in ("context", "tokens")]
    return replace(cfg, net=net, conditions=[*others, spec], text=record)
