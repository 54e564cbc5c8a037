"""The runs a studio serves: every run folder directly under the runs folder, and the shipped models.

A run is named by its folder's name alone: ``check_name`` refuses path components, hidden names and anything
that resolves outside the runs folder (a symbolic link pointing elsewhere), so a request can never make the
studio read or write outside it. Shipped models (runs/shipped.py) are listed by name when no folder shadows them.

A run that makes images lists the LoRA runs of the folder trained over its very weights (``adapters``): an
adapter's ``adapter.safetensors`` records its base's weights fingerprint, the one the library checks when it loads
the adapter (personalize/adapters.py), and the run's own is that of its newest weights
(runs.store.weights_fingerprint)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..personalize.adapters import ADAPTER
from ..runs import shipped
from ..runs.config import CheckpointError, load_config
from ..runs.store import WEIGHTS, latest_checkpoint, weights_fingerprint, weights_step

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STUDIO_DIR = ".studio"  # the studio's own files inside the runs folder: history.sqlite, images/
GENERATES = (
    "diffusion",
    "personalized",
    "distilled",
)  # the run kinds that make images (a student with its own sampler)
MAX_METRICS = 400  # points of a loss curve sent to the page


class NotFound(ValueError):
    """A run name that is not a run of this studio (unknown, or not a plain name)."""


def check_name(name: str) -> str:
    """``name`` when it is a plain folder name (letters, digits, '.', '_', '-'; no '/' or leading dot), or NotFound."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise NotFound(f"no run named {str(name)[:80]!r} (a run is named by its folder's name, without any path)")
    return name


class RunsFolder:
    """The runs folder of a studio: resolves names to run folders inside it, lists and describes them."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path(self, name: str) -> Path:
        """The folder of run ``name``: inside the runs folder (symbolic links may not leave it), or a shipped model."""
        check_name(name)
        p = self.root / name
        if p.is_dir():
            if p.resolve().parent != self.root or not (p / "config.json").is_file():
                raise NotFound(f"no run named {name!r} in {self.root}")
            return p
        if name in shipped.names():
            return shipped.SHIPPED_DIR / name
        raise NotFound(f"no run named {name!r} in {self.root}")

    def names(self) -> list[str]:
        """Every run folder directly under the runs folder, then the shipped models no folder shadows."""
        found = (
            sorted(
                p.name
                for p in self.root.iterdir()
                if NAME.match(p.name) and (p / "config.json").is_file() and p.resolve().parent == self.root
            )
            if self.root.is_dir()
            else []
        )
        return found + [n for n in shipped.names() if n not in found]

    def listing(self) -> list[dict]:
        """Every run's summary; a run that makes images with ``adapters``, the LoRA runs trained over its weights."""
        runs = [self.summary(n) for n in self.names()]
        bases = {r["name"]: r["adapter_base"] for r in runs if r.get("adapter_base")}
        for r in runs:
            if r.get("generates"):
                own = self.fingerprint(r["name"]) if bases else None
                r["adapters"] = [a for a, base in bases.items() if base == own]
        return runs

    def fingerprint(self, name: str) -> str | None:
        """The fingerprint of a run's newest weights (hashed once per file version), None without readable weights."""
        try:
            return weights_fingerprint(self.path(name))
        except (CheckpointError, OSError):
            return None

    def summary(self, name: str) -> dict:
        """What the Runs panel shows of a run: kind, data, conditions, shapes, steps, parameter count, pictures."""
        path = self.path(name)
        try:
            cfg = load_config(path)
        except (ValueError, OSError) as e:
            return {"name": name, "error": _line(e), "generates": False}
        checkpoint = latest_checkpoint(path)
        text = cfg.text_spec() is not None
        return {
            "name": name,
            "shipped": shipped.is_shipped(path),
            "kind": cfg.run_kind,
            "generates": cfg.run_kind in GENERATES and cfg.data_kind == "images" and cfg.super_resolution is None,
            "dataset": Path(cfg.dataset).name if "/" in cfg.dataset else cfg.dataset,
            "data_kind": cfg.data_kind,
            "conditions": [c.name for c in cfg.conditions],
            "text": text,
            "classes": cfg.num_classes,
            "latent": cfg.latent is not None,
            "super_resolution": cfg.super_resolution is not None,  # it takes upscale jobs alone
            "factor": None if cfg.super_resolution is None else cfg.super_resolution.factor,
            "adapter": cfg.lora is not None,  # a LoRA run: its adapters load over its base run (``lora`` of a job)
            "adapter_base": _adapter_base(path)
            if cfg.lora is not None
            else None,  # its base's fingerprint, once exported
            "shape": cfg.data_shape,
            "steps_trained": weights_step(path) if checkpoint else 0,
            "steps_planned": cfg.train.steps,
            "parameters": _parameter_count(checkpoint / WEIGHTS) if checkpoint else 0,
            "pictures": [f for f in ("samples.png", "loss.png") if (path / f).is_file()],
        }

    def _rows(self, name: str) -> list[dict]:
        """metrics.jsonl's rows with an integer step (a line being written right now is skipped)."""
        rows = []
        f = self.path(name) / "metrics.jsonl"
        if f.is_file():
            for line in f.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(r, dict) and isinstance(r.get("step"), int):
                    rows.append(r)
        return rows

    def metrics(self, name: str) -> list[dict]:
        """The training curve of a run from its metrics.jsonl: (step, loss) rows, thinned to MAX_METRICS points."""
        rows = [
            {"step": r["step"], "loss": float(r["loss"])}
            for r in self._rows(name)
            if isinstance(r.get("loss"), (int, float))
        ]
        every = max(1, -(-len(rows) // MAX_METRICS))
        return rows[::every] + (rows[-1:] if rows and (len(rows) - 1) % every else [])

    def evals(self, name: str) -> list[dict]:
        """The quality rows of ``--eval-every`` (step, score, its name: 'fd' or 'energy' for points, the best step so
        far, the nearest-training distance over the real images' where measured), in step order."""
        out = []
        for r in self._rows(name):
            key = next((k for k in ("fd", "energy") if isinstance(r.get(k), (int, float))), None)
            if key is not None:
                ratio = r.get("nn_ratio")
                out.append(
                    {
                        "step": r["step"],
                        "metric": key,
                        "value": float(r[key]),
                        "best_step": r.get("best_step"),
                        "nn_ratio": float(ratio) if isinstance(ratio, (int, float)) else None,
                    }
                )
        return out[-MAX_METRICS:]

    def picture(self, name: str, file: str) -> Path:
        """One of a run's pictures (samples.png, loss.png), nothing else."""
        if file not in ("samples.png", "loss.png"):
            raise NotFound(f"a run's pictures are samples.png and loss.png, not {file[:80]!r}")
        p = self.path(name) / file
        if not p.is_file():
            raise NotFound(f"{name} has no {file} yet")
        return p


def _adapter_base(run: Path) -> str | None:
    """The base weights' fingerprint an exported adapter records (its file's header alone), None before export."""
    try:
        with safe_open(str(run / ADAPTER), framework="pt") as f:
            return (f.metadata() or {}).get("base_fingerprint")
    except (SafetensorError, OSError):
        return None


def _parameter_count(weights: Path) -> int:
    """The EMA network's parameter count, from the safetensors header alone (no tensor is read)."""
    with safe_open(str(weights), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("ema."))  # noqa: SIM118 (a safetensors handle)


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
