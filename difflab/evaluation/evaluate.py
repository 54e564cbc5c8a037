"""Evaluate a trained run: how close its samples are to real data, and the likelihood bound of held-out data.

    result = evaluate("runs/digits", n=1000, sampler="dpmpp-2m", steps=20)
    print(format_report(result))

Image runs (digits, fashion-mnist, folders, npz). ``n`` samples are drawn in batches through
``generate`` (sample i has seed ``seed + i``), rounded to 8 bits like the data, and read by a feature network
(features.py; the shipped classifier for digits and Fashion-MNIST, fixed random features otherwise).
Against the reference split (``split``, default the test split) the report gives

    fd               Frechet distance between Gaussians fitted to the penultimate features (FID's formula)
    kid              mean and standard error of the unbiased polynomial-kernel MMD^2 over 100 subsets
    precision/recall k-NN manifold precision and recall, k = 3, on equal-size sets
    classes          the class histogram of the samples as the classifier sees them, the same for the
                     real split, the real labels, and the total variation between the first two
    real_vs_real     the same scores for n real images of the other split (train when the reference is
                     test) in place of the samples: what a model that reproduced the data would get at
                     this n (FD and KID are biased upwards at finite n: compare with this floor, not 0)
    bits_per_dim     the variational bound L_T + sum L_{t-1} + L_0 (likelihood.py, discretized decoder,
                     reverse variance beta, the tighter of the two fixed choices) of ``bpd_n`` test images,
                     in bits/dim with its standard error; DiscreteDDPM runs only, else null with the reason

The features of the reference split (a fixed subset of at most 10000 images) and their mean and
covariance are computed once and cached in $DIFFLAB_CACHE (default ~/.cache/difflab), keyed by the data
set, the split, a hash of the images themselves and the feature network's fingerprint, so a changed data
set or network never reuses stale statistics.

2-D runs: energy distance and sliced Wasserstein-2 of the samples against fresh points of the data set,
with the same distances between two fresh data sets as the floor.

Cost (2 CPU cores, measured with the preset U-Nets): bits/dim evaluates the denoiser at all T = 1000
steps per image, 0.6 s per 8x8 digit (1.7 s when other work shares the cores) and 6.6 s per 28x28 image,
so ``bpd_n`` defaults to 32: 20-50 s for digits, 3-4 minutes for Fashion-MNIST, a standard error of about
0.06 bits/dim (reported). ``bpd_n=0`` skips it. Sampling n = 1000 digits with dpmpp-2m in 20 steps takes
9-15 s; features and metrics under a second; the reference statistics, once, 0.1 s for digits and 9 s for
Fashion-MNIST (10000 test + 10000 train images).

Same arguments and seed give the same numbers: every random choice comes from a generator seeded here.
The JSON (``write_json``) holds the numbers only, no timings, so two runs with one seed give equal files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..latent.space import data_shape
from ..runs.store import RunConfig, load_denoiser, weights_step
from ..data.images import ImageSet, load_split, to_model, to_uint8
from ..data.toy2d import make_toy
from .features import FeatureNet, embed, resolve_feature_net
from ..io import atomic_path
from ..core.likelihood import bits_per_dim
from .metrics import class_histogram, energy_distance, frechet_from_stats, gaussian_stats, kid, precision_recall, sliced_wasserstein
from ..core.processes import DiscreteDDPM
from ..sampling.generate import generate
from ..guidance.config import GuidanceConfig, classes_for, guided, labels_for
from ..data.pairs import ATTRIBUTES
from .prompts import TEST_CAPTIONS, PromptSet, accuracies, follows, load_prompts
from ..text.encoders import text_condition, text_spec
from ..sampling.samplers import SAMPLERS, SPACINGS, default_spacing

DEFAULT_N = 1000
DEFAULT_BPD_N = 32
MIN_N = 10  # fewer samples cannot support a covariance, KID subsets and 3-NN radii
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
REF_MAX = 10000  # reference features: at most this many images of a split (a fixed random subset)
FEATURE_BATCH = 500
BPD_BATCH = 4  # test images per bits_per_dim batch (one progress tick each)
BPD_CALL_NUMBERS = 2**19  # input numbers per denoiser call in the bound: B * t_batch * D
# the reverse variance in the bound: both are valid bounds; beta was the tighter one on a digits preset run
# (step 1500, 16 test images: 5.17 bits/dim with beta vs 5.63 with beta_tilde; the decoder term is the same)
BPD_VARIANCE = "beta"
TOY_REF_SEED = 12345  # fresh 2-D reference points (training data use seed 1)
SUBSET_SEED = 0  # fixed subsets of real data (reference features, bits/dim images)


class EvalError(ValueError):
    """Bad evaluation options, or a run that cannot be evaluated."""


# counts reference statistics computed (not loaded from the cache): lets tests check that the cache is used
reference_computations = 0


def cache_dir() -> Path:
    """$DIFFLAB_CACHE, or ~/.cache/difflab."""
    return Path(os.environ.get("DIFFLAB_CACHE") or Path.home() / ".cache" / "difflab")


# --------------------------------------------------------------------------- reference statistics


def _fingerprint_data(images: Tensor, labels: Tensor | None) -> str:
    h = hashlib.sha256(f"{tuple(images.shape)}".encode())
    h.update(images.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def _fixed_subset(n_total: int, n: int) -> Tensor:
    """The first n of a permutation drawn from a fixed seed: the same images every time."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]


