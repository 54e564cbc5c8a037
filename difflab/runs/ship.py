"""Making a shipped model (runs/shipped.py says what one is) from a finished run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from ..io import atomic_path, file_sha256
from . import shipped
from .config import CONFIG, load_config
from .store import STEP_DIR, WEIGHTS, _require_checkpoint, load_weights, weights_fingerprint, weights_step


def ship(
    run: str | Path,
    name: str,
    recipe: dict,
    *,
    config: dict | None = None,
    extra_files: tuple[str, ...] = (),
    root: Path | None = None,
) -> Path:
    """Copy the finished ``run`` into root/NAME (default difflab/shipped/NAME) as a shipped model: ``config`` (the
    run's config as a dict, rewritten by the caller where it names other runs; its steps set to the shipped step),
    the EMA weights of its newest
    checkpoint, ``extra_files`` of the run folder, and ``recipe`` with the fingerprints added. Written to a
    temporary folder and renamed, so a kill leaves the old shipped model or the new one."""
    run = Path(run)
    root = shipped.SHIPPED_DIR if root is None else Path(root)
    cfg = config if config is not None else json.loads((run / CONFIG).read_text())
    load_config(run)  # a readable run
    step = weights_step(run)
    with safe_open(str(_require_checkpoint(run) / WEIGHTS), "pt") as f:
        meta = dict(f.metadata() or {})
    cfg = cfg | {
        "train": {**cfg["train"], "steps": step}
    }  # finished at the step it ships (a run stopped by --max-minutes too)
    ema = {f"ema.{k}": v.contiguous() for k, v in load_weights(run, "ema").items()}
    final = root / name
    tmp = root / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    ckpt = tmp / "checkpoints" / f"step-{step:08d}"
    assert STEP_DIR.match(ckpt.name)
    ckpt.mkdir(parents=True)
    save_file(ema, str(ckpt / WEIGHTS), metadata=meta | {"shipped_from": weights_fingerprint(run)})
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    for extra in extra_files:
        shutil.copy2(run / extra, tmp / extra)
    info = {
        "name": name,
        **recipe,
        "steps": step,
        "source_fingerprint": weights_fingerprint(run),
        "weights_sha256": file_sha256(ckpt / WEIGHTS),
    }
    with atomic_path(tmp / shipped.RECIPE) as t:
        Path(t).write_text(json.dumps(info, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
