"""A feature network for any folder of images, trained on the folder itself by instance discrimination (SimCLR's
NT-Xent, Chen et al. 2020: the identity encoder's recipe, evaluation/identity.py, with views that suit any images),
through the one training loop:

    difflab features train my-folder                  # runs/features-my-folder/my-folder-instance.safetensors
    difflab train my-folder --eval-every --features runs/features-my-folder/my-folder-instance.safetensors
    difflab eval RUN                                  # reads with the feature net the run recorded

FID's Inception network was trained on ImageNet; a user's folder of 32x32 images has no such network, and fixed
random features rank good models poorly. Instance discrimination needs no labels: each training image is seen as
two random *views* (``instance_views``: a random resized crop, a left-right flip where the data allow it, a colour
and contrast jitter, light noise) and the loss pulls the two views of an image together and pushes them from the
batch's other images' views. The network is a ``FeatureNet`` (nets/features.py) whose "head" is the projection
where the loss compares views; FD and KID read the layer before it (``features``, the representation SimCLR
found transfers best), rescaled to unit RMS on the training images as the classifiers are.

``export`` records what the net was trained on (``data``: the set, its split, count, shape and the SHA-256 of its
images): ``check_trained_on`` refuses, in one line, a run whose training images differ. Where the folder has
classes, ``linear_probe`` measures how much of them a linear read-out of the frozen features recovers (train split
-> test split), beside the same probe on fixed random features: the net's validation, recorded in its JSON."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.augment import FLIP_CHANGES_MEANING
from ..data.images import ImageSet, load_images
from ..data.loader import TensorDataset
from ..nets.features import FeatureNet, FeatureNetConfig, FeatureNetError, random_feature_net
from ..runs.config import CheckpointError, DataSpec, RunConfig, TrainConfig, load_config
from ..runs.kinds import RunKind
from ..runs.presets import RECIPE_PROCESS
from ..runs.run import Run
from ..runs.store import weights_step
from ..training.loop import train
from .feature_training import normalize_features, run_meta
from .features import embed, images_digest, save_feature_net
from .identity import nt_xent

SUFFIX = "instance"  # {stem}-instance.safetensors


# --------------------------------------------------------------------------- views that keep an image's identity


@dataclass(frozen=True)
class InstanceViews:
    """How much a view may differ from its image (see instance_views)."""

    crop: float = 0.4  # the crop keeps between this fraction of the image's area and all of it
    aspect: float = 4 / 3  # the crop's aspect ratio lies in [1 / aspect, aspect] (log-uniform)
    flip: bool = True  # mirror half of the views left-right
    jitter: float = 0.4  # brightness, contrast (and saturation for colour) scaled by 1 +- jitter
    grey: float = 0.2  # colour images: the share of views turned grey
    noise: float = 0.03  # Gaussian noise of up to this standard deviation (images in [0, 1])


def instance_views(
    x: Tensor, views: InstanceViews = InstanceViews(), generator: torch.Generator | None = None
) -> Tensor:
    """Model-space images (B, C, H, W) in [-1, 1] -> one random view of each, same shape and range. Draws from
    ``generator`` (default: torch's, which the training loop seeds per step)."""
    if x.ndim != 4:
        raise FeatureNetError(f"instance views take images (B, C, H, W), got {tuple(x.shape)}")
    B, C, _, _ = x.shape
    dev = x.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    # a random resized crop: area a in [crop, 1], aspect r log-uniform in [1/aspect, aspect], anywhere inside
    area = views.crop + (1 - views.crop) * rand(B)
    log_r = math.log(views.aspect) * (2 * rand(B) - 1)
    sx = (area * log_r.exp()).sqrt().clamp(max=1.0)  # the crop's width, as a fraction of the image's
    sy = (area / log_r.exp()).sqrt().clamp(max=1.0)
    tx, ty = (1 - sx) * (2 * rand(B) - 1), (1 - sy) * (2 * rand(B) - 1)  # its centre, in grid units
    if views.flip:
        sx = torch.where(rand(B) < 0.5, -sx, sx)  # a negative x scale mirrors the crop
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = sx, sy, tx, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = (F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False) + 1) / 2

    def factor():
        return (1 + views.jitter * (2 * rand(B, 1, 1, 1) - 1)).clamp(min=0)

    v = v * factor()  # brightness
    mean = v.mean(dim=(1, 2, 3), keepdim=True)
    v = mean + factor() * (v - mean)  # contrast
    if C == 3:
        grey = (v * torch.tensor([0.299, 0.587, 0.114], device=dev)[:, None, None]).sum(1, keepdim=True)
        v = grey + factor() * (v - grey)  # saturation
        v = torch.where((rand(B) < views.grey)[:, None, None, None], grey.expand_as(v), v)
    v = v + views.noise * rand(B, 1, 1, 1) * torch.randn(v.shape, generator=generator).to(dev)
    return v.clamp(0, 1) * 2 - 1


