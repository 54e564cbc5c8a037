"""The training loop: EMA arithmetic, determinism, and exact resume after SIGKILL."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch
from torch import nn

from difflab.runs.config import TrainConfig
from difflab.runs.presets import preset_for
from difflab.runs.store import load_training_state, load_weights, weights_step
from difflab.training.loop import ema_decay_at, ema_update, learning_rate


def test_ema_matches_hand_computation():
    net, ema = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ema.weight.fill_(1.0), ema.bias.fill_(0.0)
        net.weight.fill_(3.0), net.bias.fill_(2.0)
    ema_update(ema, net, decay=0.9)
    assert torch.allclose(ema.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 3))
    assert torch.allclose(ema.bias, torch.tensor([0.1 * 2]))
    ema_update(ema, net, decay=0.9)  # 0.9 * 1.2 + 0.1 * 3 = 1.38
    assert torch.allclose(ema.weight, torch.full((1, 2), 1.38))


def test_ema_copies_buffers_instead_of_averaging():
    net, ema = nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    net.running_mean.fill_(5.0)
    net.num_batches_tracked.fill_(7)
    ema_update(ema, net, decay=0.99)
    assert torch.equal(ema.running_mean, torch.full((3,), 5.0))  # copied, not 0.99 * 0 + 0.01 * 5
    assert int(ema.num_batches_tracked) == 7


def test_ema_warmup_schedule():
    assert ema_decay_at(0, 0.999, warmup=False) == ema_decay_at(10**6, 0.999, warmup=False) == 0.999
    assert ema_decay_at(0, 0.999, warmup=True) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999, warmup=True) == pytest.approx(0.91)
    assert ema_decay_at(8990, 0.999, warmup=True) == pytest.approx(0.999)  # (1 + n) / (10 + n) reaches the cap here
    assert ema_decay_at(10**6, 0.999, warmup=True) == 0.999


@pytest.mark.parametrize("n", [1, 50, 400])
def test_ema_warmup_forgets_the_initialisation(n):
    """Averaging a constant 1 into an EMA that starts at 0: what is left of the start is the product of the
    decays, prod_{k<n} (1 + k) / (10 + k) = 9! n! / (n + 9)! with warm-up, against 0.999^n without."""
    net, warm, cold = (nn.Linear(1, 1, bias=False, dtype=torch.float64) for _ in range(3))
    with torch.no_grad():
        net.weight.fill_(1.0), warm.weight.fill_(0.0), cold.weight.fill_(0.0)
    for step in range(n):
        ema_update(warm, net, ema_decay_at(step, 0.999, warmup=True))
        ema_update(cold, net, ema_decay_at(step, 0.999, warmup=False))
    left = math.factorial(9) * math.factorial(n) / math.factorial(n + 9)
    assert 1 - warm.weight.item() == pytest.approx(left, rel=1e-6, abs=1e-14)
    assert 1 - cold.weight.item() == pytest.approx(0.999**n, rel=1e-9)


def test_warmup_is_linear_then_constant_or_a_cosine_to_zero():
    tc = TrainConfig(steps=1000, lr=1.0, warmup=10)
    assert learning_rate(0, tc) == pytest.approx(0.1)
    assert learning_rate(4, tc) == pytest.approx(0.5)
    assert learning_rate(9, tc) == learning_rate(500, tc) == 1.0
    cos = replace(tc, lr_schedule="cosine")
    assert learning_rate(4, cos) == pytest.approx(0.5)  # the same warm-up
    assert learning_rate(10, cos) == pytest.approx(1.0) and learning_rate(505, cos) == pytest.approx(
        0.5
    )  # half-way down
    assert learning_rate(999, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 989 / 990)))


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    """'auto' (the image presets' precision) trains in bf16 where it is native and in fp32 where PyTorch would
    emulate it (an AVX2 CPU: its bf16 matmul is a generic loop, 60-90x slower); explicit bf16 is kept, with a
    warning in the start line."""
    from difflab.training import loop

    cpu = torch.device("cpu")
    assert preset_for("fashion-mnist").train.precision == preset_for("fashion-pairs").train.precision == "auto"
    for native in (True, False):
        monkeypatch.setattr(loop, "native_bf16", lambda device, native=native: native)
        used = "bf16" if native else "fp32"
        assert loop.resolve_precision("auto", cpu) == used and loop.resolve_precision("bf16", cpu) == "bf16"
        assert loop.describe_precision("auto", cpu) == f"auto precision ({used} on this cpu)"
        with loop.autocast("auto", cpu):
            y = nn.Linear(4, 4)(torch.randn(2, 4))
        assert y.dtype == (torch.bfloat16 if native else torch.float32)
        assert ("emulated" in loop.describe_precision("bf16", cpu)) is not native
    assert loop.resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        loop.resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="unknown precision 'fp64'"):
        loop.resolve_precision("fp64", cpu)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, torch
    torch.set_num_threads(1)
    from dataclasses import replace
    from difflab.runs.presets import preset_for
    from difflab.data.toy2d import make_toy
    from difflab.training.loop import train
    run, steps, kill_at, resume = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
    cfg = preset_for("swissroll")
    cfg = replace(cfg, train=replace(cfg.train, steps=steps, checkpoint_every=40, sample_every=kill_at or 0,
    log_every=10, batch_size=64, warmup=20, ema_warmup=True))
    def die(ema, step, run_dir):
        if kill_at and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(run, cfg, make_toy("swissroll", 1000, seed=1), resume=resume, progress=False, preview=die)
    """
)


