"""Sample quality after the same wall-clock budget of CPU training: our default recipe against the classic one.

Two contenders train on Fashion-MNIST (60000 training images, [-1, 1]) on this CPU with
torch.set_num_threads(2), each for --minutes of wall-clock time:

    ours     difflab's trainer (training.train, each slice a resumed run with max_minutes) with the default recipe
             of image_presets: DiscreteDDPM cosine T=1000, v-prediction, min-SNR-5 loss, AdamW lr 1e-3 with 500
             warm-up steps, grad clip 1, EMA 0.999 with warm-up (training.ema_decay_at), batch 64, bf16 autocast;
             the 'fashion-mnist' U-Net preset (1.15M parameters).
    classic  diffusers' examples/unconditional_image_generation/train_unconditional.py, as its defaults set it up
             (its own loop, below; only its checkpoints use difflab's safetensors/JSON format):
             UNet2DModel (benchmarks/throughput.py's diffusers_config: 1.11M parameters), DDPMScheduler
             (1000 steps, linear betas 1e-4..0.02), eps-prediction MSE, uniform t in 0..999, AdamW lr 1e-4,
             betas (0.95, 0.999), weight decay 1e-6, eps 1e-8, cosine LR schedule with 500 warm-up steps
             (its horizon: the number of steps the budget affords, estimated from the first slice), grad clip 1,
             EMAModel(decay 0.9999, use_ema_warmup, inv_gamma 1, power 3/4), fp32 ("mixed_precision no"),
             batch 64 (the example's train.sh; its argparse default is 16: --classic-batch). No random flips
             (ours has none either). Its noise and times of step k come from a generator seeded (1, k)
             (training.step_generator), so a resumed run draws what an uninterrupted one would.

The two take turns in slices of --slice-seconds (A B, then B A, ...) until each has used its budget, so
background load on a shared machine hits both alike; each slice ends with a checkpoint, so a killed run
resumes where it stopped (run it again with the same arguments). Then each EMA model draws --n-samples
images with 50 network evaluations:

    ours     generate: dpmpp-2m on its default grid, log-SNR capped at sigma/alpha 80 (its recommended
             sampler; the best at small NFE in quality_vs_nfe); sample i from seed --seed + i
    classic  diffusers DDIMScheduler (eta 0, its defaults from the training scheduler's config), its
             recommended fast sampler; diffusers DDPMScheduler at 50 steps (the example's pipeline sampler),
             both in the pipeline's loop; and generate's dpmpp-2m / logsnr+cap80 on the classic network
             wrapped as a difflab Denoiser (same sampler and seeds as ours: the recipe alone differs)

and the FD of the shipped 'fashion-mnist' classifier's features against the real test split scores them.
Target: our FD <= half the classic's (ours at its sampler against the classic at DDIM 50).

    .venv/bin/python benchmarks/quality_per_minute.py [--minutes 10] [--n-samples 1000]

Writes benchmarks/results/quality_per_minute.md and .png; runs live in benchmarks/runs/quality_per_minute/.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from common import RESULTS, RUNS, busy_processes, header, load_average, md_table
from safetensors.torch import load_file, save_file
from throughput import diffusers_config
from torch import nn
from tqdm.auto import tqdm

from difflab.core.parameterize import Denoiser
from difflab.core.processes import DiscreteDDPM
from difflab.data.images import load_images, to_model, to_uint8
from difflab.data.loader import ShuffledBatches, TensorDataset
from difflab.evaluation.features import embed, load_feature_net
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats
from difflab.runs import store as ckpt
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.presets import PRESETS
from difflab.runs.store import has_checkpoint
from difflab.sampling.generate import generate
from difflab.training.loop import step_generator, train

NAME = "quality_per_minute"
F64 = torch.float64
NFE = 50
DIFFLAB_SAMPLER = (
    "dpmpp-2m / logsnr+cap80, 50 (difflab)"  # generate's defaults for dpmpp-2m: log-SNR grid, sigma cap 80
)
IMAGE_SHAPE = (1, 28, 28)  # the classic's samples
CLASSIC_SEED = 1


# --------------------------------------------------------------------------- contenders


class Ours:
    """difflab's own trainer on the default recipe, one resumed run per slice (train(..., max_minutes=slice))."""

    name = "ours (difflab recipe)"

    def __init__(self, run: Path, data: TensorDataset):
        self.run, self.data = run, data
        preset = PRESETS["fashion-mnist"]
        # steps: a horizon the budget never reaches (the recipe's LR is constant after warm-up); one checkpoint per
        # slice
        self.config = replace(preset, train=replace(preset.train, steps=10**7, sample_every=0, checkpoint_every=10**7))
        self.progress_path = run / "budget.json"
        p = json.loads(self.progress_path.read_text()) if self.progress_path.exists() and has_checkpoint(run) else {}
        self.seconds = p.get("seconds", 0.0)

    @property
    def steps(self) -> int:
        return ckpt.weights_step(self.run) if has_checkpoint(self.run) else 0

    def train_for(self, seconds: float) -> None:
        t0 = time.perf_counter()
        train(
            self.run, self.config, self.data, resume=has_checkpoint(self.run), progress=False, max_minutes=seconds / 60
        )
        self.seconds += time.perf_counter() - t0
        self.progress_path.write_text(json.dumps({"seconds": self.seconds}))

    def denoiser(self) -> Denoiser:
        return DiffusionRun.load(self.run).denoiser

    def samplers(self) -> dict:
        def draw(n: int, seed: int, batch: int) -> torch.Tensor:
            return to_uint8(
                DiffusionRun.load(self.run).sample(
                    n, sampler="dpmpp-2m", steps=NFE, seed=seed, batch=batch, progress=True
                )
            )

        return {DIFFLAB_SAMPLER: draw}


