"""Prompts for evaluation, and whether samples follow them.

``load_prompts('test-captions' | FILE, cfg, n)`` gives n prompts (cycled): the test split's captions, or
a file's lines. Captions in the caption language of fashion-pairs (data/pairs.py) are parsed back into their
attributes (left class, left colour, right class, right colour) and marked held-out when their class
combination never occurs in the training split; then ``follows(...)`` scores samples with the shipped
attribute network:

* per-attribute accuracy and all-four-correct accuracy, over all prompts and apart on seen and held-out
  combinations;
* the same against the prompts' attributes shuffled among the samples (caption-shuffled guessing: what an
  image that ignores its caption scores, the floor a text model must beat);
* the caption swap (attribute binding): prompts with left and right exchanged must give images whose
  attributes are exchanged too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.pairs import ALL_PHRASINGS, ATTRIBUTES, PHRASINGS, caption, is_held_out, parse_caption, swapped
from ..data.pairs import NEW_PHRASINGS as NEW
from ..data.pairs import REWORDED_PHRASINGS as REWORDED
from ..runs.data import load_split

TEST_CAPTIONS = "test-captions"
NEW_PHRASINGS = "new-phrasings"  # the test captions' attributes said in phrasings never used in training
REWORDED_SET = "reworded"  # the same in a second set of such phrasings (data/pairs.py: REWORDED_PHRASINGS)


class PromptError(ValueError):
    """A prompt file that is missing or empty, or a dataset without captions."""


@dataclass
class PromptSet:
    captions: list[str]
    attributes: Tensor | None = None  # long (N, 4) when every caption parses
    held_out: Tensor | None = None  # bool (N,)
    phrasings: list[int] | None = None

    def swapped(self) -> PromptSet:
        """The prompts with left and right exchanged, in the same phrasing."""
        if self.attributes is None:
            raise PromptError("the caption swap needs prompts in the dataset's caption language (their attributes)")
        return parsed(
            [caption(swapped(a), p) for a, p in zip(self.attributes.tolist(), self.phrasings)]
        )  # held-out anew: (k, k+7) swaps to a seen pair


def parsed(captions: list[str]) -> PromptSet:
    """The prompts, with their attributes when every one parses as a fashion-pairs caption."""
    found = [parse_caption(c) for c in captions]
    if not captions or any(f is None for f in found):
        return PromptSet(list(captions))
    attrs = torch.tensor([a for a, _ in found])
    held = torch.tensor([is_held_out(a[0], a[2]) for a in attrs])
    return PromptSet(list(captions), attrs, held, [p for _, p in found])


def read_prompt_file(path) -> list[str]:
    """A prompt file's prompts: its non-blank lines, stripped (UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"prompt file {path}: no such file")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {path}: not a UTF-8 text file") from None
    if not lines:
        raise PromptError(f"prompt file {path} holds no prompt")
    return lines


def load_prompts(spec: str, cfg, n: int) -> PromptSet:
    """n prompts: the run's test split captions ('test-captions', the first n), the same images' attributes in
    the phrasings never used in training ('new-phrasings', or 'reworded' for the second such set; fashion-pairs
    only), or a file's lines; cycled."""
    if spec in (TEST_CAPTIONS, NEW_PHRASINGS, REWORDED_SET):
        test = load_split(cfg, "test")
        if test.captions is None:
            raise PromptError(f"{cfg.dataset}'s test split has no captions; give a prompt file")
        lines = test.captions
        if spec != TEST_CAPTIONS:
            found = [parse_caption(c) for c in lines[:n]]
            if any(f is None for f in found):
                raise PromptError(f"{spec}: {cfg.dataset}'s captions are not in the fashion-pairs caption language")
            first, count = (
                (len(PHRASINGS), len(NEW)) if spec == NEW_PHRASINGS else (len(PHRASINGS) + len(NEW), len(REWORDED))
            )
            lines = [caption(a, first + i % count) for i, (a, _) in enumerate(found)]
    else:
        lines = read_prompt_file(spec)
    return parsed([lines[i % len(lines)] for i in range(n)])


def either_side(predicted: Tensor, wanted: Tensor) -> Tensor:
    """(N,) bool: all four of predicted (N, 4) right up to exchanging the halves (the right items in their
    colours, maybe on the wrong sides)."""
    return (predicted == wanted).all(1) | (predicted == wanted[:, [2, 3, 0, 1]]).all(1)


def accuracies(predicted: Tensor, wanted: Tensor) -> dict:
    """Per-attribute and all-four-correct accuracy of predicted (N, 4) against wanted (N, 4), and
    ``either_side`` (the share of rows right by ``either_side``)."""
    right = predicted == wanted
    return {
        "n": len(right),
        "per_attribute": dict(zip(ATTRIBUTES, right.double().mean(0).tolist())),
        "all_four": right.all(1).double().mean().item(),
        "either_side": either_side(predicted, wanted).double().mean().item(),
    }


def follows(predicted: Tensor, prompts: PromptSet, seed: int = 0) -> dict:
    """How often the samples' attributes (predicted (N, 4), by the attribute network) are the prompts': on
    all prompts, on seen and on held-out combinations, for the prompts shuffled among the samples, and
    ('by_phrasing') all four right on the seen combinations of each phrasing the prompts use."""
    if prompts.attributes is None:
        raise PromptError("attribute accuracy needs prompts in the dataset's caption language")
    out = {"all": accuracies(predicted, prompts.attributes)}
    for name, keep in (("seen", ~prompts.held_out), ("held_out", prompts.held_out)):
        out[name] = accuracies(predicted[keep], prompts.attributes[keep]) if keep.any() else None
    perm = torch.randperm(len(predicted), generator=torch.Generator().manual_seed(seed))
    out["shuffled"] = accuracies(predicted, prompts.attributes[perm])
    if prompts.phrasings is not None:  # all four right on the seen combinations, per phrasing (data.pairs)
        phrasing, seen = torch.tensor(prompts.phrasings), ~prompts.held_out
        out["by_phrasing"] = {
            ALL_PHRASINGS[p]: {
                k: v for k, v in accuracies(predicted[keep], prompts.attributes[keep]).items() if k in ("n", "all_four")
            }
            for p in sorted(set(prompts.phrasings))
            if (keep := (phrasing == p) & seen).any()
        }
    return out
