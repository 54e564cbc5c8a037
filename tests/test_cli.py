"""Bad input: one clear error line, a non-zero exit, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from difflab.cli import main
from difflab.runs.store import latest_checkpoint


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def test_data_export_roundtrip(tmp_path, capsys):
    code, _ = run_cli(
        capsys,
        "data",
        "swissroll",
        "--n",
        "300",
        "--seed",
        "1",
        "--save",
        str(tmp_path / "d.npz"),
        "--out",
        str(tmp_path / "d.png"),
    )
    assert code == 0
    pts = np.load(tmp_path / "d.npz")["points"]
    assert pts.shape == (300, 2)
    again = tmp_path / "e.npz"
    run_cli(capsys, "data", "swissroll", "--n", "300", "--seed", "1", "--save", str(again))
    np.testing.assert_array_equal(pts, np.load(again)["points"])  # same seed, same points
    assert (tmp_path / "d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_dataset(capsys, tmp_path):
    code, err = run_cli(capsys, "data", "swissrol", "--save", str(tmp_path / "x.npz"))
    assert code == 2
    assert err.count("\n") == 0 and "swissrol" in err and "swissroll" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["sample", "{run}", "--sampler", "nope"], "unknown sampler 'nope'"),
        (["sample", "{run}", "--steps", "0"], "must be a positive integer"),
        (["sample", "{run}", "--steps", "-3"], "must be a positive integer"),
        (["sample", "{run}", "--eta", "1.5"], "must be in [0, 1]"),
        (["sample", "{run}", "--eta", "-0.1"], "must be in [0, 1]"),
        (["train", "no-such-set", "--out", "{run}"], "no-such-set"),
    ],
)
def test_bad_options(capsys, tmp_path, argv, needle):
    run = tmp_path / "run"
    code, err = run_cli(
        capsys,
        *[a.format(run=run) for a in argv],
        "--out" if argv[0] == "sample" else "--quiet",
        *([str(tmp_path / "s.png")] if argv[0] == "sample" else []),
    )
    assert code != 0
    assert needle in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "s.png").exists()


def test_missing_run(capsys, tmp_path):
    code, err = run_cli(capsys, "sample", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.png"))
    assert code == 2 and err == f"difflab: error: run directory {tmp_path / 'nothing'} does not exist"
    assert not (tmp_path / "s.png").exists()


def test_corrupt_checkpoint(capsys, tiny_toy_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_toy_run, run)
    w = latest_checkpoint(run) / "model.safetensors"
    w.write_bytes(w.read_bytes()[: len(w.read_bytes()) // 2])
    code, err = run_cli(capsys, "sample", str(run), "--out", str(tmp_path / "s.png"), "--save", str(tmp_path / "s.npz"))
    assert code == 2 and "model.safetensors is corrupt" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "s.npz").exists()

    (run / "config.json").write_text("{not json")
    code, err = run_cli(capsys, "sample", str(run))
    assert code == 2 and "config.json is corrupt" in err


def test_missing_weights(capsys, tiny_toy_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_toy_run, run)
    (latest_checkpoint(run) / "model.safetensors").unlink()
    code, err = run_cli(capsys, "sample", str(run))
    assert code == 2 and "model.safetensors is missing" in err


def test_exit_status_from_shell(tmp_path):
    """The installed entry point exits non-zero with one line on stderr."""
    p = subprocess.run(
        [sys.executable, "-m", "difflab", "sample", str(tmp_path / "x"), "--steps", "5"], capture_output=True, text=True
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"difflab: error: run directory {tmp_path / 'x'} does not exist"]


def test_wrong_suffix(capsys, tiny_toy_run, tmp_path):
    code, err = run_cli(capsys, "sample", str(tiny_toy_run), "--save", str(tmp_path / "s.txt"))
    assert code == 2 and "expected a file ending in .npz" in err


def test_refuses_to_overwrite_a_run(capsys, tiny_toy_run):
    code, err = run_cli(capsys, "train", "swissroll", "--out", str(tiny_toy_run), "--steps", "5", "--quiet")
    assert code == 2 and "--resume" in err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "swissroll", "--out", "{run}", "--resume", "--lr", "5"], "drop train.lr=5.0 (saved: 0.002)"),
        (["train", "moons", "--out", "{run}", "--resume"], "drop NAME 'moons' (the run trains 'swissroll')"),
        (["train", "--out", "{run}", "--resume", "--target", "eps"], "drop target 'eps' (saved: 'v')"),
        (["train", "--out", "{run}", "--resume", "--class-cond"], "--cond class (the run is not class-conditional)"),
        (
            ["train", "--out", "{run}", "--resume", "--init-from", "{run}"],
            "--init-from (a resumed run keeps its weights)",
        ),
        (["train", "swissroll", "--out", "{tmp}/new", "--class-cond"], "--cond class needs an image run"),
        (["train", "swissroll", "--out", "{tmp}/new", "--cond-dropout", "0.2"], "--p-uncond needs a conditional model"),
        (
            ["train", "swissroll", "--out", "{tmp}/new", "--precision", "fp16", "--device", "cpu"],
            "fp16 needs a CUDA device",
        ),
        (["train", "--out", "{tmp}/new"], "give the dataset NAME"),
        (["sample", "{run}", "--gif", "{tmp}/c.gif"], "--gif draws the chain of an image run"),
        (
            ["sample", "{run}", "--sampler", "euler", "--eta", "0.5"],
            "--eta is an option of the ddim sampler; 'euler' does not take it",
        ),
        (
            ["sample", "{run}", "--sampler", "ddim", "--variance", "beta_tilde"],
            "--variance is an option of the ddpm sampler",
        ),
        (
            ["sample", "{run}", "--sampler", "ddim", "--snr", "0.1"],
            "--snr is an option of the pc sampler; 'ddim' does not take it",
        ),
        (
            ["sample", "{run}", "--sampler", "heun", "--n-steps-each", "3"],
            "--n-steps-each is an option of the langevin sampler",
        ),
        (["sample", "{run}", "--sigma-cap", "0"], "--sigma-cap: must be a positive number or 'none', got 0"),
        (
            ["sample", "{run}", "--sampler", "ddim", "--sigma-cap", "80"],
            "--sigma-cap applies to the karras and logsnr spacings",
        ),
        (["sample", "{run}", "--sampler", "heun", "--sigma-cap", "1e-9"], "the sigma cap must exceed sigma/alpha"),
        (["sample", "{run}", "--class-label", "3"], "is unconditional; train with --cond class"),
        (
            ["trajectories", "{run}", "--out", "{tmp}/t.png", "--gif", "{tmp}/t.gif"],
            "--gif and --forward are for image runs",
        ),
        (["features", "train", "swissroll", "--out", "{tmp}"], "swissroll"),
    ],
)
def test_cli_cases_give_one_line_and_exit_2(capsys, tmp_path, tiny_toy_run, argv, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_toy_run, run)
    before = sorted(p.name for p in run.rglob("*"))
    argv = [a.format(run=run, tmp=tmp_path) for a in argv]
    code, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "s.png")] if argv[0] == "sample" else []))
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in run.rglob("*")) == before  # the run is untouched
    assert not (tmp_path / "s.png").exists() and not (tmp_path / "new").exists()


def test_sample_options_reach_the_sampler(capsys, tiny_toy_run, tmp_path):
    """DDIM's eta, DDPM's variance and the sigma cap change the samples (they are not dropped)."""

    def draw(*extra):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}.npz"
        code, err = run_cli(
            capsys, "sample", str(tiny_toy_run), "--n", "50", "--steps", "10", "--save", str(path), "--quiet", *extra
        )
        assert code == 0, err
        return np.load(path)["points"]

    assert np.abs(draw("--sampler", "ddim") - draw("--sampler", "ddim", "--eta", "1")).max() > 1e-3
    assert np.abs(draw("--sampler", "ddpm") - draw("--sampler", "ddpm", "--variance", "beta_tilde")).max() > 1e-3
    assert np.abs(draw("--sampler", "dpmpp-2m") - draw("--sampler", "dpmpp-2m", "--sigma-cap", "none")).max() > 1e-3
    np.testing.assert_array_equal(
        draw("--sampler", "dpmpp-2m"), draw("--sampler", "dpmpp-2m", "--sigma-cap", "80")
    )  # 80 is the default


def test_folder_presets_are_sized_like_the_built_in_ones(tmp_path):
    from difflab.data.images import save_npz
    from difflab.runs.presets import PRESETS as IMAGE_PRESETS
    from difflab.runs.presets import preset_for

    for size, like in ((28, "fashion-mnist"), (8, "digits")):
        path = tmp_path / f"set{size}.npz"
        save_npz(path, np.zeros((20, size, size), dtype=np.uint8))
        cfg = preset_for(str(path))
        assert (
            cfg.net == IMAGE_PRESETS[like].net
            and cfg.shape == [1, size, size]
            and cfg.train == IMAGE_PRESETS[like].train
        )
