"""Autoencoder runs: the KL autoencoder of latent diffusion as a run kind, its latent scale and fingerprint,
and the latent space a latent run records.

An autoencoder run is an ordinary run (config.json, checkpoints, resume, progress, the one training loop)
whose network is ``nets.autoencoder.Autoencoder`` and whose loss is ``core.losses.AutoencoderLoss``. When its
training ends, ``measure_scale`` encodes the training split and writes ``RUN/latent.json`` (latent/space.py
says why the scale), and ``reconstruction_report`` measures it on the test split (RUN/reconstruction.json).

    run = difflab.load("runs/ae")             # an AutoencoderRun
    run.space.encode(x), run.space.decode(z)  # its LatentSpace

A latent run records the autoencoder's path, scale, factor and a fingerprint (SHA-256 of its weights file and
latent.json): ``latent_space(record)`` refuses, in one line, an autoencoder that is missing, changed since the
latent run was trained, or of another factor or shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import cached_property, lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.losses import AutoencoderLoss
from ..data.images import to_model, to_uint8
from ..evaluation.features import embed, resolve_feature_net
from ..evaluation.metrics import frechet_from_stats, gaussian_stats, psnr
from ..io import atomic_path
from ..nets.autoencoder import Autoencoder, AutoencoderConfig
from ..runs.config import CheckpointError, LatentRecord, RunConfig, TrainConfig
from ..runs.kinds import RunKind
from ..runs.run import Run
from ..runs.shipped import from_record, locate, recorded_path
from ..runs.store import WEIGHTS, latest_checkpoint
from ..viz import plots
from .space import LatentSpace, encode_means

LATENT = "latent.json"
RECONSTRUCTION = "reconstruction.json"


class AutoencoderRun(Run):
    """A `difflab train-autoencoder` run: ``space`` is its latent space (the network and its measured scale)."""

    kinds = ("autoencoder",)
    what = "an autoencoder"

    @cached_property
    def space(self) -> LatentSpace:
        if not (self.path / LATENT).exists():
            raise CheckpointError(
                f"{self.path} has no finished autoencoder (no {LATENT}); finish it with "
                f"`difflab train-autoencoder --out {self.path} --resume`"
            )
        info = json.loads((self.path / LATENT).read_text())
        return LatentSpace(self.net, float(info["scale"]), recorded_path(self.path), fingerprint(self.path))


def autoencoder_config(
    base: RunConfig,
    factor: int = 4,
    latent_channels: int = 4,
    kl_weight: float = 1e-6,
    recon: str = "l1",
    attention: bool = False,
    base_channels: int = 16,
    disc_weight: float = 0.0,
    disc_start: int = 1000,
) -> RunConfig:
    """An autoencoder run for the data of ``base`` (a dataset preset): factor ``factor`` (a power of two),
    ``latent_channels`` channels, 3000 steps of batch 32 by default; with ``disc_weight`` > 0 a 3-layer patch
    discriminator whose hinge term starts after ``disc_start`` batches (core/losses.py: AutoencoderLoss)."""
    if base.data_kind != "images":
        raise ValueError(f"an autoencoder needs images; {base.dataset} is a set of {base.data_kind}")
    C, H, W = base.shape
    try:
        net = AutoencoderConfig.for_factor(
            factor,
            in_channels=C,
            image_size=H,
            image_width=W if W != H else None,
            latent_channels=latent_channels,
            attention=attention,
            base_channels=base_channels,
            discriminator=3 if disc_weight > 0 else 0,
        )
    except ValueError as e:
        raise ValueError(f"{base.dataset} ({C}x{H}x{W}): {e}") from None
    train = TrainConfig(
        steps=3000,
        batch_size=32,
        lr=1e-3,
        warmup=100,
        ema_decay=0.999,
        ema_warmup=True,
        precision=base.train.precision,
        checkpoint_every=250,
        sample_every=500,
        log_every=25,
    )
    loss = AutoencoderLoss(recon, kl_weight, *((disc_weight, disc_start) if disc_weight > 0 else ()))
    return replace(base, run_kind="autoencoder", net_kind="autoencoder", net=net, loss=loss, conditions=[], train=train)


def measure_scale(run: str | Path, images: torch.Tensor, progress: bool = False) -> dict:
    """Encode uint8 ``images`` (the training split) with the run's EMA weights and write RUN/latent.json:
    scale = 1 / std of the latents (all elements), their mean, the posterior's mean std, and the step."""
    run = Path(run)
    loaded = AutoencoderRun.load(run)
    chunks = [
        encode_means(loaded.net, to_model(part))
        for part in tqdm(images.split(2048), desc="latent scale", disable=not progress)
    ]
    z, post = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    std = float(z.double().std())
    info = {
        "scale": 1.0 / std,
        "std": std,
        "mean": float(z.double().mean()),
        "posterior_std": float(post.double().mean()),
        "images": len(images),
        "step": loaded.step,
    }
    with atomic_path(run / LATENT) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1))
    return info


