"""Few-step students: a trained diffusion run distilled into one that samples in 1 to 8 network evaluations.

    difflab distill runs/fashion --method progressive --steps-to 4 --out runs/fashion-4
    difflab sample runs/fashion-4                       # its own sampler: DDIM, 4 steps
    student = difflab.load("runs/fashion-4"); student.sample(16, class_label=3, guidance=3)

Two methods, both trained by the one loop (training.loop.train, with a distillation loss from losses.py):

* ``progressive`` (Salimans & Ho 2022): the student starts as its teacher and learns to make in one DDIM step
  what the teacher makes in two, N -> N/2; the student becomes the next stage's teacher, down to K steps. Each
  stage is a run of its own (``OUT/stages/1-64to32``, ...); the last stage is OUT itself.
* ``consistency`` (Song et al. 2023): a student f(x_t, t) with the boundary condition f(x, t_min) = x built in
  (targets.consistency_x0), made to agree with itself across one teacher ODE step on the teacher's capped Karras
  grid of N levels; it samples in any number of steps by multistep consistency sampling (samplers.consistency).

A guided student (``guidance_range``, for class and text runs; Meng et al. 2023) takes the guidance scale w as
an input (UNetConfig.guidance_input: embedded like the time and added to it), trained on the teacher's two-pass
classifier-free prediction for w drawn from the range: sampling at guidance w then costs one pass per step.
Progressive distillation of a guided student starts with Meng et al.'s stage one ([N, N]: the guided prediction,
no fewer steps).

The student is a run of kind ``distilled`` (loaded as a ``StudentRun``): its config records the teacher's path
and fingerprint (a changed teacher is refused), the method, the stages and the step count K it samples in.
It samples with its own sampler and steps (its ``default_sampling``; DiffusionRun's ``sample`` and ``trajectory``
fill them in), and ``check_sampling`` refuses another in one line. Latent runs distil in the latent
space and decode as usual. LoRA adapters, inverse problems and editing are refused (they were made for the
teacher's full chain)."""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..core.parameterize import Prediction, expand_t
from ..guidance.config import GuidanceConfig
from ..runs.config import (
    CheckpointError,
    Distillation,
    RunConfig,
    load_config,
    save_config,
)
from ..runs.data import training_data
from ..runs.diffusion import NETS, DefaultSampling, DiffusionRun, _check, diffusion_loss, sample_pictures
from ..runs.kinds import RunKind
from ..runs.shipped import from_record, recorded_path, refuse_writes
from ..runs.store import (
    clear_checkpoints,
    has_checkpoint,
    load_weights,
    weights_fingerprint,
    weights_step,
)
from ..sampling.samplers import _default_t_min, timesteps
from ..training.distributed import launched_rank, resolve_device, setup, wait_for_all
from ..training.loop import train
from ..viz import plots
from .losses import GUIDANCE, ConsistencyLoss, GuidedLoss, ProgressiveLoss, Teacher
from .targets import consistency_x0

METHODS = ("progressive", "consistency")
STAGES = "stages"
DEFAULT_TEACHER_STEPS = {"progressive": 64, "consistency": 18}  # N: the DDIM steps halved first / the ODE grid's levels
DEFAULT_STEPS_TO = {"progressive": 4, "consistency": 1}
DEFAULT_STEPS = {"progressive": 400, "consistency": 2000}  # optimizer steps per stage / in all
MAX_CONSISTENCY_STEPS = 8


class DistillError(ValueError):
    """A teacher that cannot be distilled as asked, or a student asked for what it was not made for."""


# --------------------------------------------------------------------------- the student's denoiser


class ConsistencyDenoiser(nn.Module):
    """A consistency student in the Denoiser interface: its x_0 reading is f(x_t, t) (targets.consistency_x0)."""

    def __init__(self, denoiser, t_min: float, sigma_data: float):
        super().__init__()
        self.denoiser, self.t_min, self.sigma_data = denoiser, float(t_min), float(sigma_data)
        self.process = denoiser.process
        self.accepts = getattr(denoiser, "accepts", None)

    def forward(self, x_t: Tensor, t, **cond) -> Prediction:
        t = expand_t(t, x_t)
        pred = self.denoiser(x_t, t, **cond)
        return Prediction(
            x_t, pred.alpha, pred.sigma, "x0", consistency_x0(self.process, pred, t, self.t_min, self.sigma_data)
        )


