import os

import pytest
import torch

from difflab.cli import main

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one thread per worker: two workers share the two cores without oversubscription


@pytest.fixture(scope="session")
def tiny_toy_run(tmp_path_factory):
    """A swiss-roll run trained for a few steps: enough to test loading and sampling plumbing."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "swissroll", "--out", str(run), "--steps", "30", "--n", "2000", "--quiet"]) == 0
    return run
