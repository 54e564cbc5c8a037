"""A U-Net for images: net(x_in, c_noise, *, class_labels, low_res, context | tokens) -> same shape as x_in.

The layout follows DDPM (Ho et al. 2020) with the refinements of Nichol & Dhariwal (2021):

    x ──conv_in──┬─[Block]×n ─ down ─[Block]×n ─ ... ─ middle ─ ... [Block]×(n+1) ─ up ─[Block]×(n+1)─ conv_out
                 └────────────── skip connections (every encoder output joins its mirror) ──────────┘

* a Block is a residual block (GroupNorm, SiLU, 3x3 conv, twice) whose second norm is modulated by the
  time (and class) embedding: h = GroupNorm(h) * (1 + scale) + shift (FiLM, "scale-shift norm");
* at the feature-map sizes in ``attention_resolutions`` the residual block is followed by multi-head
  self-attention over the H*W positions, and, when ``context_dim`` is set, by cross-attention to a
  context sequence (B, L, context_dim);
* the last conv of every residual block, the output projection of every attention block and the
  output conv start at zero, so at initialisation each block is the identity and the network outputs 0.

The network knows nothing about noise schedules: ``c_noise`` is whatever scalar per sample the
Denoiser passes (about 0..1000), embedded with nets.embeddings.TimeEmbedding.

Conditioning:
* ``class_labels`` (B,) in 0..num_classes, where the extra index ``num_classes`` is the "null" class
  used for classifier-free guidance; ``class_labels=None`` means null for the whole batch.
* ``low_res`` (B, cond_channels, h, w): concatenated to the input channels (super-resolution); when
  (h, w) differs from x's size it is first upsampled bilinearly. With ``low_res_noise`` in the config the
  network also takes the std a of the Gaussian noise added to low_res (B,) (noise conditioning
  augmentation, Ho et al. 2021), embedded like the time and added to the time embedding.
* ``context`` (B, L, context_dim) with optional ``context_mask`` (B, L), True = attend; ``context=None``
  skips the cross-attention blocks (their contribution is zero).
* ``tokens`` (B, L) word ids with ``token_mask`` (B, L), instead of ``context``, when the config has a
  ``text`` transformer (the joint encoder, trained with the U-Net): it turns them into the context.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .embeddings import TimeEmbedding
from .text import TextConfig, TextTransformer


@dataclass
class UNetConfig:
    image_size: int = 28  # the height (feature-map sizes and attention_resolutions count heights)
    in_channels: int = 1
    out_channels: int | None = None  # None: same as in_channels
    base_channels: int = 64
    channel_mults: tuple[int, ...] = (1, 2, 2)  # one entry per resolution; the size halves between entries
    num_res_blocks: int = 2  # per resolution in the encoder (the decoder has one more)
    attention_resolutions: tuple[int, ...] = (14,)  # feature-map sizes where self-attention runs
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int | None = None  # class embedding with num_classes + 1 rows (the last is "null")
    cond_channels: int = 0  # extra input channels (low_res), e.g. an upsampled low-resolution image
    low_res_noise: bool = False  # take the noise level of an augmented low_res (cascaded diffusion), embedded like time
    context_dim: int | None = None  # cross-attention to a (B, L, context_dim) sequence
    norm_groups: int = 32  # GroupNorm groups, capped to the largest divisor of the channel count
    image_width: int | None = None  # None: square images (image_size x image_size)
    text: dict | None = None  # a TextConfig: a text transformer inside the network reads ``tokens`` (the joint encoder)
    coord_channels: bool = False  # two more input channels holding each pixel's row and column in [-1, 1]
    query_positions: bool = (
        False  # a fixed 2-D sinusoidal encoding of each position added to the cross-attention queries
    )
    guidance_input: bool = (
        False  # a guided student (distill/): the guidance scale w, embedded like time and added to it
    )
    augment_dim: int = 0  # EDM's non-leaking augmentation: a linear map of these labels added to the time embedding

    def __post_init__(self):
        # JSON turns tuples into lists; store tuples so equal configs compare equal
        self.channel_mults = tuple(int(m) for m in self.channel_mults)
        self.attention_resolutions = tuple(int(r) for r in self.attention_resolutions)
        self.validate()

    @property
    def width(self) -> int:
        return self.image_size if self.image_width is None else self.image_width

    @property
    def text_config(self) -> TextConfig | None:
        """The joint text transformer's config (``text`` read), None without one."""
        return None if self.text is None else TextConfig.from_dict(self.text)

    @property
    def out_ch(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def resolutions(self) -> list[int]:
        """Feature-map size of each level: image_size, image_size/2, ..."""
        return [self.image_size // 2**i for i in range(len(self.channel_mults))]

    def validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"UNetConfig.{name} must be a positive integer, got {value!r}")

        for name in ("image_size", "in_channels", "base_channels", "num_res_blocks", "num_heads", "norm_groups"):
            positive(name)
        for name in ("out_channels", "num_classes", "context_dim", "image_width"):
            if getattr(self, name) is not None:
                positive(name)
        if not isinstance(self.augment_dim, int) or isinstance(self.augment_dim, bool) or self.augment_dim < 0:
            raise ValueError(f"UNetConfig.augment_dim must be a non-negative integer, got {self.augment_dim!r}")
        if not isinstance(self.cond_channels, int) or self.cond_channels < 0:
            raise ValueError(f"UNetConfig.cond_channels must be a non-negative integer, got {self.cond_channels!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.channel_mults or any(m <= 0 for m in self.channel_mults):
            raise ValueError(f"UNetConfig.channel_mults must be non-empty positive integers, got {self.channel_mults}")
        factor = 2 ** (len(self.channel_mults) - 1)
        for name in ("image_size", "width"):
            if getattr(self, name) % factor:
                raise ValueError(
                    f"UNetConfig.{'image_width' if name == 'width' else name}={getattr(self, name)} must be divisible "
                    "by "
                    f"2**(len(channel_mults)-1) = {factor} to downsample {len(self.channel_mults) - 1} times; use "
                    "fewer channel_mults or another size"
                )
        sizes = self.resolutions()
        unused = [r for r in self.attention_resolutions if r not in sizes]
        if unused:
            raise ValueError(
                f"UNetConfig.attention_resolutions {unused} are not feature-map sizes of this network; choose from "
                f"{sizes}"
            )
        for size, mult in zip(sizes, self.channel_mults):
            ch = self.base_channels * mult
            if size in self.attention_resolutions and ch % self.num_heads:
                raise ValueError(f"UNetConfig.num_heads={self.num_heads} must divide the {ch} channels at size {size}")
        if self.text is not None:
            width = TextConfig.from_dict(self.text).width
            if self.context_dim != width:
                raise ValueError(
                    f"UNetConfig.context_dim must be the text transformer's width {width}, got {self.context_dim}"
                )
        if self.context_dim is not None and not self.attention_resolutions:
            raise ValueError(
                "UNetConfig.context_dim is set but attention_resolutions is empty: cross-attention would never run"
            )

    def to_dict(self) -> dict:
        """JSON-ready: tuples become lists."""
        d = asdict(self)
        d["channel_mults"], d["attention_resolutions"] = list(self.channel_mults), list(self.attention_resolutions)
        if self.text is not None:
            d["text"] = TextConfig.from_dict(self.text).to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown UNetConfig fields {sorted(unknown)}")
        return cls(**d)


def group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides ``channels``."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, then GroupNorm modulated by the embedding (FiLM), SiLU, dropout, conv; plus a skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)  # -> (scale, shift)
        self.norm2, self.drop = group_norm(out_ch, groups), nn.Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) tensors. On the CPU the product runs in float32 even
    inside bf16 autocast: there PyTorch's bf16 attention backward is 8x slower than float32 (measured with
    benchmarks/throughput.py on the fashion-mnist U-Net: 94.7 ms against 11.3 ms per training step of 64)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def positions_2d(h: int, w: int, channels: int, device=None, dtype=torch.float32) -> Tensor:
    """A fixed 2-D sinusoidal encoding of the h x w positions (h*w, channels), row-major: the first half of the
    channels encode the row, the second half the column, each as sin and cos of the index at the frequencies
    1 / 100^(2i / (channels / 2)) (Vaswani et al. 2017's encoding, one per axis; 100 is enough for maps of at most
    a few dozen positions a side)."""
    quarter = channels // 4
    freq = 100.0 ** (-torch.arange(quarter, dtype=torch.float64) / max(1, quarter))  # (channels/4,)

    def axis(n: int) -> Tensor:
        angle = torch.arange(n, dtype=torch.float64)[:, None] * freq  # (n, channels/4)
        return torch.cat([angle.sin(), angle.cos()], dim=1)  # (n, channels/2)

    rows, cols = axis(h), axis(w)
    pe = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], dim=-1).reshape(
        h * w, -1
    )  # (hw, 4 quarter)
    pe = torch.nn.functional.pad(pe, (0, channels - pe.shape[1]))  # channels not divisible by 4: zeros
    return pe.to(device=device, dtype=dtype)


