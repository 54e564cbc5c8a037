"""A KL-regularised convolutional autoencoder (Rombach et al. 2022, "LDM", section 3 and appendix G):

    x (B, C, H, W) ──Encoder──> (mean, logvar) (B, 2 z, H/f, W/f) ──sample──> z ──Decoder──> x_hat (B, C, H, W)

* the Encoder is conv_in, then per level ``num_res_blocks`` residual blocks and a stride-2 conv (none after
  the last level), a middle block (with self-attention when ``attention``), GroupNorm-SiLU and a conv to the
  mean and log-variance of a diagonal Gaussian posterior q(z | x); f = 2 ** (len(channel_mults) - 1);
* the Decoder mirrors it: conv_in from z, the middle block, per level residual blocks and a nearest x2
  upsample with a conv, GroupNorm-SiLU and conv_out;
* ``net(x)`` returns (x_hat, mean, logvar) with z drawn by reparameterisation from torch's global generator
  (the training loop seeds it per step); ``encode``/``decode`` are the two halves;
* with ``discriminator`` > 0 the network also holds a PatchGAN discriminator (Isola et al. 2017, as LDM's
  autoencoders use): that many stride-2 4x4 convs, then a conv to one logit per patch. It trains with the
  autoencoder in the one loop (losses.AutoencoderLoss's adversarial term) and is never used after training.

The network knows nothing about the latent scale: autoencoder.py measures it after training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import group_norm


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    image_size: int = 32  # height
    image_width: int | None = None  # None: square
    latent_channels: int = 4
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 4)  # one entry per level; the downsampling factor is 2 ** (len - 1)
    num_res_blocks: int = 1
    attention: bool = False  # self-attention in the middle block (the lowest resolution)
    norm_groups: int = 8
    logvar_min: float = -30.0  # the posterior's log-variance is clamped to [logvar_min, 20] (as LDM does)
    discriminator: int = 0  # stride-2 layers of a patch discriminator trained alongside; 0: none
    discriminator_channels: int = 32

    def __post_init__(self):
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        for name in ("in_channels", "image_size", "latent_channels", "base_channels", "num_res_blocks", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AutoencoderConfig.{name} must be a positive integer, got {value!r}")
        if (
            not isinstance(self.discriminator, int)
            or isinstance(self.discriminator, bool)
            or not 0 <= self.discriminator <= 4
        ):
            raise ValueError(
                f"AutoencoderConfig.discriminator must be 0 (none) to 4 layers, got {self.discriminator!r}"
            )
        if self.discriminator and 2**self.discriminator > min(self.image_size, self.width):
            raise ValueError(
                f"a {self.discriminator}-layer patch discriminator needs images of at least {2**self.discriminator} "
                "pixels a side"
            )
        if not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            raise ValueError(
                f"AutoencoderConfig.channel_mults must be non-empty positive integers, got {self.channel_mults}"
            )
        f = self.factor
        if self.image_size % f or self.width % f:
            raise ValueError(
                f"a factor-{f} autoencoder needs sizes divisible by {f}, got {self.image_size}x{self.width}"
            )

    @property
    def width(self) -> int:
        return self.image_size if self.image_width is None else self.image_width

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mults) - 1)

    @property
    def latent_shape(self) -> list[int]:
        return [self.latent_channels, self.image_size // self.factor, self.width // self.factor]

    @classmethod
    def for_factor(cls, factor: int, **kw) -> AutoencoderConfig:
        """The layout for a downsampling factor (1, 2, 4, 8, ...): channel_mults (1,), (1, 2), (1, 2, 4), (1, 2, 4, 4),
        ..."""
        levels = factor.bit_length() - 1
        if factor < 1 or 2**levels != factor:
            raise ValueError(f"the autoencoder's factor must be a power of two, got {factor}")
        return cls(channel_mults=(1, 2, 4, *([4] * max(levels - 2, 0)))[: levels + 1], **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AutoencoderConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown AutoencoderConfig fields {sorted(unknown)}")
        return cls(**d)


def reparameterize(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I): a draw of N(mean, exp(logvar)) differentiable in both."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return mean + torch.exp(0.5 * logvar) * eps


class Res(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1 when the width changes) skip."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_ch, groups),
            nn.SiLU(),
            nn.Conv2d(in_ch, out_ch, 3, padding=1),
            group_norm(out_ch, groups),
            nn.SiLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
        )
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm, self.qkv, self.out = group_norm(ch, groups), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.out(h.transpose(1, 2).reshape(B, C, H, W))


def middle(ch: int, cfg: AutoencoderConfig) -> nn.Sequential:
    layers = [Res(ch, ch, cfg.norm_groups)]
    if cfg.attention:
        layers.append(SelfAttention(ch, cfg.norm_groups))
    return nn.Sequential(*layers, Res(ch, ch, cfg.norm_groups))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mults]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)]
        ch = chs[0]
        for level, out in enumerate(chs):
            for _ in range(cfg.num_res_blocks):
                layers.append(Res(ch, out, cfg.norm_groups))
                ch = out
            if level < len(chs) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers += [
            middle(ch, cfg),
            group_norm(ch, cfg.norm_groups),
            nn.SiLU(),
            nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)  # (B, 2 z, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        chs = [cfg.base_channels * m for m in cfg.channel_mults][::-1]
        ch = chs[0]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch, 3, padding=1), middle(ch, cfg)]
        for level, out in enumerate(chs):
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(Res(ch, out, cfg.norm_groups))
                ch = out
            if level < len(chs) - 1:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [group_norm(ch, cfg.norm_groups), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class PatchDiscriminator(nn.Module):
    """x (B, C, H, W) -> logits (B, 1, H / 2**layers, W / 2**layers), one per overlapping patch: real (> 0) or
    reconstructed (< 0). GroupNorm rather than BatchNorm, so that a rank's batch never changes another's logits."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = []
        ch, out = cfg.in_channels, cfg.discriminator_channels
        for i in range(cfg.discriminator):
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1)]
            if i:
                layers.append(group_norm(out, cfg.norm_groups))
            layers.append(nn.LeakyReLU(0.2))
            ch, out = out, min(2 * out, 8 * cfg.discriminator_channels)
        self.net = nn.Sequential(*layers, nn.Conv2d(ch, 1, 3, padding=1))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))  # batches trained on: the warm-up clock

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Autoencoder(nn.Module):
    """net(x) -> (x_hat, mean, logvar); ``encode(x)`` -> (mean, logvar); ``decode(z)`` -> x_hat;
    ``discriminator``: the patch discriminator, or None."""

    accepts: frozenset[str] = frozenset()  # unconditional

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.encoder, self.decoder = Encoder(config), Decoder(config)
        self.discriminator = PatchDiscriminator(config) if config.discriminator else None

    def _check(self, x: Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1:] != (c.in_channels, c.image_size, c.width):
            raise ValueError(
                f"the autoencoder expects x of shape (B, {c.in_channels}, {c.image_size}, {c.width}), got "
                f"{tuple(x.shape)}"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(self.config.logvar_min, 20.0)

    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or list(z.shape[1:]) != self.config.latent_shape:
            raise ValueError(
                f"the decoder expects z of shape (B, {', '.join(map(str, self.config.latent_shape))}), got "
                f"{tuple(z.shape)}"
            )
        return self.decoder(z)

    def forward(self, x: Tensor, *unused, **unused_kw) -> tuple[Tensor, Tensor, Tensor]:
        mean, logvar = self.encode(x)
        return self.decode(reparameterize(mean, logvar)), mean, logvar
