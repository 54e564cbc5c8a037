"""Reproducible, resumable minibatches: the data order is a pure function of (seed, epoch).

A ``TensorDataset`` holds the examples (uint8 images, kept so in memory, or float points) and their
conditions; ``ShuffledBatches`` draws the indices of each (global) batch. Under data parallelism every
process draws the same global batch of indices and takes its own shard of them (training.py), so the
order does not depend on the number of processes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import to_model


@dataclass
class TensorDataset:
    """Examples ``x`` (N, ...) and named conditions, each (N, ...); ``take`` yields ``(x, cond)``.

    uint8 examples are images in 0..255 and come out as floats in [-1, 1]."""

    x: Tensor
    cond: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        if len(self.x) == 0:
            raise ValueError("the dataset is empty")
        self.cond = {k: v for k, v in self.cond.items() if v is not None}
        for name, value in self.cond.items():
            if len(value) != len(self.x):
                raise ValueError(f"condition {name!r} has {len(value)} rows for {len(self.x)} examples")

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.x[idx]
        return (to_model(x) if x.dtype == torch.uint8 else x), {k: v[idx] for k, v in self.cond.items()}


class ShuffledBatches:
    """An endless iterator over the indices of shuffled minibatches of a dataset of ``n`` examples.

    Each epoch's permutation comes from a generator seeded with (seed, epoch), so the position
    (epoch, index) is all the state there is: ``state_dict``/``load_state_dict`` resume the exact
    data order after a crash. The ragged tail of an epoch is dropped (equal-size batches)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if n <= 0:
            raise ValueError("the dataset is empty")
        if batch_size > n:
            raise ValueError(
                f"the global batch ({batch_size}) is larger than the dataset ({n} examples); use a smaller --batch-size"
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> Tensor:
        if self.index + self.batch_size > self.n:
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return idx

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self._perm = self._permutation()
