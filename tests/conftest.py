import pytest
import torch

from difflab.cli import main

# One intra-op thread per test process: `make test` runs two xdist workers on the two cores, and the
# networks here are small, so a second thread per worker only adds OpenMP spin-waiting (measured 20x
# slower small ops when the cores are oversubscribed).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_toy_run(tmp_path_factory):
    """A swiss-roll run trained for a few steps: enough to test loading and sampling plumbing."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", "swissroll", "--out", str(run), "--steps", "30", "--n", "2000", "--quiet"]) == 0
    return run
