"""A diffusion run, loaded: the object a program asks for images (diffusers' pipeline, with our guidance as
denoiser wrappers and our validated configs).

    import difflab
    run = difflab.load("runs/t2i")                                   # pixel or latent, any conditions
    x = run.sample(16, prompt="a red sneaker on the left and a blue bag on the right", guidance=4, seed=0)
    x = run.sample(80, class_label=list(range(10)) * 8, guidance=3)  # (80, C, H, W), the data's scale

Every call goes through the one generation path (sampling/generate.py: per-sample seeds, batches, torchrun
shards) and returns images in the data space, [-1, 1] and not clipped (``data.images.to_uint8`` clips and makes
them 8-bit): a latent run decodes with its autoencoder. ``callback(step, x_t, x0_hat)`` sees every step of the
chain (in the denoiser's space: ``run.decode`` maps a latent run's states to images). Besides ``sample``: ``trajectory``
(the chain, decoded), ``restore`` (inverse problems), ``img2img`` (SDEdit) and ``interpolate``; ``with_lora``
adds LoRA adapters; ``denoiser``, ``config``, ``latent`` (the autoencoder's space or None) and ``text`` (the
text encoder or None) are the parts.

Two kinds load as a DiffusionRun: ``diffusion`` (``difflab train``) and ``personalized`` (``difflab personalize``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from ..core.conditions import ConditionError, check_accepted, condition_names
from ..core.losses import ContinuousVLBLoss, HybridLoss, NoiseAugmented
from ..core.operators import Decoded, Operator
from ..core.parameterize import Denoiser
from ..data.images import to_uint8
from ..data.toy2d import make_toy
from ..guidance.config import GuidanceConfig, guided, labels_for
from ..latent.autoencoder import latent_space
from ..latent.space import LatentSpace
from ..nets.mlp import MLP, MLPConfig
from ..nets.unet import UNet, UNetConfig
from ..personalize.adapters import with_adapters
from ..sampling.edit import img2img as sdedit
from ..sampling.edit import interpolate as interpolation
from ..sampling.generate import generate
from ..sampling.inverse import MEASUREMENT, METHODS
from ..sampling.samplers import Trajectory
from ..text.encoders import as_read, encoder_of, prompt_length, text_condition
from ..training.distributed import World
from ..viz import plots
from .config import CheckpointError, RunConfig
from .data import load_split, low_res_of
from .kinds import RunKind
from .run import Run
from .shipped import recorded_scale


@dataclass(frozen=True)
class DefaultSampling:
    """What a call that names no sampler, steps or guidance gets: ``DiffusionRun.default_sampling()``, the one
    place that decides it for the library, the CLI and the studio.

    sampler   the sampler's name (sampling/samplers.py SAMPLERS)
    steps     its steps
    guidance  the classifier-free scale s of a call that asks for a condition (a prompt, a class) and names no
              guidance: 1 (plain conditional), or the best scale a shipped model's recipe records
    spacing   the time grid (None: the sampler's usual one)
    fixed     whether the run samples with this sampler alone (a distilled student): another is refused"""

    sampler: str = "dpmpp-2m"
    steps: int = 20
    guidance: float = 1.0
    spacing: str | None = None
    fixed: bool = False


class DiffusionRun(Run):
    """A trained denoiser with what it needs to make images (see the module doc)."""

    kinds = ("diffusion", "personalized")
    what = "a denoiser"

    def __init__(self, path, config: RunConfig, net, adapters: Sequence[tuple[str, float]] = ()):
        super().__init__(path, config, net)
        self.denoiser = config.denoiser_for(self.net)
        self.adapters = tuple(adapters)

    @classmethod
    def load(
        cls, path, *, ema: bool = True, device=None, lora: Sequence[tuple[str | Path, float]] = ()
    ) -> DiffusionRun:
        """The run in ``path`` (EMA weights unless ``ema=False``) with LoRA adapters ``lora`` ((run, strength), ...)."""
        run = super().load(path, ema=ema)
        run = run.with_lora(lora) if lora else run
        return run.to(device) if device is not None else run

    def with_lora(self, adapters: Sequence[tuple[str | Path, float]]) -> DiffusionRun:
        """This run with LoRA adapters added over its weights (personalize/adapters.py); their updates add up."""
        net, cfg = with_adapters(
            self.net, self.config, self.path, self.fingerprint, [(str(r), float(s)) for r, s in adapters]
        )
        run = DiffusionRun(self.path, cfg, net, self.adapters + tuple((str(r), float(s)) for r, s in adapters))
        run.__dict__["fingerprint"] = self.fingerprint
        return run

    # ------------------------------------------------------------------ the parts

    @property
    def process(self):
        return self.denoiser.process

    @cached_property
    def latent(self) -> LatentSpace | None:
        """The autoencoder's latent space of a latent run (checked against the run's record), else None."""
        return None if self.config.latent is None else latent_space(self.config.latent)

    @cached_property
    def text(self):
        """The text encoder of a text run (checked against the run's record), else None."""
        return encoder_of(self.config)

    def decode(self, z: Tensor) -> Tensor:
        """The denoiser's space -> the data space (a latent run's decoder; else the identity)."""
        return z if self.latent is None else self.latent.decode(z)

    def encode(self, x: Tensor) -> Tensor:
        """Data-space images in [-1, 1] -> the denoiser's space (a latent run's scaled latents; else unchanged)."""
        return x if self.latent is None else self.latent.encode(x)

    # ------------------------------------------------------------------ conditions and guidance

    def encode_text(self, prompts: Sequence[str], length: int | None = None) -> dict[str, Tensor]:
        """The text condition of ``prompts``, padded to ``length`` (default: what they need, at least the training
        length)."""
        if self.text is None:
            raise ConditionError(f"{self.path} takes no text (train a text-to-image run with --text)")
        return text_condition(self.config, prompts, length, self.text)

    def _length(self, prompts: Sequence[str], g: GuidanceConfig | None) -> int | None:
        """One length for every prompt of a call (prompts, negative, composed): guided batches stack them."""
        if self.text is None:
            return None
        every = (
            list(prompts)
            + ([g.negative_prompt] if g is not None and g.negative_prompt else [])
            + ([p for p, _ in g.compose_prompts] if g is not None else [])
        )
        return prompt_length(self.config, self.text, as_read(self.config, every))

    def conditions(
        self,
        n: int,
        *,
        prompt: str | Sequence[str] | None = None,
        class_label: int | Sequence[int] | None = None,
        guidance: GuidanceConfig | None = None,
        length: int | None = None,
    ) -> dict[str, Tensor]:
        """The condition tensors of n samples: one prompt or n (a text run), one class or n (a class run)."""
        prompts = _per_sample(prompt, n, "prompt")
        if prompts is not None:
            if self.config.text_spec() is None:
                raise ConditionError(f"--prompt: {self.path} takes no text (train a text-to-image run with --text)")
            if class_label is not None:
                raise ConditionError("give a prompt or a class, not both")
            return self.encode_text(prompts, length)
        if (
            guidance is not None
            and guidance.classifier_free
            and not guidance.compose_prompts
            and self.config.text_spec() is not None
        ):
            raise ConditionError(
                "classifier-free guidance of a text run needs the caption to guide toward (--prompt or --prompt-file)"
            )
        requested = _per_sample(class_label, n, "class_label")
        labels = labels_for(
            self.config, guidance, [int(k) for k in requested] if requested is not None else None, n, str(self.path)
        )
        return {"class_labels": labels} if labels is not None else {}

    def guided(self, guidance: GuidanceConfig | None, length: int | None = None):
        """The denoiser wrapped as ``guidance`` asks (guidance/config.py checks the combination)."""
        encode = (lambda prompts: self.encode_text(prompts, length)) if self.text is not None else None
        return guided(self.denoiser, self.config, guidance, encode, str(self.path))

    def _setup(self, n, prompt, class_label, guidance, negative_prompt):
        g = GuidanceConfig.of(guidance, negative_prompt=negative_prompt)
        prompts = _per_sample(prompt, n, "prompt")
        length = self._length(prompts or [], g)
        denoiser = self.guided(g, length)  # the guidance is checked first: it says what the run cannot do
        return denoiser, self.conditions(n, prompt=prompts, class_label=class_label, guidance=g, length=length)

    # ------------------------------------------------------------------ making images

    def default_sampling(self) -> DefaultSampling:
        """The sampler, steps and guidance a call that names none of them gets: dpmpp-2m in 20 steps, plain
        conditional, or the best guidance scale a shipped model records (a distilled student: its own)."""
        return DefaultSampling(guidance=recorded_scale(self.path) or 1.0)

    def check_sampling(
        self, sampler: str | None = None, steps: int | None = None, spacing: str | None = None
    ) -> tuple[str, int, str | None]:
        """(sampler, steps, spacing) of a call: what it names, the rest from ``default_sampling`` (a student
        also refuses, in one line, a sampler, steps or grid it was not made for)."""
        own = self.default_sampling()
        return sampler or own.sampler, steps or own.steps, spacing or own.spacing

    def default_guidance(self, guidance, asked: bool):
        """The guidance of a call: what it names; when it names none but asks for a condition (``asked``), the
        run's own scale (``default_sampling().guidance``; None when that is 1: plain conditional)."""
        if guidance is not None or not asked:
            return guidance
        scale = self.default_sampling().guidance
        return None if scale == 1.0 else scale

    def sample(
        self,
        n: int = 1,
        *,
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | None = None,
        class_label: int | Sequence[int] | None = None,
        guidance: float | GuidanceConfig | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        options: dict | None = None,
        seed: int = 0,
        batch: int = 250,
        device=None,
        world: World | None = None,
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
        decoded: bool = True,
    ) -> Tensor:
        """n samples in the data space, (n, *data_shape), not clipped (images: [-1, 1] up to overshoot); sample i
        has seed ``seed + i``. ``guidance`` is a classifier-free scale s (1: plain conditional) or a GuidanceConfig;
        ``options`` the sampler's own (ddim: eta; ...) and the grid's sigma_tilde_cap. Under torchrun (``world``)
        rank 0 gets the samples, the other ranks None. ``decoded=False``: in the denoiser's space (a latent run's
        latents)."""
        sampler, steps, spacing = self.check_sampling(sampler, steps, spacing)
        guidance = self.default_guidance(guidance, prompt is not None or class_label is not None)
        denoiser, cond = self._setup(n, prompt, class_label, guidance, negative_prompt)
        return generate(
            denoiser,
            self.config.shape,
            n,
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            options=options,
            cond=cond,
            seed=seed,
            batch=batch,
            device=device,
            world=world,
            progress=progress,
            decode=self.decode if decoded else None,
            callback=_step_callback(callback),
        )

    def trajectory(
        self,
        n: int = 8,
        *,
        prompt=None,
        negative_prompt=None,
        class_label=None,
        guidance=None,
        sampler: str | None = None,
        steps: int | None = None,
        spacing: str | None = None,
        options: dict | None = None,
        seed: int = 0,
        callback=None,
    ) -> tuple[Tensor, Trajectory]:
        """n samples and their chain (x_t at every grid time, the predicted x_0 at every step), in the data space."""
        sampler, steps, spacing = self.check_sampling(sampler, steps, spacing)
        guidance = self.default_guidance(guidance, prompt is not None or class_label is not None)
        denoiser, cond = self._setup(n, prompt, class_label, guidance, negative_prompt)
        return generate(
            denoiser,
            self.config.shape,
            n,
            sampler=sampler,
            steps=steps,
            spacing=spacing,
            options=options,
            cond=cond,
            seed=seed,
            batch=n,
            decode=self.decode,
            return_trajectory=True,
            callback=_step_callback(callback),
        )

    def default_restoration(self, operator: Operator) -> str:
        """The inverse-problem method a run takes by default: DPS on a latent run (its gradient runs through the
        decoder), DDRM where the operator has an SVD, else DPS."""
        return "dps" if self.latent is not None or operator.svd is None else "ddrm"

    def restore(
        self,
        y: Tensor,
        operator: Operator,
        *,
        method: str | None = None,
        steps: int = 100,
        seed: int = 0,
        options: dict | None = None,
        prompt=None,
        negative_prompt=None,
        class_label=None,
        guidance=None,
        batch: int = 250,
        device=None,
        progress: bool = False,
        callback=None,
    ) -> Tensor:
        """Restorations x with A(x) ~ y for measurements ``y`` (N, *A's output) of data-space images
        (core/operators.py), by ``method`` (sampling/inverse.py: replace, repaint, ddrm, dps; default
        ``default_restoration``); ``options`` the method's own (ddrm: eta, eta_b; dps: scale; repaint: jumps)."""
        method = method or self.default_restoration(operator)
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from: {', '.join(METHODS)}")
        if self.config.data_kind != "images":
            raise ValueError(f"{self.path} makes {self.config.data_kind}; restoration works on image runs")
        if self.latent is not None and method != "dps":
            raise ValueError(
                f"{self.path} is a latent run: {method} needs the pixels at every step; use dps "
                "(its gradient runs through the decoder)"
            )
        if method == "ddrm" and operator.svd is None:
            raise ValueError(f"DDRM needs an operator with an SVD; {operator.name} has none")
        n = len(y)
        denoiser, cond = self._setup(n, prompt, class_label, guidance, negative_prompt)
        model_op = operator if self.latent is None else Decoded(operator, self.latent.decode, self.config.shape)
        return generate(
            denoiser,
            self.config.shape,
            n,
            sampler=METHODS[method],
            steps=steps,
            options={"operator": model_op, **(options or {})},
            cond={**cond, MEASUREMENT: y},
            seed=seed,
            batch=batch,
            device=device,
            progress=progress,
            decode=self.decode,
            callback=_step_callback(callback),
        )

    def img2img(
        self,
        images: Tensor,
        strength: float,
        *,
        n: int = 1,
        steps: int = 50,
        sampler: str = "ddim",
        seed: int = 0,
        options: dict | None = None,
        prompt=None,
        negative_prompt=None,
        class_label=None,
        guidance=None,
        batch: int = 250,
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """SDEdit: n variations of each data-space image (seeds seed + i, inputs in order), noised to
        strength * t_max and denoised back; strength 1 ignores the image. ``callback(step, x_t, x0_hat)`` as for
        ``sample``, at every step of the shortened chain."""
        self._images_only("image-to-image")
        x = self.encode(images).repeat_interleave(n, dim=0)
        denoiser, cond = self._setup(len(x), prompt, class_label, guidance, negative_prompt)
        return sdedit(
            denoiser,
            x,
            strength,
            steps=steps,
            sampler=sampler,
            seed=seed,
            cond=cond or None,
            options=options,
            batch=batch,
            progress=progress,
            decode=self.decode,
            callback=_step_callback(callback),
        )

    def interpolate(
        self,
        a: Tensor,
        b: Tensor,
        frames: int = 9,
        *,
        method: str = "ddim",
        t: float = 0.5,
        steps: int = 50,
        seed: int = 0,
        prompt=None,
        negative_prompt=None,
        class_label=None,
        guidance=None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """``frames`` images from the data-space image a (1, ...) to b: DDIM inversion + slerp ('ddim') or the DDPM mix
        ('ddpm', noised to t * t_max). A prompt or class per end: one for both, or two (a's, b's).
        ``callback(step, x_t, x0_hat)`` as for ``sample``, at every step of each chain in turn, ``step`` counting over
        all of them: 'ddim' inverts both ends (steps), then decodes the frames (steps); 'ddpm' runs each frame's
        chain."""
        self._images_only("interpolation")
        denoiser, cond = self._setup(2, prompt, class_label, guidance, negative_prompt)
        ends = [{k: v[i : i + 1] for k, v in cond.items()} for i in (0, 1)]
        return interpolation(
            denoiser,
            self.encode(a),
            self.encode(b),
            frames,
            method=method,
            t=t,
            steps=steps,
            seed=seed,
            cond_a=ends[0] or None,
            cond_b=ends[1] or None,
            specs=self.config.condition_specs(),
            decode=self.decode,
            callback=_step_callback(callback),
        )

    def upscale(
        self,
        low: Tensor,
        *,
        noise_level: float = 0.0,
        steps: int | None = None,
        sampler: str | None = None,
        seed: int = 0,
        batch: int = 250,
        progress: bool = False,
        device=None,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> Tensor:
        """A super-resolution run's samples of p(x | low_res) for low-resolution images ``low`` (model space,
        (N, C, H/k, W/k)); ``noise_level``: the conditioning augmentation's level, the input noised as in training
        and the network told so; ``sampler`` and ``steps``: the run's own (``default_sampling``) unless named.
        ``callback(step, x_t, x0_hat)`` as for ``sample``."""
        if self.config.super_resolution is None:
            raise ValueError(
                f"{self.path} is not a super-resolution run (train one with `difflab train NAME --cond low-res "
                "--factor K`)"
            )
        sampler, steps, _ = self.check_sampling(sampler, steps)  # the run's own unless named
        cond = {"low_res": low}
        if noise_level:
            g = torch.Generator().manual_seed(seed)
            cond = {
                "low_res": low + noise_level * torch.randn(low.shape, generator=g),
                "low_res_noise": torch.full((len(low),), float(noise_level)),
            }
        return generate(
            self.denoiser,
            self.config.shape,
            len(low),
            sampler=sampler,
            steps=steps,
            cond=cond,
            seed=seed,
            batch=batch,
            progress=progress,
            device=device,
            callback=_step_callback(callback),
        )

    def _images_only(self, what: str) -> None:
        if self.config.data_kind != "images":
            raise ValueError(f"{self.path} makes {self.config.data_kind}; {what} works on image runs")


def load_upscaler(path) -> DiffusionRun:
    """A super-resolution run (trained with --cond low-res)."""
    run = DiffusionRun.load(path)
    if run.config.super_resolution is None:
        raise ValueError(
            f"{path} is not a super-resolution run (train one with `difflab train NAME --cond low-res --factor K`)"
        )
    return run


def _per_sample(value, n: int, what: str) -> list | None:
    """A value for n samples: None, one value (repeated) or a sequence of one or n values."""
    if value is None:
        return None
    values = [value] if isinstance(value, (str, int)) else list(value)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConditionError(f"give one {what} or one per sample ({n}), not {len(values)}")
    return values


def _step_callback(callback):
    """The samplers' callback(i, t, x_t, prediction) as the run's callback(step, x_t, x0_hat)."""
    if callback is None:
        return None
    return lambda i, t, x, pred: callback(i, x, pred.x0)


# --------------------------------------------------------------------------- training: loss, checks, pictures


def diffusion_loss(cfg: RunConfig):
    """The loss of the config's objective (core/losses.py): the denoising loss, with noise augmentation of low_res
    for super-resolution runs; L_hybrid for a learned variance; the continuous-time bound. The bound's decoder
    is discretized for 8-bit pixels, a density for points and latents."""
    loss = cfg.loss
    decoder = "discretized" if cfg.data_kind == "images" and cfg.latent is None else "gaussian"
    if loss.objective == "hybrid":
        loss = HybridLoss(loss, decoder)
    elif loss.objective == "vlb":
        loss = ContinuousVLBLoss(decoder)
    return loss if cfg.super_resolution is None else NoiseAugmented(loss, cfg.super_resolution.aug_max)


def _check(cfg: RunConfig, net, specs) -> None:
    for spec in specs:  # the U-Net's null class is its extra embedding row, index num_classes
        if spec.name == "class_labels" and cfg.net_kind == "unet" and spec.null_label != cfg.net.num_classes:
            raise CheckpointError(
                f"config: class_labels' null_label {spec.null_label} must be the network's num_classes "
                f"({cfg.net.num_classes})"
            )
    try:
        check_accepted(
            condition_names(specs), getattr(net, "accepts", frozenset()), f"the {cfg.net_kind} of this config"
        )
    except ConditionError as e:
        raise CheckpointError(f"config: {e}") from None


def preview(ema: Denoiser, step: int, run: Path, cfg: RunConfig) -> None:
    """The pictures of a training run (rank 0, at sample_every steps and at the end): RUN/samples.png and loss.png.

    2-D: 2000 DDIM samples; images: 64 samples, or a row of 8 per class, or for a text run the first 16
    training captions each under its sample, or for super-resolution per test image its input, the upscaling and
    the truth."""
    model = DiffusionRun(run, cfg, ema.net)
    if cfg.super_resolution is not None:
        test = load_split(cfg, "test").images[:16]
        k = cfg.super_resolution.factor
        low = low_res_of(test, k)
        x = generate(
            model.denoiser, cfg.shape, len(test), sampler="dpmpp-2m", steps=20, cond={"low_res": low}, batch=len(test)
        )
        shown = torch.nn.functional.interpolate(low, scale_factor=k, mode="nearest")
        plots.save_grid(
            torch.stack([to_uint8(shown), to_uint8(x), test], dim=1).reshape(-1, *test.shape[1:]),
            run / "samples.png",
            nrow=6,
        )
    else:
        sample_pictures(model, run / "samples.png", f"DDIM, 50 steps, step {step}", sampler="ddim", steps=50)
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


def sample_pictures(model: DiffusionRun, out: Path, title: str, **points) -> None:
    """``out``: 2000 points (sampled with ``points``, e.g. sampler and steps) over the data, or 64 images, or a row
    of 8 per class, or the first 16 training captions each under its sample (the run's own sampler)."""
    cfg = model.config
    if cfg.data_kind == "points":
        plots.scatter(
            model.sample(2000, batch=2000, **points),
            out,
            title=title,
            reference=make_toy(cfg.dataset, 2000, seed=12345),
        )
    elif cfg.text is not None:
        captions = load_split(cfg, "train").captions[:16]
        plots.captioned_grid(to_uint8(model.sample(len(captions), prompt=captions, batch=16)), captions, out)
    else:
        K = cfg.num_classes
        labels = None if K is None else [k for k in range(K) for _ in range(8)]
        x = model.sample(len(labels) if labels else 64, class_label=labels, batch=len(labels) if labels else 64)
        plots.save_grid(to_uint8(x), out, nrow=8 if labels else None)


NETS = {"mlp": (MLPConfig, MLP), "unet": (UNetConfig, UNet)}
DIFFUSION = RunKind(
    "diffusion",
    "a denoiser run",
    NETS,
    diffusion_loss,
    DiffusionRun,
    "train",
    use="sample it with `difflab sample {run}`",
    check=_check,
)