class AtScale(nn.Module):
    """A guided student at guidance scale w, in the Denoiser interface: one pass per step."""

    def __init__(self, denoiser, w: float):
        super().__init__()
        self.denoiser, self.w, self.process = denoiser, float(w), denoiser.process
        accepts = getattr(denoiser, "accepts", None)
        self.accepts = None if accepts is None else frozenset(accepts) - {GUIDANCE}

    def forward(self, x_t: Tensor, t, **cond) -> Prediction:
        return self.denoiser(x_t, t, **cond, **{GUIDANCE: torch.full((len(x_t),), self.w, device=x_t.device)})


# --------------------------------------------------------------------------- the run object


class StudentRun(DiffusionRun):
    """A distilled student: a DiffusionRun that samples with its own sampler in its own few steps."""

    kinds = ("distilled",)
    what = "a distilled student"

    def __init__(self, path, config: RunConfig, net, adapters=()):
        super().__init__(path, config, net, adapters)
        d = config.distill
        if d.method == "consistency":
            self.denoiser = ConsistencyDenoiser(self.denoiser, _default_t_min(self.denoiser.process), d.sigma_data)

    @property
    def own_sampler(self) -> str:
        return "ddim" if self.config.distill.method == "progressive" else "consistency"

    def default_sampling(self) -> DefaultSampling:
        """Its own sampler in its own steps, on the uniform grid it was distilled on; nothing else is taken."""
        return DefaultSampling(self.own_sampler, self.config.distill.steps_to, spacing="uniform", fixed=True)

    def check_sampling(self, sampler=None, steps=None, spacing=None) -> tuple[str, int, str]:
        """(sampler, steps, spacing) the student takes: its own when not given; another is one clear error."""
        d, own = self.config.distill, self.own_sampler
        if sampler is not None and sampler != own:
            raise DistillError(
                f"{self.path} is a {d.method} student: it samples with {own!r}, not {sampler!r} (leave --sampler out)"
            )
        if spacing not in (None, "uniform"):
            raise DistillError(
                f"{self.path} samples on the uniform grid it was distilled on, not {spacing!r} (leave --spacing out)"
            )
        steps = d.steps_to if steps is None else steps
        if d.method == "progressive" and steps != d.steps_to:
            raise DistillError(
                f"{self.path} was distilled to sample in {d.steps_to} DDIM steps, not {steps} "
                f"(its earlier stages in {self.path / STAGES} sample in more)"
            )
        if d.method == "consistency" and not 1 <= steps <= MAX_CONSISTENCY_STEPS:
            raise DistillError(
                f"{self.path} is a consistency student: it samples in 1 to {MAX_CONSISTENCY_STEPS} steps, not {steps}"
            )
        return own, steps, "uniform"

    def guided(self, guidance: GuidanceConfig | None, length: int | None = None):
        d = self.config.distill
        if guidance is None or not guidance.active:  # w = 1, the plain conditional, or the range's nearest end
            return (
                AtScale(self.denoiser, min(max(1.0, d.guidance_range[0]), d.guidance_range[1]))
                if d.guided
                else self.denoiser
            )
        if not d.guided:
            raise DistillError(
                f"{self.path} was distilled without guidance: it samples the plain conditional law "
                "(distil with --guidance-range LO,HI for a student that takes --guidance)"
            )
        g = guidance
        if (
            g.negative is not None
            or g.compose
            or g.negative_prompt is not None
            or g.compose_prompts
            or g.interval is not None
            or g.rescale
            or g.classifier is not None
            or g.schedule != "constant"
        ):
            raise DistillError(
                f"{self.path} is a guided student: it takes a guidance scale alone (negative or composed "
                "conditions, intervals, rescale, schedules and classifiers need its teacher)"
            )
        lo, hi = d.guidance_range
        if not lo <= g.scale <= hi:
            raise DistillError(f"{self.path} was distilled for guidance scales in [{lo:g}, {hi:g}], not {g.scale:g}")
        return AtScale(self.denoiser, g.scale)

    def with_lora(self, adapters):
        raise DistillError(
            f"{self.path} is a distilled student; LoRA adapters load over the run they were trained on "
            f"(its teacher {self.config.distill.teacher})"
        )

    def _refuse(self, what: str):
        raise DistillError(
            f"{self.path} is a distilled student, made for its own {self.config.distill.steps_to}-step sampler; "
            f"{what} runs the teacher's full chain: use {self.config.distill.teacher}"
        )

    def restore(self, *a, **k):
        self._refuse("restoration")

    def img2img(self, *a, **k):
        self._refuse("image-to-image")

    def interpolate(self, *a, **k):
        self._refuse("interpolation")