def fingerprint(run: str | Path) -> str:
    """SHA-256 of the run's newest weights file and its latent.json (first 16 hex digits)."""
    run = locate(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None or not (run / LATENT).exists():
        raise CheckpointError(
            f"{run} has no finished autoencoder (no checkpoint or no {LATENT}); train it with `difflab "
            "train-autoencoder`"
        )
    h = hashlib.sha256()
    with open(ckpt / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update((run / LATENT).read_bytes())
    return h.hexdigest()[:16]


def load_autoencoder(run: str | Path) -> LatentSpace:
    """A finished autoencoder run (weights and latent.json) as a LatentSpace."""
    run = locate(run)
    if not (run / "config.json").exists():
        raise CheckpointError(
            f"no autoencoder run at {run} (train one with `difflab train-autoencoder DATASET --out {run}`)"
        )
    return AutoencoderRun.load(run).space


@lru_cache(maxsize=4)
def _cached(run: str, digest: str) -> LatentSpace:
    return load_autoencoder(run)


def latent_record(space: LatentSpace) -> LatentRecord:
    """What a latent run's config keeps of its autoencoder."""
    return LatentRecord(space.run, space.hash, space.scale, space.factor, space.image_shape)


def latent_space(rec: LatentRecord) -> LatentSpace:
    """The autoencoder a latent run recorded (a folder or a shipped model's name), checked against the record."""
    run = from_record(rec.autoencoder)
    if not (run / "config.json").exists():
        raise CheckpointError(
            f"the autoencoder of this latent run is missing: {run} (restore it, or retrain the latent run)"
        )
    digest = fingerprint(run)
    if digest != rec.hash:
        raise CheckpointError(
            f"the autoencoder {run} changed since this latent run was trained (fingerprint {digest}, "
            f"recorded {rec.hash}): its latents mean something else now; retrain the latent run"
        )
    space = _cached(str(run), digest)
    if space.factor != rec.factor or space.image_shape != list(rec.image_shape):
        raise CheckpointError(
            f"the autoencoder {run} has factor {space.factor} for {space.image_shape} images; the run "
            f"recorded factor {rec.factor} for {rec.image_shape}"
        )
    return space


def rebased(config: dict, autoencoder: str | Path) -> dict:
    """A latent run's config (as saved) moved onto ``autoencoder``, a copy of its own autoencoder (a shipped one):
    the record names the copy (a shipped model by name) and its fingerprint. Refuses a copy of another scale,
    factor or shape, so only the weights' container, never their meaning, may differ."""
    old = LatentRecord(**config["latent"])
    space = load_autoencoder(autoencoder)
    if (space.factor, list(space.image_shape)) != (old.factor, list(old.image_shape)) or abs(
        space.scale - old.scale
    ) > 1e-6 * old.scale:
        raise CheckpointError(
            f"{autoencoder} is not the autoencoder this latent run was trained on (scale {space.scale:g}, "
            f"factor {space.factor}; recorded {old.scale:g}, {old.factor})"
        )
    return config | {"latent": {**config["latent"], "autoencoder": recorded_path(autoencoder), "hash": space.hash}}


def reconstruction_report(
    run: str | Path, test: torch.Tensor, train_images: torch.Tensor, dataset: str, n: int = 2000
) -> dict:
    """PSNR of the EMA autoencoder's reconstructions (posterior mean decoded) of the first ``n`` test images,
    and of the training set's mean image as the reconstruction (a baseline that ignores its input); and the
    rFD, the FD between those reconstructions and the images, in the dataset's feature net (eval's default).
    Written to RUN/reconstruction.json."""
    loaded = AutoencoderRun.load(run)
    x = test[:n]
    recon = loaded.space.reconstruct(x)
    baseline = train_images.double().mean(0).round().to(torch.uint8).expand_as(x)
    net = resolve_feature_net(None, dataset, *x.shape[1:])
    stats = [gaussian_stats(embed(net, images)[0].double()) for images in (recon, x)]
    report = {
        "step": loaded.step,
        "test_images": len(x),
        "psnr": float(psnr(recon, x).mean()),
        "baseline_psnr": float(psnr(baseline, x).mean()),
        "rfd": frechet_from_stats(*stats[0], *stats[1]),
        "features": net.meta.get("name", "random"),
    }
    with atomic_path(Path(run) / RECONSTRUCTION) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return report


def preview(ema, step: int, run: Path, test: torch.Tensor) -> None:
    """RUN/reconstructions.png: rows of 8 test originals, each above their reconstructions; and the loss curve."""
    k = min(len(test), 16) // 8 * 8 or len(test)
    test, width = test[:k], min(k, 8)
    device = next(ema.net.parameters()).device
    with torch.no_grad():
        mean, _ = ema.net.encode(to_model(test).to(device))
        recon = to_uint8(ema.net.decode(mean).float().cpu())
    rows = torch.stack(
        [test.reshape(-1, width, *test.shape[1:]), recon.reshape(-1, width, *test.shape[1:])], dim=1
    )  # (k/w, 2, w, C, H, W)
    plots.save_grid(rows.reshape(-1, *test.shape[1:]), run / "reconstructions.png", nrow=width)
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def _check(cfg: RunConfig, net, specs) -> None:
    if specs:
        raise CheckpointError("config: an autoencoder takes no conditions")


AUTOENCODER = RunKind(
    "autoencoder",
    "an autoencoder run",
    {"autoencoder": (AutoencoderConfig, Autoencoder)},
    lambda cfg: cfg.loss,
    AutoencoderRun,
    "train-autoencoder",
    use="train a latent model on it with `difflab train DATASET --latent {run}`",
    check=_check,
    loss_config=AutoencoderLoss,
)
