"""The full training loop against the bare step it is built around, and against diffusers' training loop.

Three ways to spend the same CPU on the same network, at the presets (benchmarks/throughput.py --part loop):

    bare step   the loss of the preset's denoiser on one fixed batch, backward, the loop's AdamW step (fused):
                what the hardware gives with no data, no draws, no EMA, no clipping, no logging, no files
    full loop   difflab.training.loop.train for --loop-steps steps of the preset, as a user runs it: the data set,
                the per-step draws, clipping, the EMA, the log every log_every steps; its checkpoints and the
                CLI's previews (runs.diffusion.preview) at the preset's intervals, each timed once and charged
                per step (checkpoint seconds / checkpoint_every + preview seconds / sample_every), since a short
                measurement cannot reach the real intervals (250-1000 steps). The loop's own rate is read from its
                metrics.jsonl (it_s at the last step: from the first step to the last, start-up excluded).
    diffusers   diffusers' examples/unconditional_image_generation/train_unconditional.py as its defaults set
                it up, at the fashion-mnist preset only (its matched UNet2DModel, throughput.diffusers_config):
                a DataLoader (shuffle, num_workers 0) over a dataset that converts each image on access (the
                script's per-example transform, without torchvision), DDPMScheduler.add_noise, eps MSE, backward,
                clip 1, AdamW, the cosine LR scheduler, EMAModel.step, `loss.detach().item()` and the progress
                bar's postfix every step, `accelerator.save_state` every 500 steps (timed once, charged per step),
                bf16 as autocast (accelerate's mixed_precision).

Targets (issue 33): full loop >= 0.9x the bare step at the image presets, >= 0.8x for the swiss-roll MLP (the
overhead measure: its step is a few milliseconds), and >= 2x diffusers' loop in fp32 and in bf16.
"""

from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from common import header, load_average
from tqdm.auto import tqdm

from difflab.core.conditions import select
from difflab.runs import store as ckpt
from difflab.runs.data import training_data
from difflab.runs.diffusion import preview
from difflab.runs.presets import preset_for
from difflab.training.loop import train

LOOP_PRESETS = ("swissroll", "digits", "fashion-mnist")
PEER_PRESET = "fashion-mnist"  # the preset diffusers' matched network exists for
TARGET_LOOP, TARGET_MLP, TARGET_PEER = 0.9, 0.8, 2.0


def autocast(precision: str, device: str = "cpu"):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def preset(name: str, precision: str, steps: int):
    cfg = preset_for(name)
    return replace(cfg, train=replace(cfg.train, steps=steps, precision=precision))


def bare_step_rate(cfg, data, steps: int, device: str = "cpu") -> float:
    """Images/s of forward + loss + backward + fused AdamW on one fixed batch of the preset."""
    torch.manual_seed(0)
    den, loss_fn = cfg.build_denoiser().to(device), cfg.build_loss()
    opt = torch.optim.AdamW(den.net.parameters(), lr=cfg.train.lr, fused=True)
    g = torch.Generator().manual_seed(0)
    b = cfg.train.batch_size
    x, cond = data.take(torch.randperm(len(data), generator=g)[:b])
    t, noise = den.process.sample_t(b, g), torch.randn(x.shape, generator=g)
    x, t, noise = x.to(device), t.to(device), noise.to(device)
    cond = {k: v.to(device) for k, v in select(cond, cfg.condition_specs()).items()}
    start = None
    for i in range(steps + 3):  # three untimed warm-up steps
        if i == 3:
            synchronize(device)
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.train.precision, device):
            loss = loss_fn(den, x, t=t, noise=noise, cond=cond)
        loss.backward()
        opt.step()
    synchronize(device)
    return steps * b / (time.perf_counter() - start)