def reference_stats(data: ImageSet, net: FeatureNet, *, folder: Path | None = None, progress: bool = True) -> dict:
    """Features (N, D) float32, logits (N, K) or None, mu (D,), cov (D, D) float64 of a fixed random subset
    (at most REF_MAX images, in that random order) of ``data``; from the cache when it holds them."""
    global reference_computations
    folder = Path(folder) if folder is not None else cache_dir()
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", data.name)[:40]
    key = f"{slug}-{data.split}-{_fingerprint_data(data.images, data.labels)[:16]}-{net.fingerprint()[:16]}"
    path = folder / f"ref-{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            return {"features": t["features"], "logits": t.get("logits"), "mu": t["mu"], "cov": t["cov"], "path": path}
        except (SafetensorError, OSError, ValueError, KeyError):
            pass  # unreadable: recompute and overwrite
    index = _fixed_subset(len(data), min(len(data), REF_MAX))
    feats, logits = embed(net, data.images[index], batch=FEATURE_BATCH, progress=progress, desc=f"features of {data.name} {data.split}")
    mu, cov = gaussian_stats(feats)
    tensors = {"features": feats.contiguous(), "mu": mu, "cov": cov, "index": index}
    if logits is not None:
        tensors["logits"] = logits.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"dataset": data.name, "split": data.split, "n": str(len(index))})
    reference_computations += 1
    return {"features": feats, "logits": logits, "mu": mu, "cov": cov, "path": path}


# --------------------------------------------------------------------------- scores


def _scores(ref: dict, feats: Tensor, seed: int) -> dict:
    """FD, KID and precision/recall of features (n, D) against a reference."""
    mu, cov = gaussian_stats(feats)
    m = min(KID_SUBSET_SIZE, len(feats), len(ref["features"]))
    kid_mean, kid_se = kid(ref["features"], feats, n_subsets=KID_SUBSETS, subset_size=m, generator=torch.Generator().manual_seed(seed))
    m_pr = min(len(feats), len(ref["features"]))
    precision, recall = precision_recall(ref["features"][:m_pr], feats[:m_pr], k=PR_K)
    return {
        "fd": frechet_from_stats(mu, cov, ref["mu"], ref["cov"]),
        "kid": {"mean": kid_mean, "stderr": kid_se, "subset_size": m, "subsets": KID_SUBSETS},
        "precision": precision,
        "recall": recall,
        "pr_n": m_pr,
    }


def _class_report(net: FeatureNet, logits: Tensor | None, ref: dict, data: ImageSet) -> dict:
    if logits is None or ref["logits"] is None:
        return {"samples": None, "reason": "the feature net has no classifier head (random features)"}
    if net.config.groups is not None:
        return {"samples": None, "reason": "the feature net has attribute heads, not classes"}
    K = net.config.num_classes
    names = net.meta.get("classes") or (list(data.class_names) if data.class_names else [str(k) for k in range(K)])
    samples = class_histogram(logits, K, normalize=True)
    real = class_histogram(ref["logits"], K, normalize=True)
    labels = None
    if data.labels is not None and int(data.labels.max()) < K:
        labels = class_histogram(data.labels, K, normalize=True).tolist()
    return {
        "names": list(names),
        "samples": samples.tolist(),
        "real": real.tolist(),
        "real_labels": labels,
        "total_variation": 0.5 * (samples - real).abs().sum().item(),
    }


