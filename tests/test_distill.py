"""Few-step students (difflab/distill/): the math against closed-form truth, students of real runs against their
teachers, the run kind's refusals, and resume.

Gaussian data has an exact teacher (core/analytic.py) whose DDIM map from noise to data is linear: a student
distilled from it must reproduce the teacher's N-step map in one step."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch

import difflab
from difflab.cli import main
from difflab.core.analytic import (
    GaussianDenoiser,
    GaussianMixture,
    GaussianMixtureDenoiser,
)
from difflab.core.conditions import class_labels
from difflab.core.parameterize import Prediction
from difflab.core.processes import DiscreteDDPM
from difflab.data.loader import TensorDataset
from difflab.data.toy2d import make_toy
from difflab.distill.losses import ProgressiveLoss, Teacher
from difflab.distill.student import DistillError, distill
from difflab.distill.targets import consistency_coefficients, consistency_x0, ddim_x0_target, ode_step, pseudo_huber
from difflab.evaluation.features import accuracy, load_feature_net
from difflab.evaluation.metrics import EnergyTo
from difflab.guidance.config import GuidanceConfig
from difflab.guidance.wrappers import Guided
from difflab.runs.config import load_config
from difflab.runs.presets import preset_for
from difflab.runs.store import load_weights
from difflab.sampling.samplers import ddim, ddim_step, heun, timesteps
from difflab.training.loop import train

PROCESS = DiscreteDDPM(T=1000, schedule="cosine")


def gaussian():
    mu = torch.tensor([0.5, -0.3], dtype=torch.float64)
    cov = torch.tensor([[0.30, 0.12], [0.12, 0.08]], dtype=torch.float64)
    return mu, cov


# --------------------------------------------------------------------------- the pure math


def test_ddim_target_lands_on_the_teachers_two_steps():
    """One DDIM step from x_t with x0 = x~ arrives exactly where the teacher's two steps arrived (also into t = 0)."""
    teacher = GaussianDenoiser(PROCESS, *gaussian())
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(64, 2, generator=g, dtype=torch.float64) * 0.9
    for t, mid, s in ((1000.0, 750.0, 500.0), (250.0, 125.0, 0.0), (600.0, 410.0, 37.0)):
        t_, mid_, s_ = (torch.full((64,), v, dtype=torch.float64) for v in (t, mid, s))
        x_mid = ddim_step(PROCESS, teacher(x_t, t_), t_, mid_)
        x_s = ddim_step(PROCESS, teacher(x_mid, mid_), mid_, s_)
        target = ddim_x0_target(PROCESS, x_t, x_s, t_, s_)
        a_t, s_t = PROCESS.alpha(t_)[:, None], PROCESS.sigma(t_)[:, None]
        one = ddim_step(PROCESS, Prediction(x_t, a_t, s_t, "x0", target), t_, s_)
        assert torch.allclose(one, x_s, atol=1e-9), (t, (one - x_s).abs().max())


