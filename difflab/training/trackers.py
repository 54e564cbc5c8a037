"""Experiment trackers: a run's scalars, sample grids and config in TensorBoard or Weights & Biases.

    difflab train digits --out runs/digits --tracker tensorboard   # then: tensorboard --logdir runs/digits/tensorboard
    difflab train digits --out runs/digits --tracker wandb         # offline unless WANDB_MODE=online or logged in

The loop (training/loop.py) calls ``start`` once it knows the step it starts from, ``scalars`` at every row it
writes to metrics.jsonl, and ``close`` at the end; the CLI's preview hook calls ``image`` after each sample grid.
Both packages are optional extras (``pip install 'difflab[tracker]'``); asking for a missing one is refused in one
line before training starts.

A resumed run continues the same curves. The tracker's choice, its id (wandb) and the last step it logged are kept
in RUN/tracker.json; a run resumed from a checkpoint older than that step recomputes the same values (resume is
exact), so the tracker skips every step it already holds instead of logging it twice. A fresh run in the same
folder (``--force``) starts new curves: a new wandb id, the old TensorBoard events removed."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..io import atomic_path

TRACKERS = ("none", "tensorboard", "wandb")
STATE = "tracker.json"
TENSORBOARD_DIR = "tensorboard"


class TrackerError(ValueError):
    """A tracker that cannot run here (its package is missing)."""


class Tracker:
    """The no-op tracker and the base of the others: ``_log_scalars``/``_log_image`` do the logging."""

    kind = "none"

    def __init__(self):
        self.run_dir: Path | None = None
        self.last: dict[str, int] = {}  # group ("train", "eval", a picture's name) -> the last step logged
        self.extra: dict = {}  # what a tracker keeps across resumes besides the step (wandb: the run id)

    def start(self, run_dir: str | Path, config, step: int, fresh: bool) -> None:
        """Open the tracker for a run that starts at ``step`` (0, or a resumed checkpoint's step)."""
        if self.kind == "none":  # nothing logged, nothing to remember; a fresh run forgets an earlier tracker
            if fresh:
                (Path(run_dir) / STATE).unlink(missing_ok=True)
            return
        self.run_dir = Path(run_dir)
        state = read_state(self.run_dir)
        if fresh or state.get("kind") != self.kind:
            state = {}
            self._clear()
        self.last = {k: int(v) for k, v in state.get("last", {}).items()}
        self.extra = {k: v for k, v in state.items() if k not in ("kind", "last")}
        self._open(config, fresh=not state)
        self._save()

    def scalars(self, step: int, values: dict[str, float], group: str = "train") -> None:
        """Log one metrics row (the loop's; ``step`` itself is not a scalar) unless this group already holds that
        step (a resumed run recomputing what the killed one logged)."""
        if step <= self.last.get(group, 0):
            return
        numbers = {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not k.endswith("step")}
        self._log_scalars(step, numbers)
        self.last[group] = step
        self._save()

    def image(self, step: int, name: str, path: str | Path) -> None:
        """Log a picture file (a sample grid) at ``step`` unless a resumed run already logged that step."""
        if step <= self.last.get(name, 0) or not Path(path).is_file():
            return
        from PIL import Image

        with Image.open(path) as im:
            self._log_image(step, name, np.asarray(im.convert("RGB")))
        self.last[name] = step
        self._save()

    def close(self) -> None:
        pass

    def _save(self) -> None:
        if self.run_dir is None:
            return
        with atomic_path(self.run_dir / STATE) as tmp:
            tmp.write_text(json.dumps({"kind": self.kind, "last": self.last, **self.extra}) + "\n")

    def _open(self, config, fresh: bool) -> None:
        pass

    def _clear(self) -> None:
        pass

    def _log_scalars(self, step: int, values: dict[str, float]) -> None:
        pass

    def _log_image(self, step: int, name: str, image: np.ndarray) -> None:
        pass


class TensorBoard(Tracker):
    """Event files in RUN/tensorboard (torch.utils.tensorboard's SummaryWriter): scalars under train/ and eval/,
    the sample grids, the config as text."""

    kind = "tensorboard"

    def _clear(self) -> None:
        shutil.rmtree(self.run_dir / TENSORBOARD_DIR, ignore_errors=True)

    def _open(self, config, fresh: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR))
        if fresh:
            self.writer.add_text("config", "```\n" + json.dumps(_config_dict(config), indent=2) + "\n```", 0)

    def _log_scalars(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(tag(key), value, step)
        self.writer.flush()

    def _log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.writer.add_image(name, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if hasattr(self, "writer"):
            self.writer.close()


class Wandb(Tracker):
    """A Weights & Biases run in RUN/wandb, resumed by its id. Offline (``wandb sync`` uploads it later) unless
    WANDB_MODE says otherwise or an API key is configured; nothing here needs the network."""

    kind = "wandb"

    def _open(self, config, fresh: bool) -> None:
        import wandb

        run_id = self.extra.setdefault("id", uuid.uuid4().hex[:12])
        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "difflab"),
            name=self.run_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=mode,
            config=_config_dict(config),
        )
        self.wandb = wandb

    def _log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log({tag(k): v for k, v in values.items()}, step=step)

    def _log_image(self, step: int, name: str, image: np.ndarray) -> None:
        self.run.log({name: self.wandb.Image(image)}, step=step)

    def close(self) -> None:
        if hasattr(self, "run"):
            self.run.finish()


KINDS = {"none": Tracker, "tensorboard": TensorBoard, "wandb": Wandb}
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def make_tracker(kind: str) -> Tracker:
    """The tracker of ``kind`` (one of TRACKERS); refused in one line when its package is not installed."""
    if kind not in KINDS:
        raise TrackerError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
    package = PACKAGES.get(kind)
    if package is not None and not installed(package):
        raise TrackerError(f"--tracker {kind} needs the {package} package: pip install 'difflab[tracker]'")
    return KINDS[kind]()


def installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def read_state(run_dir: str | Path) -> dict:
    """RUN/tracker.json ({} when absent or unreadable)."""
    try:
        state = json.loads((Path(run_dir) / STATE).read_text())
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def saved_kind(run_dir: str | Path) -> str:
    """The tracker a run was last trained with ('none' when it had none)."""
    return read_state(run_dir).get("kind", "none")


def tag(key: str) -> str:
    """The tracker's name of a metrics.jsonl column: loss, grad_norm, lr, it_s under train/, the rest under eval/."""
    return key if "/" in key else ("train/" if key in ("loss", "grad_norm", "lr", "it_s") else "eval/") + key


def _config_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)


def _wandb_logged_in() -> bool:
    """An API key in the environment or ~/.netrc (wandb login): then wandb defaults to online, as wandb itself."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
