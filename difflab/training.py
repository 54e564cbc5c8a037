"""The training loop: one short function a reader can take in at a glance.

AdamW with linear warm-up, gradient clipping and accumulation, an EMA of the parameters,
bf16 autocast on the CPU when asked, checkpoints every N steps written atomically, and
--resume that continues exactly (optimizer, EMA, RNG states, step, data order)."""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .data.images import to_model
from .data.loader import ShuffledBatches
from .io import atomic_path
from .losses import SimpleLoss
from .parameterize import Denoiser

PRECISIONS = ("fp32", "bf16")


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """theta_ema <- decay theta_ema + (1 - decay) theta for parameters; buffers are copied, not averaged."""
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - decay)  # one fused call for all tensors
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay for the update after ``step`` optimizer steps.

    Without warm-up it is ``decay`` throughout. With it, min(decay, (1 + step) / (10 + step)): 0.1 at the
    first update, 0.91 after 90 steps, 0.99 after 890 (the schedule of TensorFlow's
    ExponentialMovingAverage with num_updates). A fixed 0.999 would keep 0.999^n of the random
    initialisation in the average after n steps (37% after 1000), which ruins the EMA of a short run."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def learning_rate(step: int, base_lr: float, warmup: int) -> float:
    """Linear warm-up from base_lr / warmup to base_lr over the first ``warmup`` steps, then constant."""
    return base_lr * min(1.0, (step + 1) / max(warmup, 1))


def _autocast(precision: str):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def train(
    run_dir: str | Path,
    config: ckpt.RunConfig,
    data: Tensor,
    labels: Tensor | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    preview: Callable[[Denoiser, int, Path], None] | None = None,
    stop_after: int | None = None,
) -> Denoiser:
    """Train ``config``'s denoiser on ``data`` (uint8 images, or floats already in model space) and write the run to ``run_dir``.

    Returns the EMA denoiser. ``preview(ema_denoiser, step, run_dir)`` draws pictures at sample_every
    steps and at the end; ``stop_after`` ends early after that many steps (tests use it)."""
    run_dir, tc = Path(run_dir), config.train
    torch.manual_seed(tc.seed)
    denoiser = config.build_denoiser()
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    loss_fn = SimpleLoss(**config.loss)
    opt = torch.optim.AdamW(denoiser.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
    transform = to_model if data.dtype == torch.uint8 else None  # images stay uint8 until a batch is drawn
    batches = ShuffledBatches(data, tc.batch_size * tc.accumulation, seed=tc.seed, labels=labels, transform=transform)
    gen = torch.Generator().manual_seed(tc.seed + 1)  # draws t and eps
    step = 0

    if resume:
        step = _load_state(run_dir, denoiser, ema, opt, batches, gen)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    ckpt.save_config(run_dir, config)

    first = step
    last = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    bar = tqdm(total=tc.steps, initial=step, disable=not progress, desc=f"train {config.dataset}", dynamic_ncols=True)
    log = open(run_dir / "metrics.jsonl", "a")
    t0 = time.perf_counter()
    with _finish_step_on_ctrl_c() as interrupted:
        while step < last and not interrupted:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, tc.lr, tc.warmup)
            loss, grad_norm = train_step(denoiser, loss_fn, opt, next(batches), gen, tc, _uses_labels(config))
            ema_update(ema, denoiser, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if step % tc.log_every == 0 or step == last:
                rate = (step - first) / (time.perf_counter() - t0)
                log.write(json.dumps({"step": step, "loss": loss, "grad_norm": grad_norm, "lr": opt.param_groups[0]["lr"], "it_s": rate}) + "\n")
                log.flush()
            if step % tc.checkpoint_every == 0 or step == last:
                _save_state(run_dir, denoiser, ema, opt, batches, gen, step)
            if preview is not None and ((tc.sample_every and step % tc.sample_every == 0) or step == tc.steps):
                preview(ema, step, run_dir)
    bar.close()
    log.close()
    if interrupted:
        _save_state(run_dir, denoiser, ema, opt, batches, gen, step)
        raise KeyboardInterrupt(f"interrupted at step {step}; checkpoint saved, continue with --resume")
    return ema


@contextlib.contextmanager
def _finish_step_on_ctrl_c():
    """Ctrl-C (SIGINT) sets a flag instead of raising mid-step, so the loop can finish the step and checkpoint."""
    flag: list[int] = []

    class Flag:
        def __bool__(self):
            return bool(flag)

    def handler(signum, frame):
        flag.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield Flag()
        return
    try:
        yield Flag()
    finally:
        signal.signal(signal.SIGINT, previous)


def train_step(denoiser, loss_fn, opt, batch, gen, tc: ckpt.TrainConfig, use_labels: bool) -> tuple[float, float]:
    """One optimizer step over ``tc.accumulation`` micro-batches; returns (loss, gradient norm before clipping)."""
    x, y = batch
    opt.zero_grad(set_to_none=True)
    total = 0.0
    labels = y.chunk(tc.accumulation) if (y is not None and use_labels) else [None] * tc.accumulation
    for xm, ym in zip(x.chunk(tc.accumulation), labels):
        cond = {"class_labels": ym} if ym is not None else None
        with _autocast(tc.precision):
            loss = loss_fn(denoiser, xm, generator=gen, cond=cond) / tc.accumulation
        loss.backward()
        total += loss.item()
    grad_norm = torch.nn.utils.clip_grad_norm_(denoiser.parameters(), tc.grad_clip)
    opt.step()
    return total, float(grad_norm)


def _uses_labels(config: ckpt.RunConfig) -> bool:
    return bool(config.net.get("num_classes"))


def _save_state(run_dir, denoiser, ema, opt, batches, gen, step) -> None:
    """train_state.pt first, then the weights, each atomically; both carry the step so a mismatch is caught."""
    state = {
        "step": step,
        "optimizer": opt.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "batches": batches.state_dict(),
    }
    with atomic_path(run_dir / ckpt.STATE) as tmp:
        torch.save(state, tmp)
    ckpt.save_weights(run_dir, denoiser.net, ema.net, step)


def _load_state(run_dir, denoiser, ema, opt, batches, gen) -> int:
    path = run_dir / ckpt.STATE
    if not path.exists():
        raise ckpt.CheckpointError(f"cannot resume: {path} is missing (was the run started?)")
    try:
        state = torch.load(path, weights_only=False)
    except Exception as e:  # torch raises several types for a damaged file
        raise ckpt.CheckpointError(f"cannot resume: {path} is corrupt ({type(e).__name__})") from None
    if ckpt.weights_step(run_dir) != state["step"]:
        raise ckpt.CheckpointError(f"cannot resume: {run_dir} holds weights and training state of different steps")
    denoiser.net.load_state_dict(ckpt.load_weights(run_dir, "net"))
    ema.net.load_state_dict(ckpt.load_weights(run_dir, "ema"))
    opt.load_state_dict(state["optimizer"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    batches.load_state_dict(state["batches"])
    _truncate_log(run_dir / "metrics.jsonl", state["step"])
    return state["step"]


def _truncate_log(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))