def test_consistency_boundary_is_exact_and_high_noise_is_the_denoiser():
    """f(x, t_min) = x / alpha(t_min) exactly whatever the network says (a = 1, b = 0); at t_max f is the network's
    x_0 reading; and with a v-predicting network f is Song et al.'s c_skip y + c_out F with F = -v (sigma_data 1)."""
    torch.manual_seed(0)
    x = torch.randn(16, 2, dtype=torch.float64)
    junk = torch.randn(16, 2, dtype=torch.float64) * 10
    t_min = torch.ones(16, dtype=torch.float64)
    a, b = consistency_coefficients(PROCESS, t_min, 1.0)
    assert torch.equal(a, torch.ones(16, dtype=torch.float64)) and torch.equal(b, torch.zeros(16, dtype=torch.float64))
    alpha = PROCESS.alpha(t_min)[:, None]
    pred = Prediction(x, alpha, PROCESS.sigma(t_min)[:, None], "x0", junk)
    assert torch.equal(consistency_x0(PROCESS, pred, t_min, 1.0), (1 / alpha) * x)
    t_max = torch.full((16,), 1000.0, dtype=torch.float64)
    pred = Prediction(x, PROCESS.alpha(t_max)[:, None], PROCESS.sigma(t_max)[:, None], "x0", junk)
    assert torch.allclose(consistency_x0(PROCESS, pred, t_max, 1.0), junk, atol=1e-6)
    t = torch.tensor([3.0, 40.0, 300.0, 700.0], dtype=torch.float64)
    al, si = PROCESS.alpha(t)[:, None], PROCESS.sigma(t)[:, None]
    v = torch.randn(4, 2, dtype=torch.float64)
    xt = torch.randn(4, 2, dtype=torch.float64)
    f = consistency_x0(PROCESS, Prediction(xt, al, si, "v", v), t, 1.0)
    st, st_min = (
        si / al,
        PROCESS.sigma(torch.tensor(1.0, dtype=torch.float64)) / PROCESS.alpha(torch.tensor(1.0, dtype=torch.float64)),
    )
    c_skip, c_out = 1 / ((st - st_min) ** 2 + 1), (st - st_min) / torch.sqrt(1 + st**2)
    assert torch.allclose(f, c_skip * xt / al + c_out * (-v), atol=1e-10)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far():
    c = 0.00054 * 2**0.5
    a = torch.zeros(3, 2)
    b = torch.tensor([[1e-5, 0.0], [3.0, 4.0], [0.0, 0.0]])
    d = pseudo_huber(a, b)
    assert d[2] == 0
    assert d[0] == pytest.approx(1e-10 / (2 * c), rel=1e-2)  # |x|^2 / 2c for |x| << c
    assert d[1] == pytest.approx(5.0 - c, rel=1e-6)  # |x| - c for |x| >> c


def test_heun_ode_step_matches_the_heun_sampler_per_sample():
    """ode_step with per-sample times equals the heun sampler run sample by sample on its 2-point grid."""
    teacher = GaussianDenoiser(PROCESS, *gaussian())
    levels = timesteps(PROCESS, 6, "karras")[:-1]
    x = torch.randn(len(levels) - 1, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t, s = levels[:-1], levels[1:]
    ours = ode_step(teacher, x, t, s, {}, "heun")
    for i in range(len(t)):
        ref = heun(teacher, x[i : i + 1], torch.stack([t[i], s[i]]))
        assert torch.allclose(ours[i], ref[0], atol=1e-10), i


def test_classifier_free_teacher_equals_the_guided_wrapper():
    """The distillation teacher's per-sample guided prediction is the Guided wrapper's, scale by scale (mixture)."""
    mixture = GaussianMixture(
        [0.5, 0.5], torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.stack([torch.eye(2) * 0.1, torch.eye(2) * 0.2])
    )
    exact = GaussianMixtureDenoiser(PROCESS, mixture)
    specs = [class_labels(2)]
    teacher = Teacher(exact, specs, "cfg")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([900.0, 600.0, 300.0, 100.0, 50.0, 10.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    w = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.5, 7.0], dtype=torch.float64)
    ours = teacher.predict(x, t, {"class_labels": labels}, w).x0
    for i in range(6):
        ref = Guided(exact, specs, scale=float(w[i]))(x[i : i + 1], t[i : i + 1], class_labels=labels[i : i + 1]).x0
        assert torch.allclose(ours[i], ref[0], atol=1e-9), i


# --------------------------------------------------------------------------- closed form, trained


def test_gaussian_student_learns_the_teachers_four_step_map_in_one(tmp_path):
    """Two progressive stages (4 -> 2 -> 1 DDIM steps) from the exact Gaussian teacher, through the one training
    loop: the 1-step student's map from held-out noise matches the teacher's 4-step DDIM map.
    Measured: RMS difference 0.0026 against the map's own RMS scale 0.51 (tolerance 0.05); the teacher's own
    1-step DDIM map is 0.30 away from its 4-step map."""
    mu, cov = gaussian()
    exact = GaussianDenoiser(PROCESS, mu, cov)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        (mu + torch.randn(20000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).float()
    )
    cfg = preset_for("swissroll")
    cfg = replace(
        cfg,
        train=replace(cfg.train, steps=600, lr=2e-3, warmup=50, ema_decay=0.99, checkpoint_every=600, log_every=100),
    )
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(7))
    teacher_map = ddim(exact, noise.double(), timesteps(PROCESS, 4, "uniform")).float()

    stage1 = train(tmp_path / "s1", cfg, data, loss_fn=ProgressiveLoss(Teacher(exact), 2), progress=False)
    stage2 = train(
        tmp_path / "s2",
        cfg,
        data,
        loss_fn=ProgressiveLoss(Teacher(stage1), 1),
        init_from=tmp_path / "s1",
        progress=False,
    )
    student_map = ddim(stage2, noise, timesteps(PROCESS, 1, "uniform"))
    err = (student_map - teacher_map).pow(2).mean().sqrt().item()
    scale = teacher_map.pow(2).mean().sqrt().item()
    one_step = ddim(exact, noise.double(), timesteps(PROCESS, 1, "uniform")).float()
    print(
        f"student 1-step vs teacher 4-step RMS {err:.4f} (scale {scale:.3f}); teacher 1-step vs 4-step "
        f"{(one_step - teacher_map).pow(2).mean().sqrt().item():.4f}"
    )
    assert err < 0.05
    assert (one_step - teacher_map).pow(
        2
    ).mean().sqrt().item() > 5 * err  # the student did something the teacher's 1 step cannot


