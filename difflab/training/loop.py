"""The training loop: one short function, on any device, alone or as one rank of a torchrun job.

AdamW with linear warm-up, gradient clipping and accumulation, an EMA of the parameters, autocast
that follows the device (bf16 on CPU and CUDA; fp16 with a gradient scaler on CUDA), condition dropout
for classifier-free guidance, checkpoints every N steps (runs/store.py: atomic, no pickle), and
``resume`` that continues exactly.

Randomness. Step k draws its times t, noise and condition-dropout masks from a generator on the
training device seeded with (seed, k), for the whole *global* batch; each rank keeps its own shard of
them. So the run's random state is its step number: a resumed run, or a run on 1 or N processes with
the same global batch, sees exactly the same data, noise and dropout.

Data parallelism (PyTorch DDP under torchrun, see distributed.py). The global batch is
batch_size x world size x accumulation; every rank draws the same global batch of indices and takes
its part; gradients are averaged by DDP (``no_sync`` on all but the last micro-batch); rank 0 alone
writes checkpoints, metrics and pictures; the EMA follows the unwrapped network, whose weights are
saved (no ``module.`` prefix). Ctrl-C and SIGTERM finish the step, checkpoint and raise
``Interrupted``; every rank stops at the same step."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import cache
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.conditions import drop_conditions, drop_mask, select
from ..core.parameterize import Denoiser
from ..data.augment import AUGMENT_DIMS, SPATIAL_CONDITIONS, flip, flip_mask, non_leaking_apply, non_leaking_draw
from ..data.loader import ShuffledBatches, TensorDataset
from ..io import atomic_path
from ..runs import store as ckpt
from ..runs.config import PRECISIONS, Precision, RunConfig, TrainConfig, save_config
from .distributed import World, max_over_ranks, mean_over_ranks, resolve_device, setup
from .trackers import Tracker

SEED_STRIDE = 1_000_003  # step k of a run with seed s draws from a generator seeded s * SEED_STRIDE + k


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after checkpointing; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class EMAUpdate:
    """theta_ema <- decay theta_ema + (1 - decay) theta for parameters; buffers are copied, not averaged.

    The two modules' tensors are listed once (walking the module tree every step costs more than the
    update itself for a small network)."""

    def __init__(self, ema: nn.Module, net: nn.Module):
        self.ema_params, self.params = list(ema.parameters()), list(net.parameters())
        self.ema_buffers, self.buffers = list(ema.buffers()), list(net.buffers())

    @torch.no_grad()
    def __call__(self, decay: float) -> None:
        torch._foreach_lerp_(self.ema_params, self.params, 1 - decay)  # one fused call for all tensors
        if self.buffers:
            torch._foreach_copy_(self.ema_buffers, self.buffers)


def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """One EMA update of ``ema`` towards ``net`` (see EMAUpdate, which the loop keeps across steps)."""
    EMAUpdate(ema, net)(decay)


def ema_decay_at(step: int, decay: float, warmup: bool) -> float:
    """The EMA decay for the update after ``step`` optimizer steps.

    Without warm-up it is ``decay`` throughout. With it, min(decay, (1 + step) / (10 + step)): 0.1 at the
    first update, 0.91 after 90 steps, 0.99 after 890 (the schedule of TensorFlow's
    ExponentialMovingAverage with num_updates). A fixed 0.999 would keep 0.999^n of the random
    initialisation in the average after n steps (37% after 1000), which ruins the EMA of a short run."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


def learning_rate(step: int, tc: TrainConfig) -> float:
    """Linear warm-up from lr / warmup to lr over the first ``warmup`` steps, then constant, or with
    ``lr_schedule`` 'cosine' half a cosine from lr down to 0 at the last step."""
    if step < tc.warmup or tc.lr_schedule == "constant":
        return tc.lr * min(1.0, (step + 1) / max(tc.warmup, 1))
    return 0.5 * tc.lr * (1 + math.cos(math.pi * (step - tc.warmup) / max(1, tc.steps - tc.warmup)))


