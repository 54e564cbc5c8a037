"""Evaluate a trained run: how close its samples are to real data, and the likelihood bound of held-out data.

    result = evaluate("runs/digits", n=1000, sampling=Sampling("dpmpp-2m", steps=20))
    print(format_report(result))          # evaluation/report.py

Image runs (digits, fashion-mnist, fashion-pairs, folders, npz). ``n`` samples are drawn by the run object
(``run.sample``: sample i has seed ``seed + i``), rounded to 8 bits like the data, and read by a feature network
(evaluation/features.py): ``features``, else the one the run records (``difflab train --eval-every/--features``,
e.g. a folder's instance-discrimination net), else the shipped classifier for digits, Fashion-MNIST and
fashion-pairs, fixed random features otherwise. A net that records its training images (an instance net) is refused
for a run whose training images differ.
Against the reference split (``split``, default the test split) the report gives

    fd               Frechet distance between Gaussians fitted to the penultimate features (FID's formula)
    kid              mean and standard error of the unbiased polynomial-kernel MMD^2 over 100 subsets
    precision/recall k-NN manifold precision and recall, k = 3, on equal-size sets
    classes          the class histogram of the samples as the classifier sees them, the same for the
                     real split, the real labels, and the total variation between the first two
    real_vs_real     the same scores for n real images of the other split (train when the reference is
                     test) in place of the samples: what a model that reproduced the data would get at
                     this n (FD and KID are biased upwards at finite n: compare with this floor, not 0)
    bits_per_dim     the variational bound of ``bpd_n`` test images in bits/dim with its standard error
                     (likelihood.py, discretized decoder): a DiscreteDDPM's L_T + sum L_{t-1} + L_0 with the
                     reverse variance beta (the tighter of the two fixed choices) or the run's learned one,
                     and with ``Likelihood.steps`` the same bound on coarser grids (iDDPM's 50 and 100
                     steps); a continuous-time run's continuous bound (VDM); null with the reason otherwise
    ode_bits_per_dim with ``Likelihood.method`` 'ode' or 'both': the probability-flow ODE's log-likelihood
                     (ode_likelihood.py: uniform dequantisation, Hutchinson's divergence, the NFE)

The reference statistics are computed once and cached (evaluation/reference.py). A class-conditional (or
classifier-guided) run draws balanced classes and the report adds the class accuracy; a text run samples for
prompts and the report adds how the samples follow them (evaluation/prompts.py).

2-D runs: energy distance and sliced Wasserstein-2 of the samples against fresh points of the data set,
with the same distances between two fresh data sets as the floor.

Cost (2 CPU cores, measured with the preset U-Nets): bits/dim evaluates the denoiser at all T = 1000
steps per image, 0.6 s per 8x8 digit (1.7 s when other work shares the cores) and 6.6 s per 28x28 image,
so ``bpd_n`` defaults to 32: 20-50 s for digits, 3-4 minutes for Fashion-MNIST, a standard error of about
0.06 bits/dim (reported). ``bpd_n=0`` skips it. Sampling n = 1000 digits with dpmpp-2m in 20 steps takes
9-15 s; features and metrics under a second; the reference statistics, once, 0.1 s for digits and 9 s for
Fashion-MNIST (10000 test + 10000 train images).

Same arguments and seed give the same numbers: every random choice comes from a generator seeded here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from ..core.likelihood import bits_per_dim, bound_grid
from ..core.ode_likelihood import (
    DEFAULT_TOL,
    DEQUANTIZATIONS,
    DIVERGENCES,
    Dequantization,
    Divergence,
    ode_bits_per_dim,
)
from ..core.processes import DiscreteDDPM, process_name
from ..data.images import ImageSet, to_model, to_uint8
from ..data.toy2d import make_toy
from ..guidance.config import GuidanceConfig, classes_for, labels_for
from ..nets.features import FeatureNet
from ..runs.data import load_split
from ..runs.diffusion import DiffusionRun
from ..sampling.samplers import SAMPLERS, SPACINGS, SamplerName, Spacing, default_spacing
from ..text.clip import clip_scores, load_clip
from .features import check_trained_on, embed, run_feature_net
from .metrics import (
    class_histogram,
    energy_distance,
    frechet_from_stats,
    gaussian_stats,
    kid,
    precision_recall,
    sliced_wasserstein,
)
from .prompts import TEST_CAPTIONS, PromptSet, accuracies, follows, load_prompts
from .reference import FEATURE_BATCH, fixed_subset, reference_features, reference_stats

DEFAULT_N = 1000
DEFAULT_BPD_N = 32
MIN_N = 10  # fewer samples cannot support a covariance, KID subsets and 3-NN radii
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
PR_K = 3
BPD_BATCH = 4  # test images per bits_per_dim batch (one progress tick each)
BPD_CALL_NUMBERS = 2**19  # input numbers per denoiser call in the bound: B * t_batch * D
# the reverse variance in the bound: both are valid bounds; beta was the tighter one on a digits preset run
# (step 1500, 16 test images: 5.17 bits/dim with beta vs 5.63 with beta_tilde; the decoder term is the same)
BPD_VARIANCE = "beta"
TOY_REF_SEED = 12345  # fresh 2-D reference points (training data use seed 1)
ODE_BATCH = 16  # test images per ODE solve (they share its steps)
BpdMethod = Literal["vlb", "ode", "both"]
BPD_METHODS: tuple[BpdMethod, ...] = get_args(BpdMethod)


class EvalError(ValueError):
    """Bad evaluation options, or a run that cannot be evaluated."""


@dataclass
class Sampling:
    """How the samples are drawn: the sampler, its steps and grid (None: the sampler's usual one), the sampler's
    own options (ddim: eta; ...; the grid's sigma_tilde_cap), samples per call, and the device (None: the run's)."""

    sampler: SamplerName | None = (
        None  # None: the run's own (DiffusionRun.default_sampling: dpmpp-2m, 20 steps; a student's)
    )
    steps: int | None = None
    spacing: Spacing | None = None
    options: dict | None = None
    batch: int = 250
    device: str | torch.device | None = None

    def check(self) -> None:
        for name in ("steps", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"{name} must be an integer >= 1, got {value!r}")
        if self.sampler not in SAMPLERS:
            raise EvalError(f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.spacing is not None and self.spacing not in SPACINGS:
            raise EvalError(f"unknown spacing {self.spacing!r}; choose one of: {', '.join(SPACINGS)}")


@dataclass
class Likelihood:
    """How the likelihood is measured: the variational bound ('vlb'), the probability-flow ODE ('ode') or both;
    the bound also on coarser grids of ``steps`` levels (a DiscreteDDPM); the continuous bound's time draws
    ``k`` per image; the ODE's divergence (Hutchinson's with ``probes`` Rademacher vectors, or exact),
    tolerances and dequantisation."""

    method: BpdMethod = "vlb"
    steps: tuple[int, ...] = field(default_factory=tuple)
    k: int = 64
    divergence: Divergence = "hutchinson"
    probes: int = 1
    rtol: float = DEFAULT_TOL
    atol: float = DEFAULT_TOL
    dequantization: Dequantization = "uniform"

    def check(self) -> None:
        if self.method not in BPD_METHODS:
            raise EvalError(f"unknown likelihood method {self.method!r}; choose one of: {', '.join(BPD_METHODS)}")
        if self.divergence not in DIVERGENCES:
            raise EvalError(f"unknown divergence {self.divergence!r}; choose one of: {', '.join(DIVERGENCES)}")
        if self.dequantization not in DEQUANTIZATIONS:
            raise EvalError(
                f"unknown dequantization {self.dequantization!r}; choose one of: {', '.join(DEQUANTIZATIONS)}"
            )
        for name in ("k", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EvalError(f"{name} must be an integer >= 1, got {value!r}")
        for value in self.steps:
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise EvalError(f"bound steps must be integers >= 2, got {value!r}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise EvalError(f"{name} must lie in (0, 1), got {value!r}")

    @property
    def vlb(self) -> bool:
        return self.method in ("vlb", "both")

    @property
    def ode(self) -> bool:
        return self.method in ("ode", "both")


@dataclass
class Asked:
    """What the samples are asked for: prompts (a text run), classes (a class-conditional or classifier-guided
    run: sample i asks for class i mod K), or nothing."""

    prompts: PromptSet | None = None
    labels: Tensor | None = None


# --------------------------------------------------------------------------- scores


def _scores(ref: dict, feats: Tensor, seed: int) -> dict:
    """FD, KID and precision/recall of features (n, D) against a reference."""
    mu, cov = gaussian_stats(feats)
    m = min(KID_SUBSET_SIZE, len(feats), len(ref["features"]))
    kid_mean, kid_se = kid(
        ref["features"], feats, n_subsets=KID_SUBSETS, subset_size=m, generator=torch.Generator().manual_seed(seed)
    )
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
    if net.meta.get("kind") in ("instance", "identity"):
        return {"samples": None, "reason": f"the feature net's head is a projection ({net.meta['kind']}), not classes"}
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


def _likelihood_refusal(run: DiffusionRun, bpd_n: int) -> str | None:
    """Why this run's likelihood is not measured, or None."""
    cfg = run.config
    if cfg.latent is not None:
        return "not defined for a latent run (its bound is on latents; the decoder has no likelihood)"
    if cfg.text is not None:
        return "not computed for a text run (its likelihood depends on the caption)"
    if bpd_n == 0:
        return "skipped (bpd_n = 0)"
    if cfg.distill is not None:
        return (
            "a distilled student is a few-step sampler, not a denoiser at every noise level: the bound is its teacher's"
        )
    return None


