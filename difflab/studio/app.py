"""The studio's HTTP layer: a FastAPI app over the runs folder, the job queue and the history.

    app = create_app("runs", token=None, limits=Limits())   # uvicorn.run(app, host="127.0.0.1", port=7860)

Every action of the page is a JSON endpoint (OpenAPI at /docs); images are PNGs. Every error is a 4xx JSON
object ``{"error": "one line"}``: unknown names (404), settings out of the limits or that the run cannot take
(400), an upload too large (413), a full queue (429), a job that cannot be cancelled (409), bad JSON or wrong
types (422), a missing or wrong token (401). With a token, every request needs it: ``Authorization: Bearer T``,
``?token=T``, or the cookie the page gets when it is opened with ``?token=T``.

The routes come in groups, one function each: the errors and the token (``add_guard``), the page, the runs, the
jobs (one POST /api/NAME per entry of the job kinds' table, jobs.KINDS, and the routes every job shares) and the
history with the PNGs' settings."""

from __future__ import annotations

import hmac
import inspect
import json
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runs import shipped
from ..sampling.inverse import METHODS
from ..sampling.samplers import SAMPLERS, SPACINGS
from . import pngs
from .folder import STUDIO_DIR, NotFound, RunsFolder, _line
from .history import History
from .jobs import FINISHED, KINDS, MAX_ADAPTERS, Job, JobKind, Limits, QueueFull, TooLarge
from .queue import JobQueue

COOKIE = "difflab_studio_token"
STATIC = resources.files("difflab.studio") / "static"
ID = r"^[0-9a-f]{16}$"
Name = Annotated[str, PathParam(max_length=100)]
JobId = Annotated[str, PathParam(pattern=ID)]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


def create_app(
    runs: str | Path, *, token: str | None = None, limits: Limits | None = None, device: str = "cpu"
) -> FastAPI:
    """The studio over the runs folder ``runs`` (its .studio/ folder is created on first start)."""
    limits = limits or Limits()
    folder = RunsFolder(runs)
    if not folder.root.is_dir():
        raise ValueError(f"--runs {runs}: no such folder")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = folder.root / STUDIO_DIR
        (store / "images").mkdir(parents=True, exist_ok=True)
        history = History(store / "history.sqlite")
        app.state.history = history
        app.state.queue = JobQueue(folder, history, store / "images", limits, device)
        yield
        app.state.queue.stop()
        history.close()

    app = FastAPI(
        title="difflab studio",
        version="1",
        lifespan=lifespan,
        description='Sample, guide, edit and watch diffusion runs. Every error: 4xx {"error": "..."}.',
    )
    app.state.folder, app.state.limits, app.state.token = folder, limits, token
    add_guard(app, token)
    add_page(app)
    add_runs(app, folder, limits)
    add_jobs(app)
    add_history(app, folder, limits)
    return app


# --------------------------------------------------------------------------- helpers of every group


def queue(request: Request) -> JobQueue:
    return request.app.state.queue


def found(f, *args):
    try:
        return f(*args)
    except NotFound as e:
        raise ApiError(404, str(e)) from None


def job_of(request: Request, id: str) -> Job:
    job = queue(request).get(id)
    if job is None:
        raise ApiError(404, f"no job {id} in memory (finished jobs' images are in the history)")
    return job


# --------------------------------------------------------------------------- errors and the token


def add_guard(app: FastAPI, token: str | None) -> None:
    """Every error as 4xx JSON in one line; with a token, every request checked for it."""

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "the request body"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"[:300]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)[:300]}, status_code=e.status_code)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None:
            given = (
                request.query_params.get("token")
                or request.cookies.get(COOKIE)
                or request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            )
            if not given or not hmac.compare_digest(given.encode(), token.encode()):
                return JSONResponse(
                    {"error": "this studio needs its token (?token=..., or Authorization: Bearer ...)"}, status_code=401
                )
        try:
            response = await call_next(request)
        except Exception as e:  # noqa: BLE001 -- the last guard: a bug answers one line, never a traceback
            return JSONResponse({"error": f"internal error: {_line(e)}"}, status_code=500)
        if token is not None and request.query_params.get("token") and request.url.path == "/":
            response.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return response