def _heads(t: Tensor, heads: int) -> Tensor:
    """(B, N, C) -> (B, heads, N, C/heads)."""
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)  # (B, heads, N, d)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (_heads(t, self.heads) for t in self.qkv(tokens).chunk(3, dim=-1))  # (B, heads, HW, d) each
        h = attention(q, k, v)  # (B, heads, HW, d)
        h = h.transpose(1, 2).reshape(B, H * W, C)  # (B, HW, C)
        return x + self.out(h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


def attention_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(the attention mask (B, 1, 1, L), which samples have any valid token (B,)) of a context mask (B, L); made
    once per forward (UNet.forward) and shared by every cross-attention block.

    A sample whose tokens are all masked attends to nothing: its contribution is set to zero (softmax over an
    empty set is undefined, so it attends to everything and is then zeroed)."""
    if mask is None:
        return None, None
    any_valid = mask.any(dim=1)  # (B,)
    return (mask | ~any_valid[:, None])[:, None, None, :], any_valid


class CrossAttention(nn.Module):
    """Queries from the feature map, keys and values from a context sequence (B, L, context_dim)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, positions: bool = False):
        super().__init__()
        self.heads, self.positions = heads, positions
        self.norm, self.norm_context = group_norm(channels, groups), nn.LayerNorm(context_dim)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.out = zero_(nn.Linear(channels, channels))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor | tuple | None) -> Tensor:
        """mask: the context mask (B, L) or attention_mask of it (the U-Net makes that once for all blocks)."""
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.positions:  # where each query is: "on the left" can then be read where the image is left
            tokens = tokens + positions_2d(H, W, C, x.device, tokens.dtype)
        q = _heads(self.q(tokens), self.heads)  # (B, heads, HW, d)
        k, v = (_heads(t, self.heads) for t in self.kv(self.norm_context(context)).chunk(2, dim=-1))  # (B, heads, L, d)
        attn_mask, any_valid = mask if isinstance(mask, tuple) else attention_mask(mask)
        h = attention(q, k, v, attn_mask)  # (B, heads, HW, d)
        h = self.out(h.transpose(1, 2).reshape(B, H * W, C))  # (B, HW, C)
        if any_valid is not None:
            h = h * any_valid[:, None, None].to(h.dtype)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class Block(nn.Module):
    """A residual block, optionally followed by self-attention and cross-attention."""

    def __init__(self, in_ch, out_ch, cfg: UNetConfig, emb_dim: int, attention: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.norm_groups, cfg.dropout)
        self.attn = SelfAttention(out_ch, cfg.num_heads, cfg.norm_groups) if attention else None
        self.cross = None
        if attention and cfg.context_dim is not None:
            self.cross = CrossAttention(out_ch, cfg.context_dim, cfg.num_heads, cfg.norm_groups, cfg.query_positions)

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h)
        if self.cross is not None and context is not None:
            h = self.cross(h, context, mask)
        return h