@dataclass
class InstanceLoss:
    """NT-Xent between two instance views of each image of the batch (the training loop's loss signature)."""

    temperature: float = 0.2
    flip: bool = True

    def __call__(self, model, x0: Tensor, *, t=None, noise=None, cond=None) -> Tensor:
        views = instance_views(torch.cat([x0, x0]), InstanceViews(flip=self.flip))
        z = model.net.logits(views)
        return nt_xent(*z.chunk(2), self.temperature)


# --------------------------------------------------------------------------- the recipe and its run


@dataclass
class InstanceTraining:
    """The recipe of a folder's instance-discrimination net. 5000 steps: on the 32x32 colour folder the linear probe
    reads 75.0 % against 68.9 % after 1000 (random features 62.2 %), 16 minutes on 2 CPU cores
    (benchmarks/folder_features.py)."""

    steps: int = 5000
    batch_size: int = 128  # images; the loss sees 2 views of each (capped at the training set's size)
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection: int = 64
    seed: int = 0
    widths: tuple[int, ...] | None = None  # the conv stages (default FeatureNetConfig's: 32 64 128)


class InstanceRun(Run):
    """An instance-discrimination features run: ``net`` is its FeatureNet."""

    kinds = ("instance",)
    what = "an instance-discrimination feature net run"


def flips_allowed(dataset: str) -> bool:
    """Whether views may be mirrored: not where a mirror changes what an image means (data/augment.py)."""
    return dataset not in FLIP_CHANGES_MEANING


def instance_config(
    source: str,
    data: ImageSet,
    recipe: InstanceTraining,
    data_dir: str | None = None,
    size: int | None = None,
    channels: int | None = None,
) -> RunConfig:
    """The run of an instance-discrimination net for the images ``data`` (the train split of ``source``)."""
    N, C, H, W = data.images.shape
    if N < 2:
        raise FeatureNetError(f"{data.name}: instance discrimination needs at least 2 training images, got {N}")
    widths = {"widths": tuple(recipe.widths)} if recipe.widths else {}
    net = FeatureNetConfig(
        in_channels=C, num_classes=recipe.projection, image_size=H, image_width=W if W != H else None, **widths
    )
    tc = TrainConfig(
        steps=recipe.steps,
        batch_size=min(recipe.batch_size, N),
        lr=recipe.lr,
        warmup=max(1, recipe.steps // 20),
        lr_schedule="cosine",
        weight_decay=recipe.weight_decay,
        grad_clip=0.0,
        ema_decay=0.0,
        seed=recipe.seed,
        checkpoint_every=max(1, recipe.steps // 10),
        log_every=25,
    )
    return RunConfig(
        dataset=source,
        process=RECIPE_PROCESS,
        net_kind="features",
        net=net,
        shape=[C, H, W],
        data_kind="images",
        run_kind="instance",
        target="x0",
        loss=InstanceLoss(recipe.temperature, flips_allowed(source)),
        train=tc,
        data=DataSpec(data_dir=data_dir, size=size, channels=channels),
        conditions=[],
    )


# --------------------------------------------------------------------------- validation


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor) -> float:
    """Test accuracy of a linear read-out of frozen features: ridge least squares from the standardised features
    (and a bias) to one-hot labels, fitted on the train split, the argmax read on the test split. Closed form,
    so the figure depends on the features alone; the ridge weight is 1e-3 of the mean eigenvalue."""
    mean, std = train_feats.mean(0), train_feats.std(0).clamp(min=1e-6)

    def design(f: Tensor) -> Tensor:
        z = ((f - mean) / std).double()
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)

    X = design(train_feats)
    K = int(max(train_labels.max(), test_labels.max())) + 1
    Y = F.one_hot(train_labels.long(), K).double()
    gram = X.T @ X
    ridge = 1e-3 * gram.diagonal().mean()
    W = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), X.T @ Y)
    return (design(test_feats) @ W).argmax(1).eq(test_labels.long()).double().mean().item()


