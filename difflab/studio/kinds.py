"""The studio's job kinds: one handler each, owning its request, its own checks and its run (jobs.JobKind).

| kind        | request            | what it runs                                   | sampler, steps by default    |
|-------------|--------------------|------------------------------------------------|------------------------------|
| generate    | GenerateRequest    | run.sample, a batch of up to max_batch         | the run's own                |
| chain       | ChainRequest       | run.trajectory: x_t and x0_hat at every step   | the run's own                |
| inpaint     | InpaintRequest     | run.restore with a Mask operator               | a method (ddrm, dps...), 50  |
| img2img     | Img2ImgRequest     | SDEdit: run.img2img with a strength            | ddim, 50                     |
| interpolate | InterpolateRequest | run.interpolate between two images             | ddim or ddpm, 50             |
| sweep       | SweepRequest       | one seed at several guidance scales            | the run's own                |
| forward     | ForwardRequest     | q(x_t given x_0) of an image, no network       | the run's own steps          |
| upscale     | UpscaleRequest     | run.upscale of a super-resolution run (only)   | the run's own                |

A new kind is one more subclass here and one ``register`` entry (and its name in jobs.JobKindName): the app
makes its route (POST /api/NAME) from the table. Every kind but ``forward`` (no network) runs through the
library's callback: it shows previews and stops at its next step when cancelled."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..core.operators import Mask
from ..data.images import to_model, to_uint8
from ..runs.diffusion import DiffusionRun
from ..sampling.inverse import METHODS
from ..sampling.samplers import SAMPLERS, SPACINGS, default_spacing, timesteps
from . import pngs
from .jobs import (
    MAX_SCALES,
    Job,
    JobError,
    JobKind,
    Made,
    Progress,
    conditions_of,
    guidance_of,
    register,
    run_image,
    sampler_options,
    upload,
)

INTERPOLATE_T = 0.5  # a 'ddpm' interpolation's depth: the frames are noised to this fraction of t_max
IMAGE = 8 * 2**20  # the longest base64 field


# --------------------------------------------------------------------------- requests


class Conditions(BaseModel):
    """What every kind of job that samples shares: the run, its conditions and guidance, the seed and the steps."""

    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=100)
    prompt: str | None = Field(None, max_length=4000)
    negative_prompt: str | None = Field(None, max_length=4000)
    class_label: int | None = Field(None, ge=0, le=100000)
    guidance: float | None = Field(
        None, ge=0, le=100, description="classifier-free scale s (1: plain conditional; none: the run's own)"
    )
    interval: tuple[float, float] | None = Field(None, description="(lo, hi) fractions of t_max where guidance acts")
    rescale: float | None = Field(None, ge=0, le=1)
    steps: int | None = Field(None, ge=1, le=100000)
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="none: a random seed, recorded")
    lora: list[tuple[str, float]] | None = Field(
        None, max_length=4, description="LoRA adapters: [[adapter run, strength], ...]"
    )


class ChainRequest(Conditions):
    sampler: str | None = Field(None, max_length=40, description=", ".join(SAMPLERS))
    spacing: str | None = Field(None, max_length=40, description=", ".join(SPACINGS))
    eta: float | None = Field(None, ge=0, le=10, description="ddim's eta")


class GenerateRequest(ChainRequest):
    batch: int = Field(1, ge=1, le=100000)


class InpaintRequest(Conditions):
    image: str = Field(max_length=IMAGE, description="the image: a PNG, base64 (a data: URL's prefix is allowed)")
    mask: str = Field(
        max_length=IMAGE, description="the mask: a PNG of the image's size, white = fill in, black = keep"
    )
    method: str | None = Field(None, max_length=40, description=", ".join(METHODS))


class Img2ImgRequest(ChainRequest):
    image: str = Field(max_length=IMAGE, description="the image: a PNG, base64")
    strength: float = Field(
        0.6, gt=0, le=1, description="noised to strength * t_max, then denoised (1 ignores the image)"
    )


class InterpolateRequest(Conditions):
    image: str = Field(max_length=IMAGE, description="the first end: a PNG, base64")
    image_b: str = Field(max_length=IMAGE, description="the second end")
    frames: int = Field(9, ge=2, le=100000)
    method: str | None = Field(None, max_length=40, description="ddim (inversion + slerp) or ddpm")


class SweepRequest(ChainRequest):
    scales: list[float] = Field(min_length=2, max_length=8, description="guidance scales, one sample each, same seed")


class UpscaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run: str = Field(max_length=100, description="a super-resolution run (trained with --cond low-res --factor K)")
    image: str = Field(
        max_length=IMAGE, description="the low-resolution image: a PNG, base64, of the run's size divided by K"
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
    image: str = Field(max_length=IMAGE, description="the image: a PNG, base64")
    steps: int | None = Field(None, ge=1, le=100000, description="levels between t_max and 0")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)


# --------------------------------------------------------------------------- the kinds


def _sampling(s: dict) -> dict:
    """The sampler settings of a job as keyword arguments of the run's sample and trajectory."""
    return {"sampler": s["sampler"], "steps": s["steps"], "spacing": s.get("spacing"), "options": sampler_options(s)}