# --------------------------------------------------------------------------- the page


def add_page(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")


# --------------------------------------------------------------------------- runs


def add_runs(app: FastAPI, folder: RunsFolder, limits: Limits) -> None:
    @app.get("/api/runs", summary="Every run of the runs folder and the shipped models")
    def list_runs():
        return {
            "runs": folder.listing(),
            "shipped": shipped.names(),
            "limits": limits.__dict__,
            "samplers": list(SAMPLERS),
            "spacings": list(SPACINGS),
            "methods": list(METHODS),
            "max_adapters": MAX_ADAPTERS,
        }

    @app.get(
        "/api/runs/{name}",
        summary="One run: its summary, its training curve (metrics.jsonl) and its --eval-every scores, the sampler, "
        "steps and guidance it "
        "takes by default (run.default_sampling) and, for a shipped model, its card (the recipe: what it is, the "
        "commands that trained it, its measured figures)",
    )
    def run_detail(request: Request, name: Name):
        summary = found(folder.summary, name)
        own = default_sampling(request, name) if summary["generates"] else None
        return {
            **summary,
            "metrics": found(folder.metrics, name),
            "evals": found(folder.evals, name),
            "sampling": None if own is None else {"sampler": own.sampler, "steps": own.steps},
            "guidance": None if own is None else own.guidance,
            "card": card(name) if summary.get("shipped") else None,
        }

    @app.get("/api/runs/{name}/pictures/{file}", summary="A run's samples.png or loss.png", response_class=FileResponse)
    def run_picture(name: Name, file: Annotated[str, PathParam(max_length=40)]):
        return FileResponse(found(folder.picture, name, file), media_type="image/png")


def default_sampling(request: Request, name: str):
    """What a job that names no sampler, steps or guidance gets (run.default_sampling), from the run loaded in
    the LRU (the page samples it next); None when it does not load."""
    try:
        return queue(request).runs.get(name).default_sampling()
    except (ValueError, OSError):  # a run being written, a broken one: said when a job asks for it
        return None


def card(name: str) -> dict | None:
    """A shipped model's card: what it is, the commands that trained it, its steps, training time and figures."""
    try:
        r = shipped.recipe(name)
    except ValueError:
        return None
    keys = ("what", "commands", "train_seconds", "figures", "note")
    return {k: r[k] for k in keys if k in r} | {"steps": shipped.said_steps(r)}  # "6000 + 2000" for stages


# --------------------------------------------------------------------------- jobs


def submit(request: Request, kind: JobKind, settings: dict) -> dict:
    """Queue a job of ``kind``: its public state, or the error in one line."""
    try:
        job = queue(request).submit(kind.name, settings)
    except NotFound as e:
        raise ApiError(404, str(e)) from None
    except QueueFull as e:
        raise ApiError(429, str(e)) from None
    except TooLarge as e:
        raise ApiError(413, str(e)) from None
    except (ValueError, FileNotFoundError) as e:  # JobError, the library's ConditionError, CheckpointError, ...
        raise ApiError(400, _line(e)) from None
    return job.public(queue(request).position(job))


def job_route(kind: JobKind):
    """The POST endpoint of a job kind: its request model is the body (OpenAPI shows each kind's own)."""

    def endpoint(request: Request, body) -> dict:
        return submit(request, kind, body.model_dump())

    endpoint.__name__ = kind.name
    endpoint.__signature__ = inspect.Signature(
        [
            inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request),
            inspect.Parameter("body", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind.request),
        ]
    )
    return endpoint


