"""The latent space of a KL autoencoder (latent diffusion, Rombach et al. 2022): training config, latent
scale, fingerprint, encoding and decoding.

An autoencoder run is an ordinary run (config.json, checkpoints, resume, progress, the one training loop)
whose network is ``nets.autoencoder.Autoencoder`` and whose loss is ``losses.AutoencoderLoss``. When its
training ends, ``measure_scale`` encodes the training split and writes ``RUN/latent.json``.

The latent scale. A diffusion model's process assumes data of roughly unit variance (the prior at t_max is
N(0, I), and the noise schedule was designed for data in [-1, 1]). With the small KL weight that keeps the
reconstructions sharp, nothing ties the latents to unit scale: their spread is whatever the encoder found
convenient. So the latents are multiplied by scale = 1 / std(z) over the training set before diffusion and
divided by it before decoding. Stable Diffusion's magic 0.18215 is exactly this number for its autoencoder
(its latents have a standard deviation of about 5.5). Here ``z`` is the posterior mean (with kl_weight 1e-6 the
posterior's own std is a small fraction of the latents' spread; ``latent.json`` records both).

A latent run records the autoencoder's path, scale, factor and a fingerprint (SHA-256 of its weights file and
latent.json): ``latent_space(cfg)`` refuses, in one line, an autoencoder that is missing, changed since the
latent run was trained, or of another factor or shape."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..runs.store import AUTOENCODERS, WEIGHTS, CheckpointError, RunConfig, TrainConfig, latest_checkpoint, load_config, load_into, load_weights, weights_step  # fmt: skip
from ..io import atomic_path, cached_tensor
from ..nets.autoencoder import Autoencoder, AutoencoderConfig

LATENT = "latent.json"
RECONSTRUCTION = "reconstruction.json"


def autoencoder_config(base: RunConfig, factor: int = 4, latent_channels: int = 4, kl_weight: float = 1e-6, recon: str = "l1",
                       attention: bool = False, base_channels: int = 16, disc_weight: float = 0.0, disc_start: int = 1000) -> RunConfig:
    """An autoencoder run for the data of ``base`` (a dataset preset): factor ``factor`` (a power of two),
    ``latent_channels`` channels, 3000 steps of batch 32 by default; with ``disc_weight`` > 0 a 3-layer patch
    discriminator whose hinge term starts after ``disc_start`` batches (losses.AutoencoderLoss)."""
    if base.kind != "images":
        raise ValueError(f"an autoencoder needs images; {base.dataset} is a set of {base.kind}")
    C, H, W = base.shape
    try:
        net = AutoencoderConfig.for_factor(factor, in_channels=C, image_size=H, image_width=W if W != H else None,
                                           latent_channels=latent_channels, attention=attention, base_channels=base_channels,
                                           discriminator=3 if disc_weight > 0 else 0)
    except ValueError as e:
        raise ValueError(f"{base.dataset} ({C}x{H}x{W}): {e}") from None
    train = TrainConfig(steps=3000, batch_size=32, lr=1e-3, warmup=100, ema_decay=0.999, ema_warmup=True, precision=base.train.precision,
                        checkpoint_every=250, sample_every=500, log_every=25)
    loss = {"recon": recon, "kl_weight": kl_weight}
    if disc_weight > 0:
        loss |= {"disc_weight": disc_weight, "disc_start": disc_start}
    return replace(base, net_kind="autoencoder", net=net.to_dict(), loss=loss, conditions=[], train=train)


@torch.no_grad()
def encode_means(net: Autoencoder, x: Tensor, batch: int = 256, progress: bool = False) -> tuple[Tensor, Tensor]:
    """Posterior means and stds (N, z, h, w) of model-space images x (N, C, H, W), in batches."""
    device = next(net.parameters()).device
    means, stds = [], []
    for lo in tqdm(range(0, len(x), batch), desc="encode", disable=not progress or len(x) <= batch):
        mean, logvar = net.encode(x[lo : lo + batch].to(device))
        means.append(mean.float().cpu())
        stds.append(torch.exp(0.5 * logvar.float()).cpu())
    return torch.cat(means), torch.cat(stds)


def measure_scale(run: str | Path, images: Tensor, progress: bool = False) -> dict:
    """Encode uint8 ``images`` (the training split) with the run's EMA weights and write RUN/latent.json:
    scale = 1 / std of the latents (all elements), their mean, the posterior's mean std, and the step."""
    from ..data.images import to_model

    run = Path(run)
    net = _load_net(run)
    chunks = [encode_means(net, to_model(part)) for part in tqdm(images.split(2048), desc="latent scale", disable=not progress)]
    z, post = torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks])
    std = float(z.double().std())
    info = {"scale": 1.0 / std, "std": std, "mean": float(z.double().mean()), "posterior_std": float(post.double().mean()),
            "images": len(images), "step": weights_step(run)}
    with atomic_path(run / LATENT) as tmp:
        Path(tmp).write_text(json.dumps(info, indent=1))
    return info