class Generate(JobKind):
    name, summary, request = "generate", "Queue a sampling job (run.sample)", GenerateRequest
    takes_sampler = batched = True

    def make(self, run, job, progress):
        s = job.settings
        x = run.sample(
            s["batch"],
            **conditions_of(s),
            **_sampling(s),
            seed=s["seed"],
            batch=s["batch"],
            callback=progress.callback(),
        )
        return Made(to_uint8(x.cpu()))


class Chain(JobKind):
    name, request = "chain", ChainRequest
    summary = "Queue a chain job (run.trajectory: x_t and x0_hat at every step, one sample)"
    takes_sampler = True

    def make(self, run, job, progress):
        s = job.settings
        x, traj = run.trajectory(1, **conditions_of(s), **_sampling(s), seed=s["seed"], callback=progress.callback())
        N = len(traj.x0)
        chain = {
            "t": [float(t) for t in traj.t],
            "x_t": [pngs.encode(to_uint8(traj.x_t[k, 0].cpu())) for k in range(N + 1)],
            "x0": [pngs.encode(to_uint8(traj.x0[min(k, N - 1), 0].cpu())) for k in range(N + 1)],
        }
        return Made(to_uint8(x.cpu()), chain=chain)


class Inpaint(JobKind):
    name, request = "inpaint", InpaintRequest
    summary = "Queue an inpainting job (run.restore with a mask operator)"
    default_steps = 50

    def inputs(self, run, s, limits):
        _, H, W = run.config.data_shape
        image = run_image(run, s, "image", limits)
        mask = upload(s.pop("mask"), 1, limits, "mask")[0]
        if tuple(mask.shape) != (H, W):
            raise JobError(f"the mask is {mask.shape[1]}x{mask.shape[0]}; the image is {W}x{H}")
        keep = mask < 128
        if keep.all():
            raise JobError("the mask marks no pixel to fill in (paint the part to fill)")
        if not keep.any():
            raise JobError("the mask keeps no pixel")
        s["mask_pixels"] = int((~keep).sum())
        return {"image": image, "keep": keep}

    def check(self, run, s, limits):
        everything = Mask(torch.ones(run.config.data_shape[1:], dtype=torch.bool), run.config.data_shape)
        s.setdefault("method", run.default_restoration(everything))
        if s["method"] not in METHODS:
            raise JobError(f"unknown method {s['method']!r}; choose from: {', '.join(METHODS)}")
        if run.latent is not None and s["method"] != "dps":
            raise JobError(f"{s['run']} is a latent run: inpaint it with dps")

    def make(self, run, job, progress):
        s, image = job.settings, job.inputs["image"]
        op = Mask(job.inputs["keep"], tuple(run.config.data_shape))
        y = op(to_model(image)[None].to(run.device))
        x = run.restore(
            y,
            op,
            method=s["method"],
            steps=s["steps"],
            seed=s["seed"],
            **conditions_of(s),
            callback=progress.callback(),
        )
        return Made(to_uint8(x.cpu()), files={"input": pngs.encode(image)})


class Img2Img(JobKind):
    name, request = "img2img", Img2ImgRequest
    summary = "Queue an image-to-image job (SDEdit: run.img2img with a strength)"
    takes_sampler, default_sampler, default_steps = True, "ddim", 50

    def inputs(self, run, s, limits):
        return {"image": run_image(run, s, "image", limits)}

    def check(self, run, s, limits):
        if not 0 < s.get("strength", -1) <= 1:
            raise JobError(f"strength must be within (0, 1], got {s.get('strength')}")

    def make(self, run, job, progress):
        s = job.settings
        image = to_model(job.inputs["image"])[None].to(run.device)
        x = run.img2img(
            image,
            s["strength"],
            steps=s["steps"],
            sampler=s["sampler"],
            seed=s["seed"],
            options=sampler_options(s),
            **conditions_of(s),
            callback=progress.callback(),
        )
        return Made(to_uint8(x.cpu()))


class Interpolate(JobKind):
    name, request = "interpolate", InterpolateRequest
    summary = "Queue an interpolation between two images (run.interpolate)"
    default_steps = 50

    def inputs(self, run, s, limits):
        return {
            "image": run_image(run, s, "image", limits),
            "image_b": run_image(run, s, "image_b", limits, "second image"),
        }

    def check(self, run, s, limits):
        s.setdefault("method", "ddim")
        s.setdefault("frames", 9)
        if s["method"] not in ("ddim", "ddpm"):
            raise JobError(f"unknown interpolation method {s['method']!r}; choose ddim or ddpm")
        if not 2 <= s["frames"] <= max(2, limits.max_batch):
            raise JobError(f"frames must be within 2..{max(2, limits.max_batch)}, got {s['frames']}")

    def steps(self, run, s):
        """'ddim': the inversion of both ends, then the decoding of the frames; 'ddpm': each frame's chain from
        INTERPOLATE_T * t_max (its start as sampling.generate rounds it, then the grid's times below)."""
        if s["method"] == "ddim":
            return 2 * s["steps"]
        process = run.process
        start = max(round(INTERPOLATE_T * process.t_max), 1) if process.discrete else INTERPOLATE_T * process.t_max
        ts = timesteps(process, s["steps"], default_spacing("ddpm", process))
        return s["frames"] * int((ts < start).sum())

    def make(self, run, job, progress):
        s = job.settings
        a, b = (to_model(job.inputs[k])[None].to(run.device) for k in ("image", "image_b"))
        x = run.interpolate(
            a,
            b,
            s["frames"],
            method=s["method"],
            t=INTERPOLATE_T,
            steps=s["steps"],
            seed=s["seed"],
            **conditions_of(s),
            callback=progress.callback(),
        )
        return Made(to_uint8(x.cpu()))


