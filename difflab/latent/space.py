"""A latent space: a trained KL autoencoder with its scale (latent diffusion, Rombach et al. 2022).

    space.encode(x)  model-space images in [-1, 1] -> scaled latents z = scale * E(x)   (posterior means)
    space.decode(z)  scaled latents -> images D(z / scale); differentiable (DPS runs its gradient through it)

The latent scale. A diffusion model's process assumes data of roughly unit variance (the prior at t_max is
N(0, I), and the noise schedule was designed for data in [-1, 1]). With the small KL weight that keeps the
reconstructions sharp, nothing ties the latents to unit scale: their spread is whatever the encoder found
convenient. So the latents are multiplied by scale = 1 / std(z) over the training set before diffusion and
divided by it before decoding (latent/autoencoder.py measures it). Stable Diffusion's magic 0.18215 is exactly
this number for its autoencoder (its latents have a standard deviation of about 5.5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data.images import to_model, to_uint8
from ..nets.autoencoder import Autoencoder


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


@dataclass
class LatentSpace:
    """A trained autoencoder with its scale: ``encode`` maps model-space images to scaled latents,
    ``decode`` scaled latents back to model-space images, both in batches; ``run`` and ``hash`` say which."""

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
        parts = [
            net.decode(z[lo : lo + batch] / self.scale)
            for lo in tqdm(range(0, len(z), batch), desc="decode", disable=not progress or len(z) <= batch)
        ]
        return torch.cat(parts) if parts else z.new_empty((0, *self.image_shape))

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        """uint8 images -> uint8 reconstructions D(E(x)) (posterior means), in batches."""
        return to_uint8(self.decode(self.encode(to_model(images))))
