"""Feature networks: the shipped classifiers reach their recorded accuracy, features are deterministic,
real-vs-real distances are far below real-vs-noise ones, and the generic fallbacks work on any images."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.data.images import DataError, load_images, save_npz
from difflab.evaluation.feature_training import FeatureTraining, train_features
from difflab.evaluation.features import SHIPPED, embed, load_feature_net, resolve_feature_net, weight_paths
from difflab.evaluation.metrics import frechet_distance
from difflab.nets.features import FeatureNet, FeatureNetConfig, FeatureNetError, random_feature_net

MAX_BYTES = 2 * 1024 * 1024


def accuracy(net, images, labels) -> float:
    _, logits = embed(net, images)
    return (logits.argmax(1) == labels).double().mean().item()


def fashion_or_skip(split: str):
    try:
        return load_images("fashion-mnist", split)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_small_and_documented(name):
    weights, meta_path = weight_paths(name)
    assert weights.stat().st_size <= MAX_BYTES
    meta = json.loads(meta_path.read_text())
    assert meta["seed"] == 0 and meta["command"].startswith("difflab features train")
    assert meta["config"]["image_size"] == {"digits": 8, "fashion-mnist": 28, "fashion-pairs": 32}[name]
    net = load_feature_net(name)
    assert net.config.feature_dim == 128 and net.config.num_classes == {"fashion-pairs": 32}.get(name, 10)


def test_digits_classifier_reaches_recorded_accuracy():
    net = load_feature_net("digits")
    test = load_images("digits", "test")
    acc = accuracy(net, test.images, test.labels)
    assert len(test) == net.meta["test_n"] == 355
    assert acc >= 0.97
    assert abs(acc - net.meta["test_accuracy"]) <= 0.005


def test_fashion_classifier_reaches_recorded_accuracy():
    test = fashion_or_skip("test")
    net = load_feature_net("fashion-mnist")
    k = net.meta["test_subset"]["n"]
    assert k == 2000
    acc = accuracy(net, test.images[:k], test.labels[:k])
    assert abs(acc - net.meta["test_subset"]["accuracy"]) <= 0.005
    assert net.meta["test_accuracy"] >= 0.90 and net.meta["test_n"] == 10000
    assert abs(acc - net.meta["test_accuracy"]) <= 0.02  # a 2000-image subset of the full test split


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_fashion_pairs_attribute_net_reaches_its_recorded_accuracies():
    from difflab.evaluation.features import accuracy as all_right
    from difflab.evaluation.features import attribute_accuracy

    net = load_feature_net("fashion-pairs")
    assert net.config.groups == (10, 6, 10, 6) and (net.config.image_size, net.config.image_width) == (32, 64)
    try:
        test = load_images("fashion-pairs", "test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")
    k = net.meta["test_subset"]["n"]
    assert k == 2000 and net.meta["test_n"] == 4000
    _, logits = embed(net, test.images[:k])  # one pass over the subset; the two accuracies are read off it
    right = net.attributes(logits) == test.attributes[:k]
    assert abs(right.all(1).double().mean().item() - net.meta["test_subset"]["accuracy"]) <= 0.005
    assert right.double().mean(0).tolist() == pytest.approx(net.meta["test_subset_attribute_accuracy"], abs=0.005)
    # ... as the library's two measures read them (on the first 200)
    assert all_right(net, test.images[:200], test.attributes[:200]) == right[:200].all(1).double().mean().item()
    per = attribute_accuracy(net, test.images[:200], test.attributes[:200])
    assert per == right[:200].double().mean(0).tolist()
    # recorded (15 epochs of 60000 pairs, widths 64-128-256, halves read as tiles): all four right 84.3 %; left class
    # 92.2 %, left colour 100 %, right class 91.8 %, right colour 100 %. Issue 23 asked for 91 % per class; before it:
    # 10 epochs of the 20000 train pairs 79.6 % (89.9 %, 88.5 %), and the 3-epoch net 70.3 % (83.4 %, 84.6 %)
    assert net.meta["test_accuracy"] >= 0.84 and min(net.meta["test_attribute_accuracy"][1::2]) >= 0.99
    assert min(net.meta["test_attribute_accuracy"][0::2]) >= 0.91
    # the heads read their own half: swapping the halves swaps the predicted attributes
    swapped = torch.cat([test.images[:200, ..., 32:], test.images[:200, ..., :32]], dim=-1)
    _, a = embed(net, test.images[:200])
    _, b = embed(net, swapped)
    pa, pb = net.attributes(a), net.attributes(b)
    assert (pa[:, [2, 3, 0, 1]] == pb).double().mean() > 0.85


def test_features_are_deterministic():
    images = load_images("digits", "test").images[:100]
    a, b = load_feature_net("digits"), load_feature_net("digits")
    assert a.fingerprint() == b.fingerprint()
    fa, la = embed(a, images)
    fb, lb = embed(b, images)
    assert fa.shape == (100, 128) and la.shape == (100, 10)
    assert torch.equal(fa, fb) and torch.equal(la, lb)
    f_small, _ = embed(a, images, batch=7)  # batch composition does not matter (BatchNorm in eval mode)
    torch.testing.assert_close(f_small, fa, rtol=1e-5, atol=1e-5)


def test_random_features_are_fixed_and_take_any_images():
    a, b = random_feature_net(3), random_feature_net(3)
    assert a.fingerprint() == b.fingerprint() != random_feature_net(3, seed=1).fingerprint()
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    fa, logits = embed(a, x)
    assert fa.shape == (6, 128) and logits is None
    assert torch.equal(fa, embed(b, x)[0])
    assert fa.std() > 0


def test_a_tiled_net_reads_each_tile_as_the_untiled_net_reads_it_alone():
    torch.manual_seed(0)
    tiled = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=4, tiles=2)).eval()
    single = FeatureNet(FeatureNetConfig(in_channels=3, num_classes=4)).eval()
    single.load_state_dict({k: v for k, v in tiled.state_dict().items() if not k.startswith("head")}, strict=False)
    x = torch.rand(5, 3, 16, 32) * 2 - 1
    feats = tiled.features(x)
    assert feats.shape == (5, 2 * 128)
    torch.testing.assert_close(feats[:, :128], single.features(x[..., :16]))
    torch.testing.assert_close(feats[:, 128:], single.features(x[..., 16:]))
    with pytest.raises(FeatureNetError, match="width divisible by 2"):
        tiled.features(x[..., :31])


@pytest.mark.parametrize("which", ["digits", "random"])
def test_real_vs_real_fd_is_far_below_real_vs_noise(which):
    net = load_feature_net("digits") if which == "digits" else random_feature_net(1)
    test, train = load_images("digits", "test"), load_images("digits", "train")
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (len(test), 1, 8, 8), dtype=torch.uint8, generator=g)
    blur = torch.nn.functional.avg_pool2d(test.images.float(), 3, 1, 1).round().to(torch.uint8)  # blurred digits
    f_test, f_train, f_noise, f_blur = (embed(net, x)[0] for x in (test.images, train.images, noise, blur))
    real = frechet_distance(f_test, f_train)
    assert real < 0.05 * frechet_distance(f_test, f_noise)
    assert real < 0.5 * frechet_distance(f_test, f_blur)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FeatureNetError, match="unknown feature net 'nope'"):
        load_feature_net("nope")
    with pytest.raises(FeatureNetError, match="missing"):
        load_feature_net(str(tmp_path / "mine.safetensors"))
    with pytest.raises(FeatureNetError, match="3 channels"):
        resolve_feature_net(None, "digits", channels=3, size=8)
    with pytest.raises(FeatureNetError, match="trained on 8x8"):
        resolve_feature_net("digits", "mine", channels=1, size=28)
    assert resolve_feature_net(None, "my-folder", channels=3, size=32).meta["kind"] == "random"


def test_train_own_classifier(tmp_path):
    """The generic path for a user's labelled data: train through the one loop, write weights + JSON, load by
    path; deterministic; resumable."""
    digits = load_images("digits", "all")
    data = tmp_path / "mine.npz"
    save_npz(data, digits.images, digits.labels)
    recipe = FeatureTraining(epochs=2, batch_size=64, shift=1)
    weights, meta = train_features(str(data), tmp_path / "run-a", out=tmp_path / "a", recipe=recipe, progress=False)
    again, _ = train_features(str(data), tmp_path / "run-b", out=tmp_path / "b", recipe=recipe, progress=False)
    assert weights.name == "mine-classifier.safetensors" and weights.with_suffix(".json").is_file()
    net = load_feature_net(str(weights))
    assert net.fingerprint() == load_feature_net(str(again)).fingerprint()
    test = load_images(str(data), "test")
    assert meta["test_n"] == len(test) and meta["test_accuracy"] == pytest.approx(
        accuracy(net, test.images, test.labels)
    )
    assert meta["test_accuracy"] > 0.5  # two epochs: well above chance (0.1)
    with pytest.raises(FeatureNetError, match="--out"):
        train_features(str(data), tmp_path / "run-c", recipe=recipe, progress=False)


@pytest.mark.slow  # makes fashion-pairs images and trains a tiny judge
def test_the_judge_recipe_takes_more_pairs_and_wider_stages(tmp_path, capsys):
    """`--pairs` makes that many training pairs (recorded in the run, so --resume reads the same ones) and
    `--widths` sets the stages; a number of images is refused for a set that is not made."""
    from difflab.cli import main
    from difflab.runs.config import load_config

    try:
        load_images("fashion-pairs", "train", n=300)
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")
    argv = [
        "features",
        "train",
        "fashion-pairs",
        "--out",
        str(tmp_path / "w"),
        "--run",
        str(tmp_path / "run"),
        "--pairs",
        "300",
        "--epochs",
        "1",
        "--widths",
        "8",
        "16",
        "--quiet",
    ]
    assert main(argv) == 0
    meta = json.loads((tmp_path / "w" / "fashion-pairs-classifier.json").read_text())
    assert meta["train_n"] == 300 and meta["config"]["widths"] == [8, 16]
    assert load_config(tmp_path / "run").data.n == 300
    assert (
        main(
            [
                "features",
                "train",
                "fashion-pairs",
                "--out",
                str(tmp_path / "w"),
                "--run",
                str(tmp_path / "run"),
                "--resume",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "w" / "fashion-pairs-classifier.json").read_text())["train_n"] == 300
    capsys.readouterr()
    assert (
        main(
            [
                "features",
                "train",
                "fashion-pairs",
                "--run",
                str(tmp_path / "run"),
                "--resume",
                "--pairs",
                "600",
                "--quiet",
            ]
        )
        == 2
    )
    assert "--pairs: a resumed run keeps what it was started with" in capsys.readouterr().err
    with pytest.raises(DataError, match="only fashion-pairs takes a number of images"):
        load_images("digits", "train", n=10)
    for bad in (0, 1.5, True, "5"):
        with pytest.raises(DataError, match="positive integer"):
            load_images("fashion-pairs", "train", n=bad)
