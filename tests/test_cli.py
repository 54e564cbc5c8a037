"""Bad input: one clear error line, a non-zero exit, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from difflab.checkpoint import latest_checkpoint
from difflab.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip()
    return code, err


def test_data_export_roundtrip(tmp_path, capsys):
    code, _ = run_cli(capsys, "data", "swissroll", "--n", "300", "--seed", "1", "--save", str(tmp_path / "d.npz"), "--out", str(tmp_path / "d.png"))
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
    code, err = run_cli(capsys, *[a.format(run=run) for a in argv], "--out" if argv[0] == "sample" else "--quiet", *( [str(tmp_path / "s.png")] if argv[0] == "sample" else []))
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
    p = subprocess.run([sys.executable, "-m", "difflab", "sample", str(tmp_path / "x"), "--steps", "5"], capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"difflab: error: run directory {tmp_path / 'x'} does not exist"]


def test_wrong_suffix(capsys, tiny_toy_run, tmp_path):
    code, err = run_cli(capsys, "sample", str(tiny_toy_run), "--save", str(tmp_path / "s.txt"))
    assert code == 2 and "expected a file ending in .npz" in err


def test_refuses_to_overwrite_a_run(capsys, tiny_toy_run):
    code, err = run_cli(capsys, "train", "swissroll", "--out", str(tiny_toy_run), "--steps", "5", "--quiet")
    assert code == 2 and "--resume" in err