def _bits_per_dim(run: DiffusionRun, test: ImageSet, bpd_n: int, seed: int, how: Likelihood, progress: bool):
    """The likelihood of ``bpd_n`` test images under the model itself (guidance is no likelihood), on the CPU:
    (the bound's report, the ODE's report or None when not asked)."""
    reason = _likelihood_refusal(run, bpd_n)
    if reason is not None:
        return {"total": None, "reason": reason}, ({"total": None, "reason": reason} if how.ode else None)
    x = to_model(test.images[fixed_subset(len(test), min(bpd_n, len(test)))])  # (n, C, H, W)
    denoiser = run.denoiser.cpu()
    vlb = _bound(denoiser, x, seed, how, progress) if how.vlb else {"total": None, "reason": "not asked (ode only)"}
    if isinstance(vlb, dict) and vlb.get("total") is not None:
        vlb["split"] = test.split
    ode = None
    if how.ode:
        ode = ode_bits_per_dim(
            denoiser, x.split(ODE_BATCH), dequantization=how.dequantization, divergence=how.divergence,
            probes=how.probes, rtol=how.rtol, atol=how.atol, generator=torch.Generator().manual_seed(seed),
            progress=progress,
        )  # fmt: skip
        ode.pop("per_example")  # the JSON keeps the summary
        ode |= {"split": test.split, "items": "images"}
    return vlb, ode


