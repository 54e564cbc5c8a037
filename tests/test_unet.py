"""The image U-Net: shapes at every supported resolution and conditioning, zero output at
initialisation, a config that rebuilds the same network from JSON, clear errors, and no dead parameters."""

import json

import pytest
import torch

from difflab.nets.unet import PRESETS, CrossAttention, UNet, UNetConfig, num_parameters, positions_2d


def small(**overrides) -> UNetConfig:
    """A narrow network so that every test runs in well under a second."""
    base = dict(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                num_heads=2, norm_groups=8)  # fmt: skip
    return UNetConfig(**{**base, **overrides})


def randomize_(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every parameter (the zero-initialised ones included) by small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return net


def inputs(
    cfg: UNetConfig, batch: int = 3, seed: int = 1, context_len: int = 5
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    c_noise = torch.rand(batch, generator=g) * 1000
    cond = {}
    if cfg.num_classes is not None:
        cond["class_labels"] = torch.randint(0, cfg.num_classes + 1, (batch,), generator=g)
    if cfg.cond_channels:
        half = cfg.image_size // 2
        cond["low_res"] = torch.randn(batch, cfg.cond_channels, half, half, generator=g)
    if cfg.context_dim is not None:
        cond["context"] = torch.randn(batch, context_len, cfg.context_dim, generator=g)
        cond["context_mask"] = torch.ones(batch, context_len, dtype=torch.bool)
    return x, c_noise, cond


CONFIGS = {
    "8x8, attention at 4": small(),
    "8x8, no attention": small(attention_resolutions=()),
    "28->14->7, attention at 14 and 7": small(image_size=28, channel_mults=(1, 2, 2), attention_resolutions=(14, 7)),
    "28, 3 channels in, 6 out": small(
        image_size=28, in_channels=3, out_channels=6, channel_mults=(1, 2, 2), attention_resolutions=(7,)
    ),
    "32->4, no attention, 2 res blocks": small(
        image_size=32, channel_mults=(1, 1, 2, 2), num_res_blocks=2, attention_resolutions=()
    ),
    "32, classes": small(image_size=32, channel_mults=(1, 2), attention_resolutions=(16,), num_classes=10),
    "16, low_res channels": small(image_size=16, in_channels=3, cond_channels=3, attention_resolutions=(8,)),
    "8, context (cross-attention)": small(context_dim=12, attention_resolutions=(8, 4)),
    "odd 7x7, one level": small(image_size=7, channel_mults=(1,), attention_resolutions=(7,)),
    "everything": small(
        image_size=28,
        channel_mults=(1, 2, 2),
        attention_resolutions=(7,),
        num_classes=3,
        cond_channels=1,
        context_dim=8,
        dropout=0.1,
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_shape_and_zero_output_at_init(name):
    cfg = CONFIGS[name]
    net = UNet(cfg)
    x, c_noise, cond = inputs(cfg)
    out = net(x, c_noise, **cond)
    assert out.shape == (x.shape[0], cfg.out_ch, cfg.image_size, cfg.image_size)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv
    randomize_(net)
    out = net(x, c_noise, **cond)
    assert out.shape == (x.shape[0], cfg.out_ch, cfg.image_size, cfg.image_size)
    assert torch.isfinite(out).all() and out.abs().max() > 0


def test_attention_is_placed_at_the_requested_resolutions():
    cfg = small(image_size=28, channel_mults=(1, 2, 2), attention_resolutions=(14,), context_dim=4)
    net = UNet(cfg)
    sizes = {}

    def record(module, args, output):
        sizes.setdefault(type(module).__name__, set()).add(args[0].shape[-1])

    for m in net.modules():
        if type(m).__name__ in ("SelfAttention", "CrossAttention"):
            m.register_forward_hook(record)
    x, c_noise, cond = inputs(cfg)
    net(x, c_noise, **cond)
    assert sizes == {"SelfAttention": {14}, "CrossAttention": {14}}
    assert not any(type(m).__name__ == "SelfAttention" for m in UNet(small(attention_resolutions=())).modules())


def test_time_and_conditions_change_the_output():
    cfg = small(num_classes=4, cond_channels=1, context_dim=6)
    net = randomize_(UNet(cfg)).eval()
    x, c_noise, cond = inputs(cfg)
    out = net(x, c_noise, **cond)
    assert not torch.allclose(out, net(x, c_noise + 100, **cond))
    assert not torch.allclose(out, net(x, c_noise, **{**cond, "class_labels": (cond["class_labels"] + 1) % 5}))
    assert not torch.allclose(out, net(x, c_noise, **{**cond, "low_res": cond["low_res"] + 1}))
    assert not torch.allclose(out, net(x, c_noise, **{**cond, "context": cond["context"] * 2}))
    # batch elements are independent
    assert torch.allclose(out[:1], net(x[:1], c_noise[:1], **{k: v[:1] for k, v in cond.items()}), atol=1e-5)


def test_positions_tell_the_network_where_it_is():
    """Cross-attention over a constant feature map answers the same at every position unless its queries carry
    positions_2d (the sinusoidal code: row and column halves, distinct for every position); coordinate channels
    reach the first convolution as each pixel's row and column in [-1, 1]."""
    pe = positions_2d(4, 6, 16)
    assert pe.shape == (24, 16) and torch.unique(pe, dim=0).shape[0] == 24
    assert torch.equal(pe[0, :8], pe[5, :8]) and torch.equal(
        pe[0, 8:], pe[6, 8:]
    )  # (0, 0), (0, 5) share a row; (0, 0), (1, 0) a column
    torch.testing.assert_close(pe[1, 8:12], (100.0 ** -(torch.arange(4) / 4)).sin())  # column 1: sin(1 / 100^(2i / 8))
    x = torch.ones(2, 8, 4, 6)
    context = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(0))
    for positions in (False, True):
        attn = randomize_(CrossAttention(8, 6, 2, 4, positions)).eval()
        out = attn(x, context, None)
        spread = (out - out[..., :1, :1]).abs().max().item()
        assert (spread > 1e-3) if positions else (spread < 1e-5), (positions, spread)

    cfg = small(coord_channels=True)
    net = UNet(cfg).eval()
    seen = {}
    net.conv_in.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    x, c_noise, cond = inputs(cfg)
    net(x, c_noise, **cond)
    assert seen["x"].shape[1] == cfg.in_channels + 2 and torch.equal(seen["x"][:, : cfg.in_channels], x)
    torch.testing.assert_close(seen["x"][0, -1, 3], torch.linspace(-1, 1, 8))  # the column channel along a row
    torch.testing.assert_close(seen["x"][0, -2, :, 3], torch.linspace(-1, 1, 8))  # the row channel along a column


def test_missing_class_labels_mean_the_null_class():
    cfg = small(num_classes=3)
    net = randomize_(UNet(cfg))
    x, c_noise, _ = inputs(cfg)
    null = torch.full((x.shape[0],), 3, dtype=torch.long)
    assert torch.equal(net(x, c_noise), net(x, c_noise, class_labels=null))


def test_masked_context_tokens_are_ignored():
    cfg = small(context_dim=6)
    net = randomize_(UNet(cfg))
    x, c_noise, cond = inputs(cfg, context_len=4)
    mask = torch.tensor([[True, True, False, False]] * x.shape[0])
    context = cond["context"]
    changed = context.clone()
    changed[:, 2:] = 100.0  # only masked positions differ
    out = net(x, c_noise, context=context, context_mask=mask)
    assert torch.allclose(out, net(x, c_noise, context=changed, context_mask=mask), atol=1e-5)
    assert not torch.allclose(out, net(x, c_noise, context=changed))
    # a sample with no visible token gets no cross-attention at all, rather than NaN
    none_visible = torch.zeros_like(mask)
    no_context = net(x, c_noise, context=context, context_mask=none_visible)
    assert torch.isfinite(no_context).all()
    assert torch.allclose(no_context, net(x, c_noise), atol=1e-5)


def test_low_res_at_full_size_or_smaller_is_equivalent_after_upsampling():
    cfg = small(image_size=16, cond_channels=1, attention_resolutions=())
    net = randomize_(UNet(cfg))
    x, c_noise, cond = inputs(cfg)
    up = torch.nn.functional.interpolate(cond["low_res"], size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(net(x, c_noise, **cond), net(x, c_noise, low_res=up), atol=1e-6)


def test_config_json_round_trip_rebuilds_the_same_network():
    cfg = small(image_size=28, channel_mults=(1, 2, 2), attention_resolutions=(14, 7), num_classes=5, context_dim=8)
    text = json.dumps(cfg.to_dict())
    again = UNetConfig.from_dict(json.loads(text))
    assert again == cfg and isinstance(again.channel_mults, tuple) and isinstance(again.attention_resolutions, tuple)
    a, b = randomize_(UNet(cfg)), UNet(again)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)
    b.load_state_dict(sa)
    x, c_noise, cond = inputs(cfg)
    assert torch.equal(a(x, c_noise, **cond), b(x, c_noise, **cond))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(image_size=30, channel_mults=(1, 2, 2)), "divisible"),
        (dict(image_size=28, channel_mults=(1, 2, 2, 2)), "divisible"),
        (dict(attention_resolutions=(5,)), "not feature-map sizes"),
        (dict(num_heads=3), "num_heads"),
        (dict(base_channels=0), "base_channels"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(context_dim=8, attention_resolutions=()), "context_dim"),
        (dict(cond_channels=-1), "cond_channels"),
    ],
)
def test_invalid_config_raises_a_clear_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        small(**overrides)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown UNetConfig fields.*channels_mult"):
        UNetConfig.from_dict({**small().to_dict(), "channels_mult": [1, 2]})


