"""Data-parallel training and generation under torchrun (gloo, 2 processes on this CPU machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.runs.store import checkpoints, load_weights, weights_step

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN = ["-m", "difflab", "train", "swissroll", "-n", "2000", "--quiet", "--device", "cpu", "--no-preview"]


def torchrun(nproc: int, args: list[str], extra: list[str] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, "--nproc-per-node", str(nproc), *extra, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def difflab(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)


def relative_gap(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all tensors together (a per-tensor ratio is noise for tensors that are still
    near their zero initialisation: 1e-7 apart on a norm of 1e-7)."""
    assert a.keys() == b.keys()
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    return (diff / sum(float(a[k].double().pow(2).sum()) for k in a)) ** 0.5


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    """K steps on 2 ranks with batch B/2 each end with the weights of 1 process with batch B: same data
    order, same noise (drawn for the global batch), gradients averaged by DDP."""
    one, two = tmp_path / "one", tmp_path / "two"
    p = difflab([*TRAIN, "--out", str(one), "--steps", "25", "--batch-size", "64"])
    assert p.returncode == 0, p.stderr
    q = torchrun(2, [*TRAIN, "--out", str(two), "--steps", "25", "--batch-size", "32"])
    out, _ = q.communicate(timeout=300)
    assert q.returncode == 0, out
    for which in ("net", "ema"):
        gap = relative_gap(load_weights(one, which), load_weights(two, which))
        print(f"{which}: relative gap between 1 process and 2 ranks {gap:.2e}")
        assert gap < 1e-6, (which, gap)  # measured: about 1e-8 (float32 summation order)
    assert not any(k.startswith("module.") for k in load_weights(two, "net"))  # saved from the unwrapped network


def _worker_pids(agent: int) -> dict[int, int]:
    """{local rank: pid} of the workers that the torchrun agent ``agent`` started."""
    found = {}
    for pid in subprocess.run(["pgrep", "-P", str(agent)], capture_output=True, text=True).stdout.split():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"LOCAL_RANK="):
                found[int(item.split(b"=")[1])] = int(pid)
    return found


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_a_killed_rank_is_restarted_by_torchrun_and_resumes_exactly(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = ["--steps", "200", "--batch-size", "32", "--checkpoint-every", "20"]
    ref = torchrun(2, [*TRAIN, "--out", str(straight), *args])
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    job = torchrun(2, [*TRAIN, "--out", str(broken), *args], ["--max-restarts", "1", "--monitor-interval", "0.1"])
    deadline, killed_at = time.time() + 120, None
    while time.time() < deadline and killed_at is None:
        found = checkpoints(broken)
        if found and found[-1][0] >= 40:
            pids = _worker_pids(job.pid)
            if 1 in pids:
                killed_at = found[-1][0]
                os.kill(pids[1], signal.SIGKILL)
        time.sleep(0.01)
    out, _ = job.communicate(timeout=300)
    assert killed_at is not None and killed_at < 200, "the run ended before a rank could be killed"
    assert job.returncode == 0, out
    assert weights_step(broken) == 200
    for which in ("net", "ema"):
        a, b = load_weights(straight, which), load_weights(broken, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which  # bit-identical to the uninterrupted run


def test_generate_gives_the_same_samples_on_one_and_two_processes(tiny_toy_run, tmp_path):
    one, two = tmp_path / "one.npz", tmp_path / "two.npz"
    sample = [
        "-m",
        "difflab",
        "sample",
        str(tiny_toy_run),
        "-n",
        "11",
        "--steps",
        "8",
        "--sampler",
        "ddpm",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--quiet",
    ]
    p = difflab([*sample, "--save", str(one)])
    assert p.returncode == 0, p.stderr
    q = torchrun(2, [*sample, "--save", str(two), "--batch", "3"])
    out, _ = q.communicate(timeout=300)
    assert q.returncode == 0, out
    a, b = np.load(one)["points"], np.load(two)["points"]
    assert a.shape == b.shape == (11, 2)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_accumulation_and_condition_dropout_shard_like_one_process(tmp_path):
    """2 ranks x batch 8 x 2 micro-batches on class-conditional digits with dropout 0.5 equal 1 process x
    batch 16 x 2 micro-batches: each rank's shard of each micro-batch, noise and null labels included."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [
        "-m",
        "difflab",
        "train",
        "digits",
        "--class-cond",
        "--cond-dropout",
        "0.5",
        "--accumulation",
        "2",
        "--steps",
        "4",
        "--quiet",
        "--device",
        "cpu",
        "--no-preview",
        "--precision",
        "fp32",
    ]
    p = difflab([*args, "--out", str(one), "--batch-size", "16"])
    assert p.returncode == 0, p.stderr
    q = torchrun(2, [*args, "--out", str(two), "--batch-size", "8"])
    out, _ = q.communicate(timeout=300)
    assert q.returncode == 0, out
    gap = relative_gap(load_weights(one, "net"), load_weights(two, "net"))
    print(f"accumulation + dropout: relative gap {gap:.2e}")
    assert gap < 1e-6
    # and the shards do matter: another dropout rate trains other weights
    r = difflab([*args[:6], "0.0", *args[7:], "--out", str(tmp_path / "nodrop"), "--batch-size", "16"])
    assert r.returncode == 0, r.stderr
    assert (
        relative_gap(load_weights(one, "net"), load_weights(tmp_path / "nodrop", "net")) > 1000 * gap
    )  # measured: 1.9e-4


def test_a_torchrun_worker_leaves_with_its_code_and_its_output_flushed():
    """distributed.leave: under torchrun (WORLD_SIZE > 1) the process ends without the interpreter's finalisation,
    with its exit code and everything it printed (a pipe is block-buffered: unflushed output would be lost); alone
    it exits normally, finalisation included."""
    script = (
        "import atexit, sys; atexit.register(lambda: print('finalised'));"
        "print('written', end=''); print('warned', end='', file=sys.stderr);"
        "from difflab.training.distributed import leave; leave(3)"
    )
    buffered = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # as a torchrun worker's pipes are
    for world, finalised in (("2", False), ("1", True)):
        env = buffered | {"WORLD_SIZE": world}
        p = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
        assert p.returncode == 3 and p.stdout.startswith("written") and p.stderr.startswith("warned"), (world, p)
        assert ("finalised" in p.stdout) == finalised, (world, p.stdout)