def _train(run, steps, kill_at=0, resume=False):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(run), str(steps), str(kill_at), "1" if resume else "0"],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow  # trains in subprocesses or loads large data: left out of make test-fast
def test_resume_after_sigkill_is_exact(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert _train(straight, 120).returncode == 0
    killed = _train(broken, 120, kill_at=95)
    assert killed.returncode == -9  # really killed by SIGKILL, mid-run
    assert weights_step(broken) == 80  # the last checkpoint before the kill
    assert _train(broken, 120, resume=True).returncode == 0
    assert weights_step(broken) == 120
    for which in ("net", "ema"):
        a, b = load_weights(straight, which), load_weights(broken, which)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{which}.{k} differs after resume"
    opt_a, opt_b = load_training_state(straight)[1]["state"], load_training_state(broken)[1]["state"]
    assert opt_a.keys() == opt_b.keys() and all(
        torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a
    )
    steps_logged = [
        int(line.split('"step": ')[1].split(",")[0]) for line in (broken / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == list(range(10, 121, 10))  # the killed run's rows after step 80 were dropped, none twice


def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    from difflab.data.toy2d import make_toy
    from difflab.training.loop import train

    data = make_toy("swissroll", 500, seed=1)
    cfg = preset_for("swissroll")
    cfg = replace(cfg, train=replace(cfg.train, steps=15, batch_size=32, checkpoint_every=15))
    outs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        c = replace(cfg, train=replace(cfg.train, seed=seed))
        train(tmp_path / name, c, data, progress=False)
        outs.append(load_weights(tmp_path / name, "net"))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert not all(torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


def test_resume_refuses_mismatched_files(tmp_path):
    from difflab.data.toy2d import make_toy
    from difflab.runs.store import CheckpointError, latest_checkpoint
    from difflab.training.loop import train

    data = make_toy("swissroll", 200, seed=1)
    cfg = preset_for("swissroll")
    cfg = replace(cfg, train=replace(cfg.train, steps=10, batch_size=16, checkpoint_every=5))
    train(tmp_path / "r", cfg, data, progress=False)
    state_json = latest_checkpoint(tmp_path / "r") / "state.json"
    state_json.write_text(state_json.read_text().replace('"step": 10', '"step": 5'))
    with pytest.raises(CheckpointError, match="different steps"):
        train(tmp_path / "r", replace(cfg, train=replace(cfg.train, steps=20)), data, resume=True, progress=False)


def test_injected_loss_trainable_filter_and_init_from(tmp_path):
    """The loop's hooks: a custom loss is what is minimised, frozen parameters do not move, and a run can
    start from another run's EMA weights."""
    from difflab.data.toy2d import make_toy
    from difflab.training.loop import train

    data = make_toy("swissroll", 300, seed=1)
    cfg = preset_for("swissroll")
    cfg = replace(cfg, train=replace(cfg.train, steps=8, batch_size=32, checkpoint_every=8, warmup=1))
    train(tmp_path / "base", cfg, data, progress=False)
    base = load_weights(tmp_path / "base", "ema")

    calls = []

    def loss(denoiser, x0, *, t, noise, cond):
        calls.append((x0.shape, t.shape, noise.shape, dict(cond)))
        return (denoiser(x0, t).value ** 2).mean()  # drive the output to zero

    frozen = lambda name, p: not name.startswith("out.")  # noqa: E731  (train everything but the output head)
    train(tmp_path / "tuned", cfg, data, progress=False, loss_fn=loss, trainable=frozen, init_from=tmp_path / "base")
    tuned = load_weights(tmp_path / "tuned", "net")
    assert len(calls) == 8 and calls[0][:3] == ((32, 2), (32,), (32, 2)) and calls[0][3] == {}
    assert all(torch.equal(tuned[k], base[k]) for k in base if k.startswith("out."))  # frozen: still the base EMA
    assert any(not torch.equal(tuned[k], base[k]) for k in base if not k.startswith("out."))
    opt = load_training_state(tmp_path / "tuned")[1]
    assert len(opt["state"]) == len([k for k in base if not k.startswith("out.")])  # AdamW holds only what trains


def _toy_config(**train):
    cfg = preset_for("swissroll")
    return replace(cfg, train=replace(cfg.train, **train))


def test_logged_losses_equal_a_plain_per_step_loop(tmp_path):
    """The loop keeps the loss on the device and reads it every log_every steps (fused AdamW, one generator
    reseeded per step): its logged losses are those of a plain loop that reads .item() after every step."""
    import json

    from difflab.data.loader import ShuffledBatches, TensorDataset
    from difflab.data.toy2d import make_toy
    from difflab.training.loop import SEED_STRIDE, train

    data = TensorDataset(make_toy("swissroll", 400, seed=1))
    cfg = _toy_config(steps=24, batch_size=32, warmup=5, checkpoint_every=24, log_every=4)
    train(tmp_path / "r", cfg, data, progress=False, device="cpu")
    logged = {
        r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
    }

    tc = cfg.train
    torch.manual_seed(tc.seed)
    den, loss_fn = cfg.build_denoiser(), cfg.build_loss()
    opt = torch.optim.AdamW(den.net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, foreach=False)  # per tensor
    batches = ShuffledBatches(len(data), tc.batch_size, seed=tc.seed)
    plain = {}
    for step in range(tc.steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, tc)
        gen = torch.Generator().manual_seed(tc.seed * SEED_STRIDE + step)
        t = den.process.sample_t(tc.batch_size, gen)
        noise = torch.randn((tc.batch_size, 2), generator=gen)
        x, _ = data.take(next(batches))
        opt.zero_grad()
        loss = loss_fn(den, x, t=t, noise=noise, cond={})
        loss.backward()
        nn.utils.clip_grad_norm_(den.net.parameters(), tc.grad_clip)
        opt.step()
        plain[step + 1] = loss.item()
    assert sorted(logged) == list(range(4, 25, 4))
    for step, value in logged.items():
        assert value == pytest.approx(plain[step], rel=1e-6), step  # measured: within 1.2e-7


def test_a_nan_stops_the_run_within_log_every_steps_with_a_resumable_checkpoint(tmp_path):
    from difflab.data.toy2d import make_toy
    from difflab.runs.store import checkpoints
    from difflab.training.loop import NonFiniteLoss, train

    data = make_toy("swissroll", 300, seed=1)
    cfg = _toy_config(steps=40, batch_size=32, warmup=1, checkpoint_every=10, log_every=8)
    calls = []
    plain = cfg.build_loss()

    def poisoned(denoiser, x0, **kw):  # step 13 (the 13th call) gives NaN
        calls.append(1)
        loss = plain(denoiser, x0, **kw)
        return loss * float("nan") if len(calls) == 13 else loss

    with pytest.raises(NonFiniteLoss) as caught:
        train(tmp_path / "r", cfg, data, progress=False, loss_fn=poisoned)
    message = str(caught.value)
    assert "\n" not in message and "step 13" in message and "step 16" in message  # seen at the next log step
    assert "newest checkpoint (step 10)" in message and "--resume" in message
    assert len(calls) == 16  # stopped at 16 = 13 + 3 <= 13 + log_every
    assert [s for s, _ in checkpoints(tmp_path / "r")] == [10]  # the bad weights were never saved
    rows = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and "NaN" not in rows[0]  # step 8's row; no row of the poisoned window
    train(tmp_path / "r", cfg, data, progress=False, resume=True)  # the checkpoint resumes and finishes
    assert weights_step(tmp_path / "r") == 40
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "r", "net").values())


@pytest.mark.slow  # compiles the network (inductor, C++) twice
def test_resume_is_exact_with_compile(tmp_path):
    """torch.compile changes how the step is computed, not what the run is: stopping and resuming a compiled
    run gives bit-for-bit the weights of an unbroken compiled run."""
    from difflab.data.toy2d import make_toy
    from difflab.training.loop import train

    data = make_toy("swissroll", 300, seed=1)
    cfg = _toy_config(steps=12, batch_size=32, warmup=2, checkpoint_every=6, log_every=3)
    train(tmp_path / "straight", cfg, data, progress=False, compile=True)
    train(tmp_path / "broken", cfg, data, progress=False, compile=True, stop_after=6)
    assert weights_step(tmp_path / "broken") == 6
    train(tmp_path / "broken", cfg, data, progress=False, compile=True, resume=True)
    for which in ("net", "ema"):
        a, b = load_weights(tmp_path / "straight", which), load_weights(tmp_path / "broken", which)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    assert not any(k.startswith("_orig_mod") for k in a)  # the plain module's keys