def _load_net(run: Path) -> Autoencoder:
    cfg = load_config(run)
    if cfg.net_kind not in AUTOENCODERS:
        raise CheckpointError(f"{run} is not an autoencoder run (train one with `difflab train-autoencoder DATASET --out RUN`)")
    net = cfg.build_net()
    load_into(net, load_weights(run, "ema"), run)
    return net.eval().requires_grad_(False)


def fingerprint(run: str | Path) -> str:
    """SHA-256 of the run's newest weights file and its latent.json (first 16 hex digits)."""
    run = Path(run)
    ckpt = latest_checkpoint(run)
    if ckpt is None or not (run / LATENT).exists():
        raise CheckpointError(f"{run} has no finished autoencoder (no checkpoint or no {LATENT}); train it with `difflab train-autoencoder`")
    h = hashlib.sha256()
    with open(ckpt / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update((run / LATENT).read_bytes())
    return h.hexdigest()[:16]


@dataclass
class LatentSpace:
    """A trained autoencoder with its scale: ``encode`` maps model-space images to scaled latents,
    ``decode`` scaled latents back to model-space images, both in batches."""

    net: Autoencoder
    scale: float
    run: str
    hash: str

    @property
    def factor(self) -> int:
        return self.net.config.factor

    @property
    def image_shape(self) -> list[int]:
        c = self.net.config
        return [c.in_channels, c.image_size, c.width]

    @property
    def latent_shape(self) -> list[int]:
        return self.net.config.latent_shape

    def encode(self, x: Tensor, batch: int = 256, progress: bool = False) -> Tensor:
        return encode_means(self.net, x, batch, progress)[0] * self.scale

    def decode(self, z: Tensor, batch: int = 256, progress: bool = False) -> Tensor:
        """x = D(z / scale); differentiable (DPS through the decoder), on z's device."""
        net = self.net.to(z.device)
        parts = [net.decode(z[lo : lo + batch] / self.scale) for lo in tqdm(range(0, len(z), batch), desc="decode",
                                                                            disable=not progress or len(z) <= batch)]
        return torch.cat(parts) if parts else z.new_empty((0, *self.image_shape))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """uint8 images -> uint8 reconstructions D(E(x)) (posterior means), in batches."""
        from ..data.images import to_model, to_uint8

        return to_uint8(self.decode(self.encode(to_model(images))))

    def record(self) -> dict:
        """What a latent run's config keeps of its autoencoder (data['latent'])."""
        return {"autoencoder": self.run, "hash": self.hash, "scale": self.scale, "factor": self.factor, "image_shape": self.image_shape}


def load_autoencoder(run: str | Path) -> LatentSpace:
    """A finished autoencoder run (weights and latent.json) as a LatentSpace."""
    run = Path(run)
    if not (run / "config.json").exists():
        raise CheckpointError(f"no autoencoder run at {run} (train one with `difflab train-autoencoder DATASET --out {run}`)")
    net = _load_net(run)
    digest = fingerprint(run)
    info = json.loads((run / LATENT).read_text())
    return LatentSpace(net, float(info["scale"]), str(run.resolve()), digest)


@lru_cache(maxsize=4)
def _cached(run: str, digest: str) -> LatentSpace:
    return load_autoencoder(run)


def latent_space(cfg: RunConfig) -> LatentSpace | None:
    """The autoencoder of a latent run (None for a pixel run), checked against what the run recorded."""
    rec = cfg.data.get("latent")
    if rec is None:
        return None
    run = Path(rec["autoencoder"])
    if not (run / "config.json").exists():
        raise CheckpointError(f"the autoencoder of this latent run is missing: {run} (restore it, or retrain the latent run)")
    digest = fingerprint(run)
    if digest != rec["hash"]:
        raise CheckpointError(f"the autoencoder {run} changed since this latent run was trained (fingerprint {digest}, "
                              f"recorded {rec['hash']}): its latents mean something else now; retrain the latent run")
    space = _cached(str(run), digest)
    if space.factor != rec["factor"] or space.image_shape != rec["image_shape"]:
        raise CheckpointError(f"the autoencoder {run} has factor {space.factor} for {space.image_shape} images; the run "
                              f"recorded factor {rec['factor']} for {rec['image_shape']}")
    return space


def data_shape(cfg: RunConfig) -> list[int]:
    """The shape of a run's data: its images for a latent run, else the shape it samples."""
    return list(cfg.data["latent"]["image_shape"]) if "latent" in cfg.data else list(cfg.shape)


LATENTS = "latents.safetensors"


def cached_latents(space: LatentSpace, images: Tensor, cache: Path | None, progress: bool = False) -> Tensor:
    """The scaled latents of uint8 ``images``, encoded once: read from ``cache`` when it holds latents of
    this autoencoder (fingerprint) for these images (their count and SHA-256), else encoded with a progress bar and written there
    atomically. The training split of the sets here fits in memory as latents (fashion-pairs: 20000 x
    4 x 8 x 16 floats, 41 MB), so latent runs train on the cache rather than encoding every batch."""
    from ..data.images import to_model

    tag = {"hash": space.hash, "images": str(len(images)), "data": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]}

    def encode() -> Tensor:
        return torch.cat([space.encode(to_model(part)) for part in tqdm(images.split(1024), desc="encode training set", disable=not progress)])

    return cached_tensor(cache, tag, encode, name="z")


