"""Trackers (training/trackers.py): TensorBoard's curves equal metrics.jsonl, a resumed run logs no step twice, wandb
is opened offline under one id per run, and a missing package or a bad choice is refused in one line."""

from __future__ import annotations

import json
import shutil
import sys
import types

import pytest

from difflab.cli import main
from difflab.runs import store
from difflab.training import trackers
from difflab.training.trackers import Tracker, make_tracker, read_state, tag

TOY = ("train", "swissroll", "--n", "500", "--steps", "20", "--batch-size", "64", "--checkpoint-every", "10")


def rows(run, key="loss"):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if key in r]


def set_log_every(run, every: int) -> None:
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"]["log_every"] = every
    (run / "config.json").write_text(json.dumps(cfg))


def tensorboard_scalars(folder, name: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(name)]


def test_tensorboard_resumed_run_continues_the_same_curve(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "toy"
    # a run whose newest checkpoint is older than its last logged step: what a kill between the two leaves
    assert main([*TOY, "--out", str(run), "--steps", "10", "--tracker", "tensorboard", "--quiet"]) == 0
    set_log_every(run, 2)
    assert main(["train", "--out", str(run), "--resume", "--steps", "20", "--quiet", "--no-preview"]) == 0
    logged = rows(run)
    shutil.rmtree(store.checkpoints(run)[-1][1])  # step 20's checkpoint lost: resume from step 10
    assert store.checkpoints(run)[-1][0] == 10
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-preview"]) == 0  # keeps its tracker
    assert read_state(run)["kind"] == "tensorboard"
    curve = tensorboard_scalars(run / "tensorboard", "train/loss")
    steps = [s for s, _ in curve]
    assert steps == sorted(set(steps)), "a step logged twice"
    assert steps == [r["step"] for r in rows(run)] == [r["step"] for r in logged]
    assert [v for _, v in curve] == pytest.approx([r["loss"] for r in rows(run)], rel=1e-6)
    assert [r["loss"] for r in rows(run)] == [r["loss"] for r in logged]  # the resumed steps recompute the same loss
    assert [s for s, _ in tensorboard_scalars(run / "tensorboard", "train/grad_norm")] == steps


def test_fresh_run_in_the_same_folder_starts_new_curves(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "toy"
    for _ in range(2):
        assert main([*TOY, "--out", str(run), "--tracker", "tensorboard", "--force", "--quiet", "--no-preview"]) == 0
    steps = [s for s, _ in tensorboard_scalars(run / "tensorboard", "train/loss")]
    assert steps == [r["step"] for r in rows(run)]


class FakeWandb(types.ModuleType):
    """Records what the tracker asks of wandb (init's arguments, every log call)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logs = [], []

    def init(self, **kw):
        self.inits.append(kw)
        fake = self

        class Run:
            def log(self, values, step):
                fake.logs.append((step, values))

            def finish(self):
                pass

        return Run()

    def Image(self, array):
        return ("image", array.shape)


def test_wandb_is_offline_under_one_id_and_logs_no_step_twice(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(trackers, "_wandb_logged_in", lambda: False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(trackers, "installed", lambda package: True)
    run = tmp_path / "toy"
    assert main([*TOY, "--out", str(run), "--tracker", "wandb", "--quiet", "--no-preview"]) == 0
    set_log_every(run, 2)
    assert main(["train", "--out", str(run), "--resume", "--steps", "30", "--quiet", "--no-preview"]) == 0
    shutil.rmtree(store.checkpoints(run)[-1][1])  # resume from step 20, after steps 22..30 were logged
    assert main(["train", "--out", str(run), "--resume", "--quiet", "--no-preview"]) == 0
    assert [i["mode"] for i in fake.inits] == ["offline"] * 3
    assert len({i["id"] for i in fake.inits}) == 1 and fake.inits[0]["resume"] == "allow"
    assert fake.inits[0]["dir"] == str(run) and fake.inits[0]["config"]["dataset"] == "swissroll"
    steps = [s for s, v in fake.logs if "train/loss" in v]
    assert steps == [r["step"] for r in rows(run)] == sorted(set(steps))


def test_wandb_offline_run_is_written_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "toy"
    assert main([*TOY, "--out", str(run), "--tracker", "wandb", "--quiet", "--no-preview"]) == 0
    run_id = read_state(run)["id"]
    assert list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_refusals(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        main([*TOY, "--out", str(tmp_path / "a"), "--tracker", "mlflow"])
    assert e.value.code == 2
    monkeypatch.setattr(trackers, "installed", lambda package: package != "wandb")
    assert main([*TOY, "--out", str(tmp_path / "b"), "--tracker", "wandb", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "difflab: error: --tracker wandb needs the wandb package: pip install 'difflab[tracker]'"
    assert not (tmp_path / "b").exists()  # refused before anything was written


class Recording(Tracker):
    kind = "recording"

    def _open(self, config, fresh):
        self.logged = []

    def _log_scalars(self, step, values):
        self.logged.append((step, values))


def test_tracker_state_and_tags(tmp_path):
    t = Recording()
    t.start(tmp_path, None, 0, fresh=True)
    t.scalars(10, {"step": 10, "loss": 0.5})
    t.scalars(10, {"loss": 0.6})  # the same step again: skipped
    t.scalars(10, {"eval/fd": 3.0}, group="eval")  # another group at the same step: logged
    assert read_state(tmp_path) == {"kind": "recording", "last": {"train": 10, "eval": 10}}
    assert t.logged == [(10, {"loss": 0.5}), (10, {"eval/fd": 3.0})]
    none = Tracker()  # no tracker: nothing written on the hot path, an earlier tracker's state forgotten when fresh
    none.start(tmp_path, None, 0, fresh=True)
    none.scalars(20, {"loss": 0.4})
    assert not (tmp_path / "tracker.json").exists()
    assert (tag("loss"), tag("fd"), tag("eval/kid")) == ("train/loss", "eval/fd", "eval/kid")
    assert make_tracker("none").kind == "none"
