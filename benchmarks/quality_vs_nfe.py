"""Sample quality against the number of network evaluations (NFE), for every sampler and step spacing.

One Fashion-MNIST model with our default recipe (image_presets: DiscreteDDPM cosine T=1000, v-prediction,
min-SNR-5, EMA; the 'fashion-mnist' U-Net) is trained by this command with difflab's own loop
(training.train, on --device, stopping with a checkpoint after --train-minutes), or reused when its run
folder already holds a checkpoint of at least --steps steps (an unfinished run resumes exactly). Its EMA
denoiser then draws --n-samples images by generate at every (sampler, spacing, NFE):

    samplers  ddpm (ancestral, variance beta), ddim (eta 0), euler, heun, dpmpp-2m: those of SAMPLERS that
              apply to a DiscreteDDPM process (langevin and pc need a variance-exploding one)
    spacings  uniform, leading, trailing, karras, logsnr, each label meaning one grid whatever the library's
              default: 'karras' and 'logsnr' are the uncapped grids (sigma_tilde_cap=None); 'karras+capC' and
              'logsnr+capC' are built by timesteps(..., sigma_tilde_cap=C), C = --sigma-cap, by default 80,
              which is difflab's default grid for these spacings ('--sigma-cap none' leaves those rows out)
    NFE       5, 10, 20, 50 network evaluations: N steps for every sampler but heun, which evaluates
              2N - 1 times (none extra into t = 0), so heun runs N = (NFE + 1) // 2 steps and the table
              shows its true count (9 at a budget of 10)

and each set is scored by the Frechet distance (FD) of the shipped 'fashion-mnist' classifier's 128-d
penultimate features against the real test split (10000 images), next to DDPM ancestral sampling at
1000 steps, the reference. Every point draws sample i from seed --seed + i (generate's per-sample
seeds), so all points start from the same noises. Grids that coincide (uniform and
trailing are one grid for DiscreteDDPM) are sampled once. Targets: at 10 evaluations the best sampler's
FD within 10% of the 1000-step FD, at 20 within 2%.

    .venv/bin/python benchmarks/quality_vs_nfe.py                       # CPU, small defaults
    python benchmarks/quality_vs_nfe.py --device cuda --steps 30000 --batch 128 --n-samples 10000

Each scored point is appended to the results' .jsonl as it finishes, so a killed run resumes where it
stopped (a point is reused when its sampler, grid, sample count, seed, model step and feature net match).
``--report-only`` rewrites the table and plot from the .jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from common import (
    RESULTS,
    ROOT,
    RUNS,
    command_line,
    header,
    load_average,
    machine,
    md_table,
)
from tqdm.auto import tqdm

from difflab.data.images import load_images, to_uint8
from difflab.data.loader import TensorDataset
from difflab.evaluation.features import embed, load_feature_net
from difflab.evaluation.metrics import frechet_from_stats, gaussian_stats
from difflab.runs.config import RunConfig, load_config
from difflab.runs.diffusion import DiffusionRun
from difflab.runs.presets import PRESETS
from difflab.runs.store import has_checkpoint, weights_step
from difflab.sampling.samplers import DEFAULT_SIGMA_CAP, timesteps
from difflab.training.loop import train

F64 = torch.float64
SAMPLERS = ("ddpm", "ddim", "euler", "heun", "dpmpp-2m")
SPACINGS = ("uniform", "leading", "trailing", "karras", "logsnr")
NFES = (5, 10, 20, 50)
TARGETS = {10: 0.10, 20: 0.02}  # NFE budget -> allowed relative FD gap to the 1000-step reference
REFERENCE = ("ddpm", "uniform", 1000)
NAME = "quality_vs_nfe"
CAPPABLE = ("karras", "logsnr")  # grids that --sigma-cap also sweeps with timesteps(..., sigma_tilde_cap=cap)
SEEDING = "seed+i"  # generate's per-sample seeds; part of a point's key (older rows drew from one generator)
CHECKPOINT_EVERY = 2000


def capped(spacing: str, cap: float) -> str:
    """The label of a capped grid, e.g. 'karras+cap80'."""
    return f"{spacing}+cap{cap:g}"


def parse_spacing(label: str) -> tuple[str, float | None]:
    """'karras+cap80' -> ('karras', 80.0); 'karras' -> ('karras', None): the uncapped grid, not the library default."""
    spacing, _, cap = label.partition("+cap")
    return spacing, (float(cap) if cap else None)


def sweep_spacings(args) -> list[str]:
    """The spacings of the sweep: --spacings, then the capped karras / log-SNR grids when --sigma-cap is set."""
    extra = [capped(sp, args.sigma_cap) for sp in args.spacings if sp in CAPPABLE] if args.sigma_cap else []
    return list(args.spacings) + extra


def sigma_cap(text: str) -> float | None:
    """--sigma-cap: a positive number, or 'none' (no capped rows)."""
    if text.lower() == "none":
        return None
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {text}")
    return value


# --------------------------------------------------------------------------- the model


def recipe(steps: int, batch: int | None) -> RunConfig:
    """Our default recipe for Fashion-MNIST, with the step count (and batch size) of this benchmark."""
    preset = PRESETS["fashion-mnist"]
    tc = replace(
        preset.train,
        steps=steps,
        batch_size=batch or preset.train.batch_size,
        sample_every=0,
        checkpoint_every=CHECKPOINT_EVERY,
    )
    return replace(preset, train=tc)


def trained_model(args, images) -> tuple[torch.nn.Module, RunConfig, dict]:
    """The EMA denoiser of args.run, trained (or resumed) to args.steps first if needed; its config; and where it was
    trained."""
    run = Path(args.run)
    resume = has_checkpoint(run)
    done = weights_step(run) if resume else 0
    info_path = run / "trained_on.json"
    # the sessions that trained the checkpoint there; none when there is none (a fresh run, or one of an older layout)
    info = json.loads(info_path.read_text()) if resume and info_path.exists() else {"sessions": []}
    if done < args.steps:
        config = load_config(run) if resume else recipe(args.steps, args.batch)
        config = replace(config, train=replace(config.train, steps=args.steps))
        t0 = time.perf_counter()
        train(run, config, TensorDataset(images), device=args.device, resume=resume, max_minutes=args.train_minutes)
        reached = weights_step(run)
        info["sessions"].append(
            {
                "from_step": done,
                "to_step": reached,
                "minutes": round((time.perf_counter() - t0) / 60, 2),
                "device": args.device,
                "machine": machine(args.device),
                "date": time.strftime("%Y-%m-%d %H:%M %Z"),
                "command": command_line(),
            }
        )
        info_path.write_text(json.dumps(info, indent=2) + "\n")
    model = DiffusionRun.load(run, device=args.device)
    info["step"], info["config"] = weights_step(run), json.loads(model.config.to_json())
    return model, model.config, info


# --------------------------------------------------------------------------- the sweep


def steps_for(sampler: str, nfe: int) -> int:
    """Sampler steps that spend at most ``nfe`` evaluations (heun: 2N - 1 per N steps)."""
    return (nfe + 1) // 2 if sampler == "heun" else nfe


def nfe_of(sampler: str, steps: int) -> int:
    return 2 * steps - 1 if sampler == "heun" else steps


def sweep_points(args) -> list[tuple[str, str, int]]:
    """(sampler, spacing, steps), the reference first, then the budgets with targets, then the rest."""
    budgets = sorted(args.nfe, key=lambda n: (n not in TARGETS, n))
    points = [(args.ref_sampler, "uniform", args.ref_steps)]
    for nfe in budgets:
        points += [(s, sp, steps_for(s, nfe)) for s in args.samplers for sp in sweep_spacings(args)]
    return points


@torch.no_grad()
def features_of_samples(denoiser, config, feature_net, sampler, spacing, steps, args) -> torch.Tensor:
    """Features (n, 128) of args.n_samples images drawn by generate on the grid the label ``spacing`` names."""
    spacing, cap = parse_spacing(spacing)
    cast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.precision == "bf16")
    with cast:
        x = denoiser.sample(
            args.n_samples,
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            options={"sigma_tilde_cap": cap},
            seed=args.seed,
            batch=args.sample_batch,
            device=args.device,
        )
    images = to_uint8(x.float()).to(args.device)  # (n, 1, 28, 28)
    return embed(feature_net, images, batch=2000)[0].to(F64).cpu()


def run_sweep(args, denoiser, config, info, feature_net, ref_stats, jsonl: Path, deadline: float) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()] if jsonl.exists() else []
    fingerprint = feature_net.fingerprint()[:16]
    process = denoiser.process

    def key(sampler, grid):
        return json.dumps(
            [
                sampler,
                [round(t, 6) for t in grid],
                args.n_samples,
                args.seed,
                info["step"],
                fingerprint,
                args.precision,
                SEEDING,
            ]
        )

    done = {r["key"]: r for r in rows}
    points = sweep_points(args)
    bar = tqdm(points, desc="FD sweep", dynamic_ncols=True)
    for sampler, spacing, steps in bar:
        spacing_name, cap = parse_spacing(spacing)
        grid = timesteps(process, steps, spacing_name, sigma_tilde_cap=cap).tolist()
        k = key(sampler, grid)
        label = (sampler, spacing, steps)
        if any(r["key"] == k and (r["sampler"], r["spacing"], r["steps"]) == label for r in rows):
            continue
        if k in done:  # the same grid under another spacing name: the same samples
            row = dict(done[k], spacing=spacing, same_as=done[k]["spacing"], seconds=0.0)
        else:
            if time.time() > deadline:
                print(f"deadline reached: stopping the sweep before {label}; rerun to continue")
                return
            bar.set_postfix_str(f"{sampler} {spacing} {steps} steps")
            t0 = time.perf_counter()
            feats = features_of_samples(denoiser, config, feature_net, sampler, spacing, steps, args)
            fd = frechet_from_stats(*gaussian_stats(feats), *ref_stats)
            row = {
                "key": k,
                "sampler": sampler,
                "spacing": spacing,
                "steps": steps,
                "nfe": nfe_of(sampler, steps),
                "fd": fd,
                "n": args.n_samples,
                "seed": args.seed,
                "seeding": SEEDING,
                "model_step": info["step"],
                "feature_net": fingerprint,
                "precision": args.precision,
                "seconds": round(time.perf_counter() - t0, 2),
                "device": args.device,
            }
            done[k] = row
        rows.append(row)
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- report


def report(args, jsonl: Path, meta: dict) -> None:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    # only rows of this model, sample count, feature net and precision (the .jsonl may hold older sweeps)
    rows = [
        r
        for r in rows
        if (r["model_step"], r["n"], r["feature_net"], r["precision"])
        == (meta["model_step"], meta["n"], meta["fingerprint"], args.precision)
    ]
    refs = [
        r for r in rows if (r["sampler"], r["spacing"], r["steps"]) == (args.ref_sampler, "uniform", args.ref_steps)
    ]
    ref = refs[-1] if refs else None
    capped_spacings = sorted({r["spacing"] for r in rows if parse_spacing(r["spacing"])[1] is not None})
    spacings = list(args.spacings) + capped_spacings
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        if r is ref:
            continue
        budget = next((n for n in args.nfe if steps_for(r["sampler"], n) == r["steps"]), None)
        if budget is not None:
            table.setdefault((r["sampler"], r["spacing"]), {})[budget] = r

    lines = header(
        "Sample quality vs number of network evaluations (Fashion-MNIST, default recipe)",
        command=meta.get("command"),
        machine_line=f"{meta.get('machine')} (the FD sweep); load average at its end: {meta.get('load', '?')}",
    )
    lines += [
        f"- model: `{_shown(args.run)}`, EMA weights at step {meta.get('model_step')}; recipe: DiscreteDDPM cosine "
        "T=1000, "
        f"v-prediction, min-SNR-5, AdamW lr {meta.get('lr')}, warm-up {meta.get('warmup')}, EMA "
        f"{meta.get('ema_decay')}, "
        f"batch {meta.get('batch')}, precision {meta.get('train_precision')}, U-Net preset 'fashion-mnist' "
        f"({meta.get('params', '?'):,} parameters)",
    ]
    for s in meta.get("sessions", []):
        by = f" by `{s['command']}`" if s.get("command") else ""
        lines.append(
            f"- trained steps {s['from_step']}-{s['to_step']} in {s['minutes']} min on {s['machine']} ({s['date']}){by}"
        )
    lines += [
        f"- samples: {meta.get('n')} per point, seed {args.seed}, sampling precision {args.precision}; "
        f"FD of the shipped 'fashion-mnist' classifier's 128-d features (fingerprint {meta.get('fingerprint')}, "
        f"test accuracy {meta.get('feature_acc')}) against the real test split ({meta.get('ref_n')} images)",
        f"- floor: FD of {meta.get('n')} real training images against the test split = "
        f"{meta.get('floor', float('nan')):.3f} "
        "(what a perfect model scores at this sample count)",
        f"- reference: {args.ref_sampler} ancestral, {args.ref_steps} steps: FD = "
        + (f"{ref['fd']:.3f}" if ref else "not yet measured"),
        "- NFE = network evaluations; heun runs N steps for 2N - 1 evaluations, so its column '10' is 9 evaluations "
        "(5 steps), '20' is 19, '50' is 49, '5' is 5 (3 steps). uniform and trailing are the same grid for "
        "DiscreteDDPM.",
        *(
            f"- spacing '{sp}': the uncapped {sp} grid (timesteps(..., sigma_tilde_cap=None), `difflab sample "
            "--sigma-cap none`), "
            f"not difflab's default for it, which is capped at {DEFAULT_SIGMA_CAP:g}."
            for sp in CAPPABLE
            if sp in spacings
        ),
        *(
            f"- spacing '{label}': the {sp} grid built by timesteps(..., sigma_tilde_cap={cap:g}) ("
            + ("difflab's default grid" if cap == DEFAULT_SIGMA_CAP else f"`difflab sample --sigma-cap {cap:g}`")
            + f"): the first step still starts at t = T, the rest are spread below sigma/alpha = {cap:g}."
            for label in capped_spacings
            for sp, cap in [parse_spacing(label)]
        ),
        "",
        "## FD by sampler, spacing and NFE (lower is better; in brackets: relative gap to the 1000-step reference)",
        "",
    ]
    budgets = list(args.nfe)

    def cell(r):
        if r is None:
            return "-"
        gap = f" ({100 * (r['fd'] / ref['fd'] - 1):+.0f}%)" if ref else ""
        nfe = (
            f" [{r['nfe']}]" if r["nfe"] != next(n for n in budgets if steps_for(r["sampler"], n) == r["steps"]) else ""
        )
        return f"{r['fd']:.3f}{gap}{nfe}"

    trs = [
        [s, sp, *(cell(table.get((s, sp), {}).get(n)) for n in budgets)]
        for s in args.samplers
        for sp in spacings
        if sp in args.spacings or (s, sp) in table
    ]
    lines += md_table(["sampler", "spacing", *(f"NFE {n}" for n in budgets)], trs, "ll" + "r" * len(budgets))

    lines += ["", "## Targets", ""]
    trows = []
    for nfe, tol in TARGETS.items():
        cands = [r for per in table.values() for n, r in per.items() if n == nfe]
        if not cands or ref is None:
            trows.append([f"{nfe}", f"within {100 * tol:.0f}%", "not measured", "", "", ""])
            continue
        best = min(cands, key=lambda r: r["fd"])
        gap = best["fd"] / ref["fd"] - 1
        trows.append(
            [
                f"{nfe}",
                f"within {100 * tol:.0f}%",
                f"{best['sampler']} / {best['spacing']} ({best['nfe']} evals)",
                f"{best['fd']:.3f}",
                f"{100 * gap:+.1f}%",
                "yes" if gap <= tol else "**no**",
            ]
        )
    lines += md_table(
        ["NFE budget", "target", "best sampler / spacing", "FD", "gap to 1000-step DDPM", "met"], trows, "lllrrl"
    )
    if meta.get("notes"):
        lines += ["", "## Notes", "", *(f"- {note}" for note in meta["notes"])]
    lines += ["", "Raw rows (one per point, with seconds per point): `benchmarks/results/quality_vs_nfe.jsonl`."]
    out = Path(args.results)
    (out / f"{NAME}.md").write_text("\n".join(lines) + "\n")
    plot(out / f"{NAME}.png", args, spacings, table, ref, meta)
    print("\n".join(lines))


def _shown(path) -> str:
    """A path relative to the repository root when it lies inside it."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def plot(path: Path, args, spacings, table, ref, meta) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    n = len(args.samplers)
    cols = min(3, n)
    fig, axes = plt.subplots(
        math.ceil(n / cols), cols, figsize=(4.2 * cols, 3.4 * math.ceil(n / cols)), squeeze=False, sharey=True
    )
    for ax, s in zip(axes.flat, args.samplers):
        for sp in spacings:
            pts = sorted(table.get((s, sp), {}).values(), key=lambda r: r["nfe"])
            style = "x:" if sp == "trailing" else ("s--" if parse_spacing(sp)[1] is not None else "o-")
            if pts:
                ax.plot(
                    [r["nfe"] for r in pts],
                    [r["fd"] for r in pts],
                    style,
                    ms=3,
                    label=sp + (" (= uniform grid)" if sp == "trailing" else ""),
                )
        if ref:
            ax.axhline(ref["fd"], c="k", ls="--", lw=1, label=f"DDPM {args.ref_steps} steps")
            ax.axhspan(ref["fd"], ref["fd"] * 1.1, color="grey", alpha=0.15)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(list(args.nfe), [str(v) for v in args.nfe])
        ax.set_title(s)
        ax.set_xlabel("network evaluations")
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].set_ylabel("FD (fashion-mnist features)")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[1:n]:  # panels with capped grids get their own legend (the first one has none of them)
        if any(parse_spacing(line.get_label())[1] is not None for line in ax.get_lines()):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(
        f"Fashion-MNIST, default recipe, step {meta.get('model_step')}, {meta.get('n')} samples per point "
        "(grey band: within 10% of the reference)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--steps", type=int, help="training steps (default 2000 on cpu, 30000 on cuda)")
    p.add_argument("--batch", type=int, help="training batch (default: the recipe's 64)")
    p.add_argument("--train-minutes", type=float, help="stop training after this long (checkpointed; rerun to go on)")
    p.add_argument("--run", default=str(RUNS / "quality_vs_nfe"), help="run folder (reused / resumed if present)")
    p.add_argument(
        "--out", "--results", dest="results", default=str(RESULTS), help="folder for the .md, .png and .jsonl"
    )
    p.add_argument("--n-samples", type=int, help="samples per point (default 256 on cpu, 10000 on cuda)")
    p.add_argument("--sample-batch", type=int, help="samples per sampler call (default 256 on cpu, 10000 on cuda)")
    p.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    p.add_argument("--spacings", nargs="+", default=list(SPACINGS), choices=SPACINGS)
    p.add_argument(
        "--sigma-cap",
        type=sigma_cap,
        default=DEFAULT_SIGMA_CAP,
        help=f"also sweep the karras and logsnr grids capped at this sigma/alpha (default {DEFAULT_SIGMA_CAP:g}, "
        "difflab's default grid; 'none': only the uncapped ones)",
    )
    p.add_argument("--ref-sampler", default="ddpm", choices=SAMPLERS)
    p.add_argument("--ref-steps", type=int, default=1000)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="sampling precision (autocast)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--data-dir", help="folder with the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads on cpu")
    p.add_argument("--deadline-minutes", type=float, help="stop starting new points after this long (whole command)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the .jsonl")
    args = p.parse_args(argv)
    t_start = time.time()
    deadline = t_start + 60 * args.deadline_minutes if args.deadline_minutes else float("inf")
    cuda = args.device.startswith("cuda")
    args.steps = args.steps or (30000 if cuda else 2000)
    args.n_samples = args.n_samples or (10000 if cuda else 256)
    args.sample_batch = min(args.sample_batch or (10000 if cuda else 256), args.n_samples)
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(args.threads)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / f"{NAME}.jsonl"
    meta_path = out / f"{NAME}.meta.json"

    if args.report_only:
        report(args, jsonl, json.loads(meta_path.read_text()))
        return

    train_images = load_images("fashion-mnist", "train", data_dir=args.data_dir).images
    test_images = load_images("fashion-mnist", "test", data_dir=args.data_dir).images
    denoiser, config, info = trained_model(args, train_images)
    feature_net = load_feature_net("fashion-mnist").to(args.device)
    ref_feats = embed(feature_net, test_images.to(args.device), batch=2000)[0].to(F64).cpu()
    ref_stats = gaussian_stats(ref_feats)
    floor_feats = embed(feature_net, train_images[: args.n_samples].to(args.device), batch=2000)[0].to(F64).cpu()
    tc = info["config"]["train"]
    meta = {
        "device": args.device,
        "machine": machine(args.device),
        "model_step": info["step"],
        "n": args.n_samples,
        "sessions": info["sessions"],
        "lr": tc["lr"],
        "warmup": tc["warmup"],
        "ema_decay": tc["ema_decay"],
        "batch": tc["batch_size"],
        "train_precision": tc["precision"],
        "params": sum(p.numel() for p in denoiser.net.parameters()),
        "fingerprint": feature_net.fingerprint()[:16],
        "feature_acc": feature_net.meta.get("test_accuracy"),
        "ref_n": len(test_images),
        "floor": frechet_from_stats(*gaussian_stats(floor_feats), *ref_stats),
        "command": command_line(),
    }
    run_sweep(args, denoiser, config, info, feature_net, ref_stats, jsonl, deadline)
    meta["load"] = load_average()
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    report(args, jsonl, meta)
    print(f"\nwrote {out / NAME}.md, .png, .jsonl (took {(time.time() - t_start) / 60:.1f} min)")


if __name__ == "__main__":
    main()