class ClassicNet(nn.Module):
    """A diffusers UNet2DModel as a difflab network: our integer t is diffusers' timestep index t - 1."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, c_noise):
        return self.unet(x, c_noise - 1).sample


class Classic:
    """diffusers' unconditional training example: eps-prediction, linear betas, AdamW 1e-4, cosine LR, EMAModel."""

    name = "classic (diffusers example)"

    def __init__(self, run: Path, images: torch.Tensor, batch: int, budget_seconds: float):
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel

        self.run, self.images, self.budget = run, images, budget_seconds  # images: uint8 (N, 1, 28, 28)
        torch.manual_seed(0)
        self.unet = UNet2DModel(**diffusers_config())
        self.scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
        self.ema = EMAModel(self.unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        self.batches = ShuffledBatches(len(images), batch, seed=0)
        self.steps, self.seconds, self.horizon, self.warmup = 0, 0.0, None, 500
        self.log: list[dict] = []
        if has_checkpoint(run):
            self.load()

    def load(self) -> None:
        """Resume from the newest checkpoint: safetensors weights and optimizer, JSON for the rest (no pickle)."""
        self.steps, opt_state, state = ckpt.load_training_state(self.run)
        self.unet.load_state_dict(ckpt.load_weights(self.run, "net"))
        ema = ckpt.load_weights(self.run, "ema")  # the EMA's shadow parameters, by the network's parameter names
        self.ema.load_state_dict(
            {**state["ema"], "shadow_params": [ema[name] for name, _ in self.unet.named_parameters()]}
        )
        self.opt.load_state_dict(opt_state)
        self.batches.load_state_dict(state["batches"])
        self.seconds, self.horizon, self.log = state["seconds"], state["horizon"], state["log"]

    def lr_factor(self) -> float:
        """diffusers' get_cosine_schedule_with_warmup (num_cycles 0.5) over ``horizon`` steps."""
        if self.steps < self.warmup:
            return self.steps / self.warmup
        horizon = self.horizon or 10**9
        progress = (self.steps - self.warmup) / max(1, horizon - self.warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def step(self) -> float:
        x0 = to_model(self.images[next(self.batches)])  # (B, 1, 28, 28) in [-1, 1]
        gen = step_generator(CLASSIC_SEED, self.steps, torch.device("cpu"))
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (len(x0),), generator=gen)
        x_t = self.scheduler.add_noise(x0, noise, t)
        for group in self.opt.param_groups:
            group["lr"] = 1e-4 * self.lr_factor()
        loss = F.mse_loss(self.unet(x_t, t).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.step(self.unet.parameters())
        self.steps += 1
        return loss.item()

    def train_for(self, seconds: float) -> None:
        t0 = time.perf_counter()
        first = self.steps
        while time.perf_counter() - t0 < seconds:
            loss = self.step()
        spent = time.perf_counter() - t0
        self.seconds += spent
        if self.horizon is None:  # the cosine schedule's length: the steps the whole budget affords at this rate
            self.horizon = int(self.budget * (self.steps - first) / spent)
        self.log.append({"step": self.steps, "seconds": self.seconds, "loss": loss})
        self.save()

    def save(self) -> None:
        """One atomic difflab checkpoint (checkpoint.save_checkpoint): the network, its EMA as a network, the optimizer,
        and in state.json the EMA's counters, the data position, the seconds spent, the LR horizon and the log."""
        ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        state = {
            "ema": ema,
            "batches": self.batches.state_dict(),
            "seconds": self.seconds,
            "horizon": self.horizon,
            "log": self.log,
        }
        ckpt.save_checkpoint(self.run, self.steps, self.unet, self.ema_unet(), self.opt.state_dict(), state)

    def ema_unet(self):
        unet = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(unet.parameters())
        return unet

    def samplers(self) -> dict:
        from diffusers import DDIMScheduler, DDPMScheduler

        def diffusers_loop(scheduler_cls, **step_kwargs):
            """The pipeline's own loop (diffusers' DDPMPipeline / DDIMPipeline): batches drawn from one generator."""

            @torch.no_grad()
            def draw(n: int, seed: int, batch: int) -> torch.Tensor:
                unet, g, out = self.ema_unet(), torch.Generator().manual_seed(seed), []
                sched = scheduler_cls.from_config(self.scheduler.config)
                sched.set_timesteps(NFE)
                for start in tqdm(range(0, n, batch), desc=scheduler_cls.__name__, leave=False):
                    x = torch.randn(min(batch, n - start), 1, 28, 28, generator=g) * sched.init_noise_sigma
                    for t in sched.timesteps:
                        x = sched.step(unet(x, t).sample, t, x, generator=g, **step_kwargs).prev_sample
                    out.append(to_uint8(x))
                return torch.cat(out)  # (n, 1, 28, 28) uint8

            return draw

        def difflab_dpmpp(n: int, seed: int, batch: int) -> torch.Tensor:
            denoiser = Denoiser(ClassicNet(self.ema_unet()), DiscreteDDPM(1000, "linear"), "eps").eval()
            return to_uint8(
                generate(denoiser, IMAGE_SHAPE, n, sampler="dpmpp-2m", steps=NFE, seed=seed, batch=batch, progress=True)
            )

        return {
            "DDIM 50 (diffusers DDIMScheduler, eta 0)": diffusers_loop(DDIMScheduler, eta=0.0),
            "DDPM 50 (diffusers DDPMScheduler)": diffusers_loop(DDPMScheduler),
            DIFFLAB_SAMPLER: difflab_dpmpp,
        }


# --------------------------------------------------------------------------- scoring


def plot(path: Path, rows: list[dict], grids: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 4.2))
    ax = fig.add_axes([0.06, 0.32, 0.36, 0.6])
    labels = [f"{r['contender'].split(' ')[0]}: {r['sampler'].split(' (')[0]}" for r in rows]
    colors = ["tab:blue" if r["contender"].startswith("ours") else "tab:orange" for r in rows]
    bars = ax.bar(range(len(rows)), [r["fd"] for r in rows], color=colors)
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("FD (fashion-mnist features), lower is better")
    ax.set_title("after the same CPU training budget", fontsize=10)
    for i, (title, imgs) in enumerate(grids.items()):
        a = fig.add_axes([0.47 + i * 0.27, 0.08, 0.25, 0.84])
        k = int(math.sqrt(min(64, len(imgs))))  # a k x k grid
        g = imgs[: k * k].reshape(k, k, 28, 28).permute(0, 2, 1, 3).reshape(k * 28, k * 28)  # (k*28, k*28)
        a.imshow(g.numpy(), cmap="gray", vmin=0, vmax=255)
        a.set_title(title, fontsize=8)
        a.axis("off")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training budget of each contender (wall clock)")
    p.add_argument("--slice-seconds", type=float, default=60.0, help="length of one turn")
    p.add_argument("--classic-batch", type=int, default=64)
    p.add_argument("--n-samples", type=int, default=1000)
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", default=str(RUNS / NAME), help="folder of the two runs (resumed when present)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--data-dir", help="folder with the Fashion-MNIST IDX files")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    load_start, busy_start = load_average(), busy_processes()

    train_images = load_images("fashion-mnist", "train", data_dir=args.data_dir).images  # uint8 (60000, 1, 28, 28)
    budget = 60 * args.minutes
    contenders = [
        Ours(runs / "ours", TensorDataset(train_images)),
        Classic(runs / "classic", train_images, args.classic_batch, budget),
    ]

    # ------------------------------------------------------------------ training, in alternating slices
    bar = tqdm(
        total=round(2 * budget),
        initial=round(sum(min(c.seconds, budget) for c in contenders)),
        desc="training (s of budget)",
        unit="s",
        dynamic_ncols=True,
    )
    turn = 0
    while any(c.seconds < budget for c in contenders):
        order = contenders if turn % 2 == 0 else contenders[::-1]
        for c in order:
            left = budget - c.seconds
            if left > 0:
                before = c.seconds
                c.train_for(min(args.slice_seconds, left))
                bar.update(round(min(c.seconds, budget) - min(before, budget)))
                bar.set_postfix_str(" ".join(f"{k.name.split()[0]}={k.steps}" for k in contenders))
        turn += 1
    bar.close()
    load_trained = load_average()

    # ------------------------------------------------------------------ sampling and FD
    net = load_feature_net("fashion-mnist")
    fingerprint = net.fingerprint()[:16]
    test = load_images("fashion-mnist", "test", data_dir=args.data_dir).images
    ref = gaussian_stats(embed(net, test)[0].to(F64))
    floor = frechet_from_stats(*gaussian_stats(embed(net, train_images[: args.n_samples])[0].to(F64)), *ref)
    cache_path = runs / "fd.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows, grids = [], {}
    for c in contenders:
        for label, sampler in c.samplers().items():
            key = f"{c.name}|{label}|{c.steps}|{args.n_samples}|{args.seed}|{fingerprint}"
            grid_path = runs / f"grid-{len(rows)}.safetensors"
            if key not in cache:
                t0 = time.perf_counter()
                print(f"sampling {c.name.split()[0]}: {label}", flush=True)
                imgs = sampler(args.n_samples, args.seed, args.sample_batch)  # uint8 (n, 1, 28, 28)
                fd = frechet_from_stats(*gaussian_stats(embed(net, imgs)[0].to(F64)), *ref)
                cache[key] = {"fd": fd, "seconds": round(time.perf_counter() - t0, 1)}
                cache_path.write_text(json.dumps(cache, indent=1))
                save_file({"images": imgs[:64].contiguous()}, str(grid_path))
            rows.append(
                {"contender": c.name, "sampler": label, "fd": cache[key]["fd"], "seconds": cache[key]["seconds"]}
            )
            if (
                len(grids) < 2
                and label.startswith(("dpmpp", "DDIM"))
                and grid_path.exists()
                and not any(k.startswith(c.name.split()[0]) for k in grids)
            ):
                grids[f"{c.name.split()[0]}: {label.split(' (')[0]}"] = load_file(str(grid_path))["images"]

    # ------------------------------------------------------------------ report
    ours, classic = contenders
    fd_ours = next(r["fd"] for r in rows if r["contender"] == ours.name)
    fd_classic = next(r["fd"] for r in rows if r["contender"] == classic.name and r["sampler"].startswith("DDIM"))
    fd_classic_best = min(r["fd"] for r in rows if r["contender"] == classic.name)
    lines = header(
        "FD after the same CPU training budget: our default recipe vs the classic DDPM recipe (Fashion-MNIST)"
    )
    lines += [
        f"- budget: {args.minutes:g} min of wall-clock training each, torch.set_num_threads({args.threads}), in "
        "alternating "
        f"slices of {args.slice_seconds:g} s; checkpoints written at the end of every slice (their time counts)",
        f"- load average (uptime) at the start: {load_start}; after training: {load_trained}; at the end: "
        f"{load_average()}",
        f"- other busy processes at the start: {'; '.join(busy_start) or 'none'}; at the end: "
        f"{'; '.join(busy_processes()) or 'none'}",
        f"- samples: {args.n_samples} per row, fp32, {NFE} network evaluations each; seeds: difflab rows (generate) "
        "draw sample i "
        f"from seed {args.seed} + i, diffusers rows draw from one generator seeded {args.seed}, as its pipeline does; "
        "FD of the shipped "
        f"'fashion-mnist' classifier (fingerprint {fingerprint}) against the real test split (10000 images); "
        f"floor (FD of {args.n_samples} real training images) = {floor:.3f}",
        "",
        "## Training",
        "",
    ]
    lines += md_table(
        ["contender", "parameters", "seconds trained", "optimizer steps", "images seen", "steps / s"],
        [
            [
                c.name,
                f"{sum(q.numel() for q in (ours.denoiser().net if c is ours else classic.unet).parameters()):,}",
                f"{c.seconds:.0f}",
                f"{c.steps}",
                f"{c.steps * (64 if c is ours else args.classic_batch):,}",
                f"{c.steps / c.seconds:.2f}",
            ]
            for c in contenders
        ],
    )
    if classic.horizon:
        lines += [
            "",
            f"The classic's cosine LR schedule ran over a horizon of {classic.horizon} steps (estimated from its first "
            "slice).",
        ]
    lines += ["", "## Sample quality", ""]
    lines += md_table(
        ["contender", "sampler (50 evaluations)", "FD", "sampling seconds"],
        [[r["contender"], r["sampler"], f"{r['fd']:.3f}", f"{r['seconds']:.0f}"] for r in rows],
        "llrr",
    )
    met = fd_ours <= 0.5 * fd_classic
    lines += [
        "",
        "## Target: our FD <= half the classic's",
        "",
        f"ours {fd_ours:.3f} vs classic at DDIM 50 {fd_classic:.3f}: ratio {fd_ours / fd_classic:.2f} -> "
        + ("**met**" if met else "**not met**")
        + f" (against the classic's best sampler, {fd_classic_best:.3f}: ratio {fd_ours / fd_classic_best:.2f})",
    ]
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"{NAME}.png", rows, grids)
    print("\n".join(lines))
    print(f"\nwrote {out / NAME}.md and .png")


if __name__ == "__main__":
    main()
