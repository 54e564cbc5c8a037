"""A trained run, loaded: the base of every kind's object (runs/kinds.py names which one a kind loads as).

    run = difflab.load("runs/digits")          # whatever kind it is: DiffusionRun, ClassifierRun, ...
    run.config, run.path, run.net, run.step, run.fingerprint

A ``Run`` holds its config and its network with the EMA weights of the newest checkpoint (``ema=False``:
the raw weights), in eval mode and frozen. ``Kind.load(path)`` loads a run of that kind, or of a kind whose class
specialises it (``DiffusionRun.load`` of a distilled student gives a StudentRun), and refuses another kind in
one line that says what the run is and how it is used."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .config import RunConfig, load_config
from .kinds import RunKindError
from .shipped import locate
from .store import load_into, load_weights, weights_fingerprint, weights_step


class Run:
    """A run folder with its config and its network (see the module doc). Subclasses add what their kind does."""

    kinds: ClassVar[tuple[str, ...]] = ()  # the run kinds this class loads
    what: ClassVar[str] = "a run"

    def __init__(self, path: str | Path, config: RunConfig, net: nn.Module):
        self.path, self.config, self.net = Path(path), config, net.eval().requires_grad_(False)

    @classmethod
    def load(cls, path: str | Path, *, ema: bool = True, device: str | torch.device | None = None) -> Run:
        path = locate(path)  # a shipped model's name: its folder in the package
        config = load_config(path)
        check_kind(config, path, cls)
        net = config.build_net()
        load_into(net, load_weights(path, "ema" if ema else "net"), path)
        own = config.kind.run  # a kind whose class specialises this one loads as its own (a student as a StudentRun)
        run = (own if isinstance(own, type) and issubclass(own, cls) else cls)(path, config, net)
        return run.to(device) if device is not None else run

    def to(self, device: str | torch.device) -> Run:
        self.net.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.net.parameters()), torch.empty(0)).device

    @cached_property
    def step(self) -> int:
        """The training step of the loaded weights."""
        return weights_step(self.path)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the loaded weights file (16 hex digits): which weights a derived run was made from."""
        return weights_fingerprint(self.path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, {self.config.run_kind}, {self.config.dataset})"


def check_kind(config: RunConfig, path, cls: type[Run]) -> None:
    """Refuse a run of a kind ``cls`` does not load, saying what it is and how it is used."""
    own = config.kind.run
    if config.run_kind in cls.kinds or (isinstance(own, type) and issubclass(own, cls)):
        return
    kind = config.kind
    use = f" ({kind.use.format(run=path)})" if kind.use else ""
    raise RunKindError(f"{path} is {kind.what}, not {cls.what}{use}")
