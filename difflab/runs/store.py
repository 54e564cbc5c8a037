"""A run directory, and nothing in it that could run code when read.

    RUN/config.json                         every dataclass needed to rebuild the denoiser (RunConfig)
    RUN/checkpoints/step-00001500/          one checkpoint, committed by one atomic rename:
        model.safetensors                   weights and EMA weights ("net.*", "ema.*"), the step in metadata
        optimizer.safetensors               the optimizer's tensors (Adam moments, step counts)
        state.json                          step, optimizer hyper-parameters, data position, grad scaler
    RUN/metrics.jsonl, loss.png, samples.png

A checkpoint is written into a hidden temporary folder beside the others and renamed to its final name
only when every file is complete and synced, so a kill at any moment leaves the previous checkpoint
whole and resumable; the newest ``keep`` checkpoints are kept. Nothing is ever unpickled: tensors are
safetensors, everything else JSON. ``load_config`` validates config.json field by field and raises
``CheckpointError`` (one line) for an unknown field, a wrong type or an unknown process or network kind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.conditions import ConditionError, ConditionSpec, check_accepted, condition_names
from ..io import atomic_path, file_sha256
from ..core.losses import AutoencoderLoss, ClassifierLoss, NoiseAugmented, SimpleLoss
from ..nets.autoencoder import Autoencoder, AutoencoderConfig
from ..nets.classifier import ClassifierConfig, NoisyClassifier
from ..nets.mlp import MLP, MLPConfig
from ..nets.unet import UNet, UNetConfig
from ..core.parameterize import TARGETS, Denoiser
from ..nets.text import Clip, ClipConfig
from ..text.encoders import ContrastiveLoss
from ..core.processes import PROCESSES_BY_NAME as PROCESSES
from ..core.processes import Process

CONFIG, CHECKPOINTS = "config.json", "checkpoints"
WEIGHTS, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")
KEEP = 2  # complete checkpoints kept per run
DATA_KINDS = ("points", "images")

NETS: dict[str, tuple[type, type[nn.Module]]] = {
    "mlp": (MLPConfig, MLP), "unet": (UNetConfig, UNet), "classifier": (ClassifierConfig, NoisyClassifier),
    "autoencoder": (AutoencoderConfig, Autoencoder), "clip": (ClipConfig, Clip),
}
AUG_MAX = 0.2  # super-resolution runs: the largest std of the noise added to low_res in training
CLASSIFIERS = ("classifier",)  # nets that predict their data's labels: the label condition is their target, not an input
AUTOENCODERS = ("autoencoder",)  # nets trained by the same loop that are not denoisers (autoencoder.py)
AUXILIARY = {"autoencoder": AutoencoderLoss, "clip": ContrastiveLoss}  # every such net, with its loss


class CheckpointError(ValueError):
    """A run directory or config that is missing, incomplete, corrupt or invalid."""


# --------------------------------------------------------------------------- configs


def process_to_dict(process: Process) -> dict:
    kind = next(k for k, cls in PROCESSES.items() if type(process) is cls)
    return {"kind": kind, **{f.name: getattr(process, f.name) for f in fields(process) if f.init}}


def process_from_dict(d: dict) -> Process:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in PROCESSES:
        raise CheckpointError(f"unknown process kind {kind!r}; choose one of {', '.join(PROCESSES)}")
    try:
        return PROCESSES[kind](**d)
    except TypeError as e:
        raise CheckpointError(f"process {kind!r}: {e}") from None


@dataclass
class TrainConfig:
    """How a run trains. Saved in config.json; --resume reads it back.

    The global batch is batch_size x world size x accumulation: batch_size is per process and per
    micro-batch."""

    steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accumulation: int = 1
    ema_decay: float = 0.995
    ema_warmup: bool = False  # True: decay min(ema_decay, (1 + step) / (10 + step)), see training.ema_decay_at
    precision: str = "fp32"  # "bf16" (autocast on CPU and CUDA) or "fp16" (CUDA, with a gradient scaler)
    seed: int = 0
    checkpoint_every: int = 1000
    sample_every: int = 0  # 0: only at the end
    log_every: int = 50


@dataclass
class RunConfig:
    """Everything needed to rebuild a trained denoiser, generate from it and continue its training.

    shape       the shape of one sample in the space the denoiser works in, e.g. [2] or [1, 28, 28]
    kind        what a sample is: 'points' or 'images' (how it is shown and saved)
    conditions  the conditions the model takes (ConditionSpec fields), [] for an unconditional model
    """

    dataset: str
    process: dict
    net_kind: str
    net: dict
    shape: list[int]
    kind: str
    target: str = "eps"
    loss: dict = field(default_factory=lambda: asdict(SimpleLoss()))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict = field(default_factory=dict)  # e.g. {"n": 20000, "seed": 1} or {"data_dir": ...}
    conditions: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if not isinstance(self.shape, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.shape):
            raise CheckpointError(f"config: shape must be a list of integers, got {self.shape!r}")
        self.shape = list(self.shape)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Validate and build; every problem is a one-line CheckpointError naming the field."""
        d = dict(_checked(cls, d, "config"))
        d["train"] = TrainConfig(**_checked(TrainConfig, d.get("train", {}), "train"))
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.kind not in DATA_KINDS:
            raise CheckpointError(f"config: kind must be one of {DATA_KINDS}, got {self.kind!r}")
        if not self.shape or any(s <= 0 for s in self.shape):
            raise CheckpointError(f"config: shape must be positive sizes, got {self.shape}")
        if self.target not in TARGETS:
            raise CheckpointError(f"config: unknown target {self.target!r}; choose one of {TARGETS}")
        if self.net_kind not in NETS:
            raise CheckpointError(f"config: unknown net_kind {self.net_kind!r}; choose one of {', '.join(NETS)}")
        t = self.train
        for name in ("steps", "batch_size", "accumulation", "checkpoint_every", "log_every"):
            if getattr(t, name) <= 0:
                raise CheckpointError(f"config: train.{name} must be positive, got {getattr(t, name)}")
        if t.sample_every < 0:
            raise CheckpointError(f"config: train.sample_every must be 0 (at the end only) or positive, got {t.sample_every}")
        self.build_process()
        try:
            AUXILIARY.get(self.net_kind, SimpleLoss)(**self.loss)
            specs = self.condition_specs()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config: {e}") from None
        for spec in specs:  # the U-Net's null class is its extra embedding row, index num_classes
            if spec.name == "class_labels" and self.net_kind == "unet" and spec.null_label != self.net.get("num_classes"):
                raise CheckpointError(f"config: class_labels' null_label {spec.null_label} must be the network's num_classes ({self.net.get('num_classes')})")
        net = self.build_net()
        if self.net_kind in CLASSIFIERS:
            if [s.name for s in specs] != ["class_labels"] or specs[0].p_drop != 0:
                raise CheckpointError("config: a classifier's conditions must be its labels: class_labels with p_drop 0")
            if specs[0].null_label != net.config.num_classes:
                raise CheckpointError(f"config: class_labels' null_label {specs[0].null_label} must be the classifier's num_classes ({net.config.num_classes})")
            return
        try:
            check_accepted(condition_names(specs), getattr(net, "accepts", frozenset()), f"the {self.net_kind} of this config")
        except ConditionError as e:
            raise CheckpointError(f"config: {e}") from None

    def condition_specs(self) -> list[ConditionSpec]:
        return [ConditionSpec(**c) for c in self.conditions]

    def build_process(self) -> Process:
        try:
            return process_from_dict(self.process)
        except ValueError as e:
            raise CheckpointError(f"config: {e}") from None

    def build_net(self) -> nn.Module:
        config_cls, net_cls = NETS[self.net_kind]
        try:
            cfg = config_cls.from_dict(self.net) if hasattr(config_cls, "from_dict") else config_cls(**_checked(config_cls, self.net, "net"))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config: net: {str(e).splitlines()[0]}") from None
        net = net_cls(cfg)
        if "lora" in self.data:  # a LoRA run (difflab personalize --method lora): the base network with adapters
            from ..personalize.method import LoraSpec, with_lora

            net = with_lora(net, LoraSpec.from_dict(self.data["lora"]))
        return net

    def build_loss(self):
        """The run's loss: the denoising loss (with noise augmentation of low_res for super-resolution runs),
        or the cross-entropy for a classifier."""
        if self.net_kind in CLASSIFIERS:
            return ClassifierLoss()
        if self.net_kind in AUXILIARY:
            return AUXILIARY[self.net_kind](**self.loss)
        loss = SimpleLoss(**self.loss)
        if "factor" in self.data:
            return NoiseAugmented(loss, self.data.get("aug_max", AUG_MAX))
        return loss

    def build_denoiser(self) -> Denoiser:
        return Denoiser(self.build_net(), self.build_process(), self.target)


