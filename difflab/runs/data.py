"""The training data of a diffusion run: its dataset's train split with the conditions its config names.

    data = training_data(cfg, run_dir)           # a TensorDataset: (x, {condition: tensor})

* images stay uint8 in memory and are scaled per batch (data/loader.py); 2-D sets are drawn once;
* labels become the 'class_labels' condition; a text run's captions its text condition, each distinct caption
  encoded and stored once (text/encoders.py: text_states; each example reads its row, TensorDataset.rows); an
  image with several captions (a folder's metadata.jsonl) is one example per caption, every image alike and stored
  once (data.base.ImageSet.caption_pairs), and with train.caption_variants K each image again with K rephrased
  captions (fashion-pairs: data.pairs.rephrased); a super-resolution run's images downsampled become 'low_res'
  (core/operators.Downsample);
* a latent run trains on the scaled latents of its autoencoder, encoded once and cached in the run
  (``latents.safetensors``, keyed by the autoencoder's fingerprint and the images' hash)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.operators import Downsample
from ..data.images import DataError, ImageSet, load_images, to_model
from ..data.loader import TensorDataset
from ..data.pairs import training_pairs
from ..data.toy2d import make_toy
from ..io import cached_tensor
from ..latent.autoencoder import latent_space
from ..latent.space import LatentSpace
from ..text.encoders import text_states
from .config import RunConfig

LATENTS = "latents.safetensors"


def load_split(cfg: RunConfig, split: str) -> ImageSet:
    """A run's data set (its dataset with the size, channels and folder it records), one split."""
    d = cfg.data
    return load_images(cfg.dataset, split=split, size=d.size, channels=d.channels, data_dir=d.data_dir)


def low_res_of(images: Tensor, factor: int) -> Tensor:
    """uint8 images (N, C, H, W) -> their average-pooled low-resolution versions in the model space."""
    op = Downsample(factor, tuple(images.shape[1:]))
    return torch.cat([op(to_model(chunk)) for chunk in images.split(4096)])


def cached_latents(space: LatentSpace, images: Tensor, cache: Path | None, progress: bool = False) -> Tensor:
    """The scaled latents of uint8 ``images``, encoded once: read from ``cache`` when it holds latents of
    this autoencoder (fingerprint) for these images (their count and SHA-256), else encoded with a progress bar and
    written there atomically. The training split of the sets here fits in memory as latents (fashion-pairs: 20000 x
    4 x 8 x 16 floats, 41 MB), so latent runs train on the cache rather than encoding every batch."""
    tag = {
        "hash": space.hash,
        "images": str(len(images)),
        "data": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16],
    }

    def encode() -> Tensor:
        return torch.cat(
            [
                space.encode(to_model(part))
                for part in tqdm(images.split(1024), desc="encode training set", disable=not progress)
            ]
        )

    return cached_tensor(cache, tag, encode, name="z")


def training_captions(cfg: RunConfig, ds: ImageSet) -> tuple[Tensor, list[str]]:
    """The (image, caption) pairs a text run trains on: indices into ``ds``'s images and a caption for each. An
    image with several captions comes once per caption (ImageSet.caption_pairs); with train.caption_variants K,
    every pair again with each of K rephrased captions of the image's attributes (data.pairs.rephrased)."""
    if ds.captions is None:
        raise DataError(f"the run reads captions, and {cfg.dataset} has none")
    return training_pairs(ds, cfg.train.caption_variants, cfg.train.caption_words)


def training_data(cfg: RunConfig, run: str | Path | None = None, progress: bool = False) -> TensorDataset:
    """The train split of ``cfg``'s dataset as a TensorDataset with every condition the config takes (see the
    module doc); ``run`` is where a latent run's cache lives (None: no cache)."""
    if cfg.data_kind == "points":
        return TensorDataset(make_toy(cfg.dataset, cfg.data.n or 20000, 1 if cfg.data.seed is None else cfg.data.seed))
    ds = load_split(cfg, "train")
    if list(ds.images.shape[1:]) != cfg.data_shape:
        raise DataError(
            f"{cfg.dataset} holds {tuple(ds.images.shape[1:])} images but the run makes {tuple(cfg.data_shape)}"
        )
    cond = {"class_labels": ds.labels} if ds.labels is not None else {}
    if cfg.super_resolution is not None:
        cond["low_res"] = low_res_of(ds.images, cfg.super_resolution.factor)
    rows = {}  # which stored row each example reads (TensorDataset.rows)
    if cfg.text is not None:  # one example per (image, caption): each image and each distinct caption stored once
        index, captions = training_captions(cfg, ds)
        rows = dict.fromkeys(("x", *cond), index)  # the image's tensors: its row
        states, caption_rows = text_states(cfg, captions, cfg.text.max_tokens, progress=progress)
        cond |= states
        rows |= dict.fromkeys(states, caption_rows)
    if cfg.latent is not None:
        z = cached_latents(latent_space(cfg.latent), ds.images, Path(run) / LATENTS if run else None, progress)
        return TensorDataset(z, cond, rows)
    return TensorDataset(ds.images, cond, rows)
