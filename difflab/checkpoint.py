"""A run directory: config.json (every dataclass needed to rebuild), model.safetensors (weights and EMA
weights), train_state.pt (optimizer, RNG and data-order state for --resume). Each file is written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_path
from .losses import SimpleLoss
from .nets.mlp import MLP, MLPConfig
from .nets.unet import UNet, UNetConfig
from .parameterize import Denoiser
from .processes import PROCESSES_BY_NAME as PROCESSES
from .processes import Process

CONFIG, WEIGHTS, STATE = "config.json", "model.safetensors", "train_state.pt"

NETS: dict[str, tuple[type, type[nn.Module]]] = {"mlp": (MLPConfig, MLP), "unet": (UNetConfig, UNet)}


class CheckpointError(ValueError):
    """A run directory that is missing, incomplete or corrupt."""


def process_to_dict(process: Process) -> dict:
    kind = next(k for k, cls in PROCESSES.items() if type(process) is cls)
    return {"kind": kind, **{f.name: getattr(process, f.name) for f in fields(process) if f.init}}


def process_from_dict(d: dict) -> Process:
    d = dict(d)
    return PROCESSES[d.pop("kind")](**d)


@dataclass
class TrainConfig:
    """How a run trains. Saved in config.json; --resume reads it back."""

    steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    accumulation: int = 1
    ema_decay: float = 0.995
    ema_warmup: bool = False  # True: decay min(ema_decay, (1 + step) / (10 + step)), see training.ema_decay_at
    precision: str = "fp32"  # or "bf16" (CPU autocast)
    seed: int = 0
    checkpoint_every: int = 1000
    sample_every: int = 0  # 0: only at the end
    log_every: int = 50


@dataclass
class RunConfig:
    """Everything needed to rebuild a trained denoiser and continue its training."""

    dataset: str
    process: dict
    net_kind: str
    net: dict
    target: str = "eps"
    loss: dict = field(default_factory=lambda: asdict(SimpleLoss()))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict = field(default_factory=dict)  # e.g. {"n": 20000, "seed": 1} or {"data_dir": ...}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        d["train"] = TrainConfig(**d["train"])
        return cls(**d)

    def build_process(self) -> Process:
        return process_from_dict(self.process)

    def build_net(self) -> nn.Module:
        config_cls, net_cls = NETS[self.net_kind]
        cfg = config_cls.from_dict(self.net) if hasattr(config_cls, "from_dict") else config_cls(**self.net)
        return net_cls(cfg)

    def build_denoiser(self) -> Denoiser:
        return Denoiser(self.build_net(), self.build_process(), self.target)


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
        return RunConfig.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from None


def save_weights(run_dir: Path, net: nn.Module, ema: nn.Module, step: int) -> None:
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()}
    with atomic_path(Path(run_dir) / WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"step": str(step)})


def load_weights(run_dir: str | Path, which: str = "ema") -> dict[str, torch.Tensor]:
    """The state_dict of 'net' or 'ema' from model.safetensors, with a clear error when missing or corrupt."""
    path = Path(run_dir) / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{path} is missing: the run has no checkpoint yet")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None
    prefix = f"{which}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def weights_step(run_dir: str | Path) -> int:
    """The training step recorded in model.safetensors' metadata."""
    path = Path(run_dir) / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["step"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path} is missing or corrupt ({e})") from None


def load_denoiser(run_dir: str | Path, ema: bool = True) -> tuple[Denoiser, RunConfig]:
    """Rebuild a trained denoiser from a run directory alone (no training arguments needed)."""
    config = load_config(run_dir)
    denoiser = config.build_denoiser()
    state = load_weights(run_dir, "ema" if ema else "net")
    try:
        denoiser.net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{Path(run_dir) / WEIGHTS} does not match {CONFIG}: {first}") from None
    return denoiser.eval(), config
