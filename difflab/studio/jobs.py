"""The studio's jobs: their settings, checked against the run and the studio's limits, and the queue that runs them.

    queue = JobQueue(RunsFolder("runs"), History(...), images_dir, Limits())
    job = queue.submit("generate", {"run": "t2i", "prompt": "...", "steps": 20, "seed": 0, "batch": 4, ...})
    queue.cancel(job.id)      # queued: never runs; running: stops at its next step

One worker thread runs the jobs one at a time, first in first out, on the studio's device; a request never waits
for sampling. A job is ``queued``, ``running``, then ``done``, ``cancelled`` or ``failed`` (``interrupted`` when
the server stopped under it). A running job's predicted x_0 (the x0_hat the sampler's callback sees, decoded for
a latent run) is kept as a PNG every ``preview_every`` steps, for the page's live preview. Loaded runs are kept
in a small LRU, keyed by run and checkpoint (a run still training is reloaded when a newer checkpoint lands).

Kinds: ``generate`` (run.sample), ``inpaint`` (run.restore with a Mask operator), ``chain`` (run.trajectory:
x_t and x0_hat at every step, for the chain explorer), ``img2img`` (SDEdit, run.img2img), ``interpolate``
(run.interpolate between two images), ``sweep`` (one seed at several guidance scales, side by side),
``forward`` (the forward process q(x_t | x_0) of an image, no network) and ``upscale`` (a super-resolution run's
run.upscale of a low-resolution image; the only kind such a run takes). Every kind but ``forward`` (no network)
runs through the library's callback: it shows previews and stops at its next step when cancelled. Every image
written is a PNG whose ``parameters`` chunk holds the settings that reproduce it: its own seed and batch 1 (sample
i of a call has seed ``seed + i``)."""

from __future__ import annotations

import inspect
import io
import random
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.operators import Mask
from ..data.images import to_model, to_uint8
from ..guidance.config import GuidanceConfig
from ..runs.diffusion import DiffusionRun
from ..runs.store import latest_checkpoint
from ..sampling.inverse import METHODS
from ..sampling.samplers import SAMPLERS, SPACINGS, default_spacing, timesteps
from ..viz.plots import image_grid
from . import pngs
from .folder import RunsFolder, _line
from .history import History

KINDS = ("generate", "inpaint", "chain", "img2img", "interpolate", "sweep", "forward", "upscale")
SAMPLED = (
    "generate",
    "chain",
    "img2img",
    "sweep",
    "upscale",
)  # the kinds that take a sampler (inpaint: a method; interpolate: ddim or ddpm)
MAX_SCALES = 8  # guidance scales side by side
MAX_ADAPTERS, MAX_STRENGTH = 4, 4.0  # LoRA adapters of a job, and their strengths' range
FINISHED = ("done", "cancelled", "failed", "interrupted")
MAX_SEED = 2**31 - 1
KEPT = 64  # finished jobs kept in memory (their previews and chains); older ones live in the history alone
INTERPOLATE_T = 0.5  # a 'ddpm' interpolation's depth: the frames are noised to this fraction of t_max


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


class Cancelled(Exception):
    """Raised inside the sampler's callback to stop a running job."""


@dataclass
class Job:
    id: str
    kind: str
    run: str
    settings: dict
    inputs: dict = field(default_factory=dict, repr=False)  # inpaint: the image and the mask (tensors, not settings)
    status: str = "queued"
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


class LoadedRuns:
    """A small LRU of loaded runs, keyed by (name, newest checkpoint, LoRA adapters): a run with adapters is loaded
    afresh (the adapters are injected into its network, so the plain run is never changed under another job)."""

    def __init__(self, folder: RunsFolder, size: int, device: str | torch.device = "cpu"):
        self.folder, self.size, self.device = folder, max(1, size), device
        self.cache: OrderedDict[tuple, DiffusionRun] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, name: str, lora=()) -> DiffusionRun:
        path = self.folder.path(name)
        for adapter, _ in lora:
            self.folder.path(adapter)  # each adapter is a run of this folder too (NotFound otherwise)
        adapters = tuple((a, float(s)) for a, s in lora)
        checkpoint = latest_checkpoint(path)
        key = (name, None if checkpoint is None else checkpoint.name, adapters)
        with self.lock:
            if key in self.cache:
                self.cache.move_to_end(key)
                return self.cache[key]
            run = DiffusionRun.load(
                path, device=self.device, lora=[(self.folder.path(a), s) for a, s in adapters]
            )  # another kind: a ValueError
            if run.config.data_kind != "images":
                raise JobError(f"{name} makes {run.config.data_kind}; the studio samples image runs")
            _ = run.fingerprint  # read once here, not inside a job's timing
            self.cache[key] = run
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
            return run


