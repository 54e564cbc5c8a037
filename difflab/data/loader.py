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

    ``rows`` (optional), by name ('x' or a condition's): long (N,), the row of that tensor each example reads, which
    then holds each distinct row once (an image with K captions stored once, not K times; a caption's token states
    once however many images it describes). uint8 examples are images in 0..255 and come out as floats in [-1, 1]."""

    x: Tensor
    cond: Mapping[str, Tensor] = field(default_factory=dict)
    rows: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self):
        self.cond = {k: v for k, v in self.cond.items() if v is not None}
        unknown = set(self.rows) - {"x", *self.cond}
        if unknown:
            raise ValueError(f"rows for {sorted(unknown)}, which the dataset does not hold")
        n = len(self.rows["x"]) if "x" in self.rows else len(self.x)
        if n == 0:
            raise ValueError("the dataset is empty")
        for name, value in {"x": self.x, **self.cond}.items():
            if name in self.rows:
                r = self.rows[name]
                if r.dtype != torch.long or r.shape != (n,) or int(r.min()) < 0 or int(r.max()) >= len(value):
                    raise ValueError(f"rows of {name!r} must be {n} indices into its {len(value)} rows")
            elif len(value) != n:
                raise ValueError(f"condition {name!r} has {len(value)} rows for {n} examples")
        self.n = n

    def __len__(self) -> int:
        return self.n

    def _pick(self, name: str, value: Tensor, idx: Tensor) -> Tensor:
        return value[self.rows[name][idx]] if name in self.rows else value[idx]

    def take(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self._pick("x", self.x, idx)
        return (to_model(x) if x.dtype == torch.uint8 else x), {k: self._pick(k, v, idx) for k, v in self.cond.items()}

    def tensors(self) -> list[Tensor]:
        """Every tensor it holds (the examples, the conditions, the rows): what moving it to a device moves."""
        return [self.x, *self.cond.values(), *self.rows.values()]

    def map(self, fn) -> TensorDataset:
        """The same dataset with ``fn`` applied to each of its tensors (e.g. moved to a device)."""
        return TensorDataset(
            fn(self.x), {k: fn(v) for k, v in self.cond.items()}, {k: fn(v) for k, v in self.rows.items()}
        )


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