def _bits_per_dim(denoiser, test: ImageSet, bpd_n: int, seed: int, progress: bool) -> dict:
    process = denoiser.process
    if not isinstance(process, DiscreteDDPM):
        return {"total": None, "reason": f"the variational bound is defined here for DiscreteDDPM runs; this run uses {type(process).__name__}"}
    if bpd_n == 0:
        return {"total": None, "reason": "skipped (bpd_n = 0)"}
    x = to_model(test.images[_fixed_subset(len(test), min(bpd_n, len(test)))])  # (n, C, H, W)
    D = x[0].numel()
    t_batch = max(1, BPD_CALL_NUMBERS // (BPD_BATCH * D))
    out = bits_per_dim(
        denoiser, x.split(BPD_BATCH), variance=BPD_VARIANCE, decoder="discretized",
        generator=torch.Generator().manual_seed(seed), t_batch=t_batch, progress=progress,
    )  # fmt: skip
    return {
        "total": out["total"],
        "stderr": out["total_stderr"],
        "prior": out["prior"],
        "terms": out["terms"],
        "decoder": out["decoder"],
        "n": out["n"],
        "split": test.split,
        "variance": BPD_VARIANCE,
    }


# --------------------------------------------------------------------------- the evaluation


def _check(n, sampler, steps, spacing, seed, batch, bpd_n) -> None:
    def positive(name, value, least=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise EvalError(f"{name} must be an integer >= {least}, got {value!r}")

    positive("n", n, MIN_N)
    positive("steps", steps)
    positive("batch", batch)
    positive("bpd_n", bpd_n, 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalError(f"seed must be an integer, got {seed!r}")
    if sampler not in SAMPLERS:
        raise EvalError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if spacing is not None and spacing not in SPACINGS:
        raise EvalError(f"unknown spacing {spacing!r}; choose one of: {', '.join(SPACINGS)}")


def _draw(denoiser, cfg: RunConfig, n: int, batch: int, steps: int, sampler: str, spacing: str, options: dict, seed: int,
          progress: bool, device, cond: dict | None = None) -> Tensor:
    """n samples through the one generation path (sample i has seed ``seed + i``)."""
    return generate(denoiser, cfg, n, sampler=sampler, steps=steps, spacing=spacing, options=options, seed=seed, batch=batch,
                    device=device, progress=progress, cond=cond)


def _requested_classes(cfg: RunConfig, guidance: GuidanceConfig | None, n: int, run) -> Tensor | None:
    """Balanced class labels (sample i asks for class i mod K) for a class-conditional or classifier-guided
    run; None for an unconditional one."""
    if guidance is not None and guidance.compose:
        raise EvalError("eval asks sample i for class i mod K and scores that class; composed classes are for `difflab sample`")
    K = classes_for(cfg, guidance)
    return None if K is None else labels_for(cfg, guidance, list(range(K)), n, str(run))


def evaluate(
    run_dir: str | Path,
    n: int = DEFAULT_N,
    sampler: str = "dpmpp-2m",
    steps: int = 20,
    spacing: str | None = None,
    seed: int = 0,
    batch: int = 250,
    ema: bool = True,
    bpd_n: int = DEFAULT_BPD_N,
    features: str | FeatureNet | None = None,
    split: str = "test",
    progress: bool = True,
    cache: str | Path | None = None,
    options: dict | None = None,
    device=None,
    guidance: GuidanceConfig | None = None,
    prompts: str | None = None,
    caption_swap: bool = False,
    clip: str | None = None,
) -> dict:
    """Sample ``n`` images from the run and score them (see the module doc); returns a JSON-ready dict,
    with the wall time of each phase under 'seconds'.

    A class-conditional (or classifier-guided) run draws balanced classes, sample i of class i mod K, under
    ``guidance`` (guidance_config.GuidanceConfig), and the report adds the class accuracy: how often the feature
    network's class is the one asked for.

    A text run samples for ``prompts`` ('test-captions' by default, or a file; prompts.py) and the report
    adds, with an attribute network, how often the samples follow them (seen and held-out combinations,
    against caption-shuffled guessing), with ``caption_swap`` the swapped prompts' accuracy (n more samples),
    and with ``clip`` (a train-clip run) the mean CLIP-score of samples and of the real test images."""
    _check(n, sampler, steps, spacing, seed, batch, bpd_n)
    options = dict(options or {})
    if split not in ("train", "test"):
        raise EvalError(f"split must be 'train' or 'test', got {split!r}")
    t_start = time.perf_counter()
    denoiser, cfg = load_denoiser(run_dir, ema=ema)
    plain = denoiser
    denoiser = guided(denoiser, cfg, guidance, str(run_dir))
    prompt_set = None
    if text_spec(cfg) is not None:
        prompt_set = load_prompts(prompts or TEST_CAPTIONS, cfg, n)
        if clip is not None:  # a prompt the CLIP cannot read fails now, not after the sampling
            from ..text.encoders import load_clip

            load_clip(clip)[0].config.text_config.tokenize(prompt_set.captions)
    elif prompts or caption_swap or clip:
        raise EvalError(f"{run_dir} takes no text: --prompts, --caption-swap and --clip are for text-to-image runs")
    requested = None if prompt_set is not None else _requested_classes(cfg, guidance, n, run_dir)
    spacing = spacing or default_spacing(sampler, denoiser.process)
    head = {
        "run": str(run_dir),
        "dataset": cfg.dataset,
        "step": weights_step(run_dir),
        "weights": "ema" if ema else "net",
        "process": cfg.process["kind"],
        "sampler": sampler,
        "steps": steps,
        "spacing": spacing,
        "seed": seed,
        "n": n,
        "batch": batch,
    }
    if options:
        head["options"] = options
    if guidance is not None:
        head["guidance"] = guidance.to_dict()
    cond = {"class_labels": requested} if requested is not None else None
    if prompt_set is not None:
        head["prompts"] = prompts or TEST_CAPTIONS
        cond = text_condition(cfg, prompt_set.captions)
    draw = dict(n=n, batch=batch, steps=steps, sampler=sampler, spacing=spacing, options=options, seed=seed, progress=progress, device=device,
                cond=cond)
    if cfg.kind == "points":
        return head | _evaluate_toy(denoiser, cfg, draw, t_start)
    seconds = {}

    # real data: the reference split, and the training split for the real-vs-real floor
    def load(which):
        return load_split(cfg, which)

    other = "train" if split == "test" else "test"
    ref_data, other_data = load(split), load(other)
    C, H, W = ref_data.images.shape[1:]
    if data_shape(cfg) != [C, H, W]:
        raise EvalError(f"the run makes {'x'.join(map(str, data_shape(cfg)))} images but {cfg.dataset} is {C}x{H}x{W}")
    net = resolve_feature_net(features, cfg.dataset, C, H, W)
    t0 = time.perf_counter()
    ref = reference_stats(ref_data, net, folder=cache, progress=progress)
    other_ref = reference_stats(other_data, net, folder=cache, progress=progress)
    seconds["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = to_uint8(_draw(denoiser, cfg, **draw))  # (n, C, H, W)
    seconds["sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats, logits = embed(net, images, batch=FEATURE_BATCH, progress=progress, desc="features of samples")
    seconds["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = _scores(ref, feats, seed)
    floor = None
    if len(other_ref["features"]) >= MIN_N:
        floor = {"split": other, "n": min(n, len(other_ref["features"]))} | _scores(ref, other_ref["features"][:n], seed)
    classes = _class_report(net, logits, ref, ref_data)
    if requested is not None and logits is not None and net.meta.get("name") == cfg.dataset and net.config.num_classes == classes_for(cfg, guidance):
        classes["accuracy"] = (logits.argmax(1) == requested).float().mean().item()  # the class asked for, as the feature net sees it
    text = None
    if prompt_set is not None:
        text = _text_report(net, logits, prompt_set, images, ref_data, denoiser, cfg, draw, caption_swap, clip, seed)
    seconds["metrics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test_data = ref_data if split == "test" else other_data
    if "latent" in cfg.data:  # the bound is on the latents; the decoder adds no likelihood of the pixels
        bpd = {"total": None, "reason": "not defined for a latent run (its bound is on latents; the decoder has no likelihood)"}
    elif prompt_set is not None:
        bpd = {"total": None, "reason": "not computed for a text run (its likelihood depends on the caption)"}
    else:
        bpd = _bits_per_dim(plain.cpu(), test_data, bpd_n, seed, progress)  # the model itself (guidance is no likelihood), on the CPU
    seconds["bits_per_dim"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start

    return head | {
        "kind": "images",
        "features": {
            "name": net.meta.get("name"),
            "kind": net.meta.get("kind"),
            "sha256": net.fingerprint(),
            "test_accuracy": net.meta.get("test_accuracy"),
        },
        "reference": {"split": split, "n": len(ref["features"]), "of": len(ref_data)},
        **scores,
        "classes": classes,
        "real_vs_real": floor,
        **({"text": text} if text is not None else {}),
        "bits_per_dim": bpd,
        "seconds": seconds,
    }


def _evaluate_toy(denoiser, cfg: RunConfig, draw: dict, t_start) -> dict:
    n, seed = draw["n"], draw["seed"]
    t0 = time.perf_counter()
    x = _draw(denoiser, cfg, **draw)
    sampling = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = make_toy(cfg.dataset, n, seed=TOY_REF_SEED)
    other = make_toy(cfg.dataset, n, seed=TOY_REF_SEED + 1)

    def distances(pts):
        sw = sliced_wasserstein(pts, ref, generator=torch.Generator().manual_seed(seed))
        return {"energy_distance": energy_distance(pts, ref), "sliced_wasserstein": sw}

    out = {
        "kind": "points",
        "reference": {"fresh_points": n, "seed": TOY_REF_SEED},
        **distances(x),
        "real_fresh": distances(other),
        "bits_per_dim": {"total": None, "reason": "bits/dim are defined for 8-bit images; 2-D points are real-valued"},
    }
    out["seconds"] = {"sampling": sampling, "metrics": time.perf_counter() - t0, "total": time.perf_counter() - t_start}
    return out


# --------------------------------------------------------------------------- output


def _finite(x):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def to_json(result: dict) -> str:
    """The numbers (everything but the timings) as JSON text."""
    return json.dumps(_finite({k: v for k, v in result.items() if k != "seconds"}), indent=2) + "\n"


def write_json(result: dict, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(to_json(result))


def _format_text(t: dict) -> list[str]:
    lines = [f"prompts: {t['prompts']}"]
    f = t.get("follows")
    if f is None:
        lines.append(f"follows the caption: - ({t['reason']})")
    else:
        lines.append(f"  {'attribute accuracy':22}" + "".join(f"{a:>14}" for a in (*ATTRIBUTES, "all four", "either side")))
        rows = [("all prompts", f["all"]), ("seen combinations", f["seen"]), ("held-out combinations", f["held_out"]),
                ("caption-shuffled", f["shuffled"]), ("caption swap", t.get("caption_swap"))]
        for name, acc in rows:
            if acc is not None:
                values = [*acc["per_attribute"].values(), acc["all_four"], acc["either_side"]]
                label = f"{name} (n={acc['n']})"
                lines.append(f"  {label:22}" + "".join(f"{100 * v:13.1f}%" for v in values))
    c = t.get("clip_score")
    if c:
        real = f", real test images {c['real']:.3f}" if c["real"] is not None else ""
        lines.append(f"CLIP-score (cosine, {c['run']}): samples {c['samples']:.3f}{real}")
    return lines


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _text_report(net: FeatureNet, logits, prompts: PromptSet, images: Tensor, ref_data: ImageSet, denoiser, cfg: RunConfig, draw: dict,
                 caption_swap: bool, clip: str | None, seed: int) -> dict:
    """How the samples of a text run follow their prompts (prompts.py), the caption swap and the CLIP-score."""
    out: dict = {"prompts": len(prompts.captions)}
    attribute_net = logits is not None and net.config.groups is not None and len(net.config.groups) == 4
    if prompts.attributes is None or not attribute_net:
        out["follows"] = None
        out["reason"] = ("the prompts are not all in the dataset's caption language" if prompts.attributes is None
                         else f"the feature net {net.meta.get('name')} has no attribute heads")
    else:
        out["follows"] = follows(net.attributes(logits), prompts, seed)
        if caption_swap:
            swap = prompts.swapped()
            x = to_uint8(_draw(denoiser, cfg, **{**draw, "cond": text_condition(cfg, swap.captions)}))
            out["caption_swap"] = accuracies(net.attributes(embed(net, x, batch=FEATURE_BATCH)[1]), swap.attributes)
    if clip is not None:
        from ..text.encoders import clip_scores, load_clip

        model, fingerprint = load_clip(clip)
        real = ref_data.captions is not None
        k = min(len(prompts.captions), len(ref_data)) if real else 0
        out["clip_score"] = {"run": clip, "fingerprint": fingerprint,
                             "samples": clip_scores(model, to_model(images), prompts.captions).mean().item(),
                             "real": clip_scores(model, to_model(ref_data.images[:k]), ref_data.captions[:k]).mean().item() if real else None}
    return out


def format_report(result: dict) -> str:
    """A readable table of an evaluate() result."""
    r = result
    lines = [
        f"{r['run']}: {r['dataset']}, step {r['step']}, {r['weights']} weights, {r['process']} process",
        f"samples: {r['n']} x {r['sampler']}, {r['steps']} steps, {r['spacing']} spacing, seed {r['seed']}",
    ]
    if r.get("guidance"):
        lines.append("guidance: " + ", ".join(f"{k} {v}" for k, v in r["guidance"].items()))
    if r["kind"] == "points":
        lines += [
            f"{'':22}{'samples':>12}{'fresh data':>12}   (against {r['reference']['fresh_points']} fresh points)",
            f"{'energy distance':22}{r['energy_distance']:12.5f}{r['real_fresh']['energy_distance']:12.5f}",
            f"{'sliced Wasserstein-2':22}{r['sliced_wasserstein']:12.5f}{r['real_fresh']['sliced_wasserstein']:12.5f}",
        ]
    else:
        f = r["features"]
        acc = f" (test accuracy {100 * f['test_accuracy']:.2f}%)" if f.get("test_accuracy") is not None else ""
        lines.append(f"features: {f['name']} {f['kind']}{acc}, sha256 {f['sha256'][:12]}")
        ref, floor = r["reference"], r.get("real_vs_real") or {}
        floor_head = f"real {floor['split']} (n={floor['n']})" if floor else ""
        lines.append(f"against {ref['n']} real {ref['split']} images: {'samples':>12}{floor_head:>22}")
        kid_s = f"{1e3 * r['kid']['mean']:.3f} ± {1e3 * r['kid']['stderr']:.3f}"
        kid_f = f"{1e3 * floor['kid']['mean']:.3f} ± {1e3 * floor['kid']['stderr']:.3f}" if floor else ""
        rows = [
            ("FD", f"{r['fd']:.3f}", f"{floor['fd']:.3f}" if floor else ""),
            ("KID x 1e3", kid_s, kid_f),
            ("precision (k=3)", f"{r['precision']:.3f}", f"{floor['precision']:.3f}" if floor else ""),
            ("recall (k=3)", f"{r['recall']:.3f}", f"{floor['recall']:.3f}" if floor else ""),
        ]
        lines += [f"  {name:28}{a:>12}{b:>22}" for name, a, b in rows]
        c = r["classes"]
        if c.get("samples") is None:
            lines.append(f"classes: - ({c['reason']})")
        else:
            if c.get("accuracy") is not None:
                lines.append(f"class accuracy (the class asked for, as the classifier sees it): {100 * c['accuracy']:.1f}%")
            lines.append(f"classes as the classifier sees them (total variation {c['total_variation']:.3f}):")
            lines.append(f"  {'class':16}{'samples':>9}{'real':>9}{'labels':>9}")
            labels = c["real_labels"] or [None] * len(c["names"])
            for name, s, q, lab in zip(c["names"], c["samples"], c["real"], labels):
                lines.append(f"  {name[:16]:16}{100 * s:8.1f}%{100 * q:8.1f}%{_num(None if lab is None else 100 * lab, '8.1f')}{'%' if lab is not None else ''}")
    if r.get("text"):
        lines += _format_text(r["text"])
    b = r["bits_per_dim"]
    if b["total"] is None:
        lines.append(f"bits/dim: - ({b['reason']})")
    else:
        lines.append(
            f"bits/dim of {b['n']} {b['split']} image{'s' * (b['n'] != 1)}: {b['total']:.4f} ± {b['stderr']:.4f} "
            f"(L_T {b['prior']:.4f} + sum L_t-1 {b['terms']:.4f} + L_0 {b['decoder']:.4f})"
        )
    s = r.get("seconds")
    if s:
        lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in s.items()))
    return "\n".join(lines)