class Timed:
    """Wraps a callable and keeps the seconds of each call."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)


def full_loop(cfg, data, with_preview: bool, device: str = "cpu") -> dict:
    """train() for cfg.train.steps steps into a scratch folder: the loop's own images/s, one checkpoint's and one
    preview's seconds, and the images/s with both charged at the preset's intervals."""
    saver = Timed(ckpt.save_checkpoint)
    shown = Timed(partial(preview, cfg=cfg)) if with_preview else None
    tc = cfg.train
    with tempfile.TemporaryDirectory() as run:
        ckpt.save_checkpoint, real = saver, ckpt.save_checkpoint
        try:
            start = time.perf_counter()
            train(run, cfg, data, device=device, progress=False, preview=shown)
            wall = time.perf_counter() - start
        finally:
            ckpt.save_checkpoint = real
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    it_s = rows[-1]["it_s"]
    ckpt_s = statistics.median(saver.seconds)
    preview_s = statistics.median(shown.seconds) if shown and shown.seconds else 0.0
    per_step = 1 / it_s + ckpt_s / tc.checkpoint_every + (preview_s / tc.sample_every if tc.sample_every else 0.0)
    return {
        "loop_images_s": it_s * tc.batch_size,
        "charged_images_s": tc.batch_size / per_step,
        "call_images_s": tc.steps * tc.batch_size / wall,
        "checkpoint_s": ckpt_s,
        "preview_s": preview_s,
    }


class ImagesAsTheScriptReadsThem(torch.utils.data.Dataset):
    """train_unconditional.py's dataset: each example converted when it is read (ToTensor, Normalize([0.5], [0.5]))."""

    def __init__(self, images: torch.Tensor):
        self.images = images  # uint8 (N, C, H, W)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        x = self.images[i].float() / 255.0
        return {"input": (x - 0.5) / 0.5}


def diffusers_loop(images: torch.Tensor, precision: str, steps: int, batch: int, device: str = "cpu") -> dict:
    """Images/s of diffusers' unconditional training loop (see the module doc), its checkpoint charged per step."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from throughput import diffusers_config

    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_config()).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_scheduler = get_scheduler("cosine", optimizer=opt, num_warmup_steps=500, num_training_steps=100 * 938)
    ema = EMAModel(model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    loader = torch.utils.data.DataLoader(
        ImagesAsTheScriptReadsThem(images), batch_size=batch, shuffle=True, pin_memory=device == "cuda"
    )
    bar = tqdm(total=steps, disable=True)  # the script's bar, which it updates and annotates every step
    done, start = 0, None
    while done < steps + 3:
        for batch_ in loader:
            if done == 3:
                synchronize(device)
                start = time.perf_counter()
            clean = batch_["input"].to(device)
            noise = torch.randn(clean.shape, device=device)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=device).long()
            noisy = scheduler.add_noise(clean, noise, t)
            with autocast(precision, device):
                out = model(noisy, t).sample
            loss = F.mse_loss(out.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            lr_scheduler.step()
            opt.zero_grad()
            ema.step(model.parameters())
            bar.update(1)
            bar.set_postfix(loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0], step=done)
            done += 1
            if done == steps + 3:
                break
    synchronize(device)
    loop_s = (time.perf_counter() - start) / steps
    save_s = _save_state_seconds(model, ema, opt)
    per_step = loop_s + save_s / 500  # checkpointing_steps: 500
    return {"loop_images_s": batch / loop_s, "charged_images_s": batch / per_step, "checkpoint_s": save_s}


def _save_state_seconds(model, ema, opt) -> float:
    """One accelerate-style save_state: the model's and the EMA's weights (safetensors) and the optimizer."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{folder}/model.safetensors")
        shadow = copy.deepcopy(model)
        ema.copy_to(shadow.parameters())
        save_file({k: v.contiguous() for k, v in shadow.state_dict().items()}, f"{folder}/ema.safetensors")
        torch.save(opt.state_dict(), f"{folder}/optimizer.bin")  # written, never read back here
        return time.perf_counter() - start


def _bare(cfg, data, steps: int) -> dict:
    return {"images_s": bare_step_rate(cfg, data, steps)}


def measure(rounds: int, steps: dict[str, int], presets=LOOP_PRESETS, precisions=("fp32", "bf16")) -> dict:
    """Every (preset, precision): bare step, full loop and (fashion-mnist) diffusers' loop, one after the other in
    each round, the order alternating between rounds; medians and all rounds."""
    samples: dict[tuple, list] = defaultdict(list)
    for name in presets:
        data = training_data(preset_for(name))
        for p in precisions if name != "swissroll" else ("fp32",):
            cfg, n = preset(name, p, steps[name]), steps[name]
            contenders = [
                ("bare step", partial(_bare, cfg, data, n)),
                ("full loop", partial(full_loop, cfg, data, with_preview=cfg.data_kind == "images")),
            ]
            if name == PEER_PRESET:
                contenders.append(("diffusers loop", partial(diffusers_loop, data.x, p, n, cfg.train.batch_size)))
            for r in tqdm(range(rounds), desc=f"{name} {p}", leave=False):
                for label, fn in contenders if r % 2 == 0 else contenders[::-1]:
                    samples[(name, p, label)].append(fn())
    return samples