# --------------------------------------------------------------------------- the plan


def check_teacher(cfg: RunConfig, run, method: str, teacher_steps: int, steps_to: int, guidance_range) -> None:
    """Refuse, in one line, a teacher or settings that cannot be distilled."""
    if method not in METHODS:
        raise DistillError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if cfg.run_kind not in ("diffusion", "personalized"):
        raise DistillError(f"{run} is {cfg.kind.what}: distillation needs a diffusion run (trained by `difflab train`)")
    if cfg.super_resolution is not None:
        raise DistillError(f"{run} is a super-resolution run; distil a run that samples from noise alone")
    if cfg.lora is not None:
        raise DistillError(f"{run} holds LoRA adapters; distil its base run")
    if cfg.inverts_through_tower:
        raise DistillError(
            f"{run} learns its identifier through its CLIP's text tower inside the network (textual inversion); "
            "distilling such a run is not built: distil its base run"
        )
    process = cfg.build_process()
    if not process.variance_preserving:
        raise DistillError(
            f"{run} runs a variance-exploding process; distillation here is written for variance-preserving ones"
        )
    if method == "progressive":
        if teacher_steps < 2 or teacher_steps & (teacher_steps - 1):
            raise DistillError(f"the teacher's steps must be a power of two >= 2, got {teacher_steps}")
        if process.discrete and teacher_steps > process.T:
            raise DistillError(f"{teacher_steps} teacher steps exceed the process's T = {process.T}")
        if steps_to < 1 or steps_to >= teacher_steps or steps_to & (steps_to - 1):
            raise DistillError(
                f"--steps-to must be a power of two below the teacher's {teacher_steps} steps, got {steps_to}"
            )
    else:
        if teacher_steps < 2:
            raise DistillError(f"the consistency grid needs at least 2 levels, got {teacher_steps}")
        if not 1 <= steps_to <= MAX_CONSISTENCY_STEPS:
            raise DistillError(
                f"a consistency student samples in 1 to {MAX_CONSISTENCY_STEPS} steps, got --steps-to {steps_to}"
            )
    if guidance_range is not None:
        lo, hi = guidance_range
        if not 0 <= lo <= hi:
            raise DistillError(f"--guidance-range must be LO,HI with 0 <= LO <= HI, got {lo},{hi}")
        if not cfg.conditions or cfg.text_spec() is None and cfg.num_classes is None:
            raise DistillError(f"{run} takes no class or text: a guided student needs a conditional teacher")
        if any(c.p_drop == 0 for c in cfg.conditions if c.name in ("class_labels", "context", "tokens")):
            raise DistillError(
                f"{run} was trained without condition dropout: it has no null prediction to guide against"
            )
        if cfg.net_kind != "unet":
            raise DistillError(
                f"a guided student takes the scale as an input, which the U-Net has; {run} trains an {cfg.net_kind}"
            )