# --------------------------------------------------------------------------- students of a trained run


@pytest.fixture(scope="module")
def heldout():
    return EnergyTo(make_toy("swissroll", 4000, seed=100))


@pytest.mark.quality
def test_progressive_stage_on_the_swiss_roll(swissroll_run, tmp_path, heldout):
    """One stage 8 -> 4 steps: the student's 4-step samples are as close to the teacher's 8-step samples as the
    teacher's 8-step ones are to its 16. Measured (energy distance to held-out data): teacher 16 steps 0.0024,
    8 steps 0.0070, 4 steps 0.032; the student at 4 steps 0.0069 (0.99x the teacher's 8; bound 1.5x)."""
    out = tmp_path / "pd"
    assert (
        main(
            [
                "distill",
                str(swissroll_run),
                "--method",
                "progressive",
                "--teacher-steps",
                "8",
                "--steps-to",
                "4",
                "--steps",
                "300",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    teacher, student = difflab.load(swissroll_run), difflab.load(out)
    assert type(student).__name__ == "StudentRun" and student.config.distill.stages == [[8, 4]]

    def energy(model, **kw):
        return heldout(model.sample(4000, batch=4000, **kw))

    t16, t8, t4 = (energy(teacher, sampler="ddim", steps=k, spacing="uniform") for k in (16, 8, 4))
    s4 = energy(student)
    print(f"teacher 16 {t16:.5f}, 8 {t8:.5f}, 4 {t4:.5f}; student 4 {s4:.5f}")
    assert s4 <= 1.5 * t8  # the student's 4 steps are worth the teacher's 8
    assert s4 < t4 / 4  # and far from the teacher's own 4


@pytest.mark.quality
def test_consistency_student_on_the_swiss_roll(swissroll_run, tmp_path, heldout):
    """Consistency distillation: f(x, t_min) = x / alpha(t_min) for the trained student, and its 1-step samples beat
    the teacher's
    1-step DDIM by far. Measured: student 1 step 0.0104, teacher DDIM 1 step 0.62 (59x); teacher 16 steps 0.0024."""
    out = tmp_path / "cd"
    assert (
        main(
            ["distill", str(swissroll_run), "--method", "consistency", "--steps", "1500", "--out", str(out), "--quiet"]
        )
        == 0
    )
    student = difflab.load(out)
    x = torch.randn(32, 2)
    one = torch.ones(32, dtype=torch.float64)
    assert torch.equal(
        student.denoiser(x, one).x0, x * (1 / PROCESS.alpha(one))[:, None].float()
    )  # the boundary, exactly
    s1 = heldout(student.sample(4000, batch=4000))
    d1 = heldout(difflab.load(swissroll_run).sample(4000, sampler="ddim", steps=1, batch=4000))
    print(f"consistency student 1 step {s1:.5f}; teacher ddim 1 step {d1:.5f} ({d1 / s1:.0f}x)")
    assert s1 * 10 < d1
    two = heldout(student.sample(4000, steps=2, batch=4000))
    assert two < d1 / 10  # multistep sampling works too


@pytest.mark.quality
def test_guided_student_matches_the_two_pass_teacher(digits_runs, tmp_path):
    """A guided student of the class-conditional digits run: its one pass at scale w matches the teacher's two-pass
    classifier-free prediction on held-out inputs, and its 2-step samples at s = 3 are as often of the class asked
    for as the teacher's guided dpmpp-2m samples at 20 steps x 2 passes (the digits feature net judges).
    Measured (150 steps per stage, batch 32): relative x_0 error 0.145 (the plain conditional prediction is 0.393
    away); class accuracy at s = 3, student 2 steps 1.00 against the teacher's 0.99."""
    teacher = difflab.load(digits_runs / "dc")
    out = tmp_path / "gd"
    assert (
        main(
            [
                "distill",
                str(digits_runs / "dc"),
                "--method",
                "progressive",
                "--guidance-range",
                "1,4",
                "--teacher-steps",
                "4",
                "--steps-to",
                "2",
                "--steps",
                "150",
                "--batch-size",
                "32",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    stage_one = out / "stages" / "1-4to4"
    record = load_config(out).distill
    assert record.stages == [[4, 4], [4, 2]] and record.guidance_range == [1.0, 4.0]
    one = difflab.load(stage_one)
    g = torch.Generator().manual_seed(5)
    x0 = teacher.sample(64, class_label=list(range(10)) * 6 + [0, 1, 2, 3], seed=1000)
    t = torch.randint(50, 950, (64,), generator=g).double()
    x_t = PROCESS.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    labels = torch.arange(64) % 10
    w = 3.0
    guided = (
        Teacher(teacher.denoiser, teacher.config.condition_specs(), "cfg")
        .predict(x_t, t, {"class_labels": labels}, torch.full((64,), w))
        .x0
    )
    with torch.no_grad():
        student = one.guided(GuidanceConfig(scale=w))(x_t, t, class_labels=labels).x0
        plain = teacher.denoiser(x_t, t, class_labels=labels).x0
    rel = ((student - guided).norm() / guided.norm()).item()
    rel_plain = ((plain - guided).norm() / guided.norm()).item()
    print(f"guided student vs two-pass teacher: relative x0 error {rel:.3f} (plain conditional {rel_plain:.3f})")
    assert rel < 0.25 and rel < rel_plain / 2

    net = load_feature_net("digits")
    labels = [k for k in range(10) for _ in range(20)]
    acc = {
        name: accuracy(
            net, model.sample(200, class_label=labels, guidance=3.0, seed=0).clamp(-1, 1), torch.tensor(labels)
        )
        for name, model in (("teacher", teacher), ("student", difflab.load(out)))
    }
    print("class accuracy at s = 3:", acc)
    assert acc["student"] >= acc["teacher"] - 0.03


# --------------------------------------------------------------------------- refusals and resume


def _err(capsys, *argv) -> str:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("difflab") and " error: " in err, err
    return err


def test_bad_input_is_one_line(digits_runs, tiny_toy_run, tmp_path, capsys):
    out = tmp_path / "x"
    assert "classifier" in _err(capsys, "distill", digits_runs / "clf", "--method", "progressive", "--out", out)
    assert "power of two below" in _err(
        capsys,
        "distill",
        tiny_toy_run,
        "--method",
        "progressive",
        "--teacher-steps",
        "8",
        "--steps-to",
        "3",
        "--out",
        out,
    )
    assert "power of two below" in _err(
        capsys,
        "distill",
        tiny_toy_run,
        "--method",
        "progressive",
        "--teacher-steps",
        "8",
        "--steps-to",
        "8",
        "--out",
        out,
    )
    assert "power of two" in _err(
        capsys, "distill", tiny_toy_run, "--method", "progressive", "--teacher-steps", "12", "--out", out
    )
    assert "super-resolution" in _err(capsys, "distill", digits_runs / "sr", "--method", "consistency", "--out", out)
    assert "no class or text" in _err(
        capsys, "distill", tiny_toy_run, "--method", "consistency", "--guidance-range", "1,3", "--out", out
    )
    assert "LO <= HI" in _err(
        capsys, "distill", tiny_toy_run, "--method", "consistency", "--guidance-range", "3,1", "--out", out
    )
    assert "give TEACHER" in _err(capsys, "distill", "--out", out)
    assert not out.exists()  # nothing half-written

    student = tmp_path / "s"
    assert (
        main(
            [
                "distill",
                str(tiny_toy_run),
                "--method",
                "progressive",
                "--teacher-steps",
                "4",
                "--steps-to",
                "2",
                "--steps",
                "5",
                "--out",
                str(student),
                "--quiet",
            ]
        )
        == 0
    )
    assert "samples with 'ddim', not 'heun'" in _err(capsys, "sample", student, "--sampler", "heun", "--n", "4")
    assert "in 2 DDIM steps, not 8" in _err(capsys, "sample", student, "--steps", "8", "--n", "4")
    assert "uniform grid" in _err(capsys, "sample", student, "--spacing", "karras", "--n", "4")
    assert "already holds a run" in _err(capsys, "distill", tiny_toy_run, "--method", "progressive", "--out", student)
    assert "drop" in _err(capsys, "distill", "--out", student, "--resume", "--steps", "9")
    with pytest.raises(DistillError, match="LoRA"):
        difflab.load(student, lora=[(student, 1.0)])
    assert (
        main(["sample", str(student), "--n", "8", "--save", str(tmp_path / "p.npz"), "--quiet"]) == 0
    )  # its own sampler and steps
    assert main(["trajectories", str(student), "--out", str(tmp_path / "t.png")]) == 0
    assert main(["eval", str(student), "-n", "20", "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert (report["sampler"], report["steps"]) == ("ddim", 2) and report["bits_per_dim"]["total"] is None

    changed = tmp_path / "teacher"
    shutil.copytree(tiny_toy_run, changed)
    s2 = tmp_path / "s2"
    distill(changed, s2, "progressive", teacher_steps=4, steps_to=2, steps=10, progress=False, stop_after=3)
    weights = sorted((changed / "checkpoints").glob("*/model.safetensors"))[-1]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the teacher's weights change (one bit)
    weights.write_bytes(bytes(data))
    assert "changed since" in _err(capsys, "distill", "--out", s2, "--resume")


def test_unguided_class_student_refuses_guidance(digits_runs, tmp_path, capsys):
    out = tmp_path / "u"
    assert (
        main(
            [
                "distill",
                str(digits_runs / "dc"),
                "--method",
                "consistency",
                "--steps",
                "3",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert "without guidance" in _err(capsys, "sample", out, "--class", "3", "--guidance", "3", "--n", "4")
    g = tmp_path / "g"
    assert (
        main(
            [
                "distill",
                str(digits_runs / "dc"),
                "--method",
                "consistency",
                "--guidance-range",
                "1,2",
                "--steps",
                "3",
                "--out",
                str(g),
                "--quiet",
            ]
        )
        == 0
    )
    assert "scales in [1, 2], not 3" in _err(capsys, "sample", g, "--class", "3", "--guidance", "3", "--n", "4")
    assert "scale alone" in _err(
        capsys, "sample", g, "--class", "3", "--guidance", "2", "--negative-class", "4", "--n", "4"
    )
    assert "teacher's full chain" in str(
        pytest.raises(DistillError, difflab.load(g).img2img, torch.zeros(1, 1, 8, 8), 0.5).value
    )
    assert (
        main(
            [
                "sample",
                str(g),
                "--class",
                "3",
                "--guidance",
                "1.5",
                "--n",
                "4",
                "--out",
                str(tmp_path / "g.png"),
                "--quiet",
            ]
        )
        == 0
    )


def test_a_consistency_student_is_exact_at_its_boundary_and_samples_in_one_step(tiny_toy_run, tmp_path):
    """The plumbing of a consistency student (what one achieves: the quality test on the swiss roll): a few steps
    of training, then f(x, t_min) = x / alpha(t_min) exactly, and its own sampler (1 step) gives finite points."""
    distill(tiny_toy_run, tmp_path / "cd", "consistency", steps=3, progress=False)
    student = difflab.load(tmp_path / "cd")
    x, one = torch.randn(32, 2), torch.ones(32, dtype=torch.float64)
    assert torch.equal(student.denoiser(x, one).x0, x * (1 / PROCESS.alpha(one))[:, None].float())
    points = student.sample(64, seed=0)
    assert points.shape == (64, 2) and torch.isfinite(points).all()
    assert torch.equal(points, student.sample(64, seed=0, steps=1))  # its own sampler takes one step
    assert not torch.equal(points, student.sample(64, seed=0, steps=2))


def test_a_stopped_distillation_resumes_exactly(tiny_toy_run, tmp_path):
    """Stopped inside the first stage and again inside the second, then resumed: the same student, bit for bit,
    as one uninterrupted run."""
    kw = dict(teacher_steps=8, steps_to=2, steps=12, progress=False)
    distill(tiny_toy_run, tmp_path / "a", "progressive", **kw)
    b = tmp_path / "b"
    distill(tiny_toy_run, b, "progressive", stop_after=5, **kw)
    assert not (b / "checkpoints").exists() or not any((b / "checkpoints").iterdir())
    distill(None, b, resume=True, stop_after=10, progress=False)  # finishes stage 1 (7 more), stops in stage 2
    distill(None, b, resume=True, progress=False)
    for which in ("ema", "net"):
        wa, wb = load_weights(tmp_path / "a", which), load_weights(b, which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(rows) and rows[-1] == 12


def test_latent_text_student_samples_decoded_images(text_runs, tmp_path, capsys):
    """A guided consistency student of the latent MiniLM text run: it distils in the latent space (the latents
    cached in its folder), reads captions, and samples decoded images at a guidance scale in one pass per step."""
    out = tmp_path / "t"
    assert (
        main(
            [
                "distill",
                str(text_runs / "minilm"),
                "--method",
                "consistency",
                "--guidance-range",
                "1,4",
                "--steps",
                "4",
                "--batch-size",
                "16",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "latents.safetensors").exists()
    student = difflab.load(out)
    teacher = difflab.load(text_runs / "minilm")
    x = student.sample(3, prompt="a handwritten three", guidance=2.5, steps=2, seed=0)
    assert x.shape == (3, *teacher.config.data_shape) and x.abs().max() <= 1.5  # decoded images, not latents
    z = student.sample(3, prompt="a handwritten three", guidance=2.5, steps=2, seed=0, decoded=False)
    assert z.shape == (3, *teacher.config.shape)
    alone = student.sample(1, prompt="a handwritten three", guidance=2.5, steps=2, seed=1)
    assert torch.allclose(alone, x[1:2], atol=1e-3)  # seed i is sample i, whatever the batch (to round-off)
    assert "scale alone" in _err(
        capsys,
        "sample",
        out,
        "--prompt",
        "a handwritten three",
        "--negative-prompt",
        "a handwritten eight",
        "--guidance",
        "2",
        "--n",
        "2",
    )


@pytest.mark.slow  # subprocesses under torchrun
def test_two_ranks_distil_the_student_of_one_process(tiny_toy_run, tmp_path):
    """torchrun, 2 ranks with batch B/2, through two progressive stages (the ranks wait for rank 0's checkpoint
    between them): the same student as one process with batch B."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        "-m",
        "difflab",
        "distill",
        str(tiny_toy_run),
        "--method",
        "progressive",
        "--teacher-steps",
        "4",
        "--steps-to",
        "1",
        "--steps",
        "6",
        "--quiet",
        "--device",
        "cpu",
    ]
    one = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "one"), "--batch-size", "64"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *args,
            "--out",
            str(tmp_path / "two"),
            "--batch-size",
            "32",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = load_weights(tmp_path / "one", "ema"), load_weights(tmp_path / "two", "ema")
    gap = (
        sum(float((a[k] - b[k]).double().pow(2).sum()) for k in a) / sum(float(a[k].double().pow(2).sum()) for k in a)
    ) ** 0.5
    print(f"relative gap between 1 process and 2 ranks: {gap:.2e}")
    assert gap < 1e-5