# --------------------------------------------------------------------------- settings


def check_kind(run: DiffusionRun, name: str, kind: str) -> None:
    """A super-resolution run takes upscale jobs alone, and upscale jobs take nothing else (JobError in one line)."""
    if kind == "upscale" and run.config.super_resolution is None:
        raise JobError(
            f"{name} is not a super-resolution run (its config has no super_resolution): upscale with a run "
            "trained with --cond low-res"
        )
    if kind != "upscale" and run.config.super_resolution is not None:
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


def sampler_options(s: dict) -> dict | None:
    """The sampler's own options: eta where the sampler takes it."""
    if s.get("eta") is None:
        return None
    if "eta" not in inspect.signature(SAMPLERS[s["sampler"]]).parameters:
        raise JobError(f"the {s['sampler']} sampler takes no eta (ddim does)")
    return {"eta": float(s["eta"])}


def check(run: DiffusionRun, kind: str, s: dict, limits: Limits) -> dict:
    """The settings of a job, completed (a random seed drawn, the defaults written) and checked against the run
    and the limits: JobError (or the library's own ValueError) in one line when they do not fit."""
    s = {k: v for k, v in s.items() if v is not None and v != ""}
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}")
    check_kind(run, s["run"], kind)
    own = run.default_sampling()  # a distilled student's own; else dpmpp-2m, 20
    own_sampler, own_steps = own.sampler, own.steps
    s.setdefault("sampler", "ddim" if kind in ("inpaint", "img2img") else own_sampler)
    s.setdefault("steps", 50 if kind in ("inpaint", "img2img", "interpolate") else own_steps)
    s.setdefault("batch", 1)
    if s.get("seed") is None:
        s["seed"] = random.randint(0, MAX_SEED)
    if len(s.get("lora", [])) > MAX_ADAPTERS or not all(
        -MAX_STRENGTH <= st <= MAX_STRENGTH for _, st in s.get("lora", [])
    ):
        raise JobError(f"give at most {MAX_ADAPTERS} LoRA adapters, strengths within -{MAX_STRENGTH}..{MAX_STRENGTH}")
    if not 1 <= s["steps"] <= limits.max_steps:
        raise JobError(f"steps must be within 1..{limits.max_steps}, got {s['steps']}")
    if not 1 <= s["batch"] <= (1 if kind != "generate" else limits.max_batch):
        raise JobError(f"batch must be within 1..{1 if kind != 'generate' else limits.max_batch}, got {s['batch']}")
    if not 0 <= s["seed"] <= MAX_SEED - s["batch"]:
        raise JobError(f"seed must be within 0..{MAX_SEED - s['batch']}")
    for p in ("prompt", "negative_prompt"):
        if len(s.get(p, "")) > limits.max_prompt:
            raise JobError(f"{p} is longer than {limits.max_prompt} characters")
    if kind == "inpaint":
        s.setdefault(
            "method",
            run.default_restoration(
                Mask(torch.ones(run.config.data_shape[1:], dtype=torch.bool), run.config.data_shape)
            ),
        )
        if s["method"] not in METHODS:
            raise JobError(f"unknown method {s['method']!r}; choose from: {', '.join(METHODS)}")
        if run.latent is not None and s["method"] != "dps":
            raise JobError(f"{s['run']} is a latent run: inpaint it with dps")
        s.pop("sampler", None)
    elif kind == "interpolate":
        s.setdefault("method", "ddim")
        s.setdefault("frames", 9)
        if s["method"] not in ("ddim", "ddpm"):
            raise JobError(f"unknown interpolation method {s['method']!r}; choose ddim or ddpm")
        if not 2 <= s["frames"] <= max(2, limits.max_batch):
            raise JobError(f"frames must be within 2..{max(2, limits.max_batch)}, got {s['frames']}")
        s.pop("sampler", None)
    elif kind == "forward":
        s.pop("sampler", None)
    if kind in SAMPLED:
        if s["sampler"] not in SAMPLERS:
            raise JobError(f"unknown sampler {s['sampler']!r}; choose from: {', '.join(SAMPLERS)}")
        if s.get("spacing") is not None and s["spacing"] not in SPACINGS:
            raise JobError(f"unknown spacing {s['spacing']!r}; choose from: {', '.join(SPACINGS)}")
        sampler_options(s)
    if kind == "upscale":  # no guidance, no condition but the image
        s.setdefault("noise_level", 0.0)
        if not 0 <= s["noise_level"] <= 1:
            raise JobError(f"noise_level must be within 0..1, got {s['noise_level']}")
        s["fingerprint"] = run.fingerprint
        return s
    if kind == "img2img" and not 0 < s.get("strength", -1) <= 1:
        raise JobError(f"strength must be within (0, 1], got {s.get('strength')}")
    if kind == "sweep":
        scales = s.get("scales") or []
        if not 2 <= len(scales) <= MAX_SCALES or not all(0 <= float(x) <= 100 for x in scales):
            raise JobError(f"give 2..{MAX_SCALES} guidance scales within 0..100")
        for x in scales:
            run.guided(guidance_of({**s, "guidance": float(x)}))
    if s.get("prompt") and run.text is None:
        raise JobError(f"{s['run']} takes no prompt (it is not a text-to-image run)")
    K = run.config.num_classes
    if s.get("class_label") is not None and (K is None or not 0 <= s["class_label"] < K):
        raise JobError(f"{s['run']} takes no class" if K is None else f"class_label must be within 0..{K - 1}")
    g = guidance_of(s)
    run.guided(g)  # the library says what guidance the run cannot take
    run.conditions(
        1, prompt=s.get("prompt"), class_label=s.get("class_label"), guidance=g
    )  # and which conditions (prompt length too)
    s["fingerprint"] = run.fingerprint
    return s


