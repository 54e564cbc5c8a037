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
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..core.conditions import drop_conditions, drop_mask, select
from ..core.parameterize import Denoiser
from ..data.loader import ShuffledBatches, TensorDataset
from ..io import atomic_path
from ..runs import store as ckpt
from ..runs.config import PRECISIONS, Precision, RunConfig, TrainConfig, save_config
from .distributed import World, max_over_ranks, mean_over_ranks, resolve_device, setup

SEED_STRIDE = 1_000_003  # step k of a run with seed s draws from a generator seeded s * SEED_STRIDE + k


class Interrupted(Exception):
    """Training stopped by Ctrl-C or SIGTERM after checkpointing; ``signum`` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


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


def autocast(precision: Precision, device: torch.device):
    """The autocast context of a precision on a device (fp32: none)."""
    check_precision(precision, device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator of step ``step``: the same draws on every rank and after any resume."""
    return torch.Generator(device).manual_seed(seed * SEED_STRIDE + step)


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
    """
    run_dir, tc = Path(run_dir), config.train
    device = resolve_device(device) if isinstance(device, str) else device
    world = setup(device)
    if isinstance(data, Tensor):
        data = TensorDataset(data)
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
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, foreach=True)
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
    model = _wrap(denoiser, device, world)  # after loading: DDP starts every rank from rank 0's weights

    def save():
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
    with _finish_step_on_signals() as interrupted:
        while step < last:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, tc)
            torch.manual_seed(
                ((tc.seed * SEED_STRIDE + step) << 16) + world.rank
            )  # the network's own randomness (dropout)
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
                step_generator(tc.seed, step, device),
            )
            ema_update(ema, denoiser, ema_decay_at(step, tc.ema_decay, tc.ema_warmup))
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            out_of_time = max_minutes is not None and time.perf_counter() - t0 > 60 * max_minutes
            signum, out_of_time = max_over_ranks(
                (interrupted.signum, int(out_of_time)), world, device
            )  # every rank alike
            stopped = bool(signum or out_of_time)
            if step % tc.log_every == 0 or step == last or stopped:
                loss = mean_over_ranks(loss, world, device)
                if log is not None:
                    rate = (step - first) / (time.perf_counter() - t0)
                    log.write(
                        json.dumps(
                            {
                                "step": step,
                                "loss": loss,
                                "grad_norm": grad_norm,
                                "lr": opt.param_groups[0]["lr"],
                                "it_s": rate,
                            }
                        )
                        + "\n"
                    )
                    log.flush()
            if step % tc.checkpoint_every == 0 or step == last or stopped:
                save()
            if (
                world.is_main
                and preview is not None
                and ((tc.sample_every and step % tc.sample_every == 0) or step == tc.steps)
            ):
                preview(ema, step, run_dir)
            if stopped:
                break
    bar.close()
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


def trainable_parameters(net: nn.Module, trainable, weight_decay: float) -> list[nn.Parameter]:
    """The parameters ``trainable(name, p)`` keeps (all when None), the others frozen; a bool mask trains only the
    elements it marks (the others' gradient is masked)."""
    params = []
    for name, p in net.named_parameters():
        keep = True if trainable is None else trainable(name, p)
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
    micro-batches); returns (this rank's loss, gradient norm before clipping)."""
    G, b = len(idx), tc.batch_size
    process = model.process
    x_shape = data.x.shape[1:]
    # draws for the whole global batch, identical on every rank (see the module doc)
    t_all = process.sample_t(G, gen)  # (G,)
    noise_all = torch.randn((G, *x_shape), generator=gen, device=device)  # (G, ...)
    masks_all = {s.name: drop_mask(s.p_drop, G, gen) for s in specs}
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for m in range(tc.accumulation):
        lo = (m * world.size + world.rank) * b  # this rank's shard of micro-batch m
        part = slice(lo, lo + b)
        x, cond = data.take(idx[part])
        x, cond = x.to(device, non_blocking=True), {k: v.to(device) for k, v in select(cond, specs).items()}
        cond = drop_conditions(cond, specs, masks={k: v[part] for k, v in masks_all.items()})
        sync = m == tc.accumulation - 1 or not world.distributed
        with nullcontext() if sync else model.net.no_sync(), autocast(tc.precision, device):
            loss = loss_fn(model, x, t=t_all[part], noise=noise_all[part].to(x.dtype), cond=cond) / tc.accumulation
        scaler.scale(loss).backward()
        total += loss.item()
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        [p for g in opt.param_groups for p in g["params"]], tc.grad_clip or math.inf
    )
    scaler.step(opt)
    scaler.update()
    return total, float(grad_norm)


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