class Sweep(JobKind):
    name, request = "sweep", SweepRequest
    summary = "Queue one seed at several guidance scales, side by side"
    takes_sampler = True

    def check(self, run, s, limits):
        scales = s.get("scales") or []
        if not 2 <= len(scales) <= MAX_SCALES or not all(0 <= float(x) <= 100 for x in scales):
            raise JobError(f"give 2..{MAX_SCALES} guidance scales within 0..100")
        for x in scales:
            run.guided(guidance_of({**s, "guidance": float(x)}))

    def steps(self, run, s):
        return s["steps"] * len(s["scales"])  # the chains one after another

    def make(self, run, job, progress):
        s, out = job.settings, []
        for i, scale in enumerate(s["scales"]):  # one seed at each scale: what the scale does, side by side
            cond = conditions_of({**s, "guidance": float(scale)})
            out.append(
                run.sample(
                    1, **cond, **_sampling(s), seed=s["seed"], batch=1, callback=progress.callback(i * s["steps"])
                )
            )
        return Made(to_uint8(torch.cat(out).cpu()))


class Forward(JobKind):
    name, request = "forward", ForwardRequest
    summary = "Queue the forward process q(x_t | x_0) of an image (a chain from t_max to 0, no network)"

    def inputs(self, run, s, limits):
        return {"image": run_image(run, s, "image", limits)}

    def make(self, run: DiffusionRun, job: Job, progress: Progress) -> Made:
        """x_t = alpha x_0 + sigma eps at steps + 1 levels from t_max to 0 (one eps from the seed; a latent run's
        in its latent space, decoded to be seen); the images are 8 of them."""
        s, process = job.settings, run.process
        z0 = run.encode(to_model(job.inputs["image"])[None].to(run.device))
        eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(s["seed"])).to(z0.device)
        ts = torch.linspace(float(process.t_max), 0.0, s["steps"] + 1, dtype=torch.float64)
        frames = []
        for k, t in enumerate(ts):
            frames.append(run.decode(process.q_sample(z0, t[None], eps).float()) if t > 0 else run.decode(z0))
            progress.step(k)  # a cancelled job stops here
        original = pngs.encode(to_uint8(frames[-1][0].cpu()))
        chain = {
            "t": ts.tolist(),
            "x_t": [pngs.encode(to_uint8(f[0].cpu())) for f in frames],
            "x0": [original] * len(frames),
        }
        picks = torch.linspace(0, s["steps"], min(8, s["steps"] + 1)).round().long().tolist()
        return Made(to_uint8(torch.cat([frames[k] for k in picks]).cpu()), chain=chain)


class Upscale(JobKind):
    name, request = "upscale", UpscaleRequest
    summary = "Queue a super-resolution job (a super-resolution run's run.upscale of a low-resolution image)"
    takes_sampler, super_resolution, conditioned = True, True, False  # no condition but the image

    def inputs(self, run, s, limits):
        C, H, W = run.config.data_shape
        k = run.config.super_resolution.factor
        image = upload(s.pop("image"), C, limits, "image")
        if tuple(image.shape[1:]) != (H // k, W // k):
            raise JobError(
                f"the image is {image.shape[2]}x{image.shape[1]}; {s['run']} upscales {W // k}x{H // k} images "
                f"(factor {k}) to {W}x{H}"
            )
        return {"image": image}

    def check(self, run, s, limits):
        s.setdefault("noise_level", 0.0)
        if not 0 <= s["noise_level"] <= 1:
            raise JobError(f"noise_level must be within 0..1, got {s['noise_level']}")

    def make(self, run, job, progress):
        s, image = job.settings, job.inputs["image"]
        low = to_model(image)[None]  # (1, C, H/k, W/k), on the CPU: upscale draws its noise there
        x = run.upscale(
            low,
            noise_level=s["noise_level"],
            steps=s["steps"],
            sampler=s["sampler"],
            seed=s["seed"],
            device=run.device,
            callback=progress.callback(),
        )
        return Made(to_uint8(x.cpu()), files={"input": pngs.encode(image)})


register(Generate(), Inpaint(), Chain(), Img2Img(), Interpolate(), Sweep(), Forward(), Upscale())