class Downsample(nn.Sequential):
    def __init__(self, ch: int):
        super().__init__(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # (B, C, H/2, W/2)


class Upsample(nn.Sequential):
    def __init__(self, ch: int):
        super().__init__(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))  # (B, C, 2H, 2W)


def build_encoder(cfg: UNetConfig, emb_dim: int) -> tuple[nn.Conv2d, nn.ModuleList, nn.ModuleList, list[int]]:
    """The encoder half: conv_in, the blocks of every level, the downsamplers, and the channel count of
    every output saved for a skip connection (the last is the encoder's output width)."""
    chans = [cfg.base_channels * m for m in cfg.channel_mults]
    ch = chans[0]
    conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels + 2 * cfg.coord_channels, ch, 3, padding=1)
    skip_chs = [ch]  # every output (including conv_in's) is saved for a skip connection
    down, downsample = nn.ModuleList(), nn.ModuleList()
    for level, (out_ch, size) in enumerate(zip(chans, cfg.resolutions())):
        blocks = nn.ModuleList()
        for _ in range(cfg.num_res_blocks):
            blocks.append(Block(ch, out_ch, cfg, emb_dim, size in cfg.attention_resolutions))
            ch = out_ch
            skip_chs.append(ch)
        down.append(blocks)
        if level < len(chans) - 1:
            downsample.append(Downsample(ch))
            skip_chs.append(ch)
    return conv_in, down, downsample, skip_chs