def test_invalid_inputs_raise_clear_errors():
    net = UNet(small(num_classes=2))
    x, c_noise, _ = inputs(net.config)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        net(torch.zeros(2, 1, 16, 16), c_noise[:2])
    with pytest.raises(ValueError, match="class_labels must be in 0..2"):
        net(x, c_noise, class_labels=torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="cond_channels=0"):
        net(x, c_noise, low_res=x)
    with pytest.raises(ValueError, match="context_dim=None"):
        net(x, c_noise, context=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="low_res"):
        UNet(small(cond_channels=1))(x, c_noise)
    with pytest.raises(ValueError, match="num_classes=None"):
        UNet(small())(x, c_noise, class_labels=torch.zeros(3, dtype=torch.long))


def test_gradient_reaches_every_parameter():
    """No parameter is unused: with random weights (so the zero-initialised layers pass gradient on),
    one backward pass gives every parameter a non-zero gradient."""
    cfg = CONFIGS["everything"]
    net = randomize_(UNet(cfg))
    x, c_noise, cond = inputs(cfg, batch=4)
    net(x, c_noise, **cond).square().mean().backward()
    dead = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead


def test_training_from_the_zero_init_moves_every_parameter():
    """The zero-initialised layers do not block learning: a few optimiser steps from the default
    initialisation change every parameter (the gradient reaches deeper layers one step at a time)."""
    torch.manual_seed(0)
    cfg = small(num_classes=3, context_dim=4, cond_channels=1)
    net = UNet(cfg)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, c_noise, cond = inputs(cfg, batch=4)
    target = torch.randn_like(x)
    for _ in range(5):
        opt.zero_grad()
        (net(x, c_noise, **cond) - target).square().mean().backward()
        opt.step()
    unchanged = [k for k, v in net.state_dict().items() if torch.equal(v, before[k])]
    assert not unchanged


def test_presets_build_and_run():
    assert set(PRESETS) >= {"digits", "fashion-mnist"}
    digits, fashion = PRESETS["digits"], PRESETS["fashion-mnist"]
    assert (digits.image_size, digits.in_channels, fashion.image_size, fashion.in_channels) == (8, 1, 28, 1)
    for cfg in (digits, fashion):
        net = UNet(cfg)
        assert 1e5 < num_parameters(net) < 1e7
        x, c_noise, _ = inputs(cfg, batch=2)
        assert net(x, c_noise).shape == x.shape


def test_attention_runs_in_float32_inside_cpu_bf16_autocast():
    """nets.unet.attention: bf16 inputs on the CPU are attended in float32 (faster backward there) and
    come back in bf16, equal to float32 attention of the same bf16 inputs; gradients flow."""
    import torch.nn.functional as F

    from difflab.nets.unet import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 49, 8, generator=g).bfloat16().requires_grad_() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=0, atol=0)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad.float()).all()