def add_jobs(app: FastAPI) -> None:
    for kind in KINDS.values():
        app.post(f"/api/{kind.name}", summary=kind.summary)(job_route(kind))

    @app.get("/api/jobs", summary="The jobs in memory: queued, running and recent finished ones, oldest first")
    def jobs(request: Request):
        return {"jobs": queue(request).listing()}

    @app.get("/api/jobs/{id}", summary="One job's status (falls back to the history for old jobs)")
    def job_status(request: Request, id: JobId):
        job = queue(request).get(id)
        if job is not None:
            return job.public(queue(request).position(job))
        row = request.app.state.history.get(id)
        if row is None:
            raise ApiError(404, f"no job {id}")
        return row

    @app.post("/api/jobs/{id}/cancel", summary="Cancel a queued or running job")
    def cancel(request: Request, id: JobId):
        job = queue(request).cancel(id)
        if job is None:
            raise ApiError(404, f"no job {id} in memory")
        if job.status in FINISHED and job.status != "cancelled":
            raise ApiError(409, f"job {id} is {job.status} already")
        return job.public()

    @app.get("/api/jobs/{id}/preview.png", summary="The latest live preview (predicted x_0) of a job")
    def preview(request: Request, id: JobId):
        job = job_of(request, id)
        if job.preview is None:
            raise ApiError(404, f"job {id} has no preview yet")
        return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get(
        "/api/jobs/{id}/events",
        summary="Server-Sent Events: every state of the job in order, from its first, each as it happens, until it "
        "ends",
    )
    async def events(request: Request, id: JobId):
        job = job_of(request, id)
        return StreamingResponse(
            job_events(job, request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )

    @app.get(
        "/api/jobs/{id}/images/{index}.png",
        summary="A finished job's image (index: 0.., or 'grid'); its parameters chunk holds its settings",
    )
    def image(request: Request, id: JobId, index: Annotated[str, PathParam(pattern=r"^(\d{1,4}|grid|input)$")]):
        path = queue(request).image_path(id, index)
        if not path.is_file():
            raise ApiError(404, f"job {id} has no image {index}")
        return FileResponse(path, media_type="image/png")

    @app.get(
        "/api/jobs/{id}/chain/{k}/{which}.png", summary="A chain job's x_t or x0 (x0_hat) at position k (0: pure noise)"
    )
    def chain_frame(
        request: Request,
        id: JobId,
        k: Annotated[int, PathParam(ge=0, le=100000)],
        which: Annotated[str, PathParam(pattern=r"^(x_t|x0)$")],
    ):
        job = job_of(request, id)
        if job.chain is None:
            raise ApiError(404, f"job {id} is not a finished chain job")
        frames = job.chain[which]
        if k >= len(frames):
            raise ApiError(404, f"position {k} is beyond the chain's {len(frames) - 1} steps")
        return Response(frames[k], media_type="image/png")


async def job_events(job: Job, disconnected):
    """A job's Server-Sent Events: every state of its event log (events.py) in order, from its first, each as
    soon as it happens, until its finished state (always the last event) or until the client leaves."""
    async for state in job.events.follow(disconnected):
        yield f"data: {json.dumps(state)}\n\n"


# --------------------------------------------------------------------------- history and PNG settings


def add_history(app: FastAPI, folder: RunsFolder, limits: Limits) -> None:
    @app.get("/api/history", summary="Finished jobs, newest first, searchable by prompt")
    def history(
        request: Request,
        q: Annotated[str, Query(max_length=400)] = "",
        status: Annotated[str, Query(pattern=r"^(done|cancelled|failed|interrupted|queued|running|any)$")] = "done",
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ):
        rows = request.app.state.history.search(q, None if status == "any" else status, limit, offset)
        return {"jobs": rows}

    @app.post("/api/parameters", summary="The settings stored in a PNG's parameters chunk (drop an image back in)")
    async def parameters(request: Request, file: Annotated[UploadFile, File()]):
        data = await file.read(limits.max_upload + 1)
        if len(data) > limits.max_upload:
            raise ApiError(413, f"the upload is larger than {limits.max_upload} bytes")
        try:
            _, settings = pngs.decode(data)
        except pngs.ImageError as e:
            raise ApiError(400, str(e)) from None
        if settings is None:
            raise ApiError(400, "this image holds no difflab settings (no JSON parameters chunk)")
        current = None
        if isinstance(settings.get("run"), str) and _exists(folder, settings["run"]):
            try:
                current = queue(request).runs.get(settings["run"]).fingerprint
            except ValueError:
                current = None
        return {"settings": settings, "same_weights": current is not None and current == settings.get("fingerprint")}


def _exists(folder: RunsFolder, name: str) -> bool:
    try:
        folder.path(name)
        return True
    except NotFound:
        return False
