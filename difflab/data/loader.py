"""Reproducible, resumable minibatches: the data order is a pure function of (seed, epoch)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


class ShuffledBatches:
    """An endless iterator over shuffled minibatches of ``data`` (and ``labels``).

    Each epoch's permutation comes from a generator seeded with (seed, epoch), so the
    position (epoch, index) is all the state there is: ``state_dict``/``load_state_dict``
    resume the exact data order after a crash. ``transform`` maps each batch as it is drawn
    (images stay uint8 in memory and become floats in [-1, 1] one batch at a time)."""

    def __init__(self, data: Tensor, batch_size: int, seed: int = 0, labels: Tensor | None = None, transform: Callable[[Tensor], Tensor] | None = None):
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if len(data) == 0:
            raise ValueError("the dataset is empty")
        self.data, self.labels, self.transform = data, labels, transform
        self.batch_size, self.seed = min(batch_size, len(data)), seed
        self.epoch, self.index = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.data), generator=g)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[Tensor, Tensor | None]:
        if self.index + self.batch_size > len(self.data):  # drop the ragged tail: equal-size batches
            self.epoch, self.index = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        x = self.data[idx]
        return (self.transform(x) if self.transform else x), (self.labels[idx] if self.labels is not None else None)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.index = state["seed"], state["epoch"], state["index"]
        self._perm = self._permutation()
