"""Default runs for image sets: U-Net presets sized for 2 CPU cores, and our default recipe
(cosine beta schedule, v-prediction, min-SNR-5 weighting, EMA)."""

from __future__ import annotations

from .store import RunConfig, TrainConfig, process_to_dict
from ..nets.unet import PRESETS as UNET_PRESETS
from ..nets.unet import preset_for_size
from ..core.processes import DiscreteDDPM

RECIPE_PROCESS = process_to_dict(DiscreteDDPM(T=1000, schedule="cosine"))
RECIPE_LOSS = {"target": None, "weighting": "min_snr", "gamma": 5.0}

IMAGE_PRESETS: dict[str, RunConfig] = {
    "digits": RunConfig(
        dataset="digits",
        process=RECIPE_PROCESS,
        net_kind="unet",
        net=UNET_PRESETS["digits"].to_dict(),
        shape=[1, 8, 8],
        kind="images",
        target="v",
        loss=dict(RECIPE_LOSS),
        train=TrainConfig(steps=1500, batch_size=64, lr=2e-3, warmup=100, ema_decay=0.995, checkpoint_every=500, sample_every=500, log_every=25),
    ),
    "fashion-mnist": RunConfig(
        dataset="fashion-mnist",
        process=RECIPE_PROCESS,
        net_kind="unet",
        net=UNET_PRESETS["fashion-mnist"].to_dict(),
        shape=[1, 28, 28],
        kind="images",
        target="v",
        loss=dict(RECIPE_LOSS),
        train=TrainConfig(steps=20000, batch_size=64, lr=1e-3, warmup=500, ema_decay=0.999, ema_warmup=True, precision="bf16", checkpoint_every=250, sample_every=1000, log_every=25),
    ),
    "fashion-pairs": RunConfig(
        dataset="fashion-pairs",
        process=RECIPE_PROCESS,
        net_kind="unet",
        net=preset_for_size(32, 3, 64).to_dict(),
        shape=[3, 32, 64],
        kind="images",
        target="v",
        loss=dict(RECIPE_LOSS),
        train=TrainConfig(steps=20000, batch_size=64, lr=1e-3, warmup=500, ema_decay=0.999, ema_warmup=True, precision="bf16", checkpoint_every=250, sample_every=1000, log_every=25),
    ),
}


def image_preset(source: str) -> RunConfig:
    """A run for a user's own folder or .npz: the shape is read from the data and the U-Net is sized like the
    built-in preset for that resolution (nets.unet.preset_for_size); the training recipe is the one of the
    preset of the nearest size (digits up to 16 pixels, fashion-mnist above)."""
    from ..data.images import load_images

    data = load_images(source, split="train")  # raises DataError for unknown names and bad files
    _, c, h, w = data.images.shape
    recipe = IMAGE_PRESETS["digits" if h <= 16 else "fashion-mnist"]
    return RunConfig(
        dataset=source,
        process=RECIPE_PROCESS,
        net_kind="unet",
        net=preset_for_size(h, c, w).to_dict(),
        shape=[c, h, w],
        kind="images",
        target="v",
        loss=dict(RECIPE_LOSS),
        train=recipe.train,
        data={"size": h, "channels": c},
    )