def _bound(denoiser, x: Tensor, seed: int, how: Likelihood, progress: bool) -> dict:
    """The variational bound of images x: discrete (every step of a DiscreteDDPM, then each of how.steps) or
    continuous (a continuous-time process)."""
    process = denoiser.process
    D = x[0].numel()
    gen = lambda: torch.Generator().manual_seed(seed)  # noqa: E731 - the same draws for every grid
    if not isinstance(process, DiscreteDDPM):
        if how.steps:
            raise EvalError("bound steps (--bpd-steps) are levels of a DiscreteDDPM; this run is continuous-time")
        out = bits_per_dim(
            denoiser, x.split(BPD_BATCH), decoder="discretized", generator=gen(), continuous=True, k=how.k,
            progress=progress,
        )  # fmt: skip
        return _bound_report(out, "continuous", None) | {"k": how.k}
    variance = "learned" if denoiser.learned_variance else BPD_VARIANCE
    t_batch = max(1, BPD_CALL_NUMBERS // (BPD_BATCH * D))
    out = bits_per_dim(
        denoiser, x.split(BPD_BATCH), variance=variance, decoder="discretized", generator=gen(), t_batch=t_batch,
        progress=progress,
    )  # fmt: skip
    report = _bound_report(out, variance, process.T)
    if how.steps:
        report["at_steps"] = {}
        for K in how.steps:
            if K > process.T:
                raise EvalError(f"bound steps {K} exceed the run's T = {process.T}")
            out = bits_per_dim(
                denoiser, x.split(BPD_BATCH), variance=variance, decoder="discretized", generator=gen(),
                t_batch=t_batch, ts=bound_grid(process, K), progress=progress,
            )  # fmt: skip
            report["at_steps"][str(K)] = _bound_report(out, variance, K)
    return report


def _bound_report(out: dict, variance: str, steps: int | None) -> dict:
    return {
        "total": out["total"],
        "stderr": out["total_stderr"],
        "prior": out["prior"],
        "terms": out["terms"],
        "decoder": out["decoder"],
        "n": out["n"],
        "variance": variance,
        "steps": steps,
    }


# --------------------------------------------------------------------------- the evaluation


def _asked(
    run: DiffusionRun,
    guidance: GuidanceConfig | None,
    n: int,
    prompts: str | None,
    caption_swap: bool,
    clip: str | None,
) -> Asked:
    cfg = run.config
    if cfg.text_spec() is not None:
        prompt_set = load_prompts(prompts or TEST_CAPTIONS, cfg, n)
        if clip is not None:  # a prompt the CLIP cannot read fails now, not after the sampling
            load_clip(clip)[0].text.tokenize(prompt_set.captions)
        return Asked(prompts=prompt_set)
    if prompts or caption_swap or clip:
        raise EvalError(f"{run.path} takes no text: --prompts, --caption-swap and --clip are for text-to-image runs")
    if guidance is not None and guidance.compose:
        raise EvalError(
            "eval asks sample i for class i mod K and scores that class; composed classes are for `difflab sample`"
        )
    K = classes_for(cfg, guidance)
    return Asked(labels=None if K is None else labels_for(cfg, guidance, list(range(K)), n, str(run.path)))


def evaluate(
    run: str | Path | DiffusionRun,
    n: int = DEFAULT_N,
    *,
    seed: int = 0,
    sampling: Sampling | None = None,
    guidance: GuidanceConfig | None = None,
    ema: bool = True,
    lora=(),
    bpd_n: int = DEFAULT_BPD_N,
    likelihood: Likelihood | None = None,
    features: str | FeatureNet | None = None,
    split: str = "test",
    prompts: str | None = None,
    caption_swap: bool = False,
    clip: str | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Sample ``n`` images from the run (a path, with its EMA weights unless ``ema=False`` and the LoRA adapters
    ``lora``, or a loaded DiffusionRun) and score them (see the module doc); returns a JSON-ready dict, with the
    wall time of each phase under 'seconds'.

    A class-conditional (or classifier-guided) run draws balanced classes, sample i of class i mod K, under
    ``guidance``, and the report adds the class accuracy: how often the feature network's class is the one asked for.
    A text run samples for ``prompts`` ('test-captions' by default, or a file; prompts.py) and the report
    adds, with an attribute network, how often the samples follow them (seen and held-out combinations,
    against caption-shuffled guessing), with ``caption_swap`` the swapped prompts' accuracy (n more samples),
    and with ``clip`` (a train-clip run) the mean CLIP-score of samples and of the real test images."""
    sampling = sampling or Sampling()
    likelihood = likelihood or Likelihood()
    likelihood.check()
    for name, value, least in (("n", n, MIN_N), ("bpd_n", bpd_n, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise EvalError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EvalError(f"seed must be an integer, got {seed!r}")
    if split not in ("train", "test"):
        raise EvalError(f"split must be 'train' or 'test', got {split!r}")
    t_start = time.perf_counter()
    run = run if isinstance(run, DiffusionRun) else DiffusionRun.load(run, ema=ema, lora=lora)
    if sampling.sampler is None or sampling.steps is None:  # the run's own (a distilled student's few steps)
        sampler, steps, _ = run.check_sampling(sampling.sampler, sampling.steps, sampling.spacing)
        sampling = replace(sampling, sampler=sampler, steps=steps)
    if guidance is None:  # the run's own scale, recorded in the report (a shipped model's best; else none)
        guidance = GuidanceConfig.of(run.default_guidance(None, asked=True))
    sampling.check()
    cfg = run.config
    asked = _asked(run, guidance, n, prompts, caption_swap, clip)
    head = {
        "run": str(run.path),
        "dataset": cfg.dataset,
        "step": run.step,
        "weights": "ema" if ema else "net",
        "process": process_name(cfg.process),
        "sampler": sampling.sampler,
        "steps": sampling.steps,
        "spacing": sampling.spacing or default_spacing(sampling.sampler, run.process),
        "seed": seed,
        "n": n,
        "batch": sampling.batch,
    }
    if sampling.options:
        head["options"] = sampling.options
    if guidance is not None:
        head["guidance"] = guidance.to_dict()
    if run.adapters:
        head["lora"] = [list(a) for a in run.adapters]
    if asked.prompts is not None:
        head["prompts"] = prompts or TEST_CAPTIONS

    def draw(captions=None) -> Tensor:
        captions = captions if captions is not None else (asked.prompts.captions if asked.prompts is not None else None)
        return run.sample(
            n,
            prompt=captions,
            class_label=None if asked.labels is None else asked.labels.tolist(),
            guidance=guidance,
            sampler=sampling.sampler,
            steps=sampling.steps,
            spacing=sampling.spacing,
            options=sampling.options,
            seed=seed,
            batch=sampling.batch,
            device=sampling.device,
            progress=progress,
        )

    if cfg.data_kind == "points":
        return head | _evaluate_toy(run, draw, n, seed, bpd_n, likelihood, t_start)
    return head | _evaluate_images(
        run, draw, asked, n, seed, guidance, bpd_n, likelihood, features, split, caption_swap, clip, cache, progress,
        t_start,
    )  # fmt: skip


def _evaluate_images(
    run: DiffusionRun,
    draw,
    asked: Asked,
    n: int,
    seed: int,
    guidance,
    bpd_n: int,
    likelihood: Likelihood,
    features,
    split: str,
    caption_swap: bool,
    clip: str | None,
    cache,
    progress: bool,
    t_start: float,
) -> dict:
    cfg, seconds = run.config, {}
    other = "train" if split == "test" else "test"
    ref_data, other_data = load_split(cfg, split), load_split(cfg, other)
    C, H, W = ref_data.images.shape[1:]
    if cfg.data_shape != [C, H, W]:
        raise EvalError(f"the run makes {'x'.join(map(str, cfg.data_shape))} images but {cfg.dataset} is {C}x{H}x{W}")
    net = run_feature_net(features, cfg.features, cfg.dataset, C, H, W)
    check_trained_on(net, (ref_data if split == "train" else other_data).images, cfg.dataset)
    t0 = time.perf_counter()
    ref = reference_stats(ref_data, net, folder=cache, progress=progress)
    other_feats = reference_features(other_data, net, n, folder=cache, progress=progress)  # the floor's n real images
    seconds["reference"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    images = to_uint8(draw())  # (n, C, H, W)
    seconds["sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats, logits = embed(net, images, batch=FEATURE_BATCH, progress=progress, desc="features of samples")
    seconds["features"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = _scores(ref, feats, seed)
    floor = None
    if len(other_feats) >= MIN_N:
        floor = {"split": other, "n": len(other_feats)} | _scores(ref, other_feats, seed)
    classes = _class_report(net, logits, ref, ref_data)
    if (
        asked.labels is not None
        and logits is not None
        and net.meta.get("name") == cfg.dataset
        and net.config.num_classes == classes_for(cfg, guidance)
    ):
        classes["accuracy"] = (
            (logits.argmax(1) == asked.labels).float().mean().item()
        )  # the class asked for, as the feature net sees it
    text = None
    if asked.prompts is not None:
        text = _text_report(net, logits, asked.prompts, images, ref_data, draw, caption_swap, clip, seed)
    seconds["metrics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    bpd, ode = _bits_per_dim(run, ref_data if split == "test" else other_data, bpd_n, seed, likelihood, progress)
    seconds["bits_per_dim"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    return {
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
        **({"ode_bits_per_dim": ode} if ode is not None else {}),
        "seconds": seconds,
    }


def _evaluate_toy(run: DiffusionRun, draw, n: int, seed: int, bpd_n: int, how: Likelihood, t_start: float) -> dict:
    dataset = run.config.dataset
    t0 = time.perf_counter()
    x = draw()
    sampling = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = make_toy(dataset, n, seed=TOY_REF_SEED)
    other = make_toy(dataset, n, seed=TOY_REF_SEED + 1)

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
    metrics = time.perf_counter() - t0
    t0 = time.perf_counter()
    if how.ode:  # the density itself: exact divergence in 2-D, no dequantisation
        reason = _likelihood_refusal(run, bpd_n)
        if reason:
            out["ode_bits_per_dim"] = {"total": None, "reason": reason}
        else:
            ode = ode_bits_per_dim(
                run.denoiser.cpu(), ref[:bpd_n].split(ODE_BATCH * 16), dequantization="none", divergence="exact",
                rtol=how.rtol, atol=how.atol, progress=False,
            )  # fmt: skip
            ode.pop("per_example")  # the JSON keeps the summary
            out["ode_bits_per_dim"] = ode | {"split": "fresh", "items": "points"}
    out["seconds"] = {"sampling": sampling, "metrics": metrics}
    if how.ode:
        out["seconds"]["bits_per_dim"] = time.perf_counter() - t0
    out["seconds"]["total"] = time.perf_counter() - t_start
    return out


def _text_report(
    net: FeatureNet,
    logits,
    prompts: PromptSet,
    images: Tensor,
    ref_data: ImageSet,
    draw,
    caption_swap: bool,
    clip: str | None,
    seed: int,
) -> dict:
    """How the samples of a text run follow their prompts (prompts.py), the caption swap and the CLIP-score."""
    out: dict = {"prompts": len(prompts.captions)}
    attribute_net = logits is not None and net.config.groups is not None and len(net.config.groups) == 4
    if prompts.attributes is None or not attribute_net:
        out["follows"] = None
        out["reason"] = (
            "the prompts are not all in the dataset's caption language"
            if prompts.attributes is None
            else f"the feature net {net.meta.get('name')} has no attribute heads"
        )
    else:
        out["follows"] = follows(net.attributes(logits), prompts, seed)
        if caption_swap:
            swap = prompts.swapped()
            x = to_uint8(draw(swap.captions))
            out["caption_swap"] = accuracies(net.attributes(embed(net, x, batch=FEATURE_BATCH)[1]), swap.attributes)
    if clip is not None:
        model, fingerprint = load_clip(clip)
        real = ref_data.captions is not None
        k = min(len(prompts.captions), len(ref_data)) if real else 0
        out["clip_score"] = {
            "run": clip,
            "fingerprint": fingerprint,
            "samples": clip_scores(model, to_model(images), prompts.captions).mean().item(),
            "real": clip_scores(model, to_model(ref_data.images[:k]), ref_data.captions[:k]).mean().item()
            if real
            else None,
        }
    return out
