"""`difflab eval` and evaluate(): reproducible numbers, a reused reference cache, clear errors."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from difflab.cli import main
from difflab.core.processes import ContinuousVP
from difflab.data.images import load_images
from difflab.data.loader import TensorDataset
from difflab.evaluation import evaluate as ev
from difflab.evaluation import reference, report
from difflab.evaluation.evaluate import Sampling
from difflab.nets.unet import UNetConfig
from difflab.runs.config import RunConfig, TrainConfig, save_config
from difflab.runs.presets import PRESETS as IMAGE_PRESETS
from difflab.runs.store import save_checkpoint
from difflab.training.loop import train

TINY_UNET = UNetConfig(
    image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(), norm_groups=8
)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """A fresh, empty reference cache for every test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIFFLAB_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny_digits_run(tmp_path_factory):
    """The digits recipe (DiscreteDDPM, cosine, v) with a small U-Net, trained for 30 steps."""
    run = tmp_path_factory.mktemp("runs") / "digits"
    preset = IMAGE_PRESETS["digits"]
    cfg = replace(
        preset,
        net=TINY_UNET,
        train=TrainConfig(steps=30, batch_size=32, lr=2e-3, warmup=5, checkpoint_every=30),
    )
    data = load_images("digits", "train")
    train(run, cfg, TensorDataset(data.images), device="cpu", progress=False)
    return run


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err.strip()


