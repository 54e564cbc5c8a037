"""The feature networks of the sample-quality metrics (nets/features.py): which one reads a data set, the
shipped ones, their files, and embedding images.

Where the features come from (``resolve_feature_net``):

* the shipped classifiers ``digits``, ``fashion-mnist`` and ``fashion-pairs``:
difflab/weights/{name}-classifier.safetensors
  with a JSON beside it (the config, seed, training command and measured test accuracy), trained through the one
  training loop by ``difflab features train NAME`` (evaluation/feature_training.py). The fashion-pairs net has four
  attribute heads (left class, left colour, right class, right colour: ``groups``); its recorded accuracy is all
  four right, with each head's beside it;
* your own classifier for your own labelled data set: ``difflab features train DATA --out DIR``
  writes DIR/{stem}-classifier.safetensors; pass that path to ``difflab eval --features``;
* ``random``: the same architecture with fixed random weights (Kaiming init from a seeded generator, no
  head). It needs no training or download and takes any size and channel count; it is the default for
  data sets without a shipped classifier. Random features separate real data from noise and blur well,
  but they are weaker than trained ones at ranking good models: compare runs only under the same
  feature network (the report names it and its hash).

Feature statistics are comparable only under the same network: ``FeatureNet.fingerprint`` hashes its config and
every weight, and reference statistics are cached under that hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..data.images import to_model
from ..io import atomic_path
from ..nets.features import RANDOM, FeatureNet, FeatureNetConfig, FeatureNetError, random_feature_net

WEIGHTS_DIR = Path(__file__).parent.parent / "weights"
SHIPPED = ("digits", "fashion-mnist", "fashion-pairs")
SUBSET_N = 2000  # the JSON also records the accuracy on the first SUBSET_N test images (a quick check for tests)


# --------------------------------------------------------------------------- files


def weight_paths(name: str, folder: str | Path = WEIGHTS_DIR) -> tuple[Path, Path]:
    """(weights, JSON) of the classifier called ``name`` in ``folder``."""
    folder = Path(folder)
    return folder / f"{name}-classifier.safetensors", folder / f"{name}-classifier.json"


def save_feature_net(net: FeatureNet, weights: Path, meta: dict) -> None:
    """Write the weights and, beside them, the JSON {config, ...meta}; both atomically."""
    weights = Path(weights)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(weights.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"config": net.config.to_dict(), **meta}, indent=2) + "\n")


def _load_file(weights: Path) -> FeatureNet:
    meta_path = weights.with_suffix(".json")
    if not weights.is_file():
        raise FeatureNetError(f"{weights} is missing")
    if not meta_path.is_file():
        raise FeatureNetError(f"{meta_path} is missing: a feature net's config lives in a JSON beside its weights")
    try:
        meta = json.loads(meta_path.read_text())
        config = FeatureNetConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FeatureNetError(f"{meta_path} is corrupt ({type(e).__name__}: {e})") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise FeatureNetError(f"{weights} is corrupt ({e})") from None
    net = FeatureNet(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise FeatureNetError(f"{weights} does not match {meta_path.name}: {str(e).strip().splitlines()[0]}") from None
    net.meta = {k: v for k, v in meta.items() if k != "config"}
    net.meta.setdefault("name", weights.stem)
    net.meta.setdefault("kind", "classifier")  # an instance net's or the identity encoder's JSON names its kind
    return net.eval()


def images_digest(images: Tensor, labels: Tensor | None = None) -> str:
    """SHA-256 of uint8 images (N, C, H, W), their shape and bytes, and of their labels when given: what a feature
    net records it was trained on, and the data part of reference statistics' cache key."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def check_trained_on(net: FeatureNet, train_images: Tensor, dataset: str) -> None:
    """Refuse, in one line, a feature net that records the images it was trained on (``meta['data']``, an instance
    net's) when ``train_images`` (the run's train split) are other images. Nets that record none pass."""
    data = net.meta.get("data")
    if not isinstance(data, dict) or "sha256" not in data:
        return
    if images_digest(train_images) != data["sha256"]:
        raise FeatureNetError(
            f"the feature net {net.meta.get('name')} was trained on the {data.get('n')} training images of "
            f"{net.meta.get('dataset')}, not on the {len(train_images)} of {dataset}: train one on this data with "
            f"`difflab features train {dataset} --method instance`"
        )


