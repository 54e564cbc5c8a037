"""Conditions as data: what a model is conditioned on, its null value, and condition dropout.

A condition is a named tensor with one row per sample (class labels (B,), a low-resolution image
(B, C, h, w), a token sequence (B, L, D) with its mask (B, L), ...). A run's config lists the
conditions its model takes as ``ConditionSpec``s; datasets yield ``(x, cond)`` with ``cond`` a dict
of such tensors; the denoiser is called as ``denoiser(x_t, t, **cond)``.

Classifier-free guidance (Ho & Salimans 2022) needs the network to also know p(x), so during training
each sample's condition is replaced by its *null* value with probability ``p_drop`` (default 0.1):

    null class label  the extra index ``num_classes`` (the U-Net's "null" row)
    null tensor       zeros; a boolean mask that goes with it (``companions``) becomes all False

``drop_conditions`` applies this with draws from an explicit generator, so a resumed or distributed run
drops exactly the same samples (see training.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

KINDS = ("label", "tensor")


class ConditionError(ValueError):
    """A condition the model does not take, one it needs and did not get, or of the wrong shape."""


@dataclass(frozen=True)
class ConditionSpec:
    """One condition a model takes.

    name        the keyword the network receives (``class_labels``, ``low_res``, ``context``, ...)
    kind        'label' (integer per sample, null = ``null_label``) or 'tensor' (null = zeros)
    p_drop      probability of replacing it by its null value in training (0 disables; CFG needs > 0)
    null_label  the null class index for labels (the U-Net uses ``num_classes``)
    companions  names of tensors dropped together with it (e.g. ``context_mask``, nulled to False/0)
    """

    name: str
    kind: str = "label"
    p_drop: float = 0.1
    null_label: int | None = None
    companions: tuple[str, ...] = field(default=())

    def __post_init__(self):
        object.__setattr__(self, "companions", tuple(self.companions))
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ConditionError(f"a condition name must be an identifier, got {self.name!r}")
        if self.kind not in KINDS:
            raise ConditionError(f"condition {self.name!r}: unknown kind {self.kind!r}; choose one of {KINDS}")
        if isinstance(self.p_drop, bool) or not isinstance(self.p_drop, (int, float)) or not 0.0 <= self.p_drop <= 1.0:
            raise ConditionError(f"condition {self.name!r}: p_drop must be in [0, 1], got {self.p_drop!r}")
        if self.kind == "label" and (not isinstance(self.null_label, int) or self.null_label < 0):
            raise ConditionError(
                f"condition {self.name!r}: a label condition needs null_label >= 0, got {self.null_label!r}"
            )

    def null_like(self, value: Tensor) -> Tensor:
        """The null condition shaped like ``value``."""
        if self.kind == "label":
            return torch.full_like(value, self.null_label)
        return torch.zeros_like(value)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "p_drop": self.p_drop,
            "null_label": self.null_label,
            "companions": list(self.companions),
        }


def class_labels(num_classes: int, p_drop: float = 0.1) -> ConditionSpec:
    """The class-label condition of a network with ``num_classes`` classes (null index = num_classes)."""
    return ConditionSpec("class_labels", "label", p_drop, null_label=num_classes)


def condition_names(specs) -> set[str]:
    """Every keyword the specs feed the network (names and their companions)."""
    return {n for s in specs for n in (s.name, *s.companions)}


def select(cond: Mapping[str, Tensor] | None, specs) -> dict[str, Tensor]:
    """The declared conditions out of what a dataset yields; a declared one that is missing raises."""
    cond = dict(cond or {})
    out = {}
    for s in specs:
        if s.name not in cond or cond[s.name] is None:
            raise ConditionError(
                f"the model is conditioned on {s.name!r} but the data has no {s.name!r} (it has "
                f"{sorted(k for k, v in cond.items() if v is not None) or 'none'})"
            )
        out[s.name] = cond[s.name]
        for c in s.companions:
            if cond.get(c) is not None:
                out[c] = cond[c]
    return out


def drop_mask(p: float, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """(n,) bool, True where a sample's condition is dropped: u < p for u ~ U[0, 1) from ``generator``."""
    device = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=device) < p


def drop_conditions(
    cond: Mapping[str, Tensor],
    specs,
    generator: torch.Generator | None = None,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Replace each condition (and its companions) by its null value where its drop mask is True.

    The masks are drawn from ``generator`` (one U[0, 1) draw per sample per spec, in spec order) unless
    given; pass them to drop a shard of a larger batch the way the whole batch would be dropped."""
    out = dict(cond)
    for s in specs:
        if s.p_drop == 0 or s.name not in out:
            continue
        value = out[s.name]
        m = masks[s.name] if masks is not None else drop_mask(s.p_drop, len(value), generator, value.device)
        m = m.to(value.device)
        out[s.name] = torch.where(_rows(m, value), s.null_like(value), value)
        for c in s.companions:
            if out.get(c) is not None:
                out[c] = torch.where(_rows(m, out[c]), torch.zeros_like(out[c]), out[c])
    return out


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A (B,) mask shaped to broadcast against ``like`` (B, ...)."""
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def check_accepted(given, accepts, who: str) -> None:
    """Raise one clear line when ``given`` names a condition outside ``accepts``."""
    unknown = sorted(set(given) - set(accepts))
    if unknown:
        took = ", ".join(sorted(accepts)) or "no conditions"
        raise ConditionError(f"{who} takes {took}; got {', '.join(repr(u) for u in unknown)}")
