"""Reference statistics of real data in a feature network, computed once and cached.

The features of a fixed subset (at most REF_MAX images) of a data split, and their mean and covariance, are
cached in $DIFFLAB_CACHE (default ~/.cache/difflab), keyed by the data set, the split, a hash of the images
themselves and the feature network's fingerprint, so a changed data set or network never reuses stale
statistics."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..data.images import ImageSet
from ..io import atomic_path
from ..nets.features import FeatureNet
from .features import embed, images_digest
from .metrics import gaussian_stats

REF_MAX = 10000  # reference features: at most this many images of a split (a fixed random subset)
FEATURE_BATCH = 500
SUBSET_SEED = 0  # fixed subsets of real data (reference features, bits/dim images)

# counts reference statistics computed (not loaded from the cache): lets tests check that the cache is used
reference_computations = 0


def cache_dir() -> Path:
    """$DIFFLAB_CACHE, or ~/.cache/difflab."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


# --------------------------------------------------------------------------- reference statistics


def fixed_subset(n_total: int, n: int) -> Tensor:
    """The first n of a permutation drawn from a fixed seed: the same images every time."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]


def _cached_path(data: ImageSet, net: FeatureNet, folder: Path | None) -> Path:
    folder = Path(folder) if folder is not None else cache_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.name)[:40]
    key = f"{slug}-{data.split}-{images_digest(data.images, data.labels)[:16]}-{net.fingerprint()[:16]}"
    return folder / f"ref-{key}.safetensors"


def reference_features(
    data: ImageSet, net: FeatureNet, n: int, *, folder: Path | None = None, progress: bool = True
) -> Tensor:
    """The first ``n`` rows of ``reference_stats(data, net)["features"]`` (its fixed subset, in its order; fewer where
    the subset is smaller). Read from the cache when it holds them; else a few (under a quarter of the subset) are
    embedded alone, uncached, so a small comparison never pays for the whole split; else the whole subset is
    computed and cached."""
    size = min(len(data), REF_MAX)
    n = min(n, size)
    path = _cached_path(data, net, folder)
    if not path.is_file() and 4 * n < size:
        return _embed_subset(data, net, n, progress)[1]
    return _stats_at(path, data, net, progress)["features"][:n]


def _embed_subset(data: ImageSet, net: FeatureNet, n: int, progress: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(index, features, logits) of the first n images of ``data``'s fixed subset."""
    index = fixed_subset(len(data), n)
    feats, logits = embed(
        net, data.images[index], batch=FEATURE_BATCH, progress=progress, desc=f"features of {data.name} {data.split}"
    )
    return index, feats, logits


def reference_stats(data: ImageSet, net: FeatureNet, *, folder: Path | None = None, progress: bool = True) -> dict:
    """Features (N, D) float32, logits (N, K) or None, mu (D,), cov (D, D) float64 of a fixed random subset
    (at most REF_MAX images, in that random order) of ``data``; from the cache when it holds them."""
    return _stats_at(_cached_path(data, net, folder), data, net, progress)


def _stats_at(path: Path, data: ImageSet, net: FeatureNet, progress: bool) -> dict:
    """reference_stats with its cache file ``path`` already found (its key hashes the images)."""
    global reference_computations
    if path.is_file():
        try:
            t = load_file(str(path))
            return {"features": t["features"], "logits": t.get("logits"), "mu": t["mu"], "cov": t["cov"], "path": path}
        except (SafetensorError, OSError, ValueError, KeyError):
            pass  # unreadable: recompute and overwrite
    index, feats, logits = _embed_subset(data, net, min(len(data), REF_MAX), progress)
    mu, cov = gaussian_stats(feats)
    tensors = {"features": feats.contiguous(), "mu": mu, "cov": cov, "index": index}
    if logits is not None:
        tensors["logits"] = logits.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dataset": data.name, "split": data.split, "n": str(len(index))})
    reference_computations += 1
    return {"features": feats, "logits": logits, "mu": mu, "cov": cov, "path": path}
