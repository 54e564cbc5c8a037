"""Training the feature networks (nets/features.py) through the one training loop, as a run kind of their own.

    difflab features train digits                      # runs/features-digits, then difflab/weights/digits-classifier.*
    difflab features train my-data.npz --out weights/  # your own labelled images

A features run is an ordinary run (config.json, checkpoints, ``--resume``, progress, torchrun): its network is a
``FeatureNet``, its data the labelled images with the labels as the condition ``labels`` ((N,) classes, or
(N, A) attributes for a net with attribute heads), its loss ``FeatureLoss`` (the sum of each head's
cross-entropy on lightly augmented images). The recipe (``FeatureTraining``) is written in epochs and becomes
the run's TrainConfig: AdamW with weight decay, a linear warm-up over 5 % of the steps then a cosine decay to 0,
no gradient clipping, the EMA equal to the weights (decay 0), fp32, one seed for everything, so a retrain gives
the same network. When it finishes, ``export`` rescales the feature layer to unit RMS on the training images
(``normalize_features``; the logits are unchanged), measures the test accuracy and writes the weights and the
JSON beside them that evaluation/features.py loads."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditions import ConditionSpec
from ..data.images import ImageSet, load_images
from ..data.loader import TensorDataset
from ..data.pairs import ATTRIBUTES, COLOURS, NOUNS
from ..nets.features import FeatureNet, FeatureNetConfig
from ..runs.config import CheckpointError, DataSpec, RunConfig, TrainConfig, load_config
from ..runs.kinds import RunKind
from ..runs.presets import RECIPE_PROCESS
from ..runs.run import Run
from ..training.loop import train
from .features import (
    SHIPPED,
    WEIGHTS_DIR,
    FeatureNetError,
    accuracy,
    attribute_accuracy,
    embed,
    save_feature_net,
    weight_paths,
)

SUBSET_N = 2000  # the JSON also records the accuracy on the first SUBSET_N test images (a quick check for tests)


@dataclass
class FeatureTraining:
    """How a classifier is trained, in epochs (see the module doc for what becomes of it)."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 5e-4
    warmup: float = 0.05  # fraction of the steps
    shift: int = 1  # random translation by up to `shift` pixels (edge-replicated)
    flip: bool = False  # random horizontal flips
    seed: int = 0
    pairs: int | None = None  # fashion-pairs: training images made (default: the train split's 20000)
    widths: tuple[int, ...] | None = None  # the network's conv stages (default FeatureNetConfig's)


# Measured (4 epochs, Fashion-MNIST test accuracy): no augmentation 91.6%, 1-pixel shifts 91.2%, shifts and
# flips 90.9%; 2x2 pooling before the feature layer +0.8 points over global pooling. Digits (1442 training
# images, 40 epochs) gain from 1-pixel shifts.
RECIPES: dict[str, FeatureTraining] = {
    "digits": FeatureTraining(epochs=40, batch_size=64, lr=3e-3, shift=1),
    "fashion-mnist": FeatureTraining(epochs=4, batch_size=128, lr=3e-3, shift=0),
    # fashion-pairs (issue 23's judge, per-half class accuracy on the 4000 test pairs; trained on CUDA): 10 epochs of
    # the
    # 20000 train pairs 89.9 / 88.5 %; 30 epochs 90.8 / 90.4 %; 15 epochs of 60000 pairs 91.5 / 91.7 %, with widths
    # 64-128-256 92.2 / 91.8 % (all four right 84.3 %)
    "fashion-pairs": FeatureTraining(epochs=15, batch_size=128, lr=3e-3, shift=1, pairs=60000, widths=(64, 128, 256)),
}