def check_precision(precision: Precision, device: torch.device) -> None:
    """bf16 runs anywhere, fp16 on CUDA only (it trains with a gradient scaler), fp32 everywhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (it trains with a gradient scaler); use bf16 on the CPU")


@cache  # autocast asks every micro-step; a device's answer does not change in a process
def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU of compute capability 8 or more (Ampere on; a T4 or
    V100 emulates it), or a CPU whose oneDNN has bf16 kernels (AVX-512 or AMX). Elsewhere (an AVX2 CPU: most
    laptops) PyTorch's bf16 matmul falls back to a generic loop, 60-90x slower than float32
    (benchmarks/precision.py)."""
    if device.type == "cuda":  # compute capability 8 (Ampere) on: bf16 tensor cores; older cards emulate it
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """The arithmetic a run trains in on ``device``: 'auto' is bf16 where it is native, else fp32."""
    check_precision(precision, device)
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def describe_precision(precision: Precision, device: torch.device) -> str:
    """The start line's words for a run's precision on ``device``: what 'auto' became, and a warning where bf16
    is emulated."""
    used = resolve_precision(precision, device)
    if precision == "auto":
        return f"auto precision ({used} on this {device.type})"
    if used == "bf16" and device.type in ("cpu", "cuda") and not native_bf16(device):
        return f"bf16 (emulated on this {device.type}, much slower than fp32: --precision auto picks fp32 here)"
    return used


def autocast(precision: Precision, device: torch.device):
    """The autocast context of a precision on a device (fp32, and 'auto' where bf16 is not native: none)."""
    precision = resolve_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def step_generator(seed: int, step: int, device: torch.device, generator: torch.Generator | None = None):
    """The generator of step ``step``: the same draws on every rank and after any resume (``generator``
    reseeded in place when given, so the loop keeps one)."""
    return (generator or torch.Generator(device)).manual_seed(seed * SEED_STRIDE + step)


def seed_step(seed: int, step: int, rank: int, device: torch.device) -> None:
    """Seed the global generators the network's own randomness (dropout) draws from, per step and rank: the
    CPU's and the training device's, as torch.manual_seed would, without its per-call visit to every other
    accelerator backend (a millisecond a step, more than a small network's step)."""
    s = ((seed * SEED_STRIDE + step) << 16) + rank
    torch.default_generator.manual_seed(s)
    if device.type == "cuda":
        torch.cuda.default_generators[
            device.index if device.index is not None else torch.cuda.current_device()
        ].manual_seed(s)


def configure_cuda(device: torch.device) -> None:
    """On CUDA: cuDNN picks its fastest convolution for the training shapes (they are fixed), and float32 matmuls
    and convolutions use TF32 tensor cores (Ampere and newer; about 10 bits of mantissa in the products, the
    sums in float32), the choice PyTorch leaves to the user. Nothing on other devices."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class NonFiniteLoss(ValueError):
    """The loss or the gradient norm became NaN or infinite; the run stopped without saving the bad state."""


def fused_adamw_available(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters) runs on CPU and CUDA tensors in this torch."""
    return device.type in ("cpu", "cuda")


