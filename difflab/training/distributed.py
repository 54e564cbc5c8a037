"""Devices and data-parallel processes: the training loop and ``generate`` read this, nothing else does.

One process is the default. Under ``torchrun`` (which sets RANK, WORLD_SIZE, LOCAL_RANK and
MASTER_ADDR/PORT) ``setup`` joins the job with PyTorch's process group: gloo on the CPU, NCCL on CUDA.

    torchrun --nproc-per-node 2 -m difflab train digits --out runs/digits-ddp
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m difflab train ...
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank 0 of 1 when not distributed."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when present, else the CPU), 'cpu' or 'cuda'; under torchrun CUDA is cuda:LOCAL_RANK."""
    if name not in DEVICES and not str(name).startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} asked for, but this machine has no CUDA GPU (torch {torch.__version__}); use --device cpu"
        )
    if name in ("auto", "cuda"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


def setup(device: torch.device) -> World:
    """Join the torchrun job when there is one (WORLD_SIZE > 1); else a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # torchrun's store outlives a restart (--max-restarts), and so do the addresses the killed
        # attempt's ranks wrote to it: a restarted rank could read a dead peer's address and fail to
        # connect. Keys under a per-attempt prefix are always the live attempt's.
        store, rank, size = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            store=dist.PrefixStore(f"difflab/attempt-{attempt}/", store),
            rank=rank,
            world_size=size,
        )
    return World(dist.get_rank(), dist.get_world_size())


def teardown() -> None:
    """Leave the process group (all ranks together), so no rank exits while another still talks to it."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave(code: int) -> None:
    """End this process with ``code``. A torchrun worker (WORLD_SIZE > 1) skips the interpreter's finalisation
    once its output is flushed: by then ``teardown`` has run and every file is written (each atomically), and what
    finalisation would still destroy (gloo's and the store's threads) can abort a rank under load ("terminate called
    without an active exception", exit -6: seen once in the suite's 2-rank test on 2 busy cores), which torchrun
    reports as the whole job failing. A single process exits normally."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def wait_for_all() -> None:
    """Every rank waits here for the others (a no-op in one process): e.g. until rank 0 has written a file they read."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def launched_rank() -> int:
    """This process's rank as torchrun announced it (0 when not launched by torchrun), before ``setup``."""
    return int(os.environ.get("RANK", "0"))


def restarted() -> bool:
    """True in a worker that torchrun restarted after a failure (--max-restarts): it should resume."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def max_over_ranks(values: tuple[int, ...], world: World, device: torch.device) -> tuple[int, ...]:
    """The element-wise maximum of small integers over all ranks (one tiny all-reduce), so that every rank
    takes the same decision (stop, and why) at the same step."""
    if not world.distributed:
        return tuple(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(int(v) for v in t.tolist())


def mean_over_ranks(value: float, world: World, device: torch.device) -> float:
    if not world.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world.size


def gather_rows(x: torch.Tensor, n_total: int, world: World) -> torch.Tensor | None:
    """Rows of every rank, in rank order, on rank 0 (None elsewhere); ranks hold consecutive blocks of
    ``shard(n_total, rank, size)`` rows, padded here to equal length for the collective."""
    if not world.distributed:
        return x
    per = -(-n_total // world.size)
    padded = torch.zeros((per, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(world.size)] if world.is_main else None
    dist.gather(padded, parts, dst=0)
    if not world.is_main:
        return None
    return torch.cat(
        [p[: hi - lo] for p, (lo, hi) in zip(parts, (shard(n_total, r, world.size) for r in range(world.size)))]
    )


def shard(n: int, rank: int, size: int) -> tuple[int, int]:
    """The block [lo, hi) of n items that rank ``rank`` of ``size`` handles (consecutive, near-equal)."""
    per = -(-n // size)
    return min(n, rank * per), min(n, (rank + 1) * per)