def report(samples: dict, rounds: int, steps: dict[str, int], minutes: float, load_before: str) -> list[str]:
    med = {}
    for key, runs in samples.items():
        med[key] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    lines = header("The full training loop against the bare step and diffusers' loop (CPU)")
    lines += [
        f"- {rounds} rounds, medians; the order of the contenders alternates between rounds; took {minutes:.1f} min",
        f"- steps per measurement: {', '.join(f'{k} {v}' for k, v in steps.items())}; load average before: "
        f"{load_before}, after: {load_average()}",
        "- bare step: the preset's denoiser and loss on one fixed batch, backward, fused AdamW (no data, draws, "
        "clipping, EMA, logs or files); full loop: `train()` of the preset, its checkpoint and preview timed once and "
        "charged at the preset's intervals; diffusers: train_unconditional.py's loop (benchmarks/loop_throughput.py)",
        "",
        "| preset | precision | bare step (images/s) | full loop, charged (images/s) | loop / bare | target | "
        "diffusers loop, charged (images/s) | loop / diffusers | target |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    detail = []
    for name, p in dict.fromkeys((n, p) for n, p, _ in samples):
        bare = med[(name, p, "bare step")]["images_s"]
        loop = med[(name, p, "full loop")]
        ratio = loop["charged_images_s"] / bare
        target = TARGET_MLP if name == "swissroll" else TARGET_LOOP
        cells = [name, p, f"{bare:.1f}", f"{loop['charged_images_s']:.1f}", f"{ratio:.2f}x"]
        cells.append(f">= {target}x: {'met' if ratio >= target else '**missed**'}")
        if (name, p, "diffusers loop") in med:
            peer = med[(name, p, "diffusers loop")]
            r2 = loop["charged_images_s"] / peer["charged_images_s"]
            cells += [f"{peer['charged_images_s']:.1f}", f"{r2:.2f}x"]
            cells.append(f">= {TARGET_PEER}x: {'met' if r2 >= TARGET_PEER else '**missed**'}")
            detail.append(
                f"- {name} {p}: diffusers' loop alone {peer['loop_images_s']:.1f} images/s, its save_state "
                f"{peer['checkpoint_s']:.2f} s every 500 steps"
            )
        else:
            cells += ["", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
        steps_s = loop["loop_images_s"] / preset_for(name).train.batch_size
        detail.append(
            f"- {name} {p}: the loop alone {loop['loop_images_s']:.1f} images/s ({steps_s:.1f} steps/s); "
            f"one checkpoint {loop['checkpoint_s']:.3f} s (every {preset_for(name).train.checkpoint_every}), "
            f"one preview {loop['preview_s']:.2f} s (every {preset_for(name).train.sample_every or 'run end'}); "
            f"the whole train() call with start-up {loop['call_images_s']:.1f} images/s"
        )
    lines += ["", "Where the loop's figure comes from:", "", *detail]
    return lines


def main_loop_part(rounds: int, loop_steps: dict[str, int], out: Path) -> None:
    load_before, start = load_average(), time.perf_counter()
    samples = measure(rounds, loop_steps)
    lines = report(samples, rounds, loop_steps, (time.perf_counter() - start) / 60, load_before)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput_loop.md").write_text("\n".join(lines) + "\n")
    (out / "throughput_loop.json").write_text(json.dumps({"|".join(k): v for k, v in samples.items()}, indent=1) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out / 'throughput_loop.md'}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mlp-steps", type=int, default=1000)
    parser.add_argument("--image-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    main_loop_part(
        args.rounds,
        {"swissroll": args.mlp_steps, "digits": 4 * args.image_steps, "fashion-mnist": args.image_steps},
        Path(args.out),
    )
