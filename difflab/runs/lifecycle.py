"""Starting, continuing and restarting a run: one function for every training command.

    cfg, resume = begin(out, DIFFUSION, resume=args.resume, force=args.force, fresh=lambda: make_config(...))

* ``resume`` (or a worker that torchrun restarted after a failure, when the run has a checkpoint): the run in
  ``out`` as it was saved. A run of another kind is refused with the command that continues it; options that
  would contradict the saved run (``fixed``) are refused; ``steps`` may extend it.
* otherwise a new run from ``fresh()``: a folder that already holds a run is refused unless ``force`` (a
  restarted worker before any checkpoint starts over too). The training loop clears the old checkpoints.

``unfinished(out, cfg)`` says whether a run stopped before its last step (``--max-minutes``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from ..training.distributed import restarted
from .config import CONFIG, RunConfig, load_config
from .kinds import RunKind
from .shipped import refuse_writes
from .store import has_checkpoint, weights_step


class LifecycleError(ValueError):
    """A run that cannot be started or continued as asked."""


def begin(
    out: str | Path,
    kind: RunKind | Sequence[RunKind],
    *,
    resume: bool,
    force: bool,
    fresh: Callable[[], RunConfig],
    fixed: Sequence[str] = (),
    steps: int | None = None,
) -> tuple[RunConfig, bool]:
    """(config, resumed) of the run a training command trains in ``out`` (see the module doc). ``fixed`` names
    the given options a resumed run refuses; ``steps`` sets (or on resume extends) the steps."""
    refuse_writes(out, "train a copy of it")
    out = Path(out)
    kinds = [kind] if isinstance(kind, RunKind) else list(kind)
    if resume or (restarted() and has_checkpoint(out)):
        cfg = load_config(out)
        if cfg.run_kind not in {k.name for k in kinds}:
            theirs = cfg.kind
            raise LifecycleError(
                f"{out} holds {theirs.what}: continue it with `difflab {theirs.command} --out {out} --resume`"
            )
        if fixed and resume:  # a worker torchrun restarted keeps its first command line: it resumes as saved
            raise LifecycleError(
                f"--resume continues {out} as it was saved; drop {', '.join(fixed)} (or start a new run with --out)"
            )
        return (_with_steps(cfg, steps), True)
    if (out / CONFIG).exists() and not force and not restarted():
        raise LifecycleError(f"{out} already holds a run: pass --resume to continue it or --force to start over")
    return _with_steps(fresh(), steps), False


def _with_steps(cfg: RunConfig, steps: int | None) -> RunConfig:
    return replace(cfg, train=replace(cfg.train, steps=steps)) if steps else cfg


def unfinished(out: str | Path, cfg: RunConfig) -> int | None:
    """The step a run stopped at before its last one (None when it finished)."""
    step = weights_step(out)
    return step if step < cfg.train.steps else None
