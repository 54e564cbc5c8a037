"""A class-conditional digits run end to end: training with label dropout, a noise-aware classifier, guided
sampling from the command line and its bad combinations; restoration, interpolation and image-to-image
with the same trained model."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from conftest import DIGITS_STEPS
from PIL import Image

from difflab.cli import main
from difflab.core.conditions import ConditionSpec
from difflab.evaluation.evaluate import Sampling, evaluate
from difflab.guidance.classifier import check_guides
from difflab.guidance.config import GuidanceConfig
from difflab.runs.config import CheckpointError, load_config
from difflab.runs.diffusion import DiffusionRun

STEPS = DIGITS_STEPS


@pytest.fixture(scope="module")
def runs(digits_runs):
    """The shared digits runs (conftest.py): dc (class-conditional), clf (a noise-aware classifier), sr (2x super-
    resolution)."""
    return digits_runs


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err.strip()


def accuracy(run, guidance=None) -> float:
    r = evaluate(run, n=300, sampling=Sampling("dpmpp-2m", 20), bpd_n=0, progress=False, guidance=guidance)
    return r["classes"]["accuracy"]


@pytest.mark.quality
def test_conditional_digits_follow_their_class_and_guidance_sharpens_it(runs):
    cfg = load_config(runs / "dc")
    assert cfg.conditions == [ConditionSpec("class_labels", "label", p_drop=0.1, null_label=10)]
    plain = accuracy(runs / "dc")
    guided = accuracy(runs / "dc", GuidanceConfig(scale=3.0))
    unconditional = accuracy(runs / "dc", GuidanceConfig(scale=0.0))  # the null prediction: the class is ignored
    # measured (300 steps, one thread): plain 0.56, guided 0.99, unconditional 0.10, chance 0.10; with the classifier
    # 0.47 before classifier guidance skipped the top levels; 0.765 with the gradient off above sigma/alpha = 64
    # (400-step classifier)
    assert plain > 0.35 and guided > 0.9 and guided > plain + 0.2, (plain, guided)
    assert unconditional < 0.25, unconditional
    # classifier guidance on the unconditional prediction (s = 0 nested under the classifier) finds the class too
    with_classifier = accuracy(
        runs / "dc", GuidanceConfig(scale=0.0, classifier=str(runs / "clf"), classifier_scale=3.0)
    )
    assert with_classifier > unconditional + 0.2, (with_classifier, unconditional)


@pytest.mark.quality
def test_noise_aware_classifier_accuracy_falls_as_t_grows(runs):
    saved = json.loads((runs / "clf" / "accuracy.json").read_text())
    assert saved["step"] == STEPS
    acc = saved["accuracy"]
    levels = sorted(acc, key=float)
    values = [acc[k] for k in levels]
    # measured: 0.97, 0.94, 0.70, 0.31, 0.10 at t/t_max 0.05 .. 0.95
    assert values[0] > 0.9 and values[-1] < 0.3, acc
    assert all(a > b for a, b in zip(values, values[1:])), acc
    cfg = load_config(runs / "clf")
    assert cfg.net_kind == "classifier" and cfg.process == load_config(runs / "dc").process


def test_sample_every_class_one_row_each_and_the_same_seed_gives_the_same_grid(runs, tmp_path, capsys):
    out, again, npz = tmp_path / "all.png", tmp_path / "again.png", tmp_path / "all.npz"
    argv = [
        "sample",
        runs / "dc",
        "--class",
        "all",
        "-n",
        "40",
        "--guidance",
        "2",
        "--guidance-interval",
        "0.1,0.9",
        "--steps",
        "10",
        "--quiet",
    ]
    assert run_cli(capsys, *argv, "--out", out, "--save", npz)[0] == 0
    assert run_cli(capsys, *argv, "--out", again)[0] == 0
    assert out.read_bytes() == again.read_bytes()
    labels = np.load(npz)["labels"]
    assert labels.tolist() == [k for k in range(10) for _ in range(4)]  # 40 // 10 per class
    w, h = Image.open(out).size
    assert h > 2 * w  # 10 rows of 4

    def draw(*extra):
        npz = tmp_path / "x.npz"
        assert (
            run_cli(capsys, "sample", runs / "dc", "-n", "4", "--steps", "5", "--quiet", "--save", npz, *extra)[0] == 0
        ), extra
        return np.load(npz)["images"]

    plain = draw("--class", "3")
    # null + 1 (pred_3 - null) is pred_3 up to float rounding: the same 8-bit image but for a level here and there
    composed = draw("--compose", "3:+1")
    assert np.abs(composed.astype(int) - plain.astype(int)).max() <= 1
    guided = draw("--class", "3", "--guidance", "2")
    for extra in (
        ["--negative-class", "5"],
        ["--classifier", runs / "clf", "--classifier-scale", "2"],
        ["--guidance-schedule", "linear", "--guidance-rescale", "0.7"],
    ):
        assert not np.array_equal(draw("--class", "3", "--guidance", "2", *extra), guided), extra
    assert not np.array_equal(draw("--compose", "3:+1,5:-0.5"), plain)
    chain = tmp_path / "chain.png"
    argv = [
        "trajectories",
        runs / "dc",
        "--class",
        "3",
        "--guidance",
        "2",
        "-n",
        "2",
        "--steps",
        "5",
        "--sampler",
        "dpmpp-2m",
        "--out",
        chain,
    ]
    assert run_cli(capsys, *argv)[0] == 0 and chain.exists()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "{dc}", "--class", "12"], "class 12 is outside the run's classes 0..9"),
        (
            ["sample", "{dc}", "--class", "3", "--guidance", "2", "--negative-class", "10"],
            "class 10 is outside the run's classes 0..9",
        ),
        (["sample", "{dc}", "--compose", "3:1,5"], "expected CLASS:WEIGHT pairs"),
        (["sample", "{dc}", "--class", "3", "--guidance-interval", "0.8,0.2"], "needs 0 <= lo < hi <= 1"),
        (["sample", "{dc}", "--guidance", "2"], "classifier-free guidance needs the class to guide toward"),
        (["sample", "{dc}", "--class", "3", "--classifier-scale", "2"], "--classifier-scale needs --classifier RUN"),
        (["sample", "{dc}", "--class", "all", "3"], "--class all stands alone"),
        (["sample", "{dc}", "--class", "3", "--classifier", "{dc}"], "is a denoiser run, not a classifier"),
        (["sample", "{clf}", "--class", "3"], "is a noise-aware classifier run, not a denoiser"),
        (["sample", "{toy}", "--class", "1", "--guidance", "3"], "is unconditional: classifier-free guidance"),
        (
            ["sample", "{toy}", "--class", "1"],
            "is unconditional; train with --cond class, or guide it with --classifier",
        ),
        (
            ["sample", "{toy}", "--class", "1", "--classifier", "{clf}"],
            "trained for dataset 'digits', the run for 'swissroll'",
        ),
        (["sample", "{dc}", "--class", "3", "--negative-class", "5"], "at --guidance 1 it cancels"),
        (["sample", "{dc}", "--class", "3", "--guidance-interval", "0.2,0.5"], "needs guidance to act on"),
        (["sample", "{dc}", "--compose", "3:1", "--guidance-rescale", "0.5"], "only --compose alone needs none"),
        (["eval", "{dc}", "--compose", "3:1", "--bpd-n", "0", "-n", "10"], "composed classes are for `difflab sample`"),
        (["train", "--out", "{clf}", "--resume"], "holds a noise-aware classifier"),
        (["train-classifier", "swissroll", "--out", "{tmp}/new"], "needs images"),
        (["train-classifier", "--for", "{clf}", "--out", "{tmp}/new"], "is itself a classifier"),
    ],
)
def test_bad_guidance_gives_one_line_and_no_output(runs, tiny_toy_run, tmp_path, capsys, argv, needle):
    argv = [a.format(dc=runs / "dc", clf=runs / "clf", toy=tiny_toy_run, tmp=tmp_path) for a in argv]
    code, err = run_cli(
        capsys,
        *argv,
        *(["--out", tmp_path / "s.png"] if argv[0] == "sample" else ["--quiet"] if argv[0] != "eval" else []),
    )
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "new").exists()


def test_a_classifier_for_another_process_or_class_count_is_refused(runs):
    clf, run = load_config(runs / "clf"), load_config(runs / "dc")
    check_guides(clf, run, "c")  # made for it
    other = replace(clf, process=replace(clf.process, T=500))
    with pytest.raises(CheckpointError, match="trained for process"):
        check_guides(other, run, "c")
    with pytest.raises(CheckpointError, match="trained for shape"):
        check_guides(replace(clf, shape=[1, 16, 16]), run, "c")
    fewer = replace(run, conditions=[replace(run.conditions[0], null_label=5)])
    with pytest.raises(CheckpointError, match="predicts 10 classes, the run has 5"):
        check_guides(clf, fewer, "c")


def test_classifier_training_resumes_and_extends(runs, tmp_path, capsys):
    run = tmp_path / "clf"
    shutil.copytree(runs / "clf", run)
    assert run_cli(capsys, "train-classifier", "--out", run, "--resume", "--steps", STEPS + 10, "--quiet")[0] == 0
    from difflab.runs.store import weights_step

    assert weights_step(run) == STEPS + 10
    code, err = run_cli(capsys, "train-classifier", "digits", "--out", run, "--resume", "--quiet")
    assert code == 2 and "drop NAME" in err


def test_guidance_needs_a_trained_null_class(runs):
    from difflab.core.conditions import ConditionError
    from difflab.guidance.config import guided

    run = DiffusionRun.load(runs / "dc")
    den, cfg = run.denoiser, run.config
    no_null = replace(cfg, conditions=[replace(cfg.conditions[0], p_drop=0.0)])
    with pytest.raises(ConditionError, match="without label dropout"):
        guided(den, no_null, GuidanceConfig(scale=3.0))
    assert (
        guided(den, no_null, GuidanceConfig(scale=3.0, negative=5)) is not den
    )  # a negative class replaces the null one


# --------------------------------------------------------------------------- restoration and editing


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from difflab.data.images import load_images

    folder = tmp_path_factory.mktemp("digits")
    test = load_images("digits", split="test")
    np.savez(folder / "x.npz", images=test.images[:6].numpy())
    for i in range(2):
        Image.fromarray(test.images[i, 0].numpy()).save(folder / f"d{i}.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 5:] = 255  # white: fill in
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def test_ddim_inversion_round_trips_on_the_trained_model(runs):
    from difflab.data.images import load_images, to_model
    from difflab.sampling.samplers import ddim, ddim_invert, timesteps

    den = DiffusionRun.load(runs / "dc").denoiser
    x = to_model(load_images("digits", split="test").images[:32])
    ts = timesteps(den.process, 50, "uniform")
    errors = [float((ddim(den, ddim_invert(den, x, ts, fixed_point_iters=k), ts) - x).abs().max()) for k in (0, 3)]
    # measured (50 steps, pixels in [-1, 1]): 0.081 without refinement, 0.0026 with 3 fixed-point iterations
    assert errors[0] < 0.15 and errors[1] < 0.01, errors


def test_restore_from_the_command_line(runs, digits, tmp_path, capsys):
    out, npz = tmp_path / "strip.png", tmp_path / "r.npz"
    code = main(
        [
            "restore",
            str(runs / "dc"),
            "--task",
            "inpaint",
            "--clean",
            str(digits / "x.npz"),
            "--method",
            "replace",
            "repaint",
            "ddrm",
            "dps",
            "--steps",
            "20",
            "--jump-n-sample",
            "3",
            "--out",
            str(out),
            "--save",
            str(npz),
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0 and out.exists()
    assert "repaint: 40 network evaluations per image" in printed and "ddrm: 20 network evaluations" in printed
    saved = np.load(npz)
    truth = np.load(digits / "x.npz")["images"]
    for m in ("replace", "repaint", "ddrm"):  # the known half is kept (to 8-bit rounding)
        assert np.abs(saved[m][..., :4].astype(int) - truth[..., :4].astype(int)).max() <= 1, m
    w, h = Image.open(out).size
    assert w > 5 * h / 6  # 6 columns (measurement, 4 methods, truth) by 6 rows
    # observations instead of clean images: a user's masked image and mask, a low-resolution image
    assert (
        main(
            [
                "restore",
                str(runs / "dc"),
                "--task",
                "inpaint",
                "--input",
                str(digits / "d0.png"),
                "--mask",
                str(digits / "mask.png"),
                "--out",
                str(tmp_path / "m.png"),
                "--steps",
                "10",
                "--quiet",
            ]
        )
        == 0
    )
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(small)
    assert (
        main(
            [
                "restore",
                str(runs / "dc"),
                "--task",
                "sr2",
                "--input",
                str(small),
                "--out",
                str(tmp_path / "s.png"),
                "--steps",
                "10",
                "--quiet",
            ]
        )
        == 0
    )


def test_interpolate_and_img2img_from_the_command_line(runs, digits, tmp_path):
    frames = tmp_path / "f.npz"
    assert (
        main(
            [
                "interpolate",
                str(runs / "dc"),
                str(digits / "d0.png"),
                str(digits / "d1.png"),
                "--frames",
                "5",
                "--save",
                str(frames),
                "--gif",
                str(tmp_path / "m.gif"),
                "--steps",
                "30",
            ]
        )
        == 0
    )
    images = np.load(frames)["images"].astype(int)
    ends = [np.asarray(Image.open(digits / f"d{i}.png")).astype(int) for i in (0, 1)]
    assert (
        np.abs(images[0, 0] - ends[0]).max() <= 3 and np.abs(images[-1, 0] - ends[1]).max() <= 3
    )  # inversion is near exact
    assert np.abs(images[2, 0] - ends[0]).mean() > 10  # the middle frame is neither end
    edits = tmp_path / "e.npz"
    argv = [
        "img2img",
        str(runs / "dc"),
        str(digits / "d0.png"),
        "-n",
        "3",
        "--strength",
        "0.3",
        "--save",
        str(edits),
        "--quiet",
    ]
    assert main(argv) == 0
    first = np.load(edits)["images"]
    assert main(argv) == 0 and np.array_equal(np.load(edits)["images"], first)  # the same seed, the same edits
    assert np.abs(first[:, 0].astype(int) - ends[0]).mean() < 40


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["restore", "{dc}", "--task", "sr3", "--clean", "{x}"], "the factor 3 must divide the image size 8x8"),
        (["restore", "{dc}", "--task", "sr2", "--input", "{d0}"], "is 8x8; this needs 4x4 images"),
        (["restore", "{dc}", "--task", "grey", "--clean", "{x}"], "colour-to-grey needs 3-channel images"),
        (["restore", "{dc}", "--task", "inpaint", "--clean", "{x}", "--mask", "{small}"], "mask"),
        (["restore", "{dc}", "--task", "blur", "--clean", "{x}"], "unknown task 'blur'"),
        (["restore", "{dc}", "--task", "deblur", "--clean", "{x}", "--method", "nope"], "unknown method 'nope'"),
        (["restore", "{dc}", "--task", "deblur", "--clean", "{x}", "--input", "{d0}"], "one of the two"),
        (
            ["restore", "{dc}", "--task", "random", "--clean", "{x}", "--missing", "1"],
            "missing fraction must be in [0, 1)",
        ),
        (["interpolate", "{dc}", "{d0}", "{small}"], "is 4x4; this needs 8x8 images"),
        (["interpolate", "{dc}", "{d0}", "{d1}", "--frames", "1"], "--frames must be at least 2"),
        (["img2img", "{dc}", "{d0}", "--strength", "1.5"], "must be in [0, 1]"),
    ],
)
def test_bad_editing_input_gives_one_line_and_no_output(runs, digits, tmp_path, capsys, argv, needle):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(small)
    argv = [
        a.format(dc=runs / "dc", x=digits / "x.npz", d0=digits / "d0.png", d1=digits / "d1.png", small=small)
        for a in argv
    ]
    code, err = run_cli(capsys, *argv, "--out", tmp_path / "o.png")
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.quality
def test_trained_super_resolution_beats_bilinear_and_follows_its_input(runs):
    import torch

    from difflab.core.operators import Downsample
    from difflab.data.images import load_images, to_uint8
    from difflab.evaluation.metrics import psnr
    from difflab.runs.data import low_res_of
    from difflab.runs.diffusion import load_upscaler

    sr = load_upscaler(runs / "sr")
    cfg, k = sr.config, sr.config.super_resolution.factor
    assert k == 2 and cfg.net.low_res_noise and cfg.super_resolution.aug_max == 0.2
    test = load_images("digits", split="test").images[:300]  # never seen in training
    low = low_res_of(test, k)
    x = sr.upscale(low)
    bilinear = torch.nn.functional.interpolate(low, scale_factor=k, mode="bilinear", align_corners=False).clamp(-1, 1)
    ours, theirs = float(psnr(to_uint8(x), test).mean()), float(psnr(to_uint8(bilinear), test).mean())
    # measured (300 steps, 300 held-out digits, dpmpp-2m 20 steps): 13.65 dB against bilinear's 12.78 dB
    assert ours > theirs + 0.4, (ours, theirs)
    op = Downsample(k, tuple(cfg.shape))
    own = float(op.consistency(x, low).mean())
    other = float(op.consistency(x, low.roll(1, dims=0)).mean())  # against another image's input
    assert own < 0.25 and own < 0.5 * other, (own, other)  # measured 0.196 against 0.6


def test_upscale_and_cascade_from_the_command_line(runs, digits, tmp_path, capsys):
    import torch

    from difflab.runs.data import low_res_of

    assert (
        main(
            ["upscale", str(runs / "sr"), "--clean", str(digits / "x.npz"), "--out", str(tmp_path / "u.png"), "--quiet"]
        )
        == 0
    )
    assert "PSNR: upscaled" in capsys.readouterr().out
    # a cascade: a 4x4 base model (a user's npz) whose samples the 8x8 super-resolution run upscales
    images = np.load(digits / "x.npz")["images"]
    low = (
        ((low_res_of(torch.from_numpy(np.repeat(images, 20, axis=0)), 2) + 1) * 127.5)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    np.savez(tmp_path / "low.npz", images=low.numpy())
    assert main(["train", str(tmp_path / "low.npz"), "--out", str(tmp_path / "base"), "--steps", "20", "--quiet"]) == 0
    out = tmp_path / "c.npz"
    assert (
        main(
            [
                "sample",
                str(tmp_path / "base"),
                "-n",
                "4",
                "--steps",
                "5",
                "--then",
                str(runs / "sr"),
                "--save",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert np.load(out)["images"].shape == (4, 1, 8, 8)
    code, err = run_cli(capsys, "sample", runs / "dc", "-n", "2", "--then", runs / "sr", "--out", tmp_path / "bad.png")
    assert code == 2 and "upscales 1x4x4 images" in err and not (tmp_path / "bad.png").exists()
    code, err = run_cli(capsys, "upscale", runs / "dc", "--clean", digits / "x.npz")
    assert code == 2 and "is not a super-resolution run" in err
