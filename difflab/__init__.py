"""difflab: diffusion models as the lecture notes describe them."""

import os

# OpenMP threads that spin while waiting turn any competition for the cores into a 40x slowdown
# (measured on 2 cores: a digits training step took 8.7 s instead of 0.2 s beside one other busy
# process). Passive waiting costs little when the machine is idle. It must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
