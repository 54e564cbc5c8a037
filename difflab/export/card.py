"""A model card: ``README.md`` in a run folder and in every export, written from what the folder holds.

    write_model_card("runs/digits", command="difflab train digits --out runs/digits")   # RUN/README.md
    print(model_card("fashion-mnist-classes"))                                        # any run, or a shipped name

What it reads: config.json (the data, kind, conditions, network, process, recipe), the newest checkpoint's
header (step, parameter count: no tensor is loaded), metrics.jsonl (the last loss, the training time from each
log row's it/s, the last value of any other figure logged, e.g. FD), best.json of ``--eval-every``, a shipped
model's recipe.json (its commands, time and figures) and the pictures beside (samples.png, loss.png).

The command that trained the run is what ``write_model_card`` is given, else what an earlier card recorded,
else a shipped recipe's, else one reconstructed from config.json (and said so). Writing is atomic and cheap
(no network is built), so the training loop may call it at the end of every run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import safe_open

from ..io import atomic_path
from ..runs.config import RunConfig, load_config, process_to_dict
from ..runs.shipped import RECIPE, locate, said_steps
from ..runs.store import WEIGHTS, latest_checkpoint

CARD = "README.md"
PICTURES = ("samples.png", "loss.png")  # shown in the card where the folder has them
BEST_JSON = Path("best") / "best.json"  # the best checkpoint of --eval-every and its scores
# the loop's own columns, and --eval-every's bookkeeping (its time, the best step so far); any other is a figure
LOG_KEYS = {"step", "loss", "grad_norm", "lr", "it_s", "eval_seconds", "best_step"}
RECONSTRUCTED = "reconstructed from config.json: the command itself was not recorded"
_COMMAND = re.compile(r"^## Command\n\n```\n(?P<command>[^\n]+)\n```\n(?P<note>\(.*\)\n)?", re.MULTILINE)


def write_model_card(run_dir: str | Path, command: str | None = None) -> Path:
    """Write ``RUN/README.md`` (``model_card``), atomically; returns its path."""
    run_dir = Path(run_dir)
    path = run_dir / CARD
    text = model_card(run_dir, command)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def model_card(run_dir: str | Path, command: str | None = None, extra: str = "") -> str:
    """The card of the run in ``run_dir`` (a folder or a shipped model's name) as Markdown; ``extra`` is appended
    (an export's own section)."""
    folder = locate(run_dir)
    cfg = load_config(folder)
    recipe = _json(folder / RECIPE) or {}
    name = recipe.get("name") or folder.resolve().name
    command, reconstructed = recorded_command(folder, cfg, command, recipe)
    lines = [f"# {name}", "", _summary(cfg, recipe), "", "## Model", ""]
    lines += [f"- {k}: {v}" for k, v in _model(cfg, folder).items()]
    lines += ["", "## Training", ""]
    lines += [f"- {k}: {v}" for k, v in _training(cfg, folder, recipe).items()]
    figures = _figures(folder, recipe)
    if figures:
        lines += ["", "## Figures", ""]
        lines += [f"- {k}: {_number(v)}" for k, v in figures.items()]
    pictures = [p for p in PICTURES if (folder / p).is_file()]
    if pictures:
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in pictures]
    lines += ["", "## Command", "", "```", command, "```"]
    if reconstructed:
        lines.append(f"({RECONSTRUCTED})")
    lines += ["", "## Use", "", "```", *_use(cfg, str(run_dir)), "```", ""]
    return "\n".join(lines) + (f"\n{extra.rstrip()}\n" if extra else "")


def recorded_command(folder: Path, cfg: RunConfig, command: str | None, recipe: dict) -> tuple[str, bool]:
    """(the command that trained the run, whether it was reconstructed from the config) (see the module doc)."""
    if command:
        return command, False
    if (folder / CARD).is_file():
        m = _COMMAND.search((folder / CARD).read_text(errors="replace"))
        if m and not m.group("note"):
            return m.group("command"), False
    if recipe.get("commands"):
        return " && ".join(recipe["commands"]), False
    return _reconstructed(cfg, folder), True


def _reconstructed(cfg: RunConfig, folder: Path) -> str:
    """A ``difflab`` command of the run's main choices (its kind's training command, data, conditions, steps)."""
    parts = ["difflab", cfg.kind.command, cfg.dataset]
    if cfg.num_classes is not None:
        parts += ["--cond", "class"]
    if cfg.super_resolution is not None:
        parts += ["--cond", "low-res", "--factor", str(cfg.super_resolution.factor)]
    if cfg.latent is not None:
        parts += ["--latent", cfg.latent.autoencoder]
    if cfg.text is not None:
        parts += ["--text", f"clip:{cfg.text.run}" if cfg.text.kind == "clip" else cfg.text.kind]
    parts += ["--out", str(folder), "--steps", str(cfg.train.steps), "--batch-size", str(cfg.train.batch_size)]
    return " ".join(parts)


def _summary(cfg: RunConfig, recipe: dict) -> str:
    what = recipe.get("what") or f"{cfg.kind.what} on {cfg.dataset}"
    return f"A difflab model: {what}. This card was written by difflab from the run folder."


def _model(cfg: RunConfig, folder: Path) -> dict[str, str]:
    net = cfg.net
    size = _parameters(folder)
    layout = (
        f"U-Net, base {net.base_channels} channels x {list(net.channel_mults)}, {net.num_res_blocks} block(s) per "
        f"level, attention at {list(net.attention_resolutions) or 'no level'}"
        if cfg.net_kind == "unet"
        else cfg.net_kind
    )
    rows = {
        "kind": f"{cfg.run_kind} ({cfg.kind.what})",
        "data": f"{cfg.dataset}, {cfg.data_kind} of shape {'x'.join(map(str, cfg.data_shape))}",
        "conditions": _conditions(cfg),
        "network": layout + (f", {size / 1e6:.2f} M parameters" if size else ""),
    }
    if cfg.latent is not None:
        rows["latent space"] = (
            f"the autoencoder {cfg.latent.autoencoder} ({'x'.join(map(str, cfg.shape))} latents, scale "
            f"{cfg.latent.scale:.4g})"
        )
    if cfg.run_kind in ("diffusion", "personalized", "distilled"):
        fields = process_to_dict(cfg.process)
        kind = fields.pop("kind")
        said = ", ".join(f"{k}={v}" for k, v in fields.items())
        rows["process"] = f"{kind} ({said}); the network predicts {cfg.target}" + (
            ", and its reverse variance" if cfg.variance == "learned" else ""
        )
    return rows


def _conditions(cfg: RunConfig) -> str:
    said = []
    for c in cfg.conditions:
        if c.name == "class_labels":
            said.append(f"class labels 0..{c.null_label - 1} (dropped {c.p_drop:.0%} of the time for guidance)")
        elif c.name in ("context", "tokens") and cfg.text is not None:
            said.append(f"a caption read by the {cfg.text.kind} text encoder (dropped {c.p_drop:.0%})")
        elif c.name == "low_res" and cfg.super_resolution is not None:
            said.append(f"a {cfg.super_resolution.factor}x downsampled image (super-resolution)")
        else:
            said.append(c.name)
    return "; ".join(said) or "none (unconditional)"


def _parameters(folder: Path) -> int | None:
    """The parameter count of the newest checkpoint's EMA weights, from the file's header alone."""
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        return None
    try:
        with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
            keys = [k for k in f.keys() if k.startswith("ema.")]
            return sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    except Exception:  # a torn or foreign file: the card says nothing of the size
        return None


def _training(cfg: RunConfig, folder: Path, recipe: dict) -> dict[str, str]:
    t = cfg.train
    rows = _log_rows(folder / "metrics.jsonl")
    step = _step(folder)
    rows_out = {
        "steps": f"{step if step is not None else '?'} of {t.steps}"
        + (f" (the last of its stages: {said_steps(recipe)})" if "stage_steps" in recipe else ""),
        "recipe": f"batch {t.batch_size}, lr {t.lr:g} ({t.lr_schedule}), EMA {t.ema_decay:g}, {t.precision}, "
        f"seed {t.seed}"
        + (f", augment {t.augment}" if t.augment != "none" else "")
        + (
            f", {t.caption_variants} caption variant{'s' if t.caption_variants > 1 else ''}"
            + (f" ({t.caption_words})" if t.caption_words != "dataset" else "")
            if t.caption_variants
            else ""
        ),
    }
    seconds = recipe.get("train_seconds") or _seconds(rows)
    if seconds:
        rows_out["training time"] = (f"about {_duration(seconds)}" if seconds >= 1 else _duration(seconds)) + (
            "" if recipe.get("train_seconds") else " (metrics.jsonl's it/s)"
        )
    losses = [r for r in rows if "loss" in r]
    if losses:
        rows_out["last loss"] = f"{losses[-1]['loss']:.4f} (step {losses[-1].get('step')})"
    return rows_out


def _step(folder: Path) -> int | None:
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        return None
    try:
        with safe_open(str(ckpt / WEIGHTS), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:
        return None


def _log_rows(path: Path) -> list[dict]:
    """metrics.jsonl's rows (a torn last line is skipped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _seconds(rows: list[dict]) -> float:
    """Training time from the log: each row's steps since the previous row at that row's rate (it/s)."""
    total, last = 0.0, 0
    for row in rows:
        step, rate = row.get("step"), row.get("it_s")
        if not isinstance(step, (int, float)) or not isinstance(rate, (int, float)) or rate <= 0:
            continue
        if step > last:
            total += (step - last) / rate
        last = step
    return total


def _figures(folder: Path, recipe: dict) -> dict:
    """The figures measured on the run: a shipped recipe's, the last of each non-loop column of metrics.jsonl
    (e.g. FD from --eval-every), and best.json's."""
    figures = dict(recipe.get("figures") or {})
    last = {}
    for row in _log_rows(folder / "metrics.jsonl"):
        last |= {k: (row.get("step"), v) for k, v in row.items() if k not in LOG_KEYS and isinstance(v, (int, float))}
    figures |= {f"{k} (step {step})": v for k, (step, v) in last.items()}
    best = _json(folder / BEST_JSON)
    if best:
        figures |= {f"best {k}": v for k, v in best.items() if isinstance(v, (int, float))}
    return figures


def _use(cfg: RunConfig, run: str) -> list[str]:
    if cfg.run_kind not in ("diffusion", "personalized", "distilled"):
        return [f"difflab.load({run!r})"]
    asks = " --class 3" if cfg.num_classes is not None else ' --prompt "..."' if cfg.text is not None else ""
    return [f"difflab sample {run}{asks} --out samples.png", f"difflab export {run} --format onnx --out export"]


def _json(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


def _number(v) -> str:
    """A figure as written in a card; a table of figures (per phrasing, say) as its entries, ``name value; ...``."""
    if isinstance(v, dict):
        return "; ".join(f"{k} {_number(x)}" for k, x in v.items())
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under 1 s"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
