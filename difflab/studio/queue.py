"""The studio's queue: one worker thread runs the jobs one at a time, first in first out, on the studio's device.

    queue = JobQueue(RunsFolder("runs"), History(...), images_dir, Limits())
    job = queue.submit("generate", {"run": "t2i", "prompt": "...", "steps": 20, "seed": 0, "batch": 4, ...})
    queue.cancel(job.id)      # queued: never runs; running: stops at its next step

A request never waits for sampling: ``submit`` checks the settings (the job's kind, jobs.KINDS, and the checks
every kind shares) and queues the job. Loaded runs are kept in a small LRU, keyed by run and checkpoint (a run
still training is reloaded when a newer checkpoint lands)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from pathlib import Path

import torch

from ..runs.diffusion import DiffusionRun
from ..runs.store import latest_checkpoint
from . import kinds as _builtin_kinds  # noqa: F401 -- registers the built-in job kinds in jobs.KINDS
from . import pngs
from .folder import RunsFolder, _line
from .history import History
from .jobs import (
    FINISHED,
    MAX_ADAPTERS,
    Cancelled,
    Job,
    JobError,
    JobKindName,
    Limits,
    Made,
    Progress,
    QueueFull,
    check_run,
    grid_png,
    kind_named,
    settings_of,
)

KEPT = 64  # finished jobs kept in memory (their previews and chains); older ones live in the history alone


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


class JobQueue:
    """FIFO jobs, one worker thread (see the module doc)."""

    def __init__(self, folder: RunsFolder, history: History, images: Path, limits: Limits | None = None, device="cpu"):
        self.folder, self.history, self.images, self.limits = folder, history, Path(images), limits or Limits()
        self.runs = LoadedRuns(folder, self.limits.loaded_runs, device)
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[Job] = deque()
        self.cv = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="studio-worker", daemon=True)
        self.worker.start()

    # ---- requests

    def submit(self, kind: JobKindName, settings: dict) -> Job:
        """Check the settings (uploaded images among them, base64) and queue a job of ``kind`` (JobError when they
        do not fit, TooLarge for an upload over the limit, QueueFull when the queue is full)."""
        handler = kind_named(kind)
        self._check_room()
        lora = settings.get("lora") or ()
        if len(lora) > MAX_ADAPTERS:
            raise JobError(f"give at most {MAX_ADAPTERS} LoRA adapters")
        run = self.runs.get(settings["run"], lora)
        check_run(run, settings["run"], handler)
        settings = dict(settings)
        inputs = handler.inputs(run, settings, self.limits)  # the images leave the settings, as tensors
        s = settings_of(handler, run, settings, self.limits)
        job = Job(uuid.uuid4().hex[:16], kind, s["run"], s, inputs, steps=handler.steps(run, s))
        with self.cv:
            self._check_room()  # checked again: others may have been queued meanwhile
            self.history.add(job.id, kind, job.run, s, job.created)
            self.jobs[job.id] = job
            self.queue.append(job)
            self.cv.notify()
        return job

    def _check_room(self) -> None:
        with self.cv:
            if len(self.queue) >= self.limits.max_queue:
                raise QueueFull(f"the queue is full ({self.limits.max_queue} jobs); try again when some have run")

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
            return self._position(job)

    def listing(self) -> list[dict]:
        """The jobs in memory (queued, running, the recent finished ones), oldest first."""
        with self.cv:
            return [j.public(self._position(j)) for j in self.jobs.values()]

    def _position(self, job: Job) -> int | None:
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
                job.update(status="running", started=time.time())
            self.history.set_status(job.id, "running")
            try:
                run = self.runs.get(job.run, job.settings.get("lora") or ())
                made = kind_named(job.kind).make(run, job, Progress(job, run, self.limits.preview_every))
                self._write(job, made)
                status, error = "done", None
            except Cancelled:
                status, error = ("interrupted" if self.stopping else "cancelled"), None
            except Exception as e:  # noqa: BLE001 -- the library's ValueError or anything else: the job fails, the server stays up
                status, error = "failed", _line(e)
            with self.cv:
                self._finish(job, status, error)

    def _finish(self, job: Job, status: str, error: str | None = None) -> None:
        job.inputs = {}
        job.update(error=error, finished=time.time(), status=status)  # status last: a state read meanwhile is whole
        self.history.finish(job.id, status, job.images, error)
        done = [i for i, j in self.jobs.items() if j.status in FINISHED]
        for i in done[: max(0, len(done) - KEPT)]:
            del self.jobs[i]

    def _write(self, job: Job, made: Made) -> None:
        """Each image as a PNG with the settings that reproduce it (seed + i, batch 1), then a grid of all; the
        kind's other files (an input) and its chain."""
        s = job.settings
        for name, data in made.files.items():
            _atomic_write(self.image_path(job.id, name), data)
        for i, image in enumerate(made.images):
            own = {**s, "kind": job.kind, "seed": s["seed"] + i, "batch": 1, "job": job.id, "index": i}
            _atomic_write(self.image_path(job.id, i), pngs.encode(image, own))
        _atomic_write(self.image_path(job.id, "grid"), grid_png(made.images))
        job.chain, job.images = made.chain, len(made.images)  # sent with the finished state


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