def with_latent(cfg: RunConfig, space: LatentSpace) -> RunConfig:
    """A run of ``cfg``'s data in the autoencoder's latent space: the U-Net sized to the latent (its class
    embedding kept), the autoencoder recorded in data['latent']."""
    from ..nets.unet import UNetConfig, preset_for_size

    if cfg.kind != "images" or cfg.net_kind != "unet":
        raise ValueError(f"latent diffusion needs an image run; {cfg.dataset} trains an {cfg.net_kind.upper()}")
    if list(cfg.shape) != space.image_shape:
        raise ValueError(f"the autoencoder {space.run} encodes {'x'.join(map(str, space.image_shape))} images; "
                         f"{cfg.dataset} holds {'x'.join(map(str, cfg.shape))}")
    c, h, w = space.latent_shape
    net = preset_for_size(h, c, w)
    keep = UNetConfig.from_dict(cfg.net)
    net = replace(net, num_classes=keep.num_classes, context_dim=keep.context_dim)
    return replace(cfg, shape=[c, h, w], net=net.to_dict(), data=dict(cfg.data, latent=space.record()))


def to_model_space(cfg: RunConfig, x: Tensor) -> Tensor:
    """Data-space images in [-1, 1] -> the space the run's denoiser works in (its scaled latents for a
    latent run; unchanged otherwise)."""
    space = latent_space(cfg)
    return x if space is None else space.encode(x)
