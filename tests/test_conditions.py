"""Conditions as data: condition dropout, networks that refuse what they do not take, config validation."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from difflab.core.conditions import ConditionError, ConditionSpec, class_labels, drop_conditions, drop_mask, select
from difflab.core.parameterize import Denoiser
from difflab.core.processes import DiscreteDDPM
from difflab.nets.mlp import MLP, MLPConfig
from difflab.nets.unet import UNet, UNetConfig

TINY = UNetConfig(
    image_size=8, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), norm_groups=4
)


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
def test_label_dropout_rate_matches_p(p):
    n = 200_000
    spec = class_labels(10, p)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    out = drop_conditions({"class_labels": y}, [spec], torch.Generator().manual_seed(1))["class_labels"]
    dropped = (out == 10).double().mean().item()
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-12  # within 4 binomial standard errors
    kept = out != 10
    assert torch.equal(out[kept], y[kept])  # the others are untouched


def test_dropping_a_tensor_zeroes_it_and_its_mask_together():
    spec = ConditionSpec("context", "tensor", p_drop=0.5, companions=("context_mask",))
    ctx, mask = torch.randn(1000, 3, 4), torch.ones(1000, 3, dtype=torch.bool)
    out = drop_conditions({"context": ctx, "context_mask": mask}, [spec], torch.Generator().manual_seed(0))
    gone = ~out["context_mask"].any(1)
    assert 400 < int(gone.sum()) < 600
    assert bool((out["context"][gone] == 0).all()) and torch.equal(out["context"][~gone], ctx[~gone])


def test_shards_drop_as_the_whole_batch_does():
    """Dropout masks drawn for the global batch and sliced give each shard what the whole batch gets."""
    spec, y = class_labels(5, 0.3), torch.arange(64) % 5
    whole = drop_conditions({"class_labels": y}, [spec], torch.Generator().manual_seed(7))["class_labels"]
    m = drop_mask(0.3, 64, torch.Generator().manual_seed(7))
    halves = [
        drop_conditions({"class_labels": y[s]}, [spec], masks={"class_labels": m[s]})["class_labels"]
        for s in (slice(0, 32), slice(32, 64))
    ]
    assert torch.equal(torch.cat(halves), whole)


@pytest.mark.parametrize(
    "bad, needle",
    [
        (dict(name="class labels"), "identifier"),
        (dict(name="y", kind="text"), "unknown kind"),
        (dict(name="y", p_drop=1.5, null_label=3), "p_drop must be in [0, 1]"),
        (dict(name="y", kind="label"), "null_label"),
    ],
)
def test_condition_spec_validation(bad, needle):
    with pytest.raises(ConditionError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        ConditionSpec(**bad)


def test_select_requires_what_the_model_declares():
    with pytest.raises(ConditionError, match="conditioned on 'class_labels' but the data has no"):
        select({}, [class_labels(10)])
    assert set(select({"class_labels": torch.zeros(2), "other": torch.ones(2)}, [class_labels(10)])) == {"class_labels"}


def test_networks_refuse_undeclared_conditions():
    process = DiscreteDDPM(100, "cosine")
    x, t = torch.randn(2, 2), torch.tensor([5.0, 50.0], dtype=torch.float64)
    mlp = Denoiser(MLP(MLPConfig()), process)
    with pytest.raises(ConditionError, match="MLP takes no conditions; got 'class_labels'"):
        mlp(x, t, class_labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ConditionError, match="MLP takes no conditions"):
        MLP(MLPConfig())(x, torch.zeros(2), low_res=x)  # the network itself, not only the wrapper
    unet = Denoiser(UNet(replace(TINY, num_classes=3)), process)
    assert unet.accepts == {"class_labels"}
    xi = torch.randn(2, 1, 8, 8)
    unet(xi, t, class_labels=torch.tensor([0, 3]))  # 3 is the null class
    with pytest.raises(ConditionError, match="takes class_labels; got 'context'"):
        unet(xi, t, context=torch.randn(2, 4, 8))
    assert UNet(replace(TINY, cond_channels=1, context_dim=8, attention_resolutions=(4,))).accepts == {
        "low_res",
        "context",
        "context_mask",
    }


def test_conditional_and_unconditional_predictions_differ_after_label_embedding():
    """The null class is a real row of the embedding: changing it changes the prediction."""
    net = UNet(replace(TINY, num_classes=3))
    for p in net.parameters():  # the zero-initialised output layers would hide every input
        torch.nn.init.normal_(p, std=0.2)
    x, c = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 10.0])
    a = net(x, c, class_labels=torch.tensor([1, 1]))
    b = net(x, c, class_labels=torch.tensor([3, 3]))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(net(x, c), b)  # None means the null class