def callback_steps(run: DiffusionRun, kind: str, s: dict) -> int:
    """The steps a job's callback counts to (its progress bar's end): a sweep's chains one after another; an
    interpolation's 'ddim' inversion then decoding, or its 'ddpm' chains from INTERPOLATE_T * t_max, one a frame."""
    if kind == "sweep":
        return s["steps"] * len(s["scales"])
    if kind != "interpolate":
        return s["steps"]
    if s["method"] == "ddim":
        return 2 * s["steps"]
    process = run.process  # each frame's chain: its start (as sampling.generate rounds it), then the grid's times below
    start = max(round(INTERPOLATE_T * process.t_max), 1) if process.discrete else INTERPOLATE_T * process.t_max
    ts = timesteps(process, s["steps"], default_spacing("ddpm", process))
    return s["frames"] * int((ts < start).sum())


# --------------------------------------------------------------------------- the queue


class JobQueue:
    """FIFO jobs, one worker thread (see the module doc)."""

    def __init__(self, folder: RunsFolder, history: History, images: Path, limits: Limits | None = None, device="cpu"):
        self.folder, self.history, self.images, self.limits = folder, history, Path(images), limits or Limits()
        self.runs = LoadedRuns(folder, limits.loaded_runs, device)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[Job] = deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self.worker.start()

    # ---- requests

    def submit(self, kind: str, settings: dict, inputs: dict | None = None) -> Job:
        """Check the settings and queue a job (JobError when they do not fit, QueueFull when the queue is full)."""
        with self.cv:
            if len(self.queue) >= self.limits.max_queue:
                raise QueueFull(f"the queue is full ({self.limits.max_queue} jobs); try again when some have run")
        lora = settings.get("lora") or ()
        if len(lora) > MAX_ADAPTERS:
            raise JobError(f"give at most {MAX_ADAPTERS} LoRA adapters")
        run = self.runs.get(settings["run"], lora)
        s = check(run, kind, settings, self.limits)
        job = Job(uuid.uuid4().hex[:16], kind, s["run"], s, inputs or {}, steps=callback_steps(run, kind, s))
        with self.cv:
            if len(self.queue) >= self.limits.max_queue:  # checked again: others may have been queued meanwhile
                raise QueueFull(f"the queue is full ({self.limits.max_queue} jobs); try again when some have run")
            self.history.add(job.id, kind, job.run, s, job.created)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.cv.notify()
        return job

    def cancel(self, id: str) -> Job | None:
        """Cancel a queued job (it never runs) or a running one (it stops at its next step); None if unknown."""
        with self.cv:
            job = self.jobs.get(id)
            if job is None:
                return None
            if job.status == "queued":
                self.queue.remove(job)
                self._finish(job, "cancelled")
            elif job.status == "running":
                job.cancel.set()
        return job

    def get(self, id: str) -> Job | None:
        with self.cv:
            return self.jobs.get(id)

    def position(self, job: Job) -> int | None:
        with self.cv:
            return next((i for i, j in enumerate(self.queue) if j is job), None)

    def listing(self) -> list[dict]:
        """The jobs in memory (queued, running, the recent finished ones), oldest first."""
        with self.cv:
            return [j.public(self.position_unlocked(j)) for j in self.jobs.values()]

    def position_unlocked(self, job: Job) -> int | None:
        return next((i for i, j in enumerate(self.queue) if j is job), None)

    def image_path(self, id: str, index: int | str) -> Path:
        return self.images / f"{id}-{index}.png"

    def stop(self) -> None:
        """Stop the worker: queued jobs and the running one are left ``interrupted``."""
        with self.cv:
            self.stopping = True
            for job in self.jobs.values():
                job.cancel.set()
            self.cv.notify()
        self.worker.join(timeout=30)

    # ---- the worker

    def _work(self) -> None:
        while True:
            with self.cv:
                while not self.queue and not self.stopping:
                    self.cv.wait()
                if self.stopping:
                    for job in list(self.queue):
                        self._finish(job, "interrupted")
                    return
                job = self.queue.popleft()
                job.started = time.time()
                job.status = "running"
            self.history.set_status(job.id, "running")
            try:
                images = self._run(job)
                self._write(job, images)
                status, error = "done", None
            except Cancelled:
                status, error = ("interrupted" if self.stopping else "cancelled"), None
            except Exception as e:  # noqa: BLE001 -- the library's ValueError or anything else: the job fails, the server stays up
                status, error = "failed", _line(e)
            with self.cv:
                self._finish(job, status, error)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.error, job.finished = error, time.time()
        job.status = status  # last: a state read meanwhile (the events stream, unlocked) that says finished is whole
        job.inputs = {}
        self.history.finish(job.id, status, job.images, error)
        done = [i for i, j in self.jobs.items() if j.status in FINISHED]
        for i in done[: max(0, len(done) - KEPT)]:
            del self.jobs[i]

    def _callback(self, job: Job, run: DiffusionRun, offset: list[int] | None = None):
        """The sampler's callback: cancels, counts steps (after ``offset[0]`` done by earlier calls), makes previews."""
        every, offset = self.limits.preview_every, offset or [0]

        def callback(step: int, x_t, x0_hat) -> None:
            if job.cancel.is_set():
                raise Cancelled
            job.step = offset[0] + step + 1
            if every and (step + 1) % every == 0 and job.step < job.steps:
                job.preview = grid_png(to_uint8(run.decode(x0_hat).cpu()))
                job.previews += 1

        return callback

    def _run(self, job: Job) -> torch.Tensor:
        """The job's images, uint8 (N, C, H, W)."""
        run, s = self.runs.get(job.run, job.settings.get("lora") or ()), job.settings
        g = guidance_of(s)
        cond = {"prompt": s.get("prompt"), "class_label": s.get("class_label"), "guidance": g}
        callback = self._callback(job, run)
        if job.kind == "generate":
            x = run.sample(
                s["batch"],
                **cond,
                sampler=s["sampler"],
                steps=s["steps"],
                spacing=s.get("spacing"),
                options=sampler_options(s),
                seed=s["seed"],
                batch=s["batch"],
                callback=callback,
            )
        elif job.kind == "inpaint":
            image, keep = job.inputs["image"], job.inputs["keep"]
            op = Mask(keep, tuple(run.config.data_shape))
            y = op(to_model(image)[None].to(run.device))
            x = run.restore(y, op, method=s["method"], steps=s["steps"], seed=s["seed"], **cond, callback=callback)
            self.image_path(job.id, "input").write_bytes(pngs.encode(image))
        elif job.kind == "chain":
            x, traj = run.trajectory(
                1,
                **cond,
                sampler=s["sampler"],
                steps=s["steps"],
                spacing=s.get("spacing"),
                options=sampler_options(s),
                seed=s["seed"],
                callback=callback,
            )
            N = len(traj.x0)
            job.chain = {
                "t": [float(t) for t in traj.t],
                "x_t": [pngs.encode(to_uint8(traj.x_t[k, 0].cpu())) for k in range(N + 1)],
                "x0": [pngs.encode(to_uint8(traj.x0[min(k, N - 1), 0].cpu())) for k in range(N + 1)],
            }
        elif job.kind == "img2img":
            image = to_model(job.inputs["image"])[None].to(run.device)
            x = run.img2img(
                image,
                s["strength"],
                steps=s["steps"],
                sampler=s["sampler"],
                seed=s["seed"],
                options=sampler_options(s),
                **cond,
                callback=callback,
            )
        elif job.kind == "upscale":
            low = to_model(job.inputs["image"])[None]  # (1, C, H/k, W/k), on the CPU: upscale draws its noise there
            x = run.upscale(
                low,
                noise_level=s["noise_level"],
                steps=s["steps"],
                sampler=s["sampler"],
                seed=s["seed"],
                device=run.device,
                callback=callback,
            )
            self.image_path(job.id, "input").write_bytes(pngs.encode(job.inputs["image"]))
        elif job.kind == "interpolate":
            a, b = (to_model(job.inputs[k])[None].to(run.device) for k in ("image", "image_b"))
            x = run.interpolate(
                a,
                b,
                s["frames"],
                method=s["method"],
                t=INTERPOLATE_T,
                steps=s["steps"],
                seed=s["seed"],
                **cond,
                callback=callback,
            )
        elif job.kind == "sweep":  # one seed at each guidance scale: what the scale does, side by side
            done, out = [0], []
            callback = self._callback(job, run, done)
            for scale in s["scales"]:
                out.append(
                    run.sample(
                        1,
                        prompt=s.get("prompt"),
                        class_label=s.get("class_label"),
                        guidance=guidance_of({**s, "guidance": float(scale)}),
                        sampler=s["sampler"],
                        steps=s["steps"],
                        spacing=s.get("spacing"),
                        options=sampler_options(s),
                        seed=s["seed"],
                        batch=1,
                        callback=callback,
                    )
                )
                done[0] += s["steps"]
            x = torch.cat(out)
        else:
            x = self._forward(job, run)
        return to_uint8(x.cpu())

    def _forward(self, job: Job, run: DiffusionRun) -> torch.Tensor:
        """The forward process of the job's image at steps + 1 levels from t_max to 0 (x_t = alpha x_0 + sigma eps,
        one eps from the seed; a latent run's in its latent space, decoded to be seen); returns 8 of them."""
        s, process = job.settings, run.process
        z0 = run.encode(to_model(job.inputs["image"])[None].to(run.device))
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(s["seed"])).to(z0.device)
        ts = torch.linspace(float(process.t_max), 0.0, s["steps"] + 1, dtype=torch.float64)
        frames = []
        for k, t in enumerate(ts):
            if job.cancel.is_set():
                raise Cancelled
            frames.append(run.decode(process.q_sample(z0, t[None], eps).float()) if t > 0 else run.decode(z0))
            job.step = k
        original = pngs.encode(to_uint8(frames[-1][0].cpu()))
        job.chain = {
            "t": ts.tolist(),
            "x_t": [pngs.encode(to_uint8(f[0].cpu())) for f in frames],
            "x0": [original] * len(frames),
        }
        picks = torch.linspace(0, s["steps"], min(8, s["steps"] + 1)).round().long().tolist()
        return torch.cat([frames[k] for k in picks])

    def _write(self, job: Job, images: torch.Tensor) -> None:
        """Each image as a PNG with the settings that reproduce it (seed + i, batch 1), then a grid of all."""
        s = job.settings
        for i, image in enumerate(images):
            own = {**s, "kind": job.kind, "seed": s["seed"] + i, "batch": 1, "job": job.id, "index": i}
            _atomic_write(self.image_path(job.id, i), pngs.encode(image, own))
        _atomic_write(self.image_path(job.id, "grid"), grid_png(images))
        job.images = len(images)


def grid_png(images: torch.Tensor) -> bytes:
    """uint8 (N, C, H, W) -> one PNG of them in a grid (a preview, a job's overview)."""
    out = io.BytesIO()
    image_grid(images).save(out, format="PNG")
    return out.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
