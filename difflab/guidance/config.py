"""The guidance a user asks for over a trained run, as one dataclass, and the denoiser it builds.

    g = GuidanceConfig(scale=3.0, negative=5, interval=(0.2, 0.8))
    denoiser = guided(denoiser, run_config, g, encode_text)    # guidance.wrappers' Guided / ClassifierGuided

A run object (runs/diffusion.py) builds its guided denoiser here, for every command, the evaluation, the
studio and the benchmarks, so every combination is checked in one place: a class outside the run's classes,
guidance on an unconditional run without a classifier, a classifier trained for another dataset, resolution
or process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from ..core.conditions import ConditionError
from ..runs.config import RunConfig, load_config
from ..runs.shipped import from_record
from .classifier import check_guides, load_classifier
from .wrappers import ClassifierGuided, Guided

TextEncode = Callable[[Sequence[str]], dict[str, Tensor]]  # prompts -> the run's text condition tensors


@dataclass
class GuidanceConfig:
    """scale       classifier-free guidance scale s (1: plain conditional, 0: unconditional; CFG paper's w = s - 1)
    schedule    how the scales (classifier-free and classifier) vary with t: constant, linear or cosine
    (guidance.SCHEDULES)
    negative    a class whose prediction replaces the null one
    compose     (class, weight) terms added as w (pred_class - pred_base); negative weights steer away
    negative_prompt, compose_prompts   the same two for a text run (prompts instead of classes)
    interval    (lo, hi) fractions of t_max where guidance (of either kind) acts; the plain prediction elsewhere
    rescale     Lin et al. (2024) guidance rescale phi in [0, 1]
    classifier  a `difflab train-classifier` run; classifier_scale its scale (score + s grad log p(y | x_t))"""

    scale: float = 1.0
    schedule: str = "constant"
    negative: int | None = None
    compose: tuple[tuple[int, float], ...] = field(default=())
    negative_prompt: str | None = None
    compose_prompts: tuple[tuple[str, float], ...] = field(default=())
    interval: tuple[float, float] | None = None
    rescale: float = 0.0
    classifier: str | None = None
    classifier_scale: float = 1.0

    @property
    def classifier_free(self) -> bool:
        """Whether it asks for classifier-free guidance (plain conditional sampling, s = 1, does not)."""
        return (
            self.scale != 1.0
            or self.negative is not None
            or bool(self.compose)
            or self.rescale != 0.0
            or self.negative_prompt is not None
            or bool(self.compose_prompts)
        )

    @property
    def active(self) -> bool:
        return self.classifier_free or self.classifier is not None

    def to_dict(self) -> dict:
        return {
            k: v
            for k, v in self.__dict__.items()
            if v != GuidanceConfig.__dataclass_fields__[k].default or k == "scale"
        }

    @classmethod
    def of(cls, guidance: float | GuidanceConfig | None, **fields) -> GuidanceConfig | None:
        """A scale or a GuidanceConfig, with ``fields`` (those not None) set: the guidance a call asks for."""
        fields = {k: v for k, v in fields.items() if v is not None}
        if guidance is None and not fields:
            return None
        g = (
            guidance
            if isinstance(guidance, GuidanceConfig)
            else cls(scale=1.0 if guidance is None else float(guidance))
        )
        return replace(g, **fields)


def classes_for(cfg: RunConfig, g: GuidanceConfig | None) -> int | None:
    """The classes one may ask for: the run's, or for an unconditional run its classifier's."""
    K = cfg.num_classes
    if K is None and g is not None and g.classifier is not None:
        K = load_config(g.classifier).num_classes
    return K


def check_class(k: int, num_classes: int | None, what: str, run: str) -> None:
    if num_classes is None:
        raise ConditionError(f"{what} {k}: {run} is not class-conditional")
    if not 0 <= k < num_classes:
        raise ConditionError(f"{what} {k} is outside the run's classes 0..{num_classes - 1}")


def guided(
    denoiser, cfg: RunConfig, g: GuidanceConfig | None, encode_text: TextEncode | None = None, run: str = "the run"
):
    """``denoiser`` of run ``cfg`` wrapped as ``g`` asks (itself when g is None or asks for nothing);
    ``encode_text`` gives a text run's condition tensors of its negative and composed prompts.

    The schedule and the interval apply to whichever guidance is on (classifier-free, classifier, or both)."""
    if g is None:
        return denoiser
    if not g.active:
        if g.schedule != "constant" or g.interval is not None:
            raise ConditionError(
                "a guidance schedule or interval needs guidance to act on: --guidance S (S != 1) or --classifier RUN"
            )
        return denoiser
    K = cfg.num_classes
    out = denoiser
    if g.classifier_free and cfg.text_spec() is not None:
        out = _text_guided(out, cfg, g, encode_text, run)
    elif g.classifier_free:
        if g.negative_prompt is not None or g.compose_prompts:
            raise ConditionError(
                f"{run} takes no text: --negative-prompt and --compose-prompt need a text-to-image run (--text)"
            )
        if K is None:
            raise ConditionError(
                f"{run} is unconditional: classifier-free guidance, negative and composed classes need a "
                "class-conditional "
                "run (`difflab train NAME --cond class`); an unconditional run takes classifier guidance "
                "(--classifier)"
            )
        spec = cfg.condition("class_labels")
        if spec.p_drop == 0 and g.negative is None:
            raise ConditionError(
                f"{run} was trained without label dropout (--p-uncond 0), so it has no null prediction to guide "
                f"against; give --negative-class, or retrain with --p-uncond > 0"
            )
        if g.negative is not None and g.scale == 1.0 and not g.compose:
            raise ConditionError(
                "--negative-class acts through the scale: at --guidance 1 it cancels (pred_neg + 1 (pred_c - pred_neg) "
                "= "
                "pred_c); give --guidance S > 1"
            )
        for k in [c for c, _ in g.compose] + ([g.negative] if g.negative is not None else []):
            check_class(k, K, "class", run)
        out = Guided(
            out,
            cfg.condition_specs(),
            g.scale,
            schedule=g.schedule,
            interval=g.interval,
            rescale=g.rescale,
            negative={"class_labels": g.negative} if g.negative is not None else None,
            terms=[({"class_labels": c}, w) for c, w in g.compose],
        )
    if g.classifier is not None:
        if cfg.text_spec() is not None:
            raise ConditionError(
                f"{run} reads text: classifier guidance (--classifier) needs class labels, which a text run's "
                "samples do not carry; guide it with --guidance and prompts"
            )
        clf, clf_cfg = load_classifier(g.classifier)
        check_guides(clf_cfg, cfg, g.classifier)
        out = ClassifierGuided(out, clf, g.classifier_scale, schedule=g.schedule, interval=g.interval)
    return out


def _base_knows_null(cfg: RunConfig) -> bool:
    """A run personalised without caption dropout keeps the null prediction its base learned with it."""
    p = cfg.personalize
    if p is None or not p.base:
        return False
    try:
        return load_config(from_record(p.base)).text_spec().p_drop > 0
    except (OSError, ValueError):  # the base moved or is unreadable: nothing says it has one
        return False


def _text_guided(denoiser, cfg: RunConfig, g: GuidanceConfig, encode_text: TextEncode | None, run: str):
    """Classifier-free guidance of a text run: the negative prompt's prediction replaces the null (empty
    caption) one; composed prompts are terms w (pred_prompt - pred_base)."""
    if g.negative is not None or g.compose:
        raise ConditionError(f"{run} reads text: steer it with --negative-prompt and --compose-prompt, not classes")
    if cfg.text_spec().p_drop == 0 and g.negative_prompt is None and not _base_knows_null(cfg):
        raise ConditionError(
            f"{run} was trained without caption dropout (--p-uncond 0), so it has no null prediction to guide "
            "against; give --negative-prompt, or retrain with --p-uncond > 0"
        )
    if g.negative_prompt is not None and g.scale == 1.0 and not g.compose_prompts:
        raise ConditionError(
            "--negative-prompt acts through the scale: at --guidance 1 it cancels; give --guidance S > 1"
        )
    if encode_text is None and (g.negative_prompt is not None or g.compose_prompts):
        raise ConditionError("negative and composed prompts need the run's text encoder (encode_text)")
    negative = encode_text([g.negative_prompt]) if g.negative_prompt is not None else None
    terms = [(encode_text([p]), w) for p, w in g.compose_prompts]
    return Guided(
        denoiser,
        cfg.condition_specs(),
        g.scale,
        schedule=g.schedule,
        interval=g.interval,
        rescale=g.rescale,
        negative=negative,
        terms=terms,
    )


def labels_for(cfg: RunConfig, g: GuidanceConfig | None, requested: list[int] | None, n: int, run: str = "the run"):
    """The class of each of n samples: ``requested`` (cycled) checked against the run's (or classifier's)
    classes; None when no class is asked for."""
    if not requested:
        if g is not None and g.classifier is not None:
            raise ConditionError("classifier guidance needs the class to guide toward (--class)")
        if g is not None and g.classifier_free and (not g.compose or g.interval is not None or g.rescale):
            raise ConditionError(
                "classifier-free guidance needs the class to guide toward (--class); only --compose alone needs none"
            )
        return None
    K = classes_for(cfg, g)
    if K is None and cfg.text_spec() is not None:
        raise ConditionError(f"--class: {run} reads text, not class labels; give --prompt")
    if K is None:
        raise ConditionError(f"--class: {run} is unconditional; train with --cond class, or guide it with --classifier")
    for k in requested:
        check_class(k, K, "class", run)
    labels = torch.tensor(requested, dtype=torch.long)
    return labels.repeat(-(-n // len(labels)))[:n]
