"""An identity measure for personalisation: a small encoder whose features separate one Fashion-MNIST item from
the other items of its class (what DINO features do for DreamBench's subjects), trained by instance
discrimination (SimCLR's NT-Xent, Chen et al. 2020) through the one training loop.

    difflab features identity                 # runs/features-identity, then difflab/weights/fashion-identity.*

Each training item is seen as two random *views* that keep its identity (``identity_views``: a tint from the
fashion-pairs palette or a random colour, a shift of up to 2 pixels, a scale of 0.9-1.1, a light blur and
noise, on the 32x32 black half of a fashion-pairs image); the loss pulls the two views of an item together and
pushes them from the batch's other items' views. The network is a ``FeatureNet`` (nets/features.py) whose
"head" is the projection z where the loss compares views; identity is read there (``identity_embed``: z
normalised), because the cosine between two views is what the loss trains.

Before it is trusted it is validated (``retrieval_accuracy``): for test items never seen in training, a view
of an item must retrieve the item itself (another view, in another tint) among ``distractors`` other items of
its class. ``export`` records that figure beside the weights.

Measuring a personalisation: ``identity_similarity`` of a generated subject half to the subject (the mean of
its views, ``subject_vector``), read against a floor (other real items of the class) and a ceiling (the
subject's own views through the autoencoder: the best a latent model can give) as
G = (tuned - untuned) / (ceiling - untuned) (``gain``); ``diversity`` of a set of items."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.fashion_mnist import load_fashion_mnist
from ..data.images import to_model
from ..data.loader import TensorDataset
from ..data.pairs import PAD, RGB
from ..nets.features import FeatureNet, FeatureNetConfig, FeatureNetError
from ..runs.config import CheckpointError, DataSpec, RunConfig, TrainConfig, load_config
from ..runs.kinds import RunKind
from ..runs.presets import RECIPE_PROCESS
from ..runs.run import Run
from ..runs.store import weights_step
from ..training.loop import train
from .feature_training import run_meta
from .features import WEIGHTS_DIR, load_feature_net, save_feature_net

NAME = "fashion-identity"
WEIGHTS = WEIGHTS_DIR / f"{NAME}.safetensors"
PALETTE = torch.from_numpy(RGB).float() / 255.0  # (colours, 3)


# --------------------------------------------------------------------------- views that keep identity


@dataclass(frozen=True)
class Views:
    """How much a view may differ from its item (see identity_views)."""

    shift: float = 2.0  # pixels, each axis
    scale: float = 0.1  # the item's size times 1 +- scale
    blur: float = 1.0  # blend towards a 3x3 Gaussian blur by up to this fraction
    noise: float = 0.04  # Gaussian noise of up to this standard deviation (images in [0, 1])
    palette: float = 0.5  # the share of views in a fashion-pairs colour; the rest in a random bright colour


def identity_views(items: Tensor, views: Views = Views(), generator: torch.Generator | None = None) -> Tensor:
    """Grey items (B, 1, 28, 28) in [-1, 1] -> one random view of each, (B, 3, 32, 32) in [-1, 1]: the item
    tinted (g / 255 * colour, as fashion-pairs tints), padded to a 32x32 black half, shifted and scaled about
    its centre, blurred and noised by random amounts. Draws from ``generator`` (default: torch's, which the
    training loop seeds per step)."""
    if items.ndim != 4 or items.shape[1] != 1:
        raise FeatureNetError(f"identity views take grey items (B, 1, H, W), got {tuple(items.shape)}")
    B, dev = len(items), items.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(dev)

    named = PALETTE[torch.randint(len(PALETTE), (B,), generator=generator)].to(dev)  # (B, 3)
    free = 0.25 + 0.75 * rand(B, 3)
    free = (
        free / free.amax(1, keepdim=True) * (0.6 + 0.4 * rand(B, 1))
    )  # a bright random colour: its largest channel 0.6..1
    colour = torch.where((rand(B) < views.palette)[:, None], named, free)
    x = F.pad((items + 1) / 2 * colour[:, :, None, None], (PAD,) * 4)  # (B, 3, 32, 32) in [0, 1]
    size = x.shape[-1]
    s = 1.0 / (1.0 + views.scale * (2 * rand(B) - 1))  # the sampling grid's scale: 1 / the item's
    t = views.shift * (2 * rand(B, 2) - 1) * 2.0 / size  # in grid units (the image spans [-1, 1])
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = s, s, -t
    x = F.grid_sample(
        x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="zeros", align_corners=False
    )
    k = torch.tensor([0.25, 0.5, 0.25], device=dev)
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), (k[:, None] * k[None, :]).expand(3, 1, 3, 3), groups=3)
    x = x + views.blur * rand(B, 1, 1, 1) * (blurred - x)
    x = x + views.noise * rand(B, 1, 1, 1) * torch.randn(x.shape, generator=generator).to(dev)
    return x.clamp(0, 1) * 2 - 1


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """SimCLR's loss: each of the 2B normalised projections must pick its own pair among the other 2B - 1
    (cross-entropy over cosine / temperature)."""
    B = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D)
    sim = (z @ z.T) / temperature
    sim = sim.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    targets = torch.cat([torch.arange(B, 2 * B), torch.arange(B)]).to(z.device)
    return F.cross_entropy(sim, targets)


@dataclass
class IdentityLoss:
    """NT-Xent between two identity views of each item of the batch (the training loop's loss signature)."""

    temperature: float = 0.2

    def __call__(self, model, x0: Tensor, *, t=None, noise=None, cond=None) -> Tensor:
        views = identity_views(torch.cat([x0, x0]))
        z = model.net.logits(views)
        return nt_xent(*z.chunk(2), self.temperature)


# --------------------------------------------------------------------------- the run, trained and exported


@dataclass
class IdentityTraining:
    """The recipe of the shipped identity encoder."""

    steps: int = 1500
    batch_size: int = 128  # items; the loss sees 2 views of each
    lr: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.2
    projection: int = 64
    seed: int = 0


class IdentityRun(Run):
    """An identity-encoder run: ``net`` is its FeatureNet."""

    kinds = ("identity",)
    what = "an identity encoder run"


def identity_config(recipe: IdentityTraining) -> RunConfig:
    net = FeatureNetConfig(
        in_channels=3, widths=(32, 64, 128), pool=4, feature_dim=128, num_classes=recipe.projection, image_size=32
    )
    tc = TrainConfig(
        steps=recipe.steps,
        batch_size=recipe.batch_size,
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
        dataset="fashion-mnist",
        process=RECIPE_PROCESS,
        net_kind="features",
        net=net,
        shape=[1, 28, 28],
        data_kind="images",
        run_kind="identity",
        target="x0",
        loss=IdentityLoss(recipe.temperature),
        train=tc,
        data=DataSpec(),
        conditions=[],
    )


@torch.no_grad()
def identity_embed(net: FeatureNet, images: Tensor, batch: int = 1000) -> Tensor:
    """Model-space halves (N, 3, 32, 32) in [-1, 1] (or uint8) -> unit identity vectors (N, D)."""
    if images.dtype == torch.uint8:
        images = to_model(images)
    net.eval()
    return torch.cat(
        [F.normalize(net.logits(images[i : i + batch].float()), dim=1) for i in range(0, len(images), batch)]
    )


def retrieval_accuracy(
    embed, items: Tensor, labels: Tensor, distractors: int = 100, queries: int = 1000, seed: int = 0
) -> float:
    """Top-1 retrieval of test items among ``distractors`` other items of their class: for each of ``queries``
    items, a view of it (``embed``'s input: model-space views) must be nearer (cosine) to another view of it
    (another tint, shift, scale) than to a view of each distractor. ``items`` grey (N, 1, 28, 28) in [-1, 1],
    ``embed`` maps views (n, 3, 32, 32) to unit vectors (n, D)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(items), generator=g)[:queries]
    hits = 0
    for q in order.tolist():
        same = torch.nonzero(labels == labels[q]).flatten()
        same = same[same != q]
        others = same[torch.randperm(len(same), generator=g)[:distractors]]
        gallery = embed(
            identity_views(items[torch.cat([torch.tensor([q]), others])], generator=g)
        )  # (1 + d, D): the item first
        query = embed(identity_views(items[[q]], generator=g))  # (1, D)
        hits += int((gallery @ query.T).flatten().argmax() == 0)
    return hits / len(order)


def export(
    run: str | Path, out: str | Path | None = None, command: str | None = None, seconds: float | None = None
) -> tuple[Path, dict]:
    """Write the finished identity run as fashion-identity.safetensors and .json (default difflab/weights/),
    with its retrieval accuracy on test items (never seen in training) among 100 same-class distractors."""
    loaded = IdentityRun.load(run)
    net = loaded.net.eval()
    test = load_fashion_mnist("test")
    items = to_model(test.images)
    torch.manual_seed(0)
    meta = {
        "name": NAME,
        "kind": "identity",
        "dataset": "fashion-mnist",
        "space": "the projection z, normalised (identity_embed)",
        "command": command or "difflab features identity",
        "retrieval_top1": retrieval_accuracy(lambda v: identity_embed(net, v), items, test.labels, 100, 1000),
        "retrieval_subset": {
            "queries": 200,
            "distractors": 100,
            "seed": 0,
            "top1": retrieval_accuracy(lambda v: identity_embed(net, v), items, test.labels, 100, 200),
        },
        **run_meta(loaded, seconds),
    }
    weights = Path(out) / f"{NAME}.safetensors" if out is not None else WEIGHTS
    save_feature_net(net, weights, meta)
    return weights, meta


def train_identity(
    run: str | Path,
    *,
    out: str | Path | None = None,
    recipe: IdentityTraining | None = None,
    resume: bool = False,
    progress: bool = True,
    command: str | None = None,
    device: str = "cpu",
    max_minutes: float | None = None,
) -> tuple[Path, dict] | None:
    """Train (or continue) the identity encoder in ``run`` on the Fashion-MNIST train items and export it; None
    when ``max_minutes`` stopped it first (``resume`` continues)."""
    cfg = load_config(run) if resume else identity_config(recipe or IdentityTraining())
    if cfg.run_kind != "identity":
        raise FeatureNetError(f"{run} is not an identity encoder run")
    items = load_fashion_mnist("train").images  # uint8 (60000, 1, 28, 28): the loader gives [-1, 1]
    t0 = time.perf_counter()
    train(
        run,
        cfg,
        TensorDataset(items),
        device=device,
        resume=resume,
        progress=progress,
        max_minutes=max_minutes,
        command="features identity",
    )
    if weights_step(run) < cfg.train.steps:
        return None
    return export(run, out, command, time.perf_counter() - t0)


def load_identity_net(path: str | Path | None = None) -> FeatureNet:
    """The shipped identity encoder (or one written by ``export`` at ``path``)."""
    weights = Path(path) if path is not None else WEIGHTS
    if path is None and not weights.is_file():
        raise FeatureNetError(
            f"the shipped identity encoder is missing ({weights}); rebuild it with `difflab features identity`"
        )
    net = load_feature_net(str(weights))
    net.meta["kind"] = "identity"
    return net


# --------------------------------------------------------------------------- measuring a subject


def gain(tuned: float, untuned: float, ceiling: float) -> float:
    """G = (tuned - untuned) / (ceiling - untuned): the share of the gap between the untuned model and the
    subject itself that a personalisation closes (DreamBooth on Stable Diffusion, in DINO similarity: 0.72)."""
    if ceiling <= untuned:
        raise ValueError(f"the ceiling {ceiling:.4f} must lie above the untuned model's similarity {untuned:.4f}")
    return (tuned - untuned) / (ceiling - untuned)


def subject_vector(net: FeatureNet, grey: Tensor, n: int = 64, seed: int = 0) -> Tensor:
    """The subject's identity: the normalised mean of ``n`` random views of its grey item (28, 28) uint8."""
    g = torch.Generator().manual_seed(seed)
    v = identity_embed(net, identity_views(to_model(grey.reshape(1, 1, 28, 28)).expand(n, -1, -1, -1), generator=g))
    return F.normalize(v.mean(0), dim=0)


def identity_similarity(net: FeatureNet, halves: Tensor, subject: Tensor) -> Tensor:
    """cos(identity of each half, the subject vector ``subject_vector``): halves uint8 (N, 3, 32, 32) -> (N,)."""
    return identity_embed(net, halves) @ subject


def best_half_similarity(net: FeatureNet, images: Tensor, subject: Tensor) -> Tensor:
    """The subject's identity in fashion-pairs images, uint8 (N, 3, 32, 64) -> (N,): the larger similarity of
    the two halves. Identity is read wherever the model drew the item: a model that puts it on the wrong side
    (a prompt-fidelity error, counted apart) still drew the subject or not."""
    left = identity_similarity(net, images[..., :32], subject)
    return torch.maximum(left, identity_similarity(net, images[..., 32:], subject))


def diversity(net: FeatureNet, halves: Tensor) -> float:
    """The mean identity distance 1 - cos between two different halves (N >= 2): how varied a set of items is."""
    z = identity_embed(net, halves)
    n = len(z)
    if n < 2:
        raise ValueError("diversity needs at least two images")
    return float(1 - ((z @ z.T).sum() - n) / (n * (n - 1)))


def _check(cfg: RunConfig, net, specs) -> None:
    if specs:
        raise CheckpointError("config: an identity encoder takes no condition")


IDENTITY = RunKind(
    "identity",
    "an identity encoder run",
    {"features": (FeatureNetConfig, FeatureNet)},
    lambda cfg: cfg.loss,
    IdentityRun,
    "features identity",
    use="export it with `difflab features identity --run {run} --resume`",
    check=_check,
    loss_config=IdentityLoss,
)