def plan(method: str, teacher_steps: int, steps_to: int, guided: bool) -> list[list[int]]:
    """The stages: progressive [[N, N]] (guided stage one) + [[N, N/2], ..., [2K, K]]; consistency [[N, K]]."""
    if method == "consistency":
        return [[teacher_steps, steps_to]]
    stages, n = ([[teacher_steps, teacher_steps]] if guided else []), teacher_steps
    while n > steps_to:
        stages.append([n, n // 2])
        n //= 2
    return stages


def student_config(teacher: RunConfig, record: Distillation, steps: int, lr: float, batch_size: int) -> RunConfig:
    """The student's config: the teacher's network (with the guidance input for a guided student), conditions
    never dropped (the student learns the conditional law, and w stands for guidance), a short constant schedule."""
    net = replace(teacher.net, guidance_input=True) if record.guided else teacher.net
    train_cfg = replace(
        teacher.train,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        accumulation=1,
        warmup=max(1, min(100, steps // 10)),
        weight_decay=0.0,
        lr_schedule="constant",
        ema_decay=0.999,
        ema_warmup=True,
        checkpoint_every=max(1, min(200, steps)),
        sample_every=0,
        log_every=10,
    )
    conditions = [replace(c, p_drop=0.0) for c in teacher.conditions]
    return replace(
        teacher, run_kind="distilled", distill=record, net=net, conditions=conditions, train=train_cfg, personalize=None
    )


def stage_config(cfg: RunConfig, record: Distillation, k: int) -> RunConfig:
    """Stage k's config: the record says which stage it is, and the steps that stage's student samples in."""
    steps_to = record.steps_to if record.method == "consistency" else record.stages[k][1]
    return replace(cfg, distill=replace(record, stage=k, steps_to=steps_to))


def stage_folder(out: Path, record: Distillation, k: int) -> Path:
    """Where stage k lives: OUT/stages/K-ABtoCD for all but the last, OUT itself for the last."""
    if k == len(record.stages) - 1:
        return out
    a, b = record.stages[k]
    return out / STAGES / f"{k + 1}-{a}to{b}"


def initial_state(student: RunConfig, source) -> dict[str, Tensor]:
    """The student's first weights: its source's EMA (the teacher's, or the stage before), with a fresh guidance
    input (last layer zero: the student starts as the source's conditional prediction) where the source has none."""
    state = load_weights(source, "ema")
    net = student.build_net()
    fresh = net.state_dict()
    missing = [k for k in fresh if k not in state]
    if any(not k.startswith("guidance.") for k in missing):
        raise CheckpointError(f"the weights in {source} do not fit the student's network (missing {missing[0]})")
    return {**{k: fresh[k] for k in missing}, **state}


def teacher_of(record: Distillation, out: Path, k: int, device):
    """Stage k's teacher: the teacher run (classifier-free for a guided student), or the stage before (a student)."""
    if k == 0:
        run = DiffusionRun.load(from_record(record.teacher), device=device)
        return Teacher(run.denoiser, run.config.condition_specs(), "cfg" if record.guided else "plain"), record.teacher
    source = stage_folder(out, record, k - 1)
    run = StudentRun.load(source, device=device)
    return Teacher(run.denoiser, run.config.condition_specs(), "input" if record.guided else "plain"), source


def loss_of(record: Distillation, k: int, teacher: Teacher):
    a, b = record.stages[k]
    if record.method == "consistency":
        process = teacher.process
        levels = timesteps(process, record.teacher_steps, "karras")[:-1]
        return ConsistencyLoss(
            teacher, levels, _default_t_min(process), record.sigma_data, record.solver, record.guidance_range
        )
    if a == b:
        return GuidedLoss(teacher, record.guidance_range)
    return ProgressiveLoss(teacher, b, record.guidance_range)


# --------------------------------------------------------------------------- distilling


def distill(
    teacher,
    out,
    method: str | None = None,
    *,
    teacher_steps: int | None = None,
    steps_to: int | None = None,
    guidance_range=None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    solver: str = "heun",
    resume: bool = False,
    device="auto",
    progress: bool = True,
    max_minutes: float | None = None,
    stop_after: int | None = None,
) -> Path:
    """Distil ``teacher`` into the student run ``out`` (or continue it: ``resume``; its settings are in it); returns
    ``out``. ``steps`` are optimizer steps per stage (progressive) or in all (consistency). Under torchrun rank 0
    alone writes files; every stage is a resumable run, so a run killed at any moment continues where it stopped."""
    refuse_writes(out, "distil into a shipped model's folder")
    out, main = Path(out), launched_rank() == 0
    device = resolve_device(device) if isinstance(device, str) else device
    setup(device)  # under torchrun: join the job now, so the ranks can wait for rank 0's files between stages
    if resume:
        cfg = load_config(out)
        if cfg.distill is None:
            raise DistillError(
                f"{out} is not a distilled student (start one with `difflab distill TEACHER --method M --out {out}`)"
            )
        record = cfg.distill
        if weights_fingerprint(from_record(record.teacher)) != record.teacher_fingerprint:
            raise DistillError(
                f"the teacher {record.teacher} changed since {out} was started (its weights' fingerprint differs); "
                "start over with --force"
            )
    else:
        if method is None:
            raise DistillError("give --method progressive or consistency")
        teacher_cfg = load_config(teacher)
        teacher_steps = teacher_steps or DEFAULT_TEACHER_STEPS[method]
        steps_to = steps_to or DEFAULT_STEPS_TO[method]
        check_teacher(teacher_cfg, teacher, method, teacher_steps, steps_to, guidance_range)
        record = Distillation(
            method,
            recorded_path(teacher),
            weights_fingerprint(teacher),
            teacher_steps,
            steps_to,
            plan(method, teacher_steps, steps_to, guidance_range is not None),
            guidance_range=None if guidance_range is None else [float(v) for v in guidance_range],
            solver=solver,
        )
        cfg = student_config(
            teacher_cfg,
            record,
            steps or DEFAULT_STEPS[method],
            lr or teacher_cfg.train.lr / 5,
            batch_size or teacher_cfg.train.batch_size,
        )
        if main:  # nothing of an earlier run in this folder may meet the new teacher
            shutil.rmtree(out / STAGES, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            clear_checkpoints(out)
            save_config(out, stage_config(cfg, record, len(record.stages) - 1))
    wait_for_all()  # the other ranks read what rank 0 wrote (the config, a cleared folder)
    data = training_data(cfg, out, progress=progress and main)
    t0 = time.perf_counter()
    for k in range(len(record.stages)):
        folder = stage_folder(out, record, k)
        stage_cfg = stage_config(cfg, record, k)
        done = has_checkpoint(folder) and weights_step(folder) >= stage_cfg.train.steps
        if done:
            continue
        left = None if max_minutes is None else max_minutes - (time.perf_counter() - t0) / 60
        if left is not None and left <= 0:
            return out
        teacher_k, source = teacher_of(record, out, k, device)
        a, b = record.stages[k]
        if progress and main:
            what = (
                f"consistency across {a} levels"
                if record.method == "consistency"
                else "the guided prediction in one pass"
                if a == b
                else f"{a} -> {b} DDIM steps"
            )
            print(f"stage {k + 1} of {len(record.stages)}: {what} ({folder})")
        continuing = has_checkpoint(folder)
        train(
            folder,
            stage_cfg,
            data,
            device=device,
            resume=continuing,
            progress=progress,
            loss_fn=loss_of(record, k, teacher_k),
            init_from=None if continuing else initial_state(stage_cfg, source),
            max_minutes=left,
            stop_after=stop_after,
            preview=preview,
            command="distill",
        )
        wait_for_all()  # rank 0's last checkpoint is written: every rank sees where the stage stopped
        if (
            weights_step(folder) < stage_cfg.train.steps
        ):  # stopped early (--max-minutes, stop_after): resume continues here
            return out
    return out


def unfinished_stage(out) -> int | None:
    """The first stage (1-based) of the student ``out`` not trained to its last step, or None when all are."""
    out = Path(out)
    cfg = load_config(out)
    record = cfg.distill
    for k in range(len(record.stages)):
        folder = stage_folder(out, record, k)
        if not has_checkpoint(folder) or weights_step(folder) < cfg.train.steps:
            return k + 1
    return None


def preview(ema, step: int, run: Path) -> None:
    """samples.png (rank 0, at the end of each stage): the student's own few-step samples; loss.png."""
    cfg = load_config(run)
    model = StudentRun(run, cfg, ema.net)
    d = cfg.distill
    sample_pictures(
        model, run / "samples.png", f"{model.own_sampler}, {d.steps_to} step{'s' * (d.steps_to > 1)}, step {step}"
    )
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def _check_student(cfg: RunConfig, net, specs) -> None:
    if cfg.distill is None:
        raise CheckpointError("config: a distilled run needs its distill record")
    _check(cfg, net, specs)


DISTILLED = RunKind(
    "distilled",
    "a distilled student",
    NETS,
    diffusion_loss,
    StudentRun,
    "distill",
    use="sample it with `difflab sample {run}` (its own sampler and steps)",
    check=_check_student,
)
