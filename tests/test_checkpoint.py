"""Checkpoints: nothing unpickled, crash-consistent at every file write, SIGTERM, config validation."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from difflab.cli import main
from difflab.data.toy2d import make_toy
from difflab.runs.config import CheckpointError, load_config
from difflab.runs.presets import preset_for
from difflab.runs.store import checkpoints, latest_checkpoint, load_weights, weights_step
from difflab.training.loop import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def small(steps=10, every=5):
    cfg = preset_for("swissroll")
    return replace(cfg, train=replace(cfg.train, steps=steps, batch_size=16, checkpoint_every=every, warmup=2))


class Payload:
    """Unpickling this would create a file: the marker that code from a run directory ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_in_a_run_is_refused_without_running(tmp_path):
    run, marker, data = tmp_path / "run", tmp_path / "pwned", make_toy("swissroll", 200, seed=1)
    train(run, small(), data, progress=False)
    (latest_checkpoint(run) / "optimizer.safetensors").write_bytes(pickle.dumps({"state": Payload(marker)}))
    with pytest.raises(CheckpointError, match="optimizer.safetensors is corrupt or not a safetensors file"):
        train(run, small(steps=20), data, resume=True, progress=False)
    # an old-style train_state.pt (a pickle) is named, never loaded
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((run / "config.json").read_text())
    (legacy / "train_state.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="train_state.pt, a pickle, which is never loaded"):
        train(legacy, small(), data, resume=True, progress=False)
    assert not marker.exists()


def crash(run, crash_at: int, report) -> int:
    """Train ``run`` in a forked child (the modules already imported, so each try costs its training alone) that
    dies like SIGKILL (os._exit, no clean-up) at file operation ``crash_at`` of the step-15 checkpoint (0: never),
    after writing the number of those operations to ``report``; returns the child's exit status."""
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    try:
        from pathlib import Path

        import difflab.runs.store as ckpt

        count, saving = [0], [False]

        def writes(fn):  # count the file operations of a checkpoint; die (no clean-up, like SIGKILL) at one of them
            def wrapped(*a, **k):
                if saving[0]:
                    count[0] += 1
                    if count[0] == crash_at:
                        os._exit(9)
                return fn(*a, **k)

            return wrapped

        ckpt.save_file, ckpt._fsync = writes(ckpt.save_file), writes(ckpt._fsync)
        Path.write_text, Path.rename = writes(Path.write_text), writes(Path.rename)
        original = ckpt.save_checkpoint

        def save(run_dir, step, *a, **k):
            saving[0] = step == 15
            return original(run_dir, step, *a, **k)

        ckpt.save_checkpoint = save
        train(run, small(30, 5), make_toy("swissroll", 200, seed=1), progress=False)
        os.write(os.open(report, os.O_WRONLY | os.O_CREAT), str(count[0]).encode())
        os._exit(0)
    except BaseException:  # noqa: BLE001 - the child never returns into pytest
        os._exit(1)


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_a_kill_at_any_file_write_of_a_checkpoint_leaves_a_resumable_run(tmp_path):
    data = make_toy("swissroll", 200, seed=1)
    straight = tmp_path / "straight"
    train(straight, small(30, 5), data, progress=False)
    assert crash(tmp_path / "count", 0, tmp_path / "writes") == 0
    n_writes = int((tmp_path / "writes").read_text())
    assert n_writes >= 6  # two safetensors, state.json, three fsyncs, the rename(s)
    for k in range(1, n_writes + 1):
        run = tmp_path / f"crash{k}"
        assert crash(run, k, tmp_path / "unused") == 9, k
        step = weights_step(run)
        assert step in (10, 15), (k, step)  # the previous checkpoint, or the new one if it was already renamed
        train(run, small(30, 5), data, resume=True, progress=False)
        a, b = load_weights(straight, "net"), load_weights(run, "net")
        assert all(torch.equal(a[key], b[key]) for key in a), k
        assert not list((run / "checkpoints").glob(".step-*"))  # the dead writer's leftovers were cleared


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_sigterm_checkpoints_and_exits_with_the_resume_command(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "difflab",
        "train",
        "swissroll",
        "--out",
        str(run),
        "--steps",
        "1000000",
        "--checkpoint-every",
        "1000000",
        "--quiet",
    ]
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (
        (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip()
    ):
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGTERM
    lines = err.strip().splitlines()
    assert (
        len(lines) == 1
        and "stopped by SIGTERM at step" in lines[0]
        and f"difflab train --out {run} --resume" in lines[0]
    )
    step = int(lines[0].split("at step ")[1].split(";")[0])
    assert step >= 50 and weights_step(run) == step and [s for s, _ in checkpoints(run)] == [step]
    last_logged = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert last_logged == step
    assert main(["train", "--out", str(run), "--resume", "--steps", str(step + 3), "--quiet"]) == 0
    assert weights_step(run) == step + 3


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(colour="red"), "unknown field 'colour' in config"),
        (lambda d: d["train"].update(stpes=5), "unknown field 'stpes' in train"),
        (lambda d: d["train"].update(steps="many"), "train.steps must be int, got 'many'"),
        (lambda d: d["train"].update(lr=True), "train.lr must be float, got True"),
        (lambda d: d["process"].update(kind="vpx"), "unknown process kind 'vpx'"),
        (lambda d: d.update(net_kind="transformer"), "unknown net_kind 'transformer'"),
        (lambda d: d["net"].update(width=3), "unknown field 'width' in net"),
        (
            lambda d: d.update(conditions=[{"name": "class_labels", "null_label": 10}]),
            "the mlp of this config takes no conditions",
        ),
        (lambda d: d.pop("shape"), "config lacks 'shape'"),
        (lambda d: d.update(shape=[[2]]), "shape must be a list of integers"),
        (lambda d: d["train"].update(checkpoint_every=0), "train.checkpoint_every must be positive, got 0"),
        (lambda d: d["train"].update(sample_every=-1), "train.sample_every must be 0"),
    ],
)
def test_a_bad_config_gives_one_line_and_exit_2(tiny_toy_run, tmp_path, capsys, edit, needle):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_toy_run, run)
    d = json.loads((run / "config.json").read_text())
    edit(d)
    (run / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config(run)
    out = tmp_path / "s.png"
    assert main(["sample", str(run), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: error: ") and "config.json" in err[0] and needle in err[0]
    assert not out.exists()


def test_a_fresh_run_in_a_used_folder_does_not_resume_the_old_one(tmp_path):
    data = make_toy("swissroll", 200, seed=1)
    train(tmp_path / "r", small(20, 5), data, progress=False)
    train(tmp_path / "r", small(6, 3), data, progress=False)
    assert [s for s, _ in checkpoints(tmp_path / "r")] == [3, 6] and weights_step(tmp_path / "r") == 6


def test_a_torn_metrics_row_does_not_stop_a_resume(tmp_path):
    data = make_toy("swissroll", 200, seed=1)
    cfg = replace(small(10, 5), train=replace(small(10, 5).train, log_every=1))
    train(tmp_path / "r", cfg, data, progress=False)
    log = tmp_path / "r" / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 11, "lo')  # a kill in the middle of a row
    train(tmp_path / "r", replace(cfg, train=replace(cfg.train, steps=12)), data, resume=True, progress=False)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(1, 13))


def test_a_label_condition_must_use_the_networks_null_class():
    from difflab.core.conditions import class_labels
    from difflab.runs.presets import PRESETS as IMAGE_PRESETS

    cfg = replace(IMAGE_PRESETS["digits"], net=replace(IMAGE_PRESETS["digits"].net, num_classes=10))
    replace(cfg, conditions=[class_labels(10)]).validate()
    with pytest.raises(CheckpointError, match="null_label 3 must be the network's num_classes"):
        replace(cfg, conditions=[class_labels(3)]).validate()
