"""The unseen-word captions of benchmarks/text_models.py's one-word measure (issue 32): one word changed, the rest
the dataset's, and the judge's "either side"."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.text_towers import one_worded  # noqa: E402
from difflab.data.pairs import PHRASINGS, caption, make_pairs, meant_words, said_words  # noqa: E402
from difflab.evaluation.prompts import accuracies, either_side  # noqa: E402


def articles(text: str) -> int:
    return len(re.findall(r"\b(a|an) ", text))


def test_a_one_word_caption_is_the_dataset_caption_with_that_word_alone_changed():
    attrs = make_pairs("test", n=60).attributes.tolist()
    checked = 0
    for kind in ("synonyms", "plurals", "typos"):
        for i, a in enumerate(attrs):
            phrasing = i % len(PHRASINGS)
            plain = caption(a, phrasing)
            for word, dataset in list(meant_words(kind).items())[i % 3 :: 5]:
                if dataset not in said_words(a):
                    with pytest.raises(ValueError, match="do not say"):
                        one_worded(a, phrasing, word, dataset)
                    continue
                got, checked = one_worded(a, phrasing, word, dataset), checked + 1
                assert re.search(rf"(^|\s){re.escape(word)}\b", got)
                back = got.replace(word, dataset, 1)
                if kind == "plurals":  # the plural item alone loses its article
                    assert articles(got) == articles(plain) - 1
                    assert re.sub(r"\b(a|an) ", "", back) == re.sub(r"\b(a|an) ", "", plain)
                else:  # the article follows the new word ("an azure bag")
                    assert re.sub(r"\ban ", "a ", back) == re.sub(r"\ban ", "a ", plain)
    assert checked > 50
    assert one_worded((8, 0, 3, 2), 0, "dresses", "dress") == "a red bag on the left and blue dresses on the right"
    assert one_worded((8, 0, 8, 2), 0, "crimson", "red") == "a crimson bag on the left and a blue bag on the right"


def test_either_side_counts_the_right_items_in_their_colours_on_the_wrong_sides():
    wanted = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    predicted = torch.tensor([[1, 2, 3, 4], [3, 4, 1, 2], [3, 2, 1, 4]])  # right, mirrored, colours left behind
    assert either_side(predicted, wanted).tolist() == [True, True, False]
    assert accuracies(predicted, wanted)["either_side"] == pytest.approx(2 / 3)