def test_same_seed_same_json_and_cache_reused(tiny_digits_run, cache, tmp_path, capsys):
    args = ["eval", tiny_digits_run, "--n", "60", "--steps", "4", "--bpd-n", "2", "--batch", "25", "--quiet"]
    before = reference.reference_computations
    code, out, err = run_cli(capsys, *args, "--json", tmp_path / "a.json")
    assert code == 0, err
    # the test split's statistics; the floor embeds only its 60 training images (under a quarter of the split)
    assert reference.reference_computations == before + 1
    files = sorted(cache.glob("ref-digits-*.safetensors"))
    assert len(files) == 1
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert "FD" in out and "bits/dim of 2 test images" in out and f"wrote {tmp_path / 'a.json'}" in out

    code, _, _ = run_cli(capsys, *args, "--json", tmp_path / "b.json")
    assert code == 0
    assert reference.reference_computations == before + 1  # second call: loaded from the cache
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    a, b = (tmp_path / "a.json").read_text(), (tmp_path / "b.json").read_text()
    assert a == b

    code, _, _ = run_cli(capsys, *args, "--seed", "1", "--json", tmp_path / "c.json")
    assert code == 0
    r, c = json.loads(a), json.loads((tmp_path / "c.json").read_text())
    assert r["fd"] != c["fd"] and r["bits_per_dim"]["total"] != c["bits_per_dim"]["total"]

    # the numbers themselves
    assert (
        r["n"] == 60 and r["spacing"] == "logsnr" and r["features"]["name"] == "digits" and r["reference"]["n"] == 355
    )
    assert r["fd"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["pr_n"] == 60
    assert r["kid"]["subset_size"] == 60 and r["kid"]["stderr"] > 0
    floor = r["real_vs_real"]
    assert floor["split"] == "train" and floor["n"] == 60
    assert floor["fd"] < 0.5 * r["fd"]  # 30 training steps are far from the data
    classes = r["classes"]
    assert classes["names"] == [str(k) for k in range(10)]
    for hist in (classes["samples"], classes["real"], classes["real_labels"]):
        assert len(hist) == 10 and sum(hist) == pytest.approx(1.0)
    assert classes["real_labels"][0] == pytest.approx(35 / 355)  # 178 zeros, of which positions 4, 9, ..., 174 are test
    assert 0 <= classes["total_variation"] <= 1
    bpd = r["bits_per_dim"]
    assert bpd["n"] == 2 and bpd["total"] == pytest.approx(bpd["prior"] + bpd["terms"] + bpd["decoder"])
    assert 0 < bpd["total"] < 20


def test_a_few_reference_features_are_the_cached_ones_without_the_whole_split(cache):
    from difflab.evaluation.features import load_feature_net

    data, net = load_images("digits", split="train"), load_feature_net("digits")
    before = reference.reference_computations
    few = reference.reference_features(data, net, 60, progress=False)  # 60 of 1442: embedded alone, not cached
    assert reference.reference_computations == before and not list(cache.glob("ref-*"))
    whole = reference.reference_stats(data, net, progress=False)["features"]  # now cached
    assert reference.reference_computations == before + 1 and len(whole) == len(data)
    torch.testing.assert_close(few, whole[:60], rtol=1e-5, atol=1e-5)  # the same images, in the same order
    assert torch.equal(reference.reference_features(data, net, 500, progress=False), whole[:500])  # the cache's rows
    assert len(reference.reference_features(data, net, 10**6, progress=False)) == len(data)
    assert reference.reference_computations == before + 1


def test_python_api_matches_the_cli_numbers(tiny_digits_run, tmp_path, capsys):
    result = ev.evaluate(tiny_digits_run, n=60, sampling=Sampling(steps=4, batch=25), bpd_n=2, progress=False)
    assert set(result["seconds"]) >= {"sampling", "features", "reference", "bits_per_dim", "total"}
    code, _, _ = run_cli(
        capsys,
        "eval",
        tiny_digits_run,
        "--n",
        "60",
        "--steps",
        "4",
        "--bpd-n",
        "2",
        "--batch",
        "25",
        "--quiet",
        "--json",
        tmp_path / "a.json",
    )
    assert code == 0
    assert report.to_json(result) == (tmp_path / "a.json").read_text()


def test_continuous_process_and_random_features(tmp_path):
    """A ContinuousVP run (untrained, built by hand): no bits/dim, with the reason; random features: no classes."""
    run = tmp_path / "vp"
    cfg = RunConfig(
        dataset="digits",
        process=ContinuousVP(),
        net_kind="unet",
        net=TINY_UNET,
        shape=[1, 8, 8],
        data_kind="images",
        target="v",
    )
    denoiser = cfg.build_denoiser()
    assert isinstance(denoiser.process, ContinuousVP)
    save_config(run, cfg)
    save_checkpoint(run, 0, denoiser.net, copy.deepcopy(denoiser.net))
    r = ev.evaluate(run, n=20, sampling=Sampling("ddim", 2), features="random", progress=False, bpd_n=2)
    bpd = r["bits_per_dim"]  # the continuous-time bound (VDM), its parts adding up
    assert bpd["variance"] == "continuous" and bpd["n"] == 2
    assert bpd["total"] == pytest.approx(bpd["prior"] + bpd["terms"] + bpd["decoder"])
    assert r["features"]["kind"] == "random" and r["classes"]["samples"] is None
    assert r["fd"] > r["real_vs_real"]["fd"] > 0
    text = report.format_report(r)
    assert "continuous time" in text and "no classifier head" in text


def test_toy_run_reports_distances(tiny_toy_run):
    r = ev.evaluate(tiny_toy_run, n=300, sampling=Sampling("ddim", 5), progress=False)
    assert r["kind"] == "points" and r["bits_per_dim"]["total"] is None
    assert r["energy_distance"] > r["real_fresh"]["energy_distance"] > 0  # 30 steps of training
    assert r["sliced_wasserstein"] > r["real_fresh"]["sliced_wasserstein"] > 0
    assert (
        ev.evaluate(tiny_toy_run, n=300, sampling=Sampling("ddim", 5), progress=False)["energy_distance"]
        == r["energy_distance"]
    )


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["eval", "{missing}"], 2, "does not exist"),
        (["eval", "{run}", "--n", "0"], 2, "must be a positive integer"),
        (["eval", "{run}", "--n", "5"], 2, "n must be an integer >= 10"),
        (["eval", "{run}", "--steps", "-2"], 2, "must be a positive integer"),
        (["eval", "{run}", "--batch", "x"], 2, "invalid positive_int value"),
        (["eval", "{run}", "--sampler", "nope"], 2, "unknown sampler 'nope'"),
        (["eval", "{run}", "--spacing", "nope"], 2, "invalid choice"),
        (["eval", "{run}", "--bpd-n", "-1"], 2, "--bpd-n must be 0"),
        (["eval", "{run}", "--features", "nope"], 2, "unknown feature net 'nope'"),
        (["eval", "{run}", "--json", "{tmp}/out.txt"], 2, "expected a file ending in .json"),
    ],
)
def test_bad_options_give_one_line(capsys, tmp_path, tiny_digits_run, argv, code, needle):
    argv = [a.format(missing=tmp_path / "nothing", run=tiny_digits_run, tmp=tmp_path) for a in argv]
    got, _, err = (
        run_cli(capsys, *argv, "--quiet", "--json", tmp_path / "r.json")
        if "--json" not in argv
        else run_cli(capsys, *argv, "--quiet")
    )
    assert got == code
    assert needle in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.json")) and not list(tmp_path.glob("*.txt"))


def test_bits_per_dim_both_ways_on_an_image_run(tiny_digits_run, tmp_path, capsys):
    """eval --bpd both --bpd-steps K: the bound at T and at K steps, and the ODE's figure with its NFE, in the
    report and the JSON (no per-image arrays there)."""
    args = ["eval", tiny_digits_run, "--n", "10", "--steps", "2", "--bpd-n", "2", "--quiet"]
    code, out, err = run_cli(
        capsys, *args, "--bpd", "both", "--bpd-steps", "50", "--rtol", "1e-3", "--json", tmp_path / "r.json"
    )
    assert code == 0, err
    assert "bits/dim of 2 test images (bound)" in out and "the bound at 50 steps" in out
    assert "ODE bits/dim of 2 test images" in out and "Hutchinson" in out
    r = json.loads((tmp_path / "r.json").read_text())
    ode, bound = r["ode_bits_per_dim"], r["bits_per_dim"]
    assert ode["n"] == 2 and ode["nfe"] > 0 and 0 < ode["total"] < 20 and "per_example" not in ode
    assert bound["at_steps"]["50"]["steps"] == 50 and 0 < bound["at_steps"]["50"]["total"] < 20
