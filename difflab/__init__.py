"""difflab: diffusion models as the lecture notes describe them.

import difflab
run = difflab.load("runs/digits")            # a trained run, of whatever kind
x = run.sample(16, class_label=3, guidance=3)  # (16, 1, 8, 8) in [-1, 1]
"""

import os

# OpenMP threads that spin while waiting turn any competition for the cores into a 40x slowdown
# (measured on 2 cores: a digits training step took 8.7 s instead of 0.2 s beside one other busy
# process). Passive waiting costs little when the machine is idle. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .data.images import to_uint8  # noqa: E402
from .guidance.config import GuidanceConfig  # noqa: E402
from .runs.load import load  # noqa: E402  (registers the built-in run kinds)
from .viz.plots import save_grid  # noqa: E402

__all__ = ["GuidanceConfig", "load", "save_grid", "to_uint8"]