def encode(
    net: nn.Module, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    """Run ``net``'s encoder half (its conv_in, down and downsample): (lowest-resolution features, skips)."""
    if net.config.coord_channels:  # each pixel's row and column in [-1, 1], as two more channels
        B, _, H, W = x.shape
        rows = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype)[:, None].expand(H, W)
        cols = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype)[None, :].expand(H, W)
        x = torch.cat([x, torch.stack([rows, cols]).expand(B, 2, H, W)], dim=1)  # (B, C + 2, H, W)
    h = net.conv_in(x)
    skips = [h]
    for level, blocks in enumerate(net.down):
        for block in blocks:
            h = block(h, emb, context, mask)
            skips.append(h)
        if level < len(net.downsample):
            h = net.downsample[level](h)
            skips.append(h)
    return h, skips


class UNet(nn.Module):
    """net(x, c_noise, *, class_labels=None, low_res=None, context=None, context_mask=None) -> (B, out_ch, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = 4 * cfg.base_channels
        self.time = TimeEmbedding(cfg.base_channels, emb_dim)
        self.classes = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        if (
            cfg.low_res_noise
        ):  # only then: the parameters (and the seeded initialisation) of other configs stay as they were
            self.augmentation = TimeEmbedding(cfg.base_channels, emb_dim)

        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        sizes = cfg.resolutions()
        self.conv_in, self.down, self.downsample, skip_chs = build_encoder(cfg, emb_dim)
        ch = skip_chs[-1]

        # middle, at the lowest resolution: attention there iff that size is an attention resolution
        self.mid = Block(ch, ch, cfg, emb_dim, sizes[-1] in cfg.attention_resolutions)
        self.mid_res = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.dropout)

        # decoder, lowest resolution first: each block consumes one skip
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(len(chans))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(
                    Block(ch + skip_chs.pop(), chans[level], cfg, emb_dim, sizes[level] in cfg.attention_resolutions)
                )
                ch = chans[level]
            self.up.append(blocks)
            if level > 0:
                self.upsample.append(Upsample(ch))
        assert not skip_chs

        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = zero_(nn.Conv2d(ch, cfg.out_ch, 3, padding=1))
        if cfg.text is not None:  # last: the other parameters' seeded initialisation stays as without it
            self.text = TextTransformer(TextConfig.from_dict(cfg.text))
        if cfg.guidance_input:  # after everything: its last layer starts at zero, so a student starts as its teacher
            self.guidance = TimeEmbedding(cfg.base_channels, emb_dim)
            zero_(self.guidance.mlp[-1])
        if cfg.augment_dim:  # no bias: labels of zeros (no augmentation, what sampling gives) add nothing
            self.augment = nn.Linear(cfg.augment_dim, emb_dim, bias=False)

    @property
    def accepts(self) -> frozenset[str]:
        """The condition keywords this network takes, from its config."""
        cfg, names = self.config, set()
        if cfg.num_classes is not None:
            names.add("class_labels")
        if cfg.cond_channels:
            names.add("low_res")
        if cfg.low_res_noise:
            names.add("low_res_noise")
        if cfg.guidance_input:
            names.add("guidance_scale")
        if cfg.augment_dim:
            names.add("augment_labels")
        if cfg.text is not None:
            names |= {"tokens", "token_mask"}
        elif cfg.context_dim is not None:
            names |= {"context", "context_mask"}
        return frozenset(names)

    def embedding(self, c_noise: Tensor, class_labels: Tensor | None, batch: int) -> Tensor:
        """Time embedding plus class embedding (null class when labels are None). (B, emb_dim)"""
        c_noise = torch.as_tensor(c_noise, device=self.conv_in.weight.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise ValueError(f"c_noise must have shape ({batch},) or be a scalar, got {tuple(c_noise.shape)}")
        emb = self.time(c_noise)
        if self.classes is None:
            if class_labels is not None:
                raise ValueError("class_labels given but this UNet has num_classes=None")
            return emb
        n = self.config.num_classes
        if class_labels is None:
            class_labels = torch.full((batch,), n, dtype=torch.long, device=emb.device)
        if class_labels.shape != (batch,) or class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise ValueError(
                f"class_labels must be ({batch},) integers, got {class_labels.dtype} {tuple(class_labels.shape)}"
            )
        class_labels = class_labels.long()
        message = f"class_labels must be in 0..{n} ({n} is the null class)"
        if torch.compiler.is_exporting():  # a traced graph cannot branch on values: the runtime's lookup checks them
            pass
        elif class_labels.device.type == "cpu":
            if class_labels.numel() and (class_labels.min() < 0 or class_labels.max() > n):
                raise ValueError(message)
        else:  # checked on the device, without making the host wait for the answer
            torch._assert_async(((class_labels >= 0) & (class_labels <= n)).all(), message)
        return emb + self.classes(class_labels)

    def _check_inputs(self, x: Tensor, low_res: Tensor | None, context: Tensor | None, mask: Tensor | None) -> Tensor:
        cfg = self.config
        if x.ndim != 4 or x.shape[1:] != (cfg.in_channels, cfg.image_size, cfg.width):
            raise ValueError(
                f"UNet expects x of shape (B, {cfg.in_channels}, {cfg.image_size}, {cfg.width}), got {tuple(x.shape)}"
            )
        if cfg.cond_channels:
            if low_res is None or low_res.ndim != 4 or low_res.shape[:2] != (x.shape[0], cfg.cond_channels):
                got = None if low_res is None else tuple(low_res.shape)
                raise ValueError(f"this UNet needs low_res of shape (B, {cfg.cond_channels}, h, w), got {got}")
            if low_res.shape[2:] != x.shape[2:]:
                low_res = F.interpolate(low_res, size=x.shape[2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)  # (B, C + cond_channels, H, W)
        elif low_res is not None:
            raise ValueError("low_res given but this UNet has cond_channels=0")
        if context is not None:
            if cfg.context_dim is None:
                raise ValueError("context given but this UNet has context_dim=None")
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
                raise ValueError(f"context must have shape (B, L, {cfg.context_dim}), got {tuple(context.shape)}")
            if mask is not None and (mask.shape != context.shape[:2] or mask.dtype != torch.bool):
                raise ValueError(f"context_mask must be a bool tensor of shape {tuple(context.shape[:2])}")
        elif mask is not None:
            raise ValueError("context_mask given without context")
        return x

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        *,
        class_labels: Tensor | None = None,
        low_res: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        low_res_noise: Tensor | None = None,
        tokens: Tensor | None = None,
        token_mask: Tensor | None = None,
        guidance_scale: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        if tokens is None and token_mask is not None:
            raise ValueError("token_mask given without tokens")
        if tokens is not None:  # the joint encoder: word ids -> the context sequence
            if self.config.text is None:
                raise ValueError("tokens given but this UNet has no text transformer (UNetConfig.text=None)")
            if context is not None or token_mask is None or token_mask.shape != tokens.shape:
                raise ValueError("tokens need a token_mask of their shape, and no context")
            context, context_mask = self.text(tokens, token_mask), token_mask
        h = self._check_inputs(x, low_res, context, context_mask)
        emb = self.embedding(c_noise, class_labels, x.shape[0])
        if self.config.low_res_noise:  # the augmentation level a of low_res (0 when not given), scaled like c_noise
            a = (
                torch.zeros(x.shape[0], device=x.device)
                if low_res_noise is None
                else torch.as_tensor(low_res_noise, device=x.device).float()
            )
            emb = emb + self.augmentation(1000.0 * a.expand(x.shape[0]))
        elif low_res_noise is not None:
            raise ValueError("low_res_noise given but this UNet has low_res_noise=False")
        if self.config.guidance_input:  # the scale w (1 when not given: the plain conditional), scaled like c_noise
            w = (
                torch.ones(x.shape[0], device=x.device)
                if guidance_scale is None
                else torch.as_tensor(guidance_scale, device=x.device).float()
            )
            emb = emb + self.guidance(100.0 * w.expand(x.shape[0]))
        elif guidance_scale is not None:
            raise ValueError(
                "guidance_scale given but this UNet has guidance_input=False (only a guided student takes it)"
            )
        if augment_labels is not None:  # training with --augment edm: which transform each image went through
            if not self.config.augment_dim:
                raise ValueError(
                    "augment_labels given but this UNet has augment_dim=0 (trained without --augment edm or "
                    "edm-geometric)"
                )
            emb = emb + self.augment(augment_labels.to(emb.dtype))
        cond = (emb, context, attention_mask(context_mask) if context_mask is not None else None)

        h, skips = encode(self, h, *cond)
        h = self.mid_res(self.mid(h, *cond), emb)

        for level, blocks in enumerate(self.up):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), *cond)  # (B, C + C_skip, H, W)
            if level < len(self.upsample):
                h = self.upsample[level](h)

        return self.conv_out(F.silu(self.norm_out(h)))


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Sized for 2 CPU cores at batch 64. Forward + backward per batch of 64, measured on 2 pinned cores of a
# Xeon (fp32 / torch.autocast("cpu", dtype=torch.bfloat16)):
#   digits          1.08M parameters   ~0.07 s / ~0.08 s   (~14 it/s)
# The fashion-mnist layout puts most channels at 7x7 (base 16, mults (1, 3, 5)): 1.15M parameters and 709M
# training FLOPs per image against 1133M for base 32, mults (1, 2, 2), which trained to a better FD in
# equal CPU time (benchmarks/preset_ab.py: 3.92 against 4.64 after 10 minutes each).
PRESETS: dict[str, UNetConfig] = {
    # sklearn digits, 8x8 grey: 8 -> 4, attention at 4
    "digits": UNetConfig(
        image_size=8,
        in_channels=1,
        base_channels=32,
        channel_mults=(1, 2),
        num_res_blocks=2,
        attention_resolutions=(4,),
    ),
    # Fashion-MNIST, 28x28 grey: 28 -> 14 -> 7, attention at 7
    "fashion-mnist": UNetConfig(
        image_size=28,
        in_channels=1,
        base_channels=16,
        channel_mults=(1, 3, 5),
        num_res_blocks=1,
        attention_resolutions=(7,),
    ),
}

# channel multipliers by number of halvings, following the two presets above (more for larger images)
MULTS_BY_DEPTH = {0: (1,), 1: (1, 2), 2: (1, 3, 5), 3: (1, 2, 3, 5)}


def preset_for_size(size: int, channels: int, width: int | None = None) -> UNetConfig:
    """A U-Net for size x size (or size x width) images sized like the built-in presets: halve while the
    feature map stays even and above 8 (at most 3 times), attention at the smallest map; the digits layout
    (base 32, two blocks) for a single halving or none, the fashion-mnist layout (base 16, one block) beyond."""
    width = width or size
    depth = 0
    while depth < 3 and size % 2 ** (depth + 1) == 0 and width % 2 ** (depth + 1) == 0 and size // 2**depth > 8:
        depth += 1
    if depth == 0 and size % 2 == 0 and width % 2 == 0 and size >= 4:
        depth = 1  # small images (e.g. 8x8): one halving, as digits
    small = depth <= 1
    lowest = size // 2**depth
    return UNetConfig(
        image_size=size,
        in_channels=channels,
        base_channels=32 if small else 16,
        channel_mults=MULTS_BY_DEPTH[depth],
        num_res_blocks=2 if small else 1,
        attention_resolutions=(lowest,) if lowest <= 16 else (),
        image_width=width if width != size else None,
    )