def augment(x: Tensor, shift: int, flip: bool, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by (dy, dx) in [-shift, shift]^2 (edges replicated) and mirror half of them."""
    B, _, H, W = x.shape
    if shift:
        padded = F.pad(x, (shift,) * 4, mode="replicate")  # (B, C, H + 2s, W + 2s)
        dy, dx = torch.randint(0, 2 * shift + 1, (2, B), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
        x = padded[torch.arange(B, device=x.device)[:, None, None], :, rows, cols].permute(
            0, 3, 1, 2
        )  # (B, H, W, C) -> (B, C, H, W)
    if flip:
        mirror = (torch.rand(B, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


@dataclass
class FeatureLoss:
    """The sum over the attribute heads (one head: the classes) of the cross-entropy of the network's logits on
    augmented images against cond['labels']. The augmentation draws from torch's generator, which the training
    loop seeds per step."""

    shift: int = 0
    flip: bool = False
    groups: list[int] | None = None  # the heads' sizes; None: one head of all the classes

    def __call__(self, model, x0: Tensor, *, t=None, noise=None, cond=None) -> Tensor:
        labels = cond["labels"].reshape(len(x0), -1).long()  # (B, A)
        logits = model.net(augment(x0, self.shift, self.flip))
        parts = logits.split(list(self.groups), dim=1) if self.groups else [logits]
        return sum(F.cross_entropy(part.float(), labels[:, a]) for a, part in enumerate(parts))


class FeatureRun(Run):
    """A features run: ``net`` is its FeatureNet (``export`` writes the shipped files)."""

    kinds = ("features",)
    what = "a feature network run"


def features_config(
    source: str,
    data: ImageSet,
    recipe: FeatureTraining,
    data_dir: str | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> RunConfig:
    """The run of a feature network for the labelled images ``data`` (the train split of ``source``) trained with
    ``recipe``."""
    _, C, H, W = data.images.shape
    groups = _groups(data)
    num_classes = sum(groups) if groups else data.num_classes
    widths = {"widths": tuple(recipe.widths)} if recipe.widths else {}
    net = FeatureNetConfig(
        in_channels=C,
        num_classes=num_classes,
        image_size=H,
        image_width=W if W != H else None,
        groups=groups,
        tiles=2 if groups else 1,
        **widths,
    )  # fashion-pairs: each half read alone, as an item of its own
    steps = recipe.epochs * (len(data) // recipe.batch_size)
    if steps <= 0:
        raise FeatureNetError(f"{data.name}: {len(data)} training images make no batch of {recipe.batch_size}")
    train = TrainConfig(
        steps=steps,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        warmup=max(1, int(recipe.warmup * steps)),
        lr_schedule="cosine",
        weight_decay=recipe.weight_decay,
        grad_clip=0.0,
        ema_decay=0.0,
        seed=recipe.seed,
        checkpoint_every=max(1, steps // 4),
        log_every=25,
    )
    return RunConfig(
        dataset=source,
        process=RECIPE_PROCESS,
        net_kind="features",
        net=net,
        shape=[C, H, W],
        data_kind="images",
        run_kind="features",
        target="x0",
        loss=FeatureLoss(recipe.shift, recipe.flip, list(groups) if groups else None),
        train=train,
        data=DataSpec(n=recipe.pairs, data_dir=data_dir, size=size, channels=channels),
        conditions=[ConditionSpec("labels", "tensor", 0.0)],
    )


def _groups(data: ImageSet) -> tuple[int, ...] | None:
    """The attribute heads of a data set with attributes (fashion-pairs: left/right class and colour)."""
    if data.attributes is None:
        return None
    return (len(NOUNS), len(COLOURS), len(NOUNS), len(COLOURS))


def labels_of(data: ImageSet) -> Tensor:
    """The training targets: the attributes (N, A) of a set that has them, else the labels (N,)."""
    if data.attributes is not None:
        return data.attributes
    if data.labels is None or data.num_classes is None:
        raise FeatureNetError(
            f"{data.name}: a classifier needs labels (class subfolders or an npz 'labels' array); use --features random"
        )
    return data.labels


def feature_data(data: ImageSet) -> TensorDataset:
    return TensorDataset(data.images, {"labels": labels_of(data)})


@torch.no_grad()
def normalize_features(net: FeatureNet, images: Tensor) -> FeatureNet:
    """Rescale the feature layer so the features of ``images`` have unit root-mean-square; logits unchanged.

    relu(s z) = s relu(z) for s > 0, so multiplying the feature layer by s and dividing the head's weights
    by s changes the features' scale only. Unit-scale features keep KID's kernel (x.y / D + 1)^3 near 1
    (unscaled digits features gave x.y / D of about 5 and a kernel dominated by its variance) and make FD
    read in units of the typical per-feature variance."""
    feats, _ = embed(net, images)
    s = 1.0 / feats.pow(2).mean().sqrt().clamp(min=1e-12).item()
    net.embed.weight.mul_(s)
    net.embed.bias.mul_(s)
    if net.head is not None:
        net.head.weight.div_(s)
    return net


def run_meta(loaded: Run, seconds: float | None) -> dict:
    """What a feature net's JSON says of the run that trained it: its recipe and weights' fingerprint, the
    training time and torch's version (every features exporter writes these)."""
    t = loaded.config.train
    return {
        "run": {
            "steps": t.steps,
            "batch_size": t.batch_size,
            "lr": t.lr,
            "loss": asdict(loaded.config.loss),
            "fingerprint": loaded.fingerprint,
        },
        **({"train_seconds": round(seconds, 1)} if seconds is not None else {}),
        "torch": torch.__version__,
    }


def export(
    run: str | Path, name: str, out: str | Path | None = None, command: str | None = None, seconds: float | None = None
) -> tuple[Path, dict]:
    """Write the finished features run as {name}-classifier.safetensors and .json in ``out`` (default
    difflab/weights/): the network with its features normalised, its test accuracy and its recipe."""
    loaded = FeatureRun.load(run)
    cfg = loaded.config
    d = cfg.data
    train = load_images(cfg.dataset, "train", size=d.size, channels=d.channels, data_dir=d.data_dir, n=d.n)
    test = load_images(cfg.dataset, "test", size=d.size, channels=d.channels, data_dir=d.data_dir)
    net = normalize_features(loaded.net, train.images)
    labels = labels_of(test)
    k = min(SUBSET_N, len(test))
    extra = {}
    if test.attributes is not None:
        extra = {
            "attributes": list(ATTRIBUTES),
            "test_attribute_accuracy": attribute_accuracy(net, test.images, labels),
            "test_subset_attribute_accuracy": attribute_accuracy(net, test.images[:k], labels[:k]),
        }
    meta = {
        "name": name,
        "dataset": cfg.dataset,
        "classes": list(train.class_names) if train.class_names and test.attributes is None else None,
        **extra,
        "seed": cfg.train.seed,
        "command": command or f"difflab features train {cfg.dataset}",
        "test_accuracy": accuracy(net, test.images, labels),
        "test_n": len(test),
        "test_subset": {
            "n": k,
            "accuracy": accuracy(net, test.images[:k], labels[:k]),
            "which": f"the first {k} test images in split order",
        },
        "train_n": len(train),
        **run_meta(loaded, seconds),
    }
    weights, _ = weight_paths(name, out if out is not None else WEIGHTS_DIR)
    save_feature_net(net, weights, meta)
    return weights, meta


def train_features(
    source: str,
    run: str | Path,
    *,
    out: str | Path | None = None,
    recipe: FeatureTraining | None = None,
    data_dir: str | None = None,
    size: int | None = None,
    channels: int | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    device: str = "cpu",
) -> tuple[Path, dict]:
    """Train (or with ``resume`` continue) the feature network of ``source`` in the run folder ``run`` and
    export it (see the module doc). Built-in names go to difflab/weights/ by default; other sources need ``out``."""
    name = source if source in SHIPPED else Path(source).stem
    if out is None and source not in SHIPPED:
        raise FeatureNetError(f"{source}: pass --out DIR for a data set other than {', '.join(SHIPPED)}")
    if resume:
        cfg = load_config(run)
        if cfg.run_kind != "features":
            raise FeatureNetError(f"{run} is not a features run")
        d = cfg.data
        data = load_images(cfg.dataset, "train", size=d.size, channels=d.channels, data_dir=d.data_dir, n=d.n)
    else:
        recipe = recipe or RECIPES.get(source, FeatureTraining())
        data = load_images(source, "train", size=size, channels=channels, data_dir=data_dir, n=recipe.pairs)
        cfg = features_config(source, data, recipe, data_dir, size, channels)
    t0 = time.perf_counter()
    train(run, cfg, feature_data(data), device=device, resume=resume, progress=progress, command="features train")
    return export(run, name, out, command, time.perf_counter() - t0)


def _check(cfg: RunConfig, net, specs) -> None:
    if [s.name for s in specs] != ["labels"]:
        raise CheckpointError("config: a feature network's condition is its labels")


FEATURES = RunKind(
    "features",
    "a feature network run",
    {"features": (FeatureNetConfig, FeatureNet)},
    lambda cfg: cfg.loss,
    FeatureRun,
    "features train",
    use="export it with `difflab features train NAME --run {run} --resume`",
    check=_check,
    loss_config=FeatureLoss,
)
