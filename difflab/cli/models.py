"""`difflab models`: the models that ship ready, with their recipes and measured figures.

    difflab models                  # a table: name, what it is, steps (of each stage), training time, size, figures
    difflab models NAME             # one model's recipe: the commands that trained it, fingerprints, figures

Any command that takes a run folder takes a shipped model's name (runs/shipped.py)."""

from __future__ import annotations

import json

from ..runs import shipped
from ..runs.config import load_config
from ..runs.shipped import catalogue, recipe, said_steps
from ..text.encoders import describe_text
from .options import UsageError


def _figures(r: dict) -> str:
    """The recipe's figures on one line; a table of figures (per phrasing, say) by its name and size alone."""
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} ({len(v)} figures)" if isinstance(v, dict) else f"{k} {v}"
        for k, v in r.get("figures", {}).items()
    )


def run(args) -> None:
    if args.name:
        try:
            print(json.dumps(recipe(args.name), indent=2))
        except ValueError as e:
            raise UsageError(str(e)) from None
        return
    models = catalogue()
    if not models:
        print("no shipped models in this installation")
        return
    for m in models:
        minutes = f"{m['train_seconds'] / 60:.0f} min" if m.get("train_seconds") else "-"
        print(f"{m['name']}: {m.get('what', '')}")
        print(f"    {said_steps(m)} steps, trained {minutes}, {m['bytes'] / 2**20:.1f} MiB; {_figures(m)}")
        reads = describe_text(load_config(shipped.SHIPPED_DIR / m["name"]))
        if reads:
            print(f"    reads captions with {reads}")
        for c in m.get("commands", []):
            print(f"    $ {c}")


def register(sub) -> None:
    p = sub.add_parser("models", help="list the shipped models (loadable by name wherever a run folder is taken)")
    p.add_argument("name", nargs="?", help="one shipped model: print its recipe")
    p.set_defaults(func=run)
