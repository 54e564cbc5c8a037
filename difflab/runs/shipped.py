"""Models that ship ready: finished runs inside the package, loadable by name wherever a run folder is taken.

    difflab.load("fashion-pairs-t2i").sample(4, prompt="a red sneaker on the left and a blue bag on the right")
    difflab sample fashion-pairs-t2i --prompt "..."      difflab models      (the list, with recipes and figures)

A shipped model is a run folder under difflab/shipped/NAME/ in the usual layout (config.json, one checkpoint)
holding its EMA weights only, plus recipe.json: the commands that trained it, its steps and training time,
the fingerprint of the run it was copied from and of its shipped weights file, and the figures measured on it.
A run that depends on another (a latent model on its autoencoder) records the other by its shipped name, so
the package can live anywhere. Names resolve only when no folder of that name exists (a user's ``./NAME``
wins). Shipped folders are read-only: a run to be written (``--out``) is always a folder, never a name, and
training, personalising or evaluating a shipped model writes elsewhere, never into the package.

``runs.ship.ship`` makes a shipped folder from a finished run (benchmarks/ship_models.py calls it)."""

from __future__ import annotations

import json
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped"
RECIPE = "recipe.json"


class ShippedError(ValueError):
    """A shipped model asked for something it cannot do (be written, give raw weights)."""


def names() -> list[str]:
    """The shipped models' names, sorted."""
    if not SHIPPED_DIR.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_DIR.iterdir() if (p / RECIPE).is_file())


def locate(path: str | Path) -> Path:
    """``path`` itself when it is a folder or not a shipped model's name; the shipped folder otherwise."""
    p = Path(path)
    if p.is_dir() or os.sep in str(path) or str(path) not in names():
        return p
    return SHIPPED_DIR / str(path)


def from_record(record: str | Path) -> Path:
    """Where a run that another run recorded (``recorded_path``: a shipped model by its bare name, anything else
    absolute) lives. A bare name is always the shipped model: a folder of that name in the working directory,
    which wins for a name a user types (``locate``), does not shadow what a run was trained on."""
    r = str(record)
    if not Path(r).is_absolute() and os.sep not in r and r in names():
        return SHIPPED_DIR / r
    return Path(r)


def is_shipped(path: str | Path) -> bool:
    """Whether ``path`` (a name or a folder) is a shipped model's folder."""
    try:
        return locate(path).resolve().parent == SHIPPED_DIR
    except OSError:
        return False


def recorded_path(path: str | Path) -> str:
    """How a derived run records the run it depends on: a shipped model by its name, anything else absolute."""
    p = locate(path)
    return p.name if is_shipped(p) else str(p.resolve())


def refuse_writes(path: str | Path, what: str) -> None:
    """A clear error when the folder ``path`` is inside the package's shipped models. A run to be written is
    always a folder: ``--out NAME`` writes ./NAME, never the shipped model of that name."""
    p = Path(path).resolve()
    if p.parent == SHIPPED_DIR.resolve() or SHIPPED_DIR.resolve() in p.parents:
        raise ShippedError(
            f"{path} is a shipped model and is never written; {what} with --out DIR (e.g. --init-from {p.name})"
        )


def recipe(name: str) -> dict:
    """The recipe.json of the shipped model ``name``."""
    if name not in names():
        raise ShippedError(f"no shipped model {name!r}; shipped: {', '.join(names()) or 'none'}")
    return json.loads((SHIPPED_DIR / name / RECIPE).read_text())


def said_steps(recipe: dict) -> str:
    """A recipe's training steps as said to a user: ``N``, or ``N1 + N2`` for a recipe trained in stages (each
    stage from the run before it; ``stage_steps``)."""
    return " + ".join(str(n) for n in recipe.get("stage_steps", [recipe["steps"]]))


def recorded_scale(path: str | Path) -> float | None:
    """The best guidance scale a shipped model's recipe records (its figures' ``scale``), None for any other run."""
    if not is_shipped(path):
        return None
    scale = recipe(Path(path).name).get("figures", {}).get("scale")
    return None if scale is None else float(scale)


def catalogue() -> list[dict]:
    """Every shipped model's recipe, with its folder's size in bytes."""
    out = []
    for name in names():
        folder = SHIPPED_DIR / name
        out.append(recipe(name) | {"bytes": sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())})
    return out
