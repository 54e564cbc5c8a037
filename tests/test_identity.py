"""The identity encoder behind personalisation's subject fidelity: its loss and views against closed forms, the
shipped encoder's held-out retrieval as recorded, and what the pixel and class features reach on the same task."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from difflab.cli import main
from difflab.data.images import DataError, load_images, to_model
from difflab.data.pairs import RGB, tint
from difflab.evaluation.identity import (
    WEIGHTS,
    Views,
    gain,
    identity_embed,
    identity_views,
    load_identity_net,
    nt_xent,
    retrieval_accuracy,
)


def fashion_test():
    try:
        return load_images("fashion-mnist", "test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")


def test_nt_xent_matches_its_closed_form():
    # two items, each view equal to its pair: a row sees its pair at cosine 1 and two others at cosine 0
    z = torch.eye(2)
    for t in (1.0, 0.2):
        want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2))
        assert nt_xent(z, z, t).item() == pytest.approx(want, rel=1e-6)
    # swapping the pairs' order breaks them: the loss rises
    assert nt_xent(z, z.flip(0), 0.2) > nt_xent(z, z, 0.2)


def test_a_view_without_changes_is_the_tinted_item_exactly():
    test = fashion_test()
    grey = test.images[:5]
    none = Views(shift=0, scale=0, blur=0, noise=0, palette=1.0)
    g = torch.Generator().manual_seed(3)
    colours = torch.randint(len(RGB), (5,), generator=torch.Generator().manual_seed(3))  # the views' first draw
    view = identity_views(to_model(grey), none, generator=g)
    want = (
        torch.from_numpy(tint(grey[:, 0].numpy(), RGB[colours.numpy()])).double() / 255 * 2 - 1
    )  # uint8 rounding: <= 1/255
    assert (view.double() - want).abs().max() <= 1.01 / 255


def test_views_shift_and_scale_keep_the_item_and_its_mass():
    test = fashion_test()
    x = to_model(test.images[:64])
    v = identity_views(x, Views(blur=0, noise=0), generator=torch.Generator().manual_seed(0))
    assert v.shape == (64, 3, 32, 32) and v.min() >= -1 and v.max() <= 1
    mass = ((v + 1) / 2).amax(1).sum((1, 2))  # the brightest channel's total: the item's area at its tint's scale
    grey = ((x + 1) / 2).sum((1, 2, 3))
    ratio = mass / grey
    assert ((ratio > 0.45) & (ratio < 1.4)).all()  # colour 0.6-1 bright, size 0.9-1.1 squared


def test_gain_is_the_share_of_the_gap_closed():
    assert gain(0.5, 0.2, 0.8) == pytest.approx(0.5)
    assert gain(0.2, 0.2, 0.8) == 0 and gain(0.8, 0.2, 0.8) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ceiling"):
        gain(0.5, 0.4, 0.3)


@pytest.mark.slow  # loads the Fashion-MNIST test split and a shipped net: left out of make test-fast
def test_shipped_identity_encoder_retrieves_held_out_items_as_recorded():
    test = fashion_test()
    net = load_identity_net()
    meta = json.loads(WEIGHTS.with_suffix(".json").read_text())
    sub = meta["retrieval_subset"]
    assert meta["retrieval_top1"] >= 0.90  # the bar: 1000 test items, each among 100 of its class
    items = to_model(test.images)
    top1 = retrieval_accuracy(
        lambda v: identity_embed(net, v), items, test.labels, sub["distractors"], sub["queries"], sub["seed"]
    )
    assert abs(top1 - sub["top1"]) <= 0.01
    assert WEIGHTS.stat().st_size <= 2 * 1024 * 1024


@pytest.mark.slow
def test_identity_beats_pixels_and_class_features_on_the_same_task():
    """What the measure is for: the attribute network's features (a classifier's) and raw pixels do not
    separate one sneaker from another as well; on 100 queries, each among 100 of its class."""
    test = fashion_test()
    items = to_model(test.images)
    ident = retrieval_accuracy(lambda v: identity_embed(load_identity_net(), v), items, test.labels, 100, 100, seed=1)

    def pixels(v):  # luminance, centred and normalised: the shape correlation of evaluation/subject.py
        lum = (v * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).flatten(1)
        return F.normalize(lum - lum.mean(1, keepdim=True), dim=1)

    pix = retrieval_accuracy(pixels, items, test.labels, 100, 100, seed=1)
    assert ident >= 0.9 and ident > pix + 0.1, (ident, pix)


def test_identity_command_refuses_a_missing_run(tmp_path, capsys):
    code = main(["features", "identity", "--run", str(tmp_path / "nothing"), "--resume", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nothing" in err[0]
