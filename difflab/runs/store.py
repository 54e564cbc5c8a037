"""A run directory's checkpoints, and nothing in them that could run code when read.

    RUN/config.json                         the RunConfig (runs/config.py)
    RUN/checkpoints/step-00001500/          one checkpoint, committed by one atomic rename:
        model.safetensors                   weights and EMA weights ("net.*", "ema.*"), the step in metadata
        optimizer.safetensors               the optimizer's tensors (Adam moments, step counts)
        state.json                          step, optimizer hyper-parameters, data position, grad scaler
    RUN/metrics.jsonl, loss.png, samples.png
    RUN/best/                               with --eval-every: the best EMA weights so far, a run of their own

A checkpoint is written into a hidden temporary folder beside the others and renamed to its final name
only when every file is complete and synced, so a kill at any moment leaves the previous checkpoint
whole and resumable; the newest ``keep`` checkpoints are kept. Nothing is ever unpickled: tensors are
safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_dir, file_sha256
from .config import CONFIG, CheckpointError
from .shipped import locate

CHECKPOINTS = "checkpoints"
WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
KEEP = 2  # complete checkpoints kept per run
BEST, BEST_JSON = "best", "best.json"  # RUN/best: the best EMA weights by --eval-every (save_best)


# --------------------------------------------------------------------------- checkpoints


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run (or shipped model), oldest first, as (step, folder)."""
    folder = locate(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None


def has_checkpoint(run_dir: str | Path) -> bool:
    return latest_checkpoint(run_dir) is not None


def _require_checkpoint(run_dir: str | Path) -> Path:
    folder = latest_checkpoint(run_dir)
    if folder is None:
        if (Path(run_dir) / "train_state.pt").exists():
            raise CheckpointError(
                f"{run_dir} is a run of an older difflab (train_state.pt, a pickle, which is never loaded); train it "
                "again"
            )
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS} holds no checkpoint yet (was the run started?)")
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    net: nn.Module,
    ema: nn.Module,
    optimizer: dict | None = None,
    state: dict | None = None,
    keep: int = KEEP,
) -> Path:
    """Write checkpoint ``step`` (weights, the optimizer's state_dict, JSON-ready ``state``) atomically.

    Files go to a hidden temporary folder, are synced, and the folder is renamed into place in one step;
    older checkpoints beyond the newest ``keep`` are then removed."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors = {f"net.{k}": v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        tensors |= {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"step": str(step)})
        opt_tensors, opt_meta = _flatten_optimizer(optimizer or {"state": {}, "param_groups": []})
        save_file(opt_tensors, str(tmp / OPTIMIZER), metadata={"step": str(step)})
        (tmp / STATE).write_text(json.dumps({"step": step, "optimizer": opt_meta, **(state or {})}, indent=1))
        for name in (WEIGHTS, OPTIMIZER, STATE):
            _fsync(tmp / name)
        _fsync(tmp)  # the folder's entries too, so a renamed folder is never empty after a power loss
        if final.exists():  # only a leftover of a run that was not cleared (training starts a run afresh)
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*"):  # leftovers of a writer killed mid-write (ours was just renamed)
        shutil.rmtree(stale, ignore_errors=True)
    return final


def save_best(run_dir: str | Path, step: int, ema: nn.Module, scores: dict) -> Path:
    """RUN/best: the EMA weights of ``step`` as a run of their own (config.json, checkpoints/step-N/model.safetensors
    with the EMA weights only, as a shipped model, and best.json with ``scores``), so that every command that takes
    a run takes RUN/best. Written beside and swapped in whole (io.atomic_dir): a kill leaves the old or the new one."""
    run_dir = Path(run_dir)
    with atomic_dir(run_dir / BEST, replace=True) as tmp:
        (tmp / CHECKPOINTS / f"step-{step:08d}").mkdir(parents=True)
        shutil.copyfile(run_dir / CONFIG, tmp / CONFIG)
        tensors = {f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
        save_file(tensors, str(tmp / CHECKPOINTS / f"step-{step:08d}" / WEIGHTS), metadata={"step": str(step)})
        (tmp / BEST_JSON).write_text(json.dumps({"step": step, **scores}, indent=1) + "\n")
    return run_dir / BEST


def best_record(run_dir: str | Path) -> dict | None:
    """RUN/best/best.json (the step and the scores of the best checkpoint so far), or None."""
    try:
        record = json.loads((Path(run_dir) / BEST / BEST_JSON).read_text())
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def clear_checkpoints(run_dir: str | Path) -> None:
    """Remove a run's checkpoints (and its best weights): a run started afresh in a used folder must not resume the
    old one."""
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(Path(run_dir) / BEST, ignore_errors=True)


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    """An optimizer state_dict as safetensors tensors ('state.<param>.<key>') and a JSON-ready rest."""
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta["state"].setdefault(str(idx), {})[key] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, rest in meta["state"].items():
        state.setdefault(int(idx), {}).update(rest)
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else dict(g) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is corrupt or not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def load_training_state(run_dir: str | Path) -> tuple[int, dict, dict]:
    """(step, optimizer state_dict, the rest of state.json) of the newest checkpoint; nothing is unpickled."""
    folder = _require_checkpoint(run_dir)
    try:
        state = json.loads((folder / STATE).read_text())
        step = int(state.pop("step"))
        opt_meta = state.pop("optimizer")
        int(state["batches"]["epoch"]), int(state["batches"]["index"]), int(state["batches"]["seed"])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / STATE} is missing or corrupt ({type(e).__name__})") from None
    if weights_step(run_dir) != step:
        raise CheckpointError(f"cannot resume: {folder} holds weights and training state of different steps")
    return step, _unflatten_optimizer(_load_tensors(folder / OPTIMIZER), opt_meta), state


def load_weights(run_dir: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The state_dict of 'net' or 'ema' from the newest checkpoint, with a clear error when missing or corrupt."""
    tensors = _load_tensors(_require_checkpoint(run_dir) / WEIGHTS)
    prefix = f"{which}."
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not state and which == "net" and any(k.startswith("ema.") for k in tensors):
        raise CheckpointError(f"{run_dir} holds its EMA weights only (a shipped model): load it with its EMA weights")
    return state


def weights_fingerprint(run_dir: str | Path) -> str:
    """SHA-256 of the newest checkpoint's weights file (16 hex digits): which weights a derived run (a CLIP
    encoder's user, a personalised run, an adapter) was made from."""
    return file_sha256(_require_checkpoint(run_dir) / WEIGHTS)[:16]


def weights_step(run_dir: str | Path) -> int:
    """The training step recorded in the newest checkpoint's model.safetensors."""
    path = _require_checkpoint(run_dir) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["step"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is missing or corrupt ({e})") from None


def load_into(net: nn.Module, state: dict, run_dir) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"the weights in {run_dir} do not match its {CONFIG}: {first}") from None