def _checked(cls, d, where: str) -> dict:
    """``d`` as keyword arguments of dataclass ``cls``: unknown fields and plainly wrong types raise."""
    if not isinstance(d, dict):
        raise CheckpointError(f"config: {where} must be an object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise CheckpointError(f"config: unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in {where} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    for name, value in d.items():
        if not _type_ok(value, hints[name]):
            raise CheckpointError(f"config: {where}.{name} must be {_type_name(hints[name])}, got {value!r}")
    missing = [n for n, f in known.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise CheckpointError(f"config: {where} lacks {', '.join(map(repr, missing))}")
    return d


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    base = origin or hint
    if hint is type(None):
        return value is None
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(base, type) and base is not typing.Any:
        return isinstance(value, base) or (base is TrainConfig and isinstance(value, dict))
    return True


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def save_config(run_dir: Path, config: RunConfig) -> None:
    with atomic_path(Path(run_dir) / CONFIG) as tmp:
        tmp.write_text(config.to_json())


def load_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {run_dir} is not a difflab run (train one with `difflab train`)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    try:
        return RunConfig.from_dict(d)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {str(e).removeprefix('config: ')}") from None


# --------------------------------------------------------------------------- checkpoints


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints of a run, oldest first, as (step, folder)."""
    folder = Path(run_dir) / CHECKPOINTS
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
            raise CheckpointError(f"{run_dir} is a run of an older difflab (train_state.pt, a pickle, which is never loaded); train it again")
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINTS} holds no checkpoint yet (was the run started?)")
    return folder


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, step: int, net: nn.Module, ema: nn.Module, optimizer: dict | None = None,
                    state: dict | None = None, keep: int = KEEP) -> Path:
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


def clear_checkpoints(run_dir: str | Path) -> None:
    """Remove a run's checkpoints: a run started afresh in a used folder must not resume the old one."""
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)


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
        raise CheckpointError(f"{path} is corrupt or not a safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


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
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


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


def load_denoiser(run_dir: str | Path, ema: bool = True, classifier: bool = False) -> tuple[Denoiser, RunConfig]:
    """Rebuild a trained denoiser from a run directory alone (no training arguments needed); a classifier
    run (behind the same wrapper) only when ``classifier``."""
    config = load_config(run_dir)
    if config.net_kind in AUTOENCODERS:
        raise CheckpointError(f"{run_dir} is an autoencoder run, not a denoiser (train a latent model on it with `difflab train DATASET --latent {run_dir}`)")
    if config.net_kind == "clip":
        raise CheckpointError(f"{run_dir} is a CLIP run, not a denoiser (condition a model on it with `difflab train DATASET --text clip:{run_dir}`)")
    if (config.net_kind in CLASSIFIERS) != classifier:
        raise CheckpointError(f"{run_dir} is a noise-aware classifier run, not a denoiser (use it with --classifier)" if not classifier else
                              f"{run_dir} is a denoiser run, not a classifier (train one with `difflab train-classifier`)")
    denoiser = config.build_denoiser()
    load_into(denoiser.net, load_weights(run_dir, "ema" if ema else "net"), run_dir)
    return denoiser.eval(), config


def load_into(net: nn.Module, state: dict, run_dir) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"the weights in {run_dir} do not match its {CONFIG}: {first}") from None
