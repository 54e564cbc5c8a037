"""The studio's jobs: the job record and its states, the limits, and the table of job kinds with the checks every
kind shares.

    job = queue.submit("generate", {"run": "t2i", "prompt": "...", "steps": 20, "seed": 0, "batch": 4, ...})

A job is ``queued``, ``running``, then ``done``, ``cancelled`` or ``failed`` (``interrupted`` when the server
stopped under it). Every change of its state (its status, a step, a preview) goes through ``Job.update``, which
appends the new state to the job's event log (events.py): the events stream sends each of them, none skipped. A
running job's predicted x_0 (the x0_hat the sampler's callback sees, decoded for a latent run) is kept as a PNG
every ``preview_every`` steps, for the page's live preview. Every image written is a PNG whose ``parameters``
chunk holds the settings that reproduce it: its own seed and batch 1 (sample i of a call has seed ``seed + i``).

Job kinds: one ``JobKind`` handler per kind (kinds.py) owns its request, its own checks and its run, and is one
entry of ``KINDS`` (as run kinds are in runs/kinds.py); ``settings_of`` applies the checks every kind shares. The
sampler, steps and guidance a job names none of are the run's own: ``run.default_sampling()``."""

from __future__ import annotations

import base64
import binascii
import inspect
import io
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal, get_args

import torch
from pydantic import BaseModel

from ..data.images import to_uint8
from ..guidance.config import GuidanceConfig
from ..runs.diffusion import DiffusionRun
from ..sampling.samplers import SAMPLERS, SPACINGS
from ..viz.plots import image_grid
from . import pngs
from .events import EventLog

JobKindName = Literal["generate", "inpaint", "chain", "img2img", "interpolate", "sweep", "forward", "upscale"]
Status = Literal["queued", "running", "done", "cancelled", "failed", "interrupted"]
FINISHED = ("done", "cancelled", "failed", "interrupted")
MAX_SCALES = 8  # guidance scales side by side
MAX_ADAPTERS, MAX_STRENGTH = 4, 4.0  # LoRA adapters of a job, and their strengths' range
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    """What a request may ask for, set when the studio starts."""

    max_steps: int = 200
    max_batch: int = 16
    max_queue: int = 16  # queued jobs; more are refused (HTTP 429)
    max_prompt: int = 400  # characters (the encoder's token limit is checked too)
    max_upload: int = 4 * 2**20  # bytes of an uploaded image
    preview_every: int = 5  # steps between two live previews (0: none)
    loaded_runs: int = 2  # the LRU of loaded runs


class JobError(ValueError):
    """Settings a job cannot run with (said in one line, answered 400)."""


class QueueFull(JobError):
    """The queue holds ``max_queue`` jobs already (answered 429)."""


class TooLarge(JobError):
    """An uploaded image larger than ``max_upload`` bytes (answered 413)."""


class Cancelled(Exception):
    """Raised inside the sampler's callback to stop a running job."""


# --------------------------------------------------------------------------- the job and its states


@dataclass
class Job:
    id: str
    kind: JobKindName
    run: str
    settings: dict
    inputs: dict = field(default_factory=dict, repr=False)  # uploaded images as tensors (not settings)
    status: Status = "queued"
    step: int = 0
    steps: int = 0
    previews: int = 0
    preview: bytes | None = field(default=None, repr=False)
    images: int = 0
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    chain: dict | None = field(default=None, repr=False)  # chain jobs: t (N+1,), x_t and x0 as PNG bytes per position
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    events: EventLog = field(default_factory=lambda: EventLog(lambda s: s["status"] in FINISHED), repr=False)

    def __post_init__(self) -> None:
        self.events.append(self.public())  # its first state

    def update(self, **changes) -> None:
        """Change the job's state and append the new state to its event log (one event per change)."""
        for name, value in changes.items():
            setattr(self, name, value)
        self.events.append(self.public())

    def public(self, position: int | None = None) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "run": self.run,
            "status": self.status,
            "step": self.step,
            "steps": self.steps,
            "previews": self.previews,
            "images": self.images,
            "error": self.error,
            "position": position,
            "settings": self.settings,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "chain": None if self.chain is None else {"t": self.chain["t"], "positions": len(self.chain["x_t"])},
        }


