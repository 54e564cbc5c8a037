"""The GPU check script's logic, rehearsed on the CPU at a tiny size (on a CUDA machine it runs the real thing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from difflab.data.images import DataError, load_images

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    try:
        load_images("fashion-mnist", "test")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST IDX files not installed: {e}")
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--device", "cpu", "--work", str(tmp_path / "work"), "--out", str(tmp_path)]) == 0
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert len(parts) == 7 and all(p["ok"] for p in parts.values()), parts
    low = module.low_precision(
        "cpu"
    )  # bf16 where this CPU computes it natively, else fp32 (emulated: 60-90x slower matmuls)
    step = parts["the training step (issue 33)"]
    assert step["syncs"].startswith("skipped") and all(step[p]["loop_images_s"] > 0 for p in ("fp32", low))
    assert parts[f"fashion-mnist preset, {low}"]["steps"] == 4
    assert parts[f"the {low} run resumed on the CPU"]["to_step"] == 6
    assert "skipped" in parts["2-rank NCCL"] and "skipped" in parts["fashion-mnist preset, fp16"]
    points = parts["quality_vs_nfe, smallest size"]["points"]
    assert {(p["sampler"], p["nfe"]) for p in points} >= {("dpmpp-2m", 5), ("ddim", 5)} and all(
        p["fd"] > 0 for p in points
    )
