"""The studio's HTTP layer: a FastAPI app over the runs folder, the job queue and the history.

    app = create_app("runs", token=None, limits=Limits())   # uvicorn.run(app, host="127.0.0.1", port=7860)

Every action of the page is a JSON endpoint (OpenAPI at /docs); images are PNGs. Every error is a 4xx JSON
object ``{"error": "one line"}``: unknown names (404), settings out of the limits or that the run cannot take
(400), a full queue (429), a job that cannot be cancelled (409), bad JSON or wrong types (422), a missing or
wrong token (401). With a token, every request needs it: ``Authorization: Bearer T``, ``?token=T``, or the
cookie the page gets when it is opened with ``?token=T``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..runs import shipped
from ..sampling.inverse import METHODS
from ..sampling.samplers import SAMPLERS, SPACINGS
from . import pngs
from .folder import STUDIO_DIR, NotFound, RunsFolder, _line
from .history import History
from .jobs import FINISHED, MAX_ADAPTERS, Job, JobQueue, Limits, QueueFull, check_kind

COOKIE = "difflab_studio_token"
STATIC = resources.files("difflab.studio") / "static"
ID = r"^[0-9a-f]{16}$"
Name = Annotated[str, PathParam(max_length=100)]
JobId = Annotated[str, PathParam(pattern=ID)]


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


class Conditions(BaseModel):
    """What every kind of job shares: the run, its conditions and guidance, the seed and the steps."""

    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=100)
    prompt: str | None = Field(None, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    class_label: int | None = Field(None, ge=0, le=100000)
    guidance: float = Field(1.0, ge=0, le=100, description="classifier-free scale s (1: plain conditional)")
    interval: tuple[float, float] | None = Field(None, description="(lo, hi) fractions of t_max where guidance acts")
    rescale: float | None = Field(None, ge=0, le=1)
    steps: int | None = Field(None, ge=1, le=100000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="none: a random seed, recorded")
    lora: list[tuple[str, float]] | None = Field(
        None, max_length=4, description="LoRA adapters: [[adapter run, strength], ...]"
    )


class GenerateRequest(Conditions):
    sampler: str | None = Field(None, max_length=40, description=", ".join(SAMPLERS))
    spacing: str | None = Field(None, max_length=40, description=", ".join(SPACINGS))
    eta: float | None = Field(None, ge=0, le=10, description="ddim's eta")
    batch: int = Field(1, ge=1, le=100000)


class ChainRequest(Conditions):
    sampler: str | None = Field(None, max_length=40)
    spacing: str | None = Field(None, max_length=40)
    eta: float | None = Field(None, ge=0, le=10)


class InpaintRequest(Conditions):
    image: str = Field(max_length=8 * 2**20, description="the image: a PNG, base64 (a data: URL's prefix is allowed)")
    mask: str = Field(
        max_length=8 * 2**20, description="the mask: a PNG of the image's size, white = fill in, black = keep"
    )
    method: str | None = Field(None, max_length=40, description=", ".join(METHODS))


class Img2ImgRequest(ChainRequest):
    image: str = Field(max_length=8 * 2**20, description="the image: a PNG, base64")
    strength: float = Field(
        0.6, gt=0, le=1, description="noised to strength * t_max, then denoised (1 ignores the image)"
    )


class InterpolateRequest(Conditions):
    image: str = Field(max_length=8 * 2**20, description="the first end: a PNG, base64")
    image_b: str = Field(max_length=8 * 2**20, description="the second end")
    frames: int = Field(9, ge=2, le=100000)
    method: str | None = Field(None, max_length=40, description="ddim (inversion + slerp) or ddpm")


class SweepRequest(ChainRequest):
    scales: list[float] = Field(min_length=2, max_length=8, description="guidance scales, one sample each, same seed")


class UpscaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=100, description="a super-resolution run (trained with --cond low-res --factor K)")
    image: str = Field(
        max_length=8 * 2**20, description="the low-resolution image: a PNG, base64, of the run's size divided by K"
    )
    noise_level: float = Field(
        0.0, ge=0, le=1, description="conditioning augmentation: the input noised to this level, the network told so"
    )
    sampler: str | None = Field(None, max_length=40, description=", ".join(SAMPLERS))
    steps: int | None = Field(None, ge=1, le=100000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


class ForwardRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=100)
    image: str = Field(max_length=8 * 2**20, description="the image: a PNG, base64")
    steps: int | None = Field(None, ge=1, le=100000, description="levels between t_max and 0")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


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

    # ------------------------------------------------------------------ errors and the token

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

    def queue(request: Request) -> JobQueue:
        return request.app.state.queue

    def found(f, *args):
        try:
            return f(*args)
        except NotFound as e:
            raise ApiError(404, str(e)) from None

    def job_of(request: Request, id: str):
        job = queue(request).get(id)
        if job is None:
            raise ApiError(404, f"no job {id} in memory (finished jobs' images are in the history)")
        return job

    def submit(request: Request, kind: str, settings: dict, inputs: dict | None = None) -> dict:
        try:
            job = queue(request).submit(kind, settings, inputs)
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except QueueFull as e:
            raise ApiError(429, str(e)) from None
        except (ValueError, FileNotFoundError) as e:  # JobError, the library's ConditionError, CheckpointError, ...
            raise ApiError(400, _line(e)) from None
        return job.public(queue(request).position(job))

    # ------------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    def index():
        return HTMLResponse((STATIC / "index.html").read_text())

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    # ------------------------------------------------------------------ runs

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
        summary="One run: its summary, its training curve (metrics.jsonl) and the sampler and steps it "
        "takes by default (a distilled student's own)",
    )
    def run_detail(request: Request, name: Name):
        summary = found(folder.summary, name)
        return {
            **summary,
            "metrics": found(folder.metrics, name),
            "sampling": sampling_of(request, name) if summary["generates"] else None,
        }

    def sampling_of(request: Request, name: str) -> dict | None:
        """The sampler and steps a job that names neither gets (run.default_sampling), from the run loaded in the
        LRU (the page samples it next); None when it does not load."""
        try:
            own = queue(request).runs.get(name).default_sampling()
            sampler, steps = own.sampler, own.steps
        except (ValueError, OSError):  # a run being written, a broken one: said when a job asks for it
            return None
        return {"sampler": sampler, "steps": steps}

    @app.get("/api/runs/{name}/pictures/{file}", summary="A run's samples.png or loss.png", response_class=FileResponse)
    def run_picture(name: Name, file: Annotated[str, PathParam(max_length=40)]):
        return FileResponse(found(folder.picture, name, file), media_type="image/png")

    # ------------------------------------------------------------------ jobs

    @app.post("/api/generate", summary="Queue a sampling job (run.sample)")
    def generate(request: Request, body: GenerateRequest):
        return submit(request, "generate", body.model_dump())

    @app.post("/api/chain", summary="Queue a chain job (run.trajectory: x_t and x0_hat at every step, one sample)")
    def chain(request: Request, body: ChainRequest):
        return submit(request, "chain", body.model_dump())

    def loaded(request: Request, name: str, kind: str):
        """The run ``name`` loaded, when it takes jobs of ``kind`` (else a 400 saying which it takes)."""
        try:
            run = queue(request).runs.get(name)
            check_kind(run, name, kind)
            return run
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except ValueError as e:  # another kind of run, or one that does not load
            raise ApiError(400, _line(e)) from None

    def run_image(run, name: str, data: str, what: str = "image"):
        """An uploaded image that must have the run's data shape exactly (never resized)."""
        C, H, W = run.config.data_shape
        image = _image(data, C, limits, what)
        if tuple(image.shape[1:]) != (H, W):
            raise ApiError(400, f"the {what} is {image.shape[2]}x{image.shape[1]}; {name} takes {W}x{H}")
        return image

    @app.post("/api/inpaint", summary="Queue an inpainting job (run.restore with a mask operator)")
    def inpaint(request: Request, body: InpaintRequest):
        run = loaded(request, body.run, "inpaint")
        _, H, W = run.config.data_shape
        image = run_image(run, body.run, body.image)
        mask = _image(body.mask, 1, limits, "mask")[0]
        if tuple(mask.shape) != (H, W):
            raise ApiError(400, f"the mask is {mask.shape[1]}x{mask.shape[0]}; the image is {W}x{H}")
        keep = mask < 128
        if keep.all():
            raise ApiError(400, "the mask marks no pixel to fill in (paint the part to fill)")
        if not keep.any():
            raise ApiError(400, "the mask keeps no pixel")
        settings = body.model_dump(exclude={"image", "mask"})
        settings["mask_pixels"] = int((~keep).sum())
        return submit(request, "inpaint", settings, {"image": image, "keep": keep})

    @app.post("/api/img2img", summary="Queue an image-to-image job (SDEdit: run.img2img with a strength)")
    def img2img(request: Request, body: Img2ImgRequest):
        image = run_image(loaded(request, body.run, "img2img"), body.run, body.image)
        return submit(request, "img2img", body.model_dump(exclude={"image"}), {"image": image})

    @app.post("/api/interpolate", summary="Queue an interpolation between two images (run.interpolate)")
    def interpolate(request: Request, body: InterpolateRequest):
        run = loaded(request, body.run, "interpolate")
        inputs = {
            "image": run_image(run, body.run, body.image),
            "image_b": run_image(run, body.run, body.image_b, "second image"),
        }
        return submit(request, "interpolate", body.model_dump(exclude={"image", "image_b"}), inputs)

    @app.post("/api/sweep", summary="Queue one seed at several guidance scales, side by side")
    def sweep(request: Request, body: SweepRequest):
        return submit(request, "sweep", body.model_dump())

    @app.post(
        "/api/forward",
        summary="Queue the forward process q(x_t | x_0) of an image (a chain from t_max to 0, no network)",
    )
    def forward(request: Request, body: ForwardRequest):
        image = run_image(loaded(request, body.run, "forward"), body.run, body.image)
        return submit(request, "forward", body.model_dump(exclude={"image"}), {"image": image})

    @app.post(
        "/api/upscale",
        summary="Queue a super-resolution job (a super-resolution run's run.upscale of a low-resolution image)",
    )
    def upscale(request: Request, body: UpscaleRequest):
        run = loaded(request, body.run, "upscale")
        C, H, W = run.config.data_shape
        k = run.config.super_resolution.factor
        image = _image(body.image, C, limits, "image")
        if tuple(image.shape[1:]) != (H // k, W // k):
            raise ApiError(
                400,
                f"the image is {image.shape[2]}x{image.shape[1]}; {body.run} upscales {W // k}x{H // k} images "
                f"(factor {k}) to {W}x{H}",
            )
        return submit(request, "upscale", body.model_dump(exclude={"image"}), {"image": image})

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

    @app.get("/api/jobs/{id}/events", summary="Server-Sent Events: the job's status whenever it changes, until it ends")
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

    # ------------------------------------------------------------------ history and PNG settings

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

    return app


async def job_events(job: Job, disconnected, every: float = 0.05):
    """A job's Server-Sent Events: its state whenever it changes (checked every ``every`` s), until it ends or the
    client leaves. One snapshot is both sent and tested for the end, so the last event of a stream is always the
    job's finished state: the worker thread may finish the job at any moment, also between the two."""
    last = None
    while True:
        state = job.public()
        data = json.dumps(state)
        if data != last:
            last = data
            yield f"data: {data}\n\n"
        if state["status"] in FINISHED or await disconnected():
            return
        await asyncio.sleep(every)


def _exists(folder: RunsFolder, name: str) -> bool:
    try:
        folder.path(name)
        return True
    except NotFound:
        return False


def _image(data: str, channels: int, limits: Limits, what: str):
    """A base64 PNG (or a data: URL) -> uint8 (C, H, W), or a 400 in one line."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) > limits.max_upload * 4 // 3 + 4:
        raise ApiError(413, f"the {what} is larger than {limits.max_upload} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"the {what} is not base64") from None
    try:
        x, _ = pngs.decode(raw, channels)
    except pngs.ImageError as e:
        raise ApiError(400, f"the {what}: {e}") from None
    return x