class Progress:
    """What a running job's kind reports through: each step (a cancelled job stops at its next one) and, every
    ``every`` steps, a preview of the predicted x_0."""

    def __init__(self, job: Job, run: DiffusionRun, every: int):
        self.job, self.run, self.every = job, run, every

    def step(self, k: int) -> None:
        """Step k is done (a kind without the library's callback: the forward process)."""
        if self.job.cancel.is_set():
            raise Cancelled
        self.job.update(step=k)

    def callback(self, offset: int = 0) -> Callable:
        """The library's callback(step, x_t, x0_hat) for a call whose steps come after ``offset`` done before."""
        job, every = self.job, self.every

        def callback(step: int, x_t, x0_hat) -> None:
            if job.cancel.is_set():
                raise Cancelled
            k = offset + step + 1
            if every and (step + 1) % every == 0 and k < job.steps:
                job.update(step=k, preview=grid_png(to_uint8(self.run.decode(x0_hat).cpu())), previews=job.previews + 1)
            else:
                job.update(step=k)

        return callback


@dataclass
class Made:
    """What a job's kind made: its images, uint8 (N, C, H, W); the PNGs it keeps beside them ("input"); a chain."""

    images: torch.Tensor
    files: dict[str, bytes] = field(default_factory=dict)
    chain: dict | None = None


# --------------------------------------------------------------------------- the table of job kinds


class JobKind:
    """One kind of job (kinds.py has one subclass per kind; the pattern of diffusers' one pipeline per task):

    name              its name, the last part of its route (POST /api/NAME)
    summary           what it does, one line (the route's OpenAPI summary)
    request           the JSON body it takes (a pydantic model; uploaded images are base64 PNG fields)
    takes_sampler     a sampler, spacing and eta are among its settings (checked here)
    default_sampler   None: the run's own (run.default_sampling()); else this kind's own (img2img: ddim)
    default_steps     None: the run's own; else this kind's own
    batched           takes a batch above 1 (generate)
    conditioned       takes a prompt or class and guidance (checked against the run by the library)
    super_resolution  takes super-resolution runs, and only those (upscale)

    and its methods: ``inputs`` (the uploaded images decoded, checked against the run), ``check`` (its own
    settings, completed), ``steps`` (the steps its progress counts to) and ``make`` (its run: the images)."""

    name: ClassVar[JobKindName]
    summary: ClassVar[str]
    request: ClassVar[type[BaseModel]]
    takes_sampler: ClassVar[bool] = False
    default_sampler: ClassVar[str | None] = None
    default_steps: ClassVar[int | None] = None
    batched: ClassVar[bool] = False
    conditioned: ClassVar[bool] = True
    super_resolution: ClassVar[bool] = False

    def inputs(self, run: DiffusionRun, s: dict, limits: Limits) -> dict:
        """The uploaded images of settings ``s`` as tensors (removed from ``s``); none by default."""
        return {}

    def check(self, run: DiffusionRun, s: dict, limits: Limits) -> None:
        """This kind's own settings, completed in ``s`` and checked (JobError in one line)."""

    def steps(self, run: DiffusionRun, s: dict) -> int:
        """The steps the job's callback counts to (its progress bar's end)."""
        return s["steps"]

    def make(self, run: DiffusionRun, job: Job, progress: Progress) -> Made:
        raise NotImplementedError


KINDS: dict[str, JobKind] = {}


def register(*kinds: JobKind) -> dict[str, JobKind]:
    """Add kinds to the table (kinds.py registers the built-in ones; a name registered again is replaced)."""
    for k in kinds:
        if k.name not in get_args(JobKindName):
            raise ValueError(f"job kind {k.name!r}: add it to JobKindName too (the names other modules may give)")
        KINDS[k.name] = k
    return KINDS


def kind_named(name: str) -> JobKind:
    if name not in KINDS:
        raise JobError(f"unknown job kind {name!r}; known kinds: {', '.join(KINDS)}")
    return KINDS[name]


# --------------------------------------------------------------------------- the checks every kind shares


def check_run(run: DiffusionRun, name: str, kind: JobKind) -> None:
    """A super-resolution run takes upscale jobs alone, and upscale jobs take nothing else (JobError in one line)."""
    if kind.super_resolution and run.config.super_resolution is None:
        raise JobError(
            f"{name} is not a super-resolution run (its config has no super_resolution): upscale with a run "
            "trained with --cond low-res"
        )
    if not kind.super_resolution and run.config.super_resolution is not None:
        raise JobError(
            f"{name} is a super-resolution run: it upscales low-resolution images (POST /api/upscale), nothing else"
        )


def guidance_of(s: dict) -> GuidanceConfig | None:
    """The GuidanceConfig a job's settings ask for (scale, interval, rescale, negative prompt)."""
    interval = tuple(s["interval"]) if s.get("interval") else None
    return GuidanceConfig.of(
        s.get("guidance"),
        negative_prompt=s.get("negative_prompt") or None,
        interval=interval,
        rescale=s.get("rescale") or None,
    )


def conditions_of(s: dict) -> dict:
    """The keyword arguments of a run's call that a job's conditions and guidance make."""
    return {"prompt": s.get("prompt"), "class_label": s.get("class_label"), "guidance": guidance_of(s)}


