"""The identifier that names a subject ("a red sks sneaker"), in captions and in the joint encoder's vocabulary.

MiniLM reads any word (WordPiece splits "sks" into known pieces), so nothing is added for it. The joint
encoder's vocabulary is fitted on the training captions, so the identifier is appended to it as new rows of
the word embeddings (initialised from the class word's). Textual inversion may give it several rows: the
caption's "sks" is then read as the words sks, sks1, ..., each with its own learned vector."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..nets.text import words
from ..runs.config import RunConfig

EMBEDDING = "text.embed.weight"  # the joint encoder's word embeddings


class PersonalizeError(ValueError):
    """A personalisation the run or the images cannot support."""


def class_prompt(caption: str, token: str) -> str:
    """The caption without the identifier: "a red sks sneaker ..." -> "a red sneaker ..."."""
    return " ".join(re.sub(rf"(?i)\b{re.escape(token)}\b", " ", caption).split())


def says(caption: str, phrase: str) -> bool:
    """Whether ``caption`` says ``phrase`` (one or more words) as whole words."""
    return f" {' '.join(words(phrase))} " in f" {' '.join(words(caption))} "


def check_captions(captions: Sequence[str], token: str, class_word: str) -> None:
    for c in captions:
        if token not in words(c):
            raise PersonalizeError(f"the caption {c!r} does not name the subject by its identifier {token!r}")
        if not says(c, class_word):
            raise PersonalizeError(f"the caption {c!r} does not contain the class word {class_word!r}")


def check_token(token: str) -> None:
    if words(token) != [token]:
        raise PersonalizeError(
            f"the identifier must be one lower-case word of letters and digits (e.g. sks), got {token!r}"
        )


def with_tokens(cfg: RunConfig, tokens: Sequence[str]) -> RunConfig:
    """A joint-encoder run with ``tokens`` appended to its vocabulary (new embedding rows)."""
    text = cfg.net.text_config
    if len(set(tokens)) < len(tokens):
        raise PersonalizeError(f"two subjects share an identifier ({', '.join(tokens)}); each needs its own word")
    known = [t for t in tokens if t in text.vocabulary]
    if known:
        raise PersonalizeError(f"{known[0]!r} is a word the model already knows; choose a rare identifier (e.g. sks)")
    text = replace(text, vocabulary=text.vocabulary + tuple(tokens))
    return replace(cfg, net=replace(cfg.net, text=text.to_dict()))


def with_token_rows(state: dict[str, Tensor], vocabulary: Sequence[str], rows: Tensor) -> dict[str, Tensor]:
    """``state`` with ``rows`` appended to the joint encoder's word embeddings."""
    if state[EMBEDDING].shape[0] != len(vocabulary):
        raise PersonalizeError(
            f"the weights have {state[EMBEDDING].shape[0]} word embeddings for a vocabulary of {len(vocabulary)}"
        )
    return {**state, EMBEDDING: torch.cat([state[EMBEDDING], rows.to(state[EMBEDDING].dtype)])}


def initial_rows(state: dict[str, Tensor], vocabulary: Sequence[str], init_words: str, count: int) -> Tensor:
    """New embedding rows initialised from the mean of ``init_words``' rows (the class word)."""
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = [index[w] for w in words(init_words) if w in index]
    if not ids:
        raise PersonalizeError(f"the class word {init_words!r} is not in the model's vocabulary")
    return state[EMBEDDING][ids].mean(0, keepdim=True).repeat(count, 1)
