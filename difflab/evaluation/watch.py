"""Quality while training (``difflab train ... --eval-every N``): a small evaluation of the EMA every N steps.

    scores = TrainingEval(cfg, n=256)(ema_denoiser, step)   # {"fd": ..., "kid": ..., "nn_train": ..., ...}

Each evaluation draws ``n`` samples with a fast sampler (dpmpp-2m, 20 steps, seeds 0..n-1: the same noise every
time, so two checkpoints differ only by their weights), reads them with the feature net the run records
(``cfg.features``, from ``--features``: e.g. the instance-discrimination net `difflab features train FOLDER` writes;
by default the shipped classifier of a built-in set, else fixed random features; ``difflab eval`` reads with the
same) and reports

    fd          Frechet distance to the cached statistics of the test split (evaluation/reference.py); the loop keeps
                the EMA with the lowest as RUN/best
    kid         the unbiased KID against the same reference (10 subsets)
    nn_train    memorisation: the mean over samples of the pixel distance to the nearest training image (RMS over
                pixels, images in [0, 1]; up to NN_TRAIN training images)
    nn_ratio    nn_train over the same distance for real test images: about 1 for a model that generalises like
                the data, well below 1 for one that copies its training set

2-D runs report the energy distance to fresh points of the data set (``energy``, the quantity kept best) instead.
Class runs draw balanced classes; text runs caption their samples with the test split's captions; super-resolution
runs are not evaluated here (use ``difflab eval``)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from ..core.parameterize import Denoiser
from ..data.images import to_uint8
from ..data.toy2d import make_toy
from ..runs.config import FeaturesRecord, RunConfig
from ..runs.data import load_split
from ..runs.diffusion import DiffusionRun
from .features import check_trained_on, embed, features_spec, resolve_feature_net, run_feature_net
from .metrics import energy_distance, frechet_from_stats, gaussian_stats, kid
from .reference import FEATURE_BATCH, fixed_subset, reference_stats

DEFAULT_N = 256
SAMPLER, STEPS = "dpmpp-2m", 20
NN_TRAIN = 5000  # training images the memorisation distance searches
KID_SUBSETS = 10
TOY_SEED = 12345


class WatchError(ValueError):
    """A run that --eval-every cannot evaluate."""


def nearest_distance(queries: Tensor, support: Tensor, batch: int = 256) -> Tensor:
    """(Q,) the RMS pixel distance of each uint8 image in ``queries`` to its nearest image in ``support`` (both
    (N, C, H, W), read in [0, 1])."""
    s = support.flatten(1).float() / 255
    s2 = (s * s).sum(1)
    out = []
    for q in queries.split(batch):
        q = q.flatten(1).float() / 255
        d2 = (q * q).sum(1, keepdim=True) + s2[None] - 2 * q @ s.T  # (b, N) squared distances
        out.append(d2.min(1).values.clamp_min(0).div(s.shape[1]).sqrt())
    return torch.cat(out)


def features_record(cfg: RunConfig, spec: str | None, n: int | None) -> FeaturesRecord | None:
    """What a new image run records of the feature net it is measured with (``spec``: --features), refused first
    when the net cannot read its images or was trained on other images; None for a 2-D run."""
    if cfg.data_kind == "points":
        if spec is not None:
            raise WatchError(f"--features reads images; {cfg.dataset} is a 2-D set (its score is the energy distance)")
        return None
    C, H, W = cfg.data_shape
    net = resolve_feature_net(spec, cfg.dataset, C, H, W)
    check_trained_on(net, load_split(cfg, "train").images, cfg.dataset)
    return FeaturesRecord(features_spec(spec, cfg.dataset), net.fingerprint(), n or DEFAULT_N)


class TrainingEval:
    """The evaluator the loop calls at eval_every steps (see the module doc); built once per run: the feature net,
    the reference statistics and the training images are read here, not at every evaluation."""

    def __init__(
        self,
        cfg: RunConfig,
        n: int | None = None,
        *,
        features: str | None = None,
        cache: str | Path | None = None,
        progress: bool = False,
    ):
        if cfg.super_resolution is not None:
            raise WatchError("--eval-every does not evaluate super-resolution runs; use `difflab eval` on the run")
        n = n or (cfg.features.eval_n if cfg.features is not None else DEFAULT_N)
        if n < 10:
            raise WatchError(f"--eval-n must be at least 10 (a covariance and KID subsets), got {n}")
        self.cfg, self.n = cfg, n
        self.primary = "energy" if cfg.data_kind == "points" else "fd"
        if cfg.data_kind == "points":
            self.reference = make_toy(cfg.dataset, 2000, seed=TOY_SEED)
            return
        test, train = load_split(cfg, "test"), load_split(cfg, "train")
        C, H, W = test.images.shape[1:]
        self.net = run_feature_net(features, cfg.features, cfg.dataset, C, H, W)
        check_trained_on(self.net, train.images, cfg.dataset)
        self.ref = reference_stats(test, self.net, folder=cache, progress=progress)
        self.train_images = train.images[fixed_subset(len(train), min(len(train), NN_TRAIN))]
        real = test.images[fixed_subset(len(test), min(len(test), n))]
        self.nn_real = nearest_distance(real, self.train_images).mean().item()
        self.labels = None if cfg.num_classes is None else [i % cfg.num_classes for i in range(n)]
        self.captions = None
        if cfg.text is not None:
            captions = test.captions or train.captions
            self.captions = [captions[i % len(captions)] for i in range(n)]

    def __call__(self, ema: Denoiser, step: int) -> dict:
        t0 = time.perf_counter()
        model = DiffusionRun(Path("."), self.cfg, ema.net)
        x = model.sample(
            self.n,
            sampler=SAMPLER,
            steps=STEPS,
            class_label=self.labels if self.cfg.data_kind != "points" else None,
            prompt=self.captions if self.cfg.data_kind != "points" else None,
            seed=0,
            batch=min(self.n, 256),
        )
        if self.cfg.data_kind == "points":
            return {"energy": energy_distance(x, self.reference), "eval_seconds": time.perf_counter() - t0}
        images = to_uint8(x)
        feats, _ = embed(self.net, images, batch=FEATURE_BATCH)
        mu, cov = gaussian_stats(feats)
        m = min(len(feats), len(self.ref["features"]))
        kid_mean, _ = kid(
            self.ref["features"],
            feats,
            n_subsets=KID_SUBSETS,
            subset_size=m,
            generator=torch.Generator().manual_seed(0),
        )
        nn = nearest_distance(images, self.train_images).mean().item()
        return {
            "fd": frechet_from_stats(mu, cov, self.ref["mu"], self.ref["cov"]),
            "kid": kid_mean,
            "nn_train": nn,
            "nn_ratio": nn / self.nn_real if self.nn_real > 0 else None,
            "eval_seconds": time.perf_counter() - t0,
        }