def sampler_options(s: dict) -> dict | None:
    """The sampler's own options: eta where the sampler takes it."""
    if s.get("eta") is None:
        return None
    if "eta" not in inspect.signature(SAMPLERS[s["sampler"]]).parameters:
        raise JobError(f"the {s['sampler']} sampler takes no eta (ddim does)")
    return {"eta": float(s["eta"])}


def settings_of(kind: JobKind, run: DiffusionRun, s: dict, limits: Limits) -> dict:
    """The settings of a job, completed (a random seed drawn, the run's own sampling written) and checked against
    the run and the limits: JobError (or the library's own ValueError) in one line when they do not fit."""
    s = {k: v for k, v in s.items() if v is not None and v != ""}
    own = run.default_sampling()  # the sampler, steps and guidance a job naming none gets
    if kind.takes_sampler:
        s.setdefault("sampler", kind.default_sampler or own.sampler)
    s.setdefault("steps", kind.default_steps or own.steps)
    if "guidance" in kind.request.model_fields:
        s.setdefault("guidance", own.guidance)
    s.setdefault("batch", 1)
    if s.get("seed") is None:
        s["seed"] = random.randint(0, MAX_SEED)
    if len(s.get("lora", [])) > MAX_ADAPTERS or not all(
        -MAX_STRENGTH <= st <= MAX_STRENGTH for _, st in s.get("lora", [])
    ):
        raise JobError(f"give at most {MAX_ADAPTERS} LoRA adapters, strengths within -{MAX_STRENGTH}..{MAX_STRENGTH}")
    if not 1 <= s["steps"] <= limits.max_steps:
        raise JobError(f"steps must be within 1..{limits.max_steps}, got {s['steps']}")
    max_batch = limits.max_batch if kind.batched else 1
    if not 1 <= s["batch"] <= max_batch:
        raise JobError(f"batch must be within 1..{max_batch}, got {s['batch']}")
    if not 0 <= s["seed"] <= MAX_SEED - s["batch"]:
        raise JobError(f"seed must be within 0..{MAX_SEED - s['batch']}")
    for p in ("prompt", "negative_prompt"):
        if len(s.get(p, "")) > limits.max_prompt:
            raise JobError(f"{p} is longer than {limits.max_prompt} characters")
    if kind.takes_sampler:
        if s["sampler"] not in SAMPLERS:
            raise JobError(f"unknown sampler {s['sampler']!r}; choose from: {', '.join(SAMPLERS)}")
        if s.get("spacing") is not None and s["spacing"] not in SPACINGS:
            raise JobError(f"unknown spacing {s['spacing']!r}; choose from: {', '.join(SPACINGS)}")
        sampler_options(s)
    kind.check(run, s, limits)
    if kind.conditioned:
        if s.get("prompt") and run.text is None:
            raise JobError(f"{s['run']} takes no prompt (it is not a text-to-image run)")
        K = run.config.num_classes
        if s.get("class_label") is not None and (K is None or not 0 <= s["class_label"] < K):
            raise JobError(f"{s['run']} takes no class" if K is None else f"class_label must be within 0..{K - 1}")
        g = guidance_of(s)
        run.guided(g)  # the library says what guidance the run cannot take
        run.conditions(1, prompt=s.get("prompt"), class_label=s.get("class_label"), guidance=g)  # and conditions
    s["fingerprint"] = run.fingerprint
    return s


def upload(data: str, channels: int, limits: Limits, what: str) -> torch.Tensor:
    """A base64 PNG (or a data: URL) -> uint8 (C, H, W); TooLarge or JobError in one line."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_upload * 4 // 3 + 4:
        raise TooLarge(f"the {what} is larger than {limits.max_upload} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise JobError(f"the {what} is not base64") from None
    try:
        x, _ = pngs.decode(raw, channels)
    except pngs.ImageError as e:
        raise JobError(f"the {what}: {e}") from None
    return x


def run_image(run: DiffusionRun, s: dict, field_name: str, limits: Limits, what: str = "image") -> torch.Tensor:
    """The uploaded image ``s[field_name]`` (removed from ``s``), which must have the run's data shape exactly."""
    C, H, W = run.config.data_shape
    image = upload(s.pop(field_name), C, limits, what)
    if tuple(image.shape[1:]) != (H, W):
        raise JobError(f"the {what} is {image.shape[2]}x{image.shape[1]}; {s['run']} takes {W}x{H}")
    return image


def grid_png(images: torch.Tensor) -> bytes:
    """uint8 (N, C, H, W) -> one PNG of them in a grid (a preview, a job's overview)."""
    out = io.BytesIO()
    image_grid(images).save(out, format="PNG")
    return out.getvalue()