def train(
    run_dir: str | Path,
    config: RunConfig,
    data: TensorDataset,
    *,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool = True,
    preview: Callable[[Denoiser, int, Path], None] | None = None,
    stop_after: int | None = None,
    max_minutes: float | None = None,
    loss_fn: Callable | None = None,
    trainable: Callable[[str, nn.Parameter], bool | Tensor] | None = None,
    init_from: str | Path | dict[str, Tensor] | None = None,
    command: str = "train",
    compile: bool = False,
    tracker: Tracker | None = None,
    evaluator: Callable[[Denoiser, int], dict] | None = None,
) -> Denoiser:
    """Train ``config``'s denoiser on ``data`` and write the run to ``run_dir``; returns the EMA denoiser.

    preview(ema_denoiser, step, run_dir)  pictures at sample_every steps and at the end (rank 0)
    stop_after, max_minutes               end early after that many steps / minutes, with a checkpoint
    loss_fn(denoiser, x0, t=, noise=, cond=) -> scalar   replaces the config's loss (config.build_loss())
    trainable(name, parameter) -> bool    which parameters train (the rest stay frozen); a bool tensor of the
                                          parameter's shape trains only the elements it marks (their gradient
                                          is masked, so with weight_decay 0 the others never move)
    init_from                             a run whose EMA weights initialise the network, or the state dict
                                          itself (not on resume)
    command                               the difflab command that continues the run (named when interrupted)
    compile                               torch.compile the network (its forward and backward; the EMA, the
                                          previews and the saved weights stay the plain module's)
    tracker                               also logs every metrics row (and, through preview, the pictures) to
                                          TensorBoard or wandb (trackers.py); rank 0
    evaluator(ema_denoiser, step) -> dict  scores of the EMA at eval_every steps and at the end (rank 0), written
                                          to metrics.jsonl and the tracker; the EMA with the lowest
                                          evaluator.primary ('fd') is kept as RUN/best (runs/store.py save_best)

    The step never waits on the device: the loss and the gradient norm stay there and are read every
    ``log_every`` steps, at checkpoints and at the end. A NaN or infinite loss (or gradient norm) at step k
    stops the run at the first of these reads, by step k + log_every, with NonFiniteLoss and no checkpoint of
    the bad weights: the newest checkpoint (saved before step k) resumes."""
    run_dir, tc = Path(run_dir), config.train
    device = resolve_device(device) if isinstance(device, str) else device
    world = setup(device)
    configure_cuda(device)
    if isinstance(data, Tensor):
        data = TensorDataset(data)
    data = on_device(data, device)
    specs = config.condition_specs()
    check_precision(tc.precision, device)

    torch.manual_seed(tc.seed)
    denoiser = config.build_denoiser().to(device)
    if init_from is not None and not resume:
        state = init_from if isinstance(init_from, dict) else ckpt.load_weights(init_from, "ema")
        ckpt.load_into(denoiser.net, state, "the initial weights" if isinstance(init_from, dict) else init_from)
    ema = copy.deepcopy(denoiser).requires_grad_(False).eval()
    params = trainable_parameters(denoiser.net, trainable, tc.weight_decay)
    loss_fn = loss_fn or config.build_loss()
    fused = fused_adamw_available(device) and all(p.dtype.is_floating_point for p in params)
    opt = torch.optim.AdamW(
        parameter_groups(denoiser.net, params),
        lr=tc.lr,
        weight_decay=tc.weight_decay,
        fused=fused,
        foreach=None if fused else True,
    )
    scaler = torch.amp.GradScaler("cuda", enabled=tc.precision == "fp16")
    per_rank = tc.batch_size
    batches = ShuffledBatches(len(data), per_rank * world.size * tc.accumulation, seed=tc.seed)
    step = 0

    if resume:
        step = _restore(run_dir, denoiser, ema, opt, batches, scaler, world)
    elif world.is_main:  # a fresh run: nothing of an earlier run in this folder may survive
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clear_checkpoints(run_dir)
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if world.is_main:
        save_config(run_dir, config)
    tracker = tracker if tracker is not None and world.is_main else Tracker()
    tracker.start(run_dir, config, step, fresh=not resume)
    best = ckpt.best_record(run_dir) if resume else None
    update_ema = EMAUpdate(ema, denoiser)
    if compile:
        denoiser.net.compile()  # in place: the same module, parameters and state-dict keys
    model = _wrap(denoiser, device, world)  # after loading: DDP starts every rank from rank 0's weights
    health = Health(device)

    def save():
        health.check(step, run_dir, command)  # never a checkpoint of NaN weights
        if world.is_main:
            state = {
                "batches": batches.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "world_size": world.size,
            }
            ckpt.save_checkpoint(run_dir, step, denoiser.net, ema.net, opt.state_dict(), state)

    first, t0 = step, time.perf_counter()
    last = tc.steps if stop_after is None else min(tc.steps, step + stop_after)
    bar = tqdm(
        total=tc.steps,
        initial=step,
        disable=not (progress and world.is_main),
        dynamic_ncols=True,
        desc=f"train {config.dataset}" + (f" ({world.size} processes)" if world.distributed else ""),
    )
    log = open(run_dir / "metrics.jsonl", "a") if world.is_main else None
    stopped, signum = False, 0
    gen = torch.Generator(device)
    try:
        with _finish_step_on_signals() as interrupted:
            while step < last:
                for group in opt.param_groups:
                    group["lr"] = learning_rate(step, tc) * group.get("lr_scale", 1.0)
                seed_step(tc.seed, step, world.rank, device)  # the network's own randomness (dropout)
                loss, grad_norm = train_step(
                    model,
                    loss_fn,
                    opt,
                    scaler,
                    data,
                    next(batches),
                    specs,
                    tc,
                    world,
                    device,
                    step_generator(tc.seed, step, device, gen),
                )
                health.record(step, loss, grad_norm)
                update_ema(ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
                step += 1
                bar.update(1)
                out_of_time = max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes
                signum, out_of_time = max_over_ranks(
                    (interrupted.signum, int(out_of_time)), world, device
                )  # every rank alike
                stopped = bool(signum or out_of_time)
                if step % tc.log_every == 0 or step == last or stopped:
                    health.check(step, run_dir, command)  # the one read of the device's values in a window
                    loss_value = mean_over_ranks(float(loss), world, device)
                    bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
                    if log is not None:
                        rate = (step - first) / (time.perf_counter() - t0)
                        row = {
                            "step": step,
                            "loss": loss_value,
                            "grad_norm": float(grad_norm),
                            "lr": opt.param_groups[0]["lr"],
                            "it_s": rate,
                        }
                        log.write(json.dumps(row) + "\n")
                        log.flush()
                        tracker.scalars(step, row)
                if step % tc.checkpoint_every == 0 or step == last or stopped:
                    save()
                if (
                    world.is_main
                    and evaluator is not None
                    and tc.eval_every
                    and (step % tc.eval_every == 0 or step == tc.steps)
                ):
                    scores = evaluator(ema, step)
                    key = getattr(evaluator, "primary", "fd")  # lower is better
                    if best is None or scores[key] < best.get(key, math.inf):
                        best = {"step": step, **scores}
                        ckpt.save_best(run_dir, step, ema.net, scores)
                    row = {"step": step, **scores, "best_step": best["step"]}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    tracker.scalars(step, {f"eval/{k}": v for k, v in row.items()}, group="eval")
                if (
                    world.is_main
                    and preview is not None
                    and ((tc.sample_every and step % tc.sample_every == 0) or step == tc.steps)
                ):
                    preview(ema, step, run_dir)
                if stopped:
                    break
    finally:
        bar.close()
        tracker.close()
        if log is not None:
            log.close()
    if stopped and signum:
        name = signal.Signals(signum).name
        raise Interrupted(
            f"stopped by {name} at step {step}; checkpoint saved; continue with: difflab {command} --out {run_dir} "
            "--resume",
            signum,
        )
    return ema


class Health:
    """Whether every step so far had a finite loss and gradient norm, kept on the device (no wait per step) and
    read by ``check`` at log steps and before checkpoints."""

    def __init__(self, device: torch.device):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # the first non-finite step, or -1

    def record(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self, step: int, run_dir: Path, command: str) -> None:
        """Raise NonFiniteLoss (naming the bad step and the checkpoint that resumes) if a step went bad."""
        bad = int(self.first_bad)
        if bad < 0:
            return
        saved = ckpt.checkpoints(run_dir)
        newest = saved[-1][0] if saved else None
        where = (
            f"the newest checkpoint (step {newest}) resumes: difflab {command} --out {run_dir} --resume, with a lower "
            "--lr or --grad-clip"
            if newest is not None
            else f"no checkpoint was saved before it: start {run_dir} again with a lower --lr"
        )
        raise NonFiniteLoss(
            f"the loss or its gradient became NaN or infinite at step {bad + 1}; training stopped at step {step} "
            f"without saving; {where}"
        )


def on_device(data: TensorDataset, device: torch.device, fraction: float = 0.25) -> TensorDataset:
    """The training set on the training device when it fits in ``fraction`` of the device's free memory (every
    batch is then gathered there, with no copy from the host); else in pinned host memory, so that each batch
    is copied without blocking while the device works on the previous one. On the CPU: unchanged."""
    if device.type != "cuda":
        return data
    size = sum(t.numel() * t.element_size() for t in data.tensors())
    free, _ = torch.cuda.mem_get_info(device)
    if size <= fraction * free:
        return data.map(lambda t: t.to(device))
    return data.map(lambda t: t.pin_memory())


def trainable_parameters(net: nn.Module, trainable, weight_decay: float) -> list[nn.Parameter]:
    """The parameters ``trainable(name, p)`` keeps (when None: those ``net.trains(name)`` keeps where the network says,
    e.g. a pretrained part it keeps frozen; else all), the others frozen; a bool mask trains only the elements it
    marks (the others' gradient is masked)."""
    params = []
    for name, p in net.named_parameters():
        keep = trainable(name, p) if trainable is not None else net.trains(name) if hasattr(net, "trains") else True
        if isinstance(keep, Tensor):  # train some elements only: mask the gradient of the others
            if keep.shape != p.shape or keep.dtype != torch.bool:
                raise ValueError(
                    f"trainable({name!r}) gave a mask of shape {tuple(keep.shape)}; the parameter is {tuple(p.shape)} "
                    "(bool)"
                )
            if weight_decay:
                raise ValueError("a trainable mask needs weight_decay 0 (AdamW's decay would move the masked elements)")
            mask = keep.to(p.device)
            p.requires_grad_(True).register_hook(lambda g, m=mask: g * m)
        elif not keep:
            p.requires_grad_(False)
            continue
        params.append(p.requires_grad_(True))
    if not params:
        raise ValueError("no parameter is trainable (the trainable filter kept none)")
    return params


def parameter_groups(net: nn.Module, params: list[nn.Parameter]) -> list[dict]:
    """AdamW's parameter groups: one per learning-rate multiple ``net.lr_scale(name)`` (1 where the network has
    none; a pretrained part may learn slower than the layers trained from scratch), in first-seen order."""
    scale = getattr(net, "lr_scale", lambda name: 1.0)
    ids = {id(p) for p in params}
    groups: dict[float, list] = {}
    for name, p in net.named_parameters():
        if id(p) in ids:
            groups.setdefault(float(scale(name)), []).append(p)
    return [{"params": ps, "lr_scale": k} for k, ps in groups.items()]


def _restore(
    run_dir: Path, denoiser: Denoiser, ema: Denoiser, opt, batches: ShuffledBatches, scaler, world: World
) -> int:
    """Load the newest checkpoint into the network, its EMA, the optimizer, the data position and the scaler;
    the step it was saved at."""
    step, opt_state, state = ckpt.load_training_state(run_dir)
    if state.get("world_size", 1) != world.size:
        raise ckpt.CheckpointError(
            f"{run_dir} was trained by {state.get('world_size')} processes; resume it with as many "
            f"(the global batch is batch_size x processes x accumulation), not {world.size}"
        )
    ckpt.load_into(denoiser.net, ckpt.load_weights(run_dir, "net"), run_dir)
    ckpt.load_into(ema.net, ckpt.load_weights(run_dir, "ema"), run_dir)
    opt.load_state_dict(opt_state)
    batches.load_state_dict(state["batches"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if world.is_main:
        _truncate_log(run_dir / "metrics.jsonl", step)
    return step


def _wrap(denoiser: Denoiser, device: torch.device, world: World) -> Denoiser:
    """The denoiser the loss calls: itself, or one whose network is wrapped in DistributedDataParallel."""
    if not world.distributed:
        return denoiser
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(denoiser.net, device_ids=[device.index] if device.type == "cuda" else None)
    return Denoiser(ddp, denoiser.process, denoiser.target, denoiser.learned_variance)


def train_step(
    model: Denoiser,
    loss_fn,
    opt,
    scaler,
    data: TensorDataset,
    idx: Tensor,
    specs,
    tc: TrainConfig,
    world: World,
    device: torch.device,
    gen: torch.Generator,
) -> tuple[float, float]:
    """One optimizer step on the global batch ``idx`` (this rank's shards of its ``tc.accumulation``
    micro-batches); returns (this rank's loss, gradient norm before clipping) as tensors on the device: reading
    them would make the host wait for the step."""
    G, b = len(idx), tc.batch_size
    process = model.process
    x_shape = data.x.shape[1:]
    idx = idx.to(data.x.device, non_blocking=True)  # the batch is gathered where the data lives
    # draws for the whole global batch, identical on every rank (see the module doc)
    t_all = process.sample_t(G, gen)  # (G,)
    noise_all = torch.randn((G, *x_shape), generator=gen, device=device)  # (G, ...)
    masks_all = {s.name: drop_mask(s.p_drop, G, gen) for s in specs}
    flips_all = flip_mask(G, gen) if tc.augment == "flip" else None
    edm_all = non_leaking_draw(tc.augment, G, x_shape[-2], x_shape[-1], gen) if tc.augment in AUGMENT_DIMS else None
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for m in range(tc.accumulation):
        lo = (m * world.size + world.rank) * b  # this rank's shard of micro-batch m
        part = slice(lo, lo + b)
        x, cond = data.take(idx[part])
        x = x.to(device, non_blocking=True)
        cond = {k: v.to(device, non_blocking=True) for k, v in select(cond, specs).items()}
        if flips_all is not None:  # the image and its image conditions mirrored together
            x = flip(x, flips_all[part])
            cond = {k: flip(v, flips_all[part]) if k in SPATIAL_CONDITIONS else v for k, v in cond.items()}
        if edm_all is not None:  # the network is told what was done (non-leaking: data/augment.py)
            x, cond["augment_labels"] = non_leaking_apply(tc.augment, x, edm_all[part])
        cond = drop_conditions(cond, specs, masks={k: v[part] for k, v in masks_all.items()})
        sync = m == tc.accumulation - 1 or not world.distributed
        with nullcontext() if sync else model.net.no_sync(), autocast(tc.precision, device):
            loss = loss_fn(model, x, t=t_all[part], noise=noise_all[part].to(x.dtype), cond=cond) / tc.accumulation
        scaler.scale(loss).backward()
        total += loss.detach().float()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in opt.param_groups for p in g["params"]], tc.grad_clip or math.inf
    )
    scaler.step(opt)
    scaler.update()
    return total, grad_norm.detach()


@contextlib.contextmanager
def _finish_step_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM set a flag instead of raising mid-step, so the loop can finish the
    step and checkpoint. The flag is truthy once a signal came; ``.signum`` says which."""

    class Flag:
        signum = 0

        def __bool__(self):
            return self.signum != 0

    flag = Flag()

    def handler(signum, frame):
        flag.signum = signum
        signal.signal(signum, previous[signum])  # a second signal acts at once (e.g. a step stuck on a dead peer)

    previous: dict = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _truncate_log(path: Path, step: int) -> None:
    """Drop metric rows written after the checkpoint we resume from (the killed run's lost steps)."""
    if not path.exists():
        return
    rows = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                rows.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a row torn by the kill
    with atomic_path(path) as tmp:
        tmp.write_text("".join(r + "\n" for r in rows))