def probe_figures(net: FeatureNet, train: ImageSet, test: ImageSet) -> dict | None:
    """The linear probe of ``net`` and of fixed random features (the floor), or None for a set without classes."""
    if train.labels is None or test.labels is None or len(test) == 0:
        return None
    figures = {}
    for key, n in (("linear_probe", net), ("linear_probe_random", random_feature_net(train.images.shape[1]))):
        figures[key] = linear_probe(embed(n, train.images)[0], train.labels, embed(n, test.images)[0], test.labels)
    return figures


# --------------------------------------------------------------------------- export and training


def instance_paths(name: str, folder: str | Path) -> tuple[Path, Path]:
    folder = Path(folder)
    return folder / f"{name}-{SUFFIX}.safetensors", folder / f"{name}-{SUFFIX}.json"


def export(
    run: str | Path, name: str, out: str | Path | None = None, command: str | None = None, seconds: float | None = None
) -> tuple[Path, dict]:
    """Write the finished run as {name}-instance.safetensors and .json in ``out`` (default: the run folder): the
    net with its features at unit RMS on the training images, what it was trained on, and its linear probe."""
    loaded = InstanceRun.load(run)
    cfg, d = loaded.config, loaded.config.data
    train_set = load_images(cfg.dataset, "train", size=d.size, channels=d.channels, data_dir=d.data_dir)
    net = normalize_features(loaded.net.eval(), train_set.images)
    try:
        test_set = load_images(cfg.dataset, "test", size=d.size, channels=d.channels, data_dir=d.data_dir)
    except ValueError:
        test_set = None
    probe = probe_figures(net, train_set, test_set) if test_set is not None else None
    meta = {
        "name": f"{name}-{SUFFIX}",
        "kind": SUFFIX,
        "dataset": cfg.dataset,
        "data": {
            "split": "train",
            "n": len(train_set),
            "shape": list(train_set.images.shape[1:]),
            "sha256": images_digest(train_set.images),
        },
        "space": "features: the layer before the projection, unit RMS on the training images",
        "classes": list(train_set.class_names) if train_set.class_names else None,
        **(probe or {}),
        **({"test_n": len(test_set)} if probe else {}),
        "seed": cfg.train.seed,
        "command": command or f"difflab features train {cfg.dataset}",
        **run_meta(loaded, seconds),
    }
    weights, _ = instance_paths(name, out if out is not None else run)
    save_feature_net(net, weights, meta)
    return weights, meta


def train_instance(
    source: str,
    run: str | Path,
    *,
    out: str | Path | None = None,
    recipe: InstanceTraining | None = None,
    data_dir: str | None = None,
    size: int | None = None,
    channels: int | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    device: str = "cpu",
    max_minutes: float | None = None,
) -> tuple[Path, dict] | None:
    """Train (or with ``resume`` continue) the instance-discrimination net of ``source``'s train split in ``run``
    and export it (see ``export``); None when ``max_minutes`` stopped it first (``resume`` continues)."""
    if resume:
        cfg = load_config(run)
        if cfg.run_kind != "instance":
            raise FeatureNetError(f"{run} is not an instance-discrimination features run")
        source, d = cfg.dataset, cfg.data
        data = load_images(source, "train", size=d.size, channels=d.channels, data_dir=d.data_dir)
    else:
        data = load_images(source, "train", size=size, channels=channels, data_dir=data_dir)
        cfg = instance_config(source, data, recipe or InstanceTraining(), data_dir, size, channels)
    t0 = time.perf_counter()
    train(
        run,
        cfg,
        TensorDataset(data.images),
        device=device,
        resume=resume,
        progress=progress,
        max_minutes=max_minutes,
        command="features train",
    )
    if weights_step(run) < cfg.train.steps:
        return None
    return export(run, Path(source).stem, out, command, time.perf_counter() - t0)


def _check(cfg: RunConfig, net, specs) -> None:
    if specs:
        raise CheckpointError("config: an instance-discrimination net takes no condition")


INSTANCE = RunKind(
    "instance",
    "an instance-discrimination feature net run",
    {"features": (FeatureNetConfig, FeatureNet)},
    lambda cfg: cfg.loss,
    InstanceRun,
    "features train",
    use="export it with `difflab features train NAME --run {run} --resume`",
    check=_check,
    loss_config=InstanceLoss,
)