def load_feature_net(name: str) -> FeatureNet:
    """A shipped classifier by name ('digits', 'fashion-mnist'), or a classifier's .safetensors path
    (with its .json beside it, as ``difflab features train`` writes them)."""
    if name in SHIPPED:
        weights, _ = weight_paths(name)
        if not weights.is_file():
            raise FeatureNetError(
                f"the shipped {name} feature net is missing ({weights}); rebuild it with `difflab features train "
                f"{name}`"
            )
        return _load_file(weights)
    path = Path(name).expanduser()
    if path.suffix == ".safetensors":
        return _load_file(path)
    raise FeatureNetError(
        f"unknown feature net {name!r}: choose one of {', '.join(SHIPPED)}, '{RANDOM}', or a .safetensors file "
        "written by `difflab features train DATA --out DIR`"
    )


def resolve_feature_net(
    spec: str | FeatureNet | None, dataset: str, channels: int, size: int, width: int | None = None
) -> FeatureNet:
    """The feature net for images of ``dataset`` (C = channels, H = size, W = width or size).

    spec None: the shipped classifier when ``dataset`` has one, else random features; 'random'; a shipped
    name; a .safetensors path; or a FeatureNet. Raises FeatureNetError when it cannot read such images."""
    if isinstance(spec, FeatureNet):
        net = spec
    elif spec == RANDOM or (spec is None and dataset not in SHIPPED):
        net = random_feature_net(channels)
    else:
        net = load_feature_net(spec if spec is not None else dataset)
    c = net.config
    if c.in_channels != channels:
        raise FeatureNetError(
            f"the feature net reads {c.in_channels}-channel images but {dataset} has {channels} channels"
        )
    width = width or size
    if c.image_size is not None and (c.image_size, c.image_width or c.image_size) != (size, width):
        raise FeatureNetError(
            f"the feature net was trained on {c.image_size}x{c.image_width or c.image_size} images but {dataset} is "
            f"{size}x{width}; "
            f"train one on this data (`difflab features train ...`) or use --features {RANDOM}"
        )
    return net


def features_spec(spec: str | None, dataset: str) -> str:
    """A --features value as a run records it: a file as its absolute path, a name as given, None as the net it
    stands for (the dataset's shipped classifier, else 'random')."""
    if spec is None:
        return dataset if dataset in SHIPPED else RANDOM
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.suffix == ".safetensors" else spec


def run_feature_net(
    spec: str | FeatureNet | None, record, dataset: str, channels: int, size: int, width: int | None = None
) -> FeatureNet:
    """The feature net a run is measured with: ``spec`` when given, else the one the run records
    (runs.config.FeaturesRecord; refused when its weights changed since), else ``resolve_feature_net``'s default."""
    if spec is not None or record is None:
        return resolve_feature_net(spec, dataset, channels, size, width)
    net = resolve_feature_net(record.net, dataset, channels, size, width)
    now = net.fingerprint()
    if now != record.fingerprint:
        raise FeatureNetError(
            f"the run's feature net {record.net} has changed since the run recorded it (fingerprint "
            f"{record.fingerprint[:12]}, now {now[:12]}): its FDs would not compare; pass --features to measure with "
            "another net"
        )
    return net


@torch.no_grad()
def embed(
    net: FeatureNet, images: Tensor, batch: int = 500, progress: bool = False, desc: str = "features"
) -> tuple[Tensor, Tensor | None]:
    """Features (N, feature_dim) and logits (N, K) (None without a head), float32, of images given as
    uint8 (N, C, H, W) or model-space floats. Fixed-size batches, so the result does not depend on N."""
    net.eval()
    feats, logits = [], []
    for chunk in tqdm(images.split(batch), desc=desc, disable=not progress, leave=False):
        x = to_model(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        f = net.features(x)
        feats.append(f)
        if net.head is not None:
            logits.append(net.classify(f))
    feats_all = torch.cat(feats) if feats else torch.empty(0, net.config.tiles * net.config.feature_dim)
    return feats_all, (torch.cat(logits) if logits else None)


def accuracy(net: FeatureNet, images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose argmax logit is their label (attribute heads: whose every attribute is right)."""
    _, logits = embed(net, images)
    right = net.attributes(logits) == labels.reshape(len(labels), -1)  # (N, A)
    return right.all(1).double().mean().item()


def attribute_accuracy(net: FeatureNet, images: Tensor, attributes: Tensor) -> list[float]:
    """Per attribute head, the fraction of images for which it is right."""
    _, logits = embed(net, images)
    return (net.attributes(logits) == attributes).double().mean(0).tolist()
