"""Likelihood three ways (issue 35; docs/likelihood.md): at equal training steps, on digits and Fashion-MNIST,

    ddpm               the recipe: DDPM cosine (T = 1000), L_simple, fixed reverse variances
    ddpm-learned-var   the same with learned variances (iDDPM), trained with L_hybrid
    vp-cosine-vlb      continuous-time VP, the fixed cosine schedule, trained on the continuous bound (VDM's loss)
    vp-learned-vlb     the same loss with a learned schedule (VDM: gamma(t) monotone, its variance trained down)

each scored on the same test images by

    the bound        DDPM runs: the discrete bound at T = 1000 and at 50 and 100 evenly spaced steps (fixed
                     variances: beta at 1000, the better of beta and beta_tilde at 50 and 100; learned: the
                     run's own); continuous
                     runs: the continuous bound (k stratified draws per image, uniform in log-SNR)
    the ODE          the probability-flow ODE's bits/dim (uniform dequantisation, Hutchinson with one probe,
                     rtol = atol = 1e-5) with its NFE
    loss variance    continuous runs: the variance over draws (image, t, eps) of the one-draw bound in bits/dim,
                     the loss the runs were trained on (VDM's claim: a learned schedule lowers it)

and the costs: seconds per training step (a separate timed phase, ``--costs``, run with the machine to itself)
and seconds per image of each measure.

    .venv/bin/python benchmarks/likelihood.py                      # train (resumable) and measure
    .venv/bin/python benchmarks/likelihood.py --costs              # then the timed phase, alone on the machine

Runs live in benchmarks/runs/likelihood/DATASET-CONFIG; figures are cached in results/likelihood.json by the
run's weights step, so a rerun measures only what changed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import RESULTS, RUNS, busy_processes, header, load_average, md_table, trained  # noqa: E402

CONFIGS = {
    "ddpm": ("DDPM cosine, L_simple, fixed variances", []),
    "ddpm-learned-var": ("DDPM cosine, L_hybrid, learned variances", ["--variance", "learned"]),
    "vp-cosine-vlb": (
        "VP cosine (fixed), continuous bound",
        ["--process", "vp", "--schedule", "cosine", "--objective", "vlb"],
    ),
    "vp-learned-vlb": ("VP learned schedule, continuous bound", ["--process", "vp", "--schedule", "learned"]),
}
DEFAULT_STEPS = {"digits": 1500, "fashion-mnist": 1500}
DEFAULT_BPD_N = {"digits": 64, "fashion-mnist": 64}
BOUND_STEPS = (50, 100)
K_CONTINUOUS = 64  # time draws per image in the continuous bound
VARIANCE_DRAWS = 16  # one-draw bounds per image for the loss variance
# per config, bumped when measure() changes what it reports for that config: cached figures of a lower version
# are remeasured (3: the DDPM bound's K-step grid starts at t = 1, as improved-diffusion's respacing; for the
# learned schedule, retrained with the variance gradient in the loss's units, bits/dim)
MEASURES_VERSION = {"ddpm": 3, "ddpm-learned-var": 3, "vp-cosine-vlb": 2, "vp-learned-vlb": 3}
ODE_BATCH = 16


def run_dir(runs: Path, dataset: str, name: str) -> Path:
    return runs / f"{dataset}-{name}"


def train_argv(dataset: str, name: str, steps: int, out: Path) -> list[str]:
    return ["train", dataset, "--out", str(out), "--steps", str(steps), "--precision", "fp32", "--seed", "0",
            *CONFIGS[name][1], "--quiet"]  # fmt: skip


def test_images(dataset: str, n: int) -> torch.Tensor:
    from difflab.data.images import load_images, to_model
    from difflab.evaluation.reference import fixed_subset

    data = load_images(dataset, split="test")
    return to_model(data.images[fixed_subset(len(data), n)])


def measure(run_path: Path, x: torch.Tensor, seed: int = 0) -> dict:
    """Every figure of one run on the test images x (see the module doc), with the seconds each took."""
    from difflab.core.likelihood import bits_per_dim, bound_grid
    from difflab.core.losses import ContinuousVLBLoss
    from difflab.core.ode_likelihood import ode_bits_per_dim
    from difflab.core.processes import DiscreteDDPM
    from difflab.runs.diffusion import DiffusionRun

    run = DiffusionRun.load(run_path, ema=True)
    den = run.denoiser.cpu().eval()
    process = den.process
    D = x[0].numel()
    out: dict = {"step": run.step, "n": len(x), "seconds": {}}
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731
    t0 = time.perf_counter()
    if isinstance(process, DiscreteDDPM):
        for K in (process.T, *BOUND_STEPS):
            best = None  # fixed variances: beta at T = 1000 (evaluate's choice, the tighter there), both below
            variances = ["learned"] if den.learned_variance else ["beta"] if K == process.T else ["beta", "beta_tilde"]
            for variance in variances:
                b = bits_per_dim(
                    den, x.split(4), variance=variance, generator=gen(), ts=bound_grid(process, K),
                    t_batch=max(1, 2**19 // (4 * D)), progress=False,
                )  # fmt: skip
                if best is None or b["total"] < best["total"]:
                    best = {"total": b["total"], "stderr": b["total_stderr"], "variance": variance,
                            "per_example": b["per_example"].tolist()}  # fmt: skip
            out[f"bound_{K}"] = best
        out["seconds"]["bound"] = time.perf_counter() - t0
    else:
        b = bits_per_dim(den, x.split(16), continuous=True, k=K_CONTINUOUS, generator=gen(), progress=False)
        out["bound_continuous"] = {"total": b["total"], "stderr": b["total_stderr"], "prior": b["prior"],
                                   "diffusion": b["terms"], "decoder": b["decoder"],
                                   "per_example": b["per_example"].tolist()}  # fmt: skip
        out["seconds"]["bound"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loss = ContinuousVLBLoss()  # the runs' own training loss, one draw of (t, eps) per image and repeat
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            draws = []
            for _ in range(VARIANCE_DRAWS):
                t = process.sample_t(len(x), generator=g)
                noise = torch.randn(x.shape, generator=g)
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))  # the decoder's noise
                draws.append(loss(den, x, t=t, noise=noise, reduction="none").double())
            draws = torch.cat(draws)
        out["loss_variance"] = {"mean": float(draws.mean()), "var": float(draws.var()), "draws": len(draws)}
        out["seconds"]["loss_variance"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    o = ode_bits_per_dim(den, x.split(ODE_BATCH), generator=gen(), progress=False)
    out["ode"] = {"total": o["total"], "stderr": o["total_stderr"], "nfe": o["nfe"],
                  "per_example": o["per_example"].tolist()}  # fmt: skip
    out["seconds"]["ode"] = time.perf_counter() - t0
    return out


def step_seconds(dataset: str, name: str, steps: int = 40) -> float:
    """Seconds per training step of a fresh run of the config: (t(5 + steps) - t(5)) / steps, in subprocesses."""
    times = []
    for n in (5, 5 + steps):
        with tempfile.TemporaryDirectory() as tmp:
            argv = train_argv(dataset, name, n, Path(tmp) / "run")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "difflab", *argv], check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
    return (times[1] - times[0]) / steps


def _fmt(v, digits=3):
    return "-" if v is None else f"{v:.{digits}f}"


def table(results: dict, datasets: list[str]) -> list[str]:
    lines = []
    for dataset in datasets:
        rows = []
        for name, (label, _) in CONFIGS.items():
            r = results.get(dataset, {}).get(name)
            if r is None:
                continue
            m = r["measures"]
            bound = m.get("bound_1000") or m.get("bound_continuous")
            b50, b100 = m.get("bound_50"), m.get("bound_100")
            lv = m.get("loss_variance")
            cost = r.get("step_seconds")
            per_image = {k: v / m["n"] for k, v in m["seconds"].items()}
            rows.append([
                f"`{name}`: {label}", m["step"],
                f"{_fmt(bound['total'])} ± {_fmt(bound['stderr'])}",
                "-" if b50 is None else f"{_fmt(b50['total'])} ({b50['variance']})",
                "-" if b100 is None else f"{_fmt(b100['total'])} ({b100['variance']})",
                f"{_fmt(m['ode']['total'])} ± {_fmt(m['ode']['stderr'])}", f"{m['ode']['nfe']:.0f}",
                "-" if lv is None else f"{lv['var']:.3g}",
                "-" if cost is None else f"{cost:.3f}",
                f"{per_image['bound']:.2f} / {per_image['ode']:.2f}",
            ])  # fmt: skip
        n = next(iter(results.get(dataset, {}).values()), {}).get("measures", {}).get("n")
        lines += [f"## {dataset} ({n} test images)", ""]
        lines += md_table(
            ["run", "steps", "bound bits/dim", "bound, 50 steps", "bound, 100 steps", "ODE bits/dim", "ODE NFE",
             "loss variance", "s / train step", "s / image: bound / ODE"],
            rows,
        )  # fmt: skip
        lines.append("")
        lines += paired(results.get(dataset, {}))
    return lines


# the comparisons the issue asks for: (what, run a, figure a, run b, figure b); a - b < 0 means a is lower
COMPARISONS = [
    ("learned schedule vs fixed cosine, continuous bound", "vp-learned-vlb", "bound_continuous",
     "vp-cosine-vlb", "bound_continuous"),
    ("learned vs fixed variances, bound at 50 steps", "ddpm-learned-var", "bound_50", "ddpm", "bound_50"),
    ("learned vs fixed variances, bound at 100 steps", "ddpm-learned-var", "bound_100", "ddpm", "bound_100"),
    ("learned vs fixed variances, bound at T = 1000", "ddpm-learned-var", "bound_1000", "ddpm", "bound_1000"),
    *[(f"ODE vs bound, `{name}`", name, "ode", name, "bound_1000" if name.startswith("ddpm") else "bound_continuous")
      for name in CONFIGS],
]  # fmt: skip


def paired(runs: dict) -> list[str]:
    """Paired differences on the same test images (and the same dequantisation draws): mean ± standard error."""
    rows = []
    for what, a, fa, b, fb in COMPARISONS:
        xa = runs.get(a, {}).get("measures", {}).get(fa, {}).get("per_example")
        xb = runs.get(b, {}).get("measures", {}).get(fb, {}).get("per_example")
        if xa is None or xb is None:
            continue
        d = torch.tensor(xa, dtype=torch.float64) - torch.tensor(xb, dtype=torch.float64)
        se = float(d.std() / math.sqrt(len(d)))
        rows.append([what, f"{float(d.mean()):+.3f} ± {se:.3f}", f"{float(d.mean()) / se:+.1f}" if se > 0 else "-"])
    if not rows:
        return []
    return ["Paired differences (a - b, bits/dim, on the same images; negative: a is lower):", "",
            *md_table(["comparison", "a - b", "in standard errors"], rows), ""]  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_STEPS), choices=list(DEFAULT_STEPS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, help="training steps of every run (default: digits 1500, fashion-mnist 1500)")
    p.add_argument("--bpd-n", type=int, help="test images (default: digits 64, fashion-mnist 32)")
    p.add_argument("--costs", action="store_true", help="time the training steps (run alone on the machine)")
    p.add_argument("--no-train", action="store_true", help="measure only the runs that exist")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--runs", type=Path, default=RUNS / "likelihood")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    cache = args.out / "likelihood.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for dataset in args.datasets:
        steps = args.steps or DEFAULT_STEPS[dataset]
        x = test_images(dataset, args.bpd_n or DEFAULT_BPD_N[dataset])
        for name in args.configs:
            out = run_dir(args.runs, dataset, name)
            if not args.no_train:
                trained(train_argv(dataset, name, steps, out))
            if not (out / "config.json").exists():
                continue
            entry = results.setdefault(dataset, {}).setdefault(name, {})
            from difflab.runs.store import weights_step

            m = entry.get("measures", {})
            if (m.get("step"), m.get("n"), m.get("version")) != (weights_step(out), len(x), MEASURES_VERSION[name]):
                print(f"measuring {out} ...", flush=True)
                entry["measures"] = {**measure(out, x), "version": MEASURES_VERSION[name]}
                entry["load"] = load_average()
            if args.costs:
                entry["step_seconds"] = step_seconds(dataset, name)
                entry["costs_load"] = load_average()
                entry["costs_busy"] = busy_processes()
            args.out.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(results, indent=1))
            print(json.dumps({dataset: {name: entry}}, indent=1), flush=True)
    lines = header("Likelihood three ways: fixed cosine, learned schedule, learned variances")
    lines += [
        "Bits/dim of test images (lower is better), every run trained with the same steps, batch and seed in fp32; "
        "± is the standard error over images. The bound: DDPM runs at T = 1000 and on 50 / 100 evenly spaced "
        "steps (fixed variances: beta at 1000, the better of beta and beta_tilde at 50 / 100, named), "
        "continuous runs the continuous bound "
        f"({K_CONTINUOUS} stratified draws per image, uniform in log-SNR). ODE: uniform dequantisation, "
        "Hutchinson (1 probe), rtol = atol = "
        "1e-5. Loss variance: the variance of the continuous runs' training loss (one draw of t ~ U(0, 1) and eps, "
        f"bits/dim), pooled over {VARIANCE_DRAWS} draws of each image. Costs: seconds per training "
        "step from `--costs` (5 vs 45 steps of a fresh run), seconds per image of each measure.",
        "",
        *table(results, args.datasets),
    ]
    (args.out / "likelihood.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
