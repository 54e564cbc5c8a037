"""A run's config: every dataclass needed to rebuild its network, sample from it and continue its training,
saved as ``RUN/config.json`` and validated field by field when read.

    RunConfig
      dataset, data (DataSpec)              what it trains on
      run_kind                              which entry of the kinds table (runs/kinds.py) it is
      process (Process)                     the forward process (core/processes.py)
      net_kind, net                         the network: net is the kind's config dataclass for net_kind
                                            (UNetConfig, MLPConfig, ClassifierConfig, AutoencoderConfig, ...)
      shape                                 the shape it works in
      data_kind                             what a sample is: 'points' or 'images'
      target, loss, train (TrainConfig)     how it trains: loss is the kind's loss dataclass (SimpleLoss, ...)
      variance                              'fixed', or 'learned': the network also gives the reverse variance
      conditions (list[ConditionSpec])      the conditions its network takes
      super_resolution, latent, text, lora, personalize, distill    typed records of the variants, None when absent

The objects are the config; JSON is only their serialised form (``to_dict`` / ``from_dict``): the process as
``process_to_dict`` writes it (its fields and a ``kind`` key), the network and the loss as their fields, the
conditions as ConditionSpec.to_dict. Every problem is a one-line ``CheckpointError`` naming the field: an
unknown field, a wrong type or choice, an unknown process, network or run kind. Configs written before the
typed records existed (the variants as keys of a ``data`` dict, ``kind`` for the data kind) are read and
converted (``_upgraded``)."""

from __future__ import annotations

import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Literal, get_args

from torch import nn

from ..core.conditions import ConditionError, ConditionSpec, check_accepted, condition_names
from ..core.losses import AutoencoderLoss, ClassifierLoss, ContrastiveLoss, SimpleLoss
from ..core.parameterize import TARGETS, Denoiser, Target, WithSchedule
from ..core.processes import PROCESSES_BY_NAME as PROCESSES
from ..core.processes import DiscreteDDPM, Process, has_parameters, process_name
from ..data.augment import AUGMENT_DIMS, edm_refusal, flip_refusal
from ..data.pairs import CAPTION_WORDS, MAX_CAPTION_VARIANTS
from ..io import atomic_path
from ..nets.autoencoder import AutoencoderConfig
from ..nets.classifier import ClassifierConfig
from ..nets.clip import ClipConfig
from ..nets.features import FeatureNetConfig
from ..nets.lora import LoraSpec, with_lora
from ..nets.mlp import MLPConfig
from ..nets.text import words
from ..nets.unet import UNetConfig
from .kinds import RunKind, RunKindError, kind_named
from .shipped import locate

CONFIG = "config.json"
DataKind = Literal["points", "images"]  # what a sample is: a point of the plane or an image
DATA_KINDS: tuple[DataKind, ...] = get_args(DataKind)
Precision = Literal["fp32", "bf16", "fp16", "auto"]  # float32, bf16 autocast, fp16 with a scaler, bf16 where native
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
Augment = Literal["none", "flip", "edm", "edm-geometric"]  # training-time augmentation of image data (data/augment.py)
AUGMENTS: tuple[Augment, ...] = get_args(Augment)
LRSchedule = Literal["constant", "cosine"]  # the learning rate after the warm-up: held, or half a cosine down to 0
LR_SCHEDULES: tuple[LRSchedule, ...] = get_args(LRSchedule)
Variance = Literal["fixed", "learned"]  # the reverse variance: the process's, or the network's (iDDPM)
RUN_VARIANCES: tuple[Variance, ...] = get_args(Variance)
NetConfig = UNetConfig | MLPConfig | ClassifierConfig | AutoencoderConfig | ClipConfig | FeatureNetConfig
"""A network's config: the built-in kinds' (a kind registered elsewhere may bring its own); which one a run holds
is the kinds table's ``nets[net_kind][0]``."""
LossConfig = SimpleLoss | ClassifierLoss | AutoencoderLoss | ContrastiveLoss
"""A loss's config, the loss itself: the run kind's ``loss_config`` (the feature runs' FeatureLoss and
IdentityLoss live in evaluation/, a registered kind may bring its own)."""
AUG_MAX = 0.2  # super-resolution runs: the largest std of the noise added to low_res in training
TEXT_ENCODERS = ("minilm", "clip", "joint")
PERSONALIZATION_METHODS = ("dreambooth", "lora", "textual-inversion")
# what the prior-preservation term's class images are drawn for: the subject's captions without the identifier, or
# captions of the base's own training data that name the class word (personalize.method.prior_prompts)
PRIOR_PROMPTS = ("subject", "data")
DISTILLATION_METHODS = ("progressive", "consistency")


class CheckpointError(ValueError):
    """A run directory or config that is missing, incomplete, corrupt or invalid."""


def process_to_dict(process: Process) -> dict:
    """The process as config.json holds it: ``kind`` (its name in PROCESSES_BY_NAME) and its fields."""
    return {"kind": process_name(process), **{f.name: getattr(process, f.name) for f in fields(process) if f.init}}


def process_from_dict(d: dict) -> Process:
    if not isinstance(d, dict):
        raise CheckpointError(f"process must be an object, got {type(d).__name__}")
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in PROCESSES:
        raise CheckpointError(f"unknown process kind {kind!r}; choose one of {', '.join(PROCESSES)}")
    try:
        return PROCESSES[kind](**d)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"process {kind!r}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- the records


@dataclass
class TrainConfig:
    """How a run trains. The global batch is batch_size x world size x accumulation: batch_size is per
    process and per micro-batch.

    Args:
        lr_schedule (`LRSchedule`, defaults to `"constant"`): the learning rate after the warm-up: `"constant"`
            holds lr, `"cosine"` decays it along half a cosine to 0 at the last step.
        precision (`Precision`, defaults to `"fp32"`): `"fp32"`, `"bf16"` (autocast on CPU and CUDA),
            `"fp16"` (CUDA, with a gradient scaler) or `"auto"`: bf16 where the device computes it natively (a GPU
            with bf16, a CPU with AVX-512 or AMX), else fp32 (training.loop.resolve_precision).
        ema_decay (`float`, defaults to 0.995): 0, the EMA is the network itself.
        ema_warmup (`bool`, defaults to `False`): True, decay min(ema_decay, (1 + step) / (10 + step)), see
            training.loop.ema_decay_at."""

    steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    warmup: int = 100
    lr_schedule: LRSchedule = "constant"
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0: no clipping
    accumulation: int = 1
    ema_decay: float = 0.995
    ema_warmup: bool = False
    precision: Precision = "fp32"
    seed: int = 0
    checkpoint_every: int = 1000
    sample_every: int = 0  # 0: only at the end
    log_every: int = 50
    eval_every: int = 0  # FD/KID and the memorisation distance every N steps, the best kept as RUN/best (0: never)
    augment: Augment = (
        "none"  # "flip": mirrored left-right with probability 1/2; "edm", "edm-geometric": EDM's non-leaking transforms
    )
    caption_variants: int = 0  # a fashion-pairs text run: each image also seen with this many rephrased captions
    caption_words: str = "dataset"  # the variants' colour and item words: "dataset" or "synonyms" (data.pairs)


@dataclass
class FeaturesRecord:
    """The feature net a run is measured with (``difflab train --eval-every`` / ``--features``; ``difflab eval``
    reads with it by default): a built-in name ('digits', 'random', ...) or the absolute path of a .safetensors,
    its weights' fingerprint (a changed net is refused), and --eval-every's samples."""

    net: str
    fingerprint: str
    eval_n: int = 256


@dataclass
class DataSpec:
    """Where the examples come from, beyond the dataset's name."""

    n: int | None = None  # 2-D sets: training points; fashion-pairs (a features run): training pairs made
    seed: int | None = None  # 2-D sets: their draw
    data_dir: str | None = None  # the folder holding a named dataset's files (Fashion-MNIST's IDX files)
    size: int | None = None  # a folder of images: resized to size x size
    channels: int | None = None  # a folder of images: 1 grey or 3 RGB


@dataclass
class SuperResolution:
    """p(x | its images downsampled ``factor`` times) (SR3), with noise conditioning augmentation up to aug_max."""

    factor: int
    aug_max: float = AUG_MAX


@dataclass
class LatentRecord:
    """The autoencoder a latent run works in: its path, fingerprint (weights and latent.json), scale and shapes."""

    autoencoder: str
    hash: str
    scale: float
    factor: int
    image_shape: list[int]


@dataclass
class TextRecord:
    """The text encoder a text run reads captions through.

    kind        'minilm' (pretrained, frozen), 'clip' (a train-clip run's text tower, frozen) or 'joint'
                (a text transformer inside the network, UNetConfig.text)
    package, sha256         minilm: the package and the SHA-256 of its weights
    run, fingerprint        clip: the CLIP run and its weights' fingerprint
    max_tokens              frozen encoders: the longest training caption, in tokens (what captions were
                            padded to in training; a longer prompt is encoded to its own length)"""

    kind: str
    package: str | None = None
    sha256: str | None = None
    run: str | None = None
    fingerprint: str | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        if self.kind not in TEXT_ENCODERS:
            raise CheckpointError(f"config: text.kind must be one of {TEXT_ENCODERS}, got {self.kind!r}")

    def encoder_record(self) -> dict:
        """The encoder's identity (what a frozen encoder's ``record()`` gives), without the run's lengths."""
        return {k: v for k, v in asdict(self).items() if v is not None and k != "max_tokens"}


@dataclass
class Personalization:
    """What ``difflab personalize`` was asked for (the personalised run's record)."""

    method: str
    class_word: str
    token: str = "sks"
    prior_weight: float = 1.0  # lambda; 0: no prior preservation
    class_images: int = 64  # class samples drawn once by the base model
    class_guidance: float = (
        1.0  # their guidance scale: 1, the model's own conditional law, which is what the term preserves
    )
    prior_prompts: str = "subject"  # PRIOR_PROMPTS; a run saved before it existed drew for its subject's captions
    caption_dropout: float | None = None  # the captions' dropout while personalising (None: the base's)
    # textual inversion: new embedding rows for the identifier ("sks" reads as that many tokens); None: the base's
    # default (personalize.method.default_vectors: 8 through a pretrained CLIP tower, 1 in a joint encoder)
    vectors: int | None = None
    captions: list[str] = field(default_factory=list)  # the subject images' captions
    base: str = ""  # the base run (resolved) and its weights' fingerprint
    base_fingerprint: str = ""

    def __post_init__(self):
        if self.method not in PERSONALIZATION_METHODS:
            raise CheckpointError(f"unknown method {self.method!r}; choose one of {', '.join(PERSONALIZATION_METHODS)}")
        if words(self.token) != [self.token]:
            raise CheckpointError(
                f"the identifier must be one lower-case word of letters and digits (e.g. sks), got {self.token!r}"
            )
        if not words(self.class_word):
            raise CheckpointError("give the subject's class word (--class-word, e.g. sneaker)")
        if not self.prior_weight >= 0:
            raise CheckpointError(f"the prior-preservation weight must be >= 0, got {self.prior_weight}")
        if self.class_images <= 0:
            raise CheckpointError(f"--class-images must be positive, got {self.class_images}")
        if self.prior_prompts not in PRIOR_PROMPTS:
            raise CheckpointError(
                f"unknown prior prompts {self.prior_prompts!r}; choose one of {', '.join(PRIOR_PROMPTS)}"
            )
        if self.caption_dropout is not None and not 0 <= self.caption_dropout <= 1:
            raise CheckpointError(f"the caption dropout must lie in [0, 1], got {self.caption_dropout}")
        if self.vectors is not None and (
            not isinstance(self.vectors, int)
            or self.vectors < 1
            or (self.vectors > 1 and self.method != "textual-inversion")
        ):
            raise CheckpointError(
                f"several vectors (--vectors) are for textual inversion; got {self.vectors} for {self.method}"
            )

    @property
    def tokens(self) -> list[str]:
        """The identifier's words in the joint vocabulary: 'sks', or 'sks', 'sks1', ... for several vectors."""
        return [self.token] + [f"{self.token}{i}" for i in range(1, self.vectors or 1)]


@dataclass
class Distillation:
    """What ``difflab distill`` made a student of, and how (the student run's record; distill/student.py).

    teacher, teacher_fingerprint   the run distilled (resolved) and its weights' SHA-256 (a changed teacher is refused)
    method          'progressive' (Salimans & Ho 2022) or 'consistency' (Song et al. 2023)
    teacher_steps   N: progressive, the teacher's DDIM steps the first stage halves; consistency, the levels of
                    the teacher's ODE grid (Karras, capped) the student is made consistent across
    steps_to        K: the steps the student samples in (progressive: N / 2^stages; consistency: its default)
    stages          progressive: [from, to] per stage, [N, N] first for a guided student (Meng et al. 2023's stage one)
    stage           which stage this folder holds (the final student is the last; earlier ones live in stages/)
    guidance_range  [lo, hi]: a guided student takes the scale w as an input, trained for w drawn uniformly there
    solver          consistency: the teacher's ODE step, 'heun' or 'ddim'
    sigma_data      consistency: sigma_data of the boundary parameterisation (1: a v-predicting teacher's own)"""

    method: str
    teacher: str
    teacher_fingerprint: str
    teacher_steps: int
    steps_to: int
    stages: list[list[int]] = field(default_factory=list)
    stage: int = 0
    guidance_range: list[float] | None = None
    solver: str = "heun"
    sigma_data: float = 1.0

    def __post_init__(self):
        if self.method not in DISTILLATION_METHODS:
            raise CheckpointError(
                f"unknown distillation method {self.method!r}; choose one of {', '.join(DISTILLATION_METHODS)}"
            )
        if self.solver not in ("heun", "ddim"):
            raise CheckpointError(f"the consistency teacher's ODE step must be 'heun' or 'ddim', got {self.solver!r}")
        if self.guidance_range is not None:
            lo, hi = (list(self.guidance_range) + [None, None])[:2]
            if (
                len(self.guidance_range) != 2
                or not isinstance(lo, (int, float))
                or not isinstance(hi, (int, float))
                or not 0 <= lo <= hi
            ):
                raise CheckpointError(
                    f"the guidance range must be LO,HI with 0 <= LO <= HI, got {self.guidance_range!r}"
                )
            self.guidance_range = [float(lo), float(hi)]

    @property
    def guided(self) -> bool:
        return self.guidance_range is not None


# --------------------------------------------------------------------------- the run config


@dataclass
class RunConfig:
    """Everything needed to rebuild a trained run, use it and continue its training (see the module doc).

    Args:
        process (`Process`): the forward process (DiscreteDDPM, ContinuousVP, VarianceExploding).
        net_kind (`str`): which of the run kind's networks it holds ('mlp', 'unet', 'classifier', ...).
        net (`NetConfig`): that network's config, the kinds table's ``nets[net_kind][0]`` (e.g. a UNetConfig).
        shape (`list[int]`): the shape of one sample in the space the network works in, e.g. [2], [1, 28, 28]
            or a latent's.
        data_kind (`DataKind`): what a sample is, `"points"` or `"images"` (how it is shown and saved).
        run_kind (`str`, defaults to `"diffusion"`): the entry of the kinds table (runs/kinds.py).
        target (`Target`, defaults to `"eps"`): what the network predicts, `"x0"`, `"eps"`, `"v"` or `"score"`.
        loss (`LossConfig`, defaults to `SimpleLoss()`): the run kind's loss dataclass (its ``loss_config``).
        conditions (`list[ConditionSpec]`, defaults to `[]`): the conditions the network takes, [] for an
            unconditional model.
        variance (`Variance`, defaults to `"fixed"`): `"learned"`, the network's output has twice the channels
            and also gives the reverse step's variance (Nichol & Dhariwal 2021; trained with loss.objective
            'hybrid')."""

    dataset: str
    process: Process
    net_kind: str
    net: NetConfig
    shape: list[int]
    data_kind: DataKind
    run_kind: str = "diffusion"
    target: Target = "eps"
    loss: LossConfig = field(default_factory=SimpleLoss)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataSpec = field(default_factory=DataSpec)
    conditions: list[ConditionSpec] = field(default_factory=list)
    super_resolution: SuperResolution | None = None
    latent: LatentRecord | None = None
    text: TextRecord | None = None
    lora: LoraSpec | None = None
    personalize: Personalization | None = None
    distill: Distillation | None = None
    variance: Variance = "fixed"
    features: FeaturesRecord | None = None

    def __post_init__(self):
        if not isinstance(self.shape, (list, tuple)) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in self.shape
        ):
            raise CheckpointError(f"config: shape must be a list of integers, got {self.shape!r}")
        self.shape = list(self.shape)
        self.conditions = list(self.conditions)

    # ------------------------------------------------------------------ reading and writing

    def to_dict(self) -> dict:
        """The JSON form config.json holds (the layout of every earlier difflab)."""
        typed = {
            "process": process_to_dict(self.process),
            "net": _record_dict(self.net),
            "loss": _record_dict(self.loss),
            "conditions": [c.to_dict() for c in self.conditions],
        }
        d = {f.name: typed[f.name] if f.name in typed else _plain(getattr(self, f.name)) for f in fields(self)}
        if self.variance == "fixed":  # the layout of every earlier difflab
            del d["variance"]
        if self.features is None:
            del d["features"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        """Validate and build; every problem is a one-line CheckpointError naming the field."""
        cfg = _build(cls, _upgraded(d), "config", parsers=_PARSERS)
        cfg.validate()
        return cfg

    # ------------------------------------------------------------------ what it is

    @property
    def kind(self) -> RunKind:
        try:
            return kind_named(self.run_kind)
        except RunKindError as e:
            raise CheckpointError(f"config: {e}") from None

    @property
    def data_shape(self) -> list[int]:
        """The shape of the run's data: its images for a latent run, else the shape it samples."""
        return list(self.latent.image_shape) if self.latent is not None else list(self.shape)

    @property
    def net_config_class(self) -> type:
        """The config dataclass of this run's network: the kinds table's ``nets[net_kind][0]``."""
        kind = self.kind
        if self.net_kind not in kind.nets:
            raise CheckpointError(
                f"config: unknown net_kind {self.net_kind!r} for a {kind.name} run; choose one of "
                f"{', '.join(kind.nets)}"
            )
        return kind.nets[self.net_kind][0]

    def condition_specs(self) -> list[ConditionSpec]:
        """The conditions (a copy of the list)."""
        return list(self.conditions)

    def condition(self, name: str) -> ConditionSpec | None:
        return next((s for s in self.condition_specs() if s.name == name), None)

    @property
    def num_classes(self) -> int | None:
        """The classes a class-conditional run takes (None when it takes none)."""
        spec = self.condition("class_labels")
        return None if spec is None else spec.null_label

    def text_spec(self) -> ConditionSpec | None:
        """The run's text condition (``context`` or ``tokens``), or None when it reads no text."""
        return next((s for s in self.condition_specs() if s.name in ("context", "tokens")), None)

    @property
    def inverts_through_tower(self) -> bool:
        """Textual inversion on a CLIP-conditioned run: its network reads the captions' ids through the CLIP's
        pretrained tower, the identifier's new ids reading the learned rows (personalize/tower.py)."""
        p = self.personalize
        return p is not None and p.method == "textual-inversion" and self.text is not None and self.text.kind == "clip"

    # ------------------------------------------------------------------ building

    def build_process(self) -> Process:
        return self.process

    def build_net(self) -> nn.Module:
        """The network (with its LoRA adapters for a LoRA run; inside what its run kind wraps it in, ``wrap``;
        beside a learned schedule's network for a run whose process has one: ``WithSchedule``)."""
        config_cls = self.net_config_class
        _, net_cls = self.kind.nets[self.net_kind]
        if type(self.net) is not config_cls:
            raise CheckpointError(
                f"config: net must be a {config_cls.__name__} for net_kind {self.net_kind!r}, got "
                f"{type(self.net).__name__}"
            )
        try:
            net = net_cls(self.net)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config: net: {str(e).splitlines()[0]}") from None
        net = with_lora(net, self.lora) if self.lora is not None else net
        if self.kind.wrap is not None:
            net = self.kind.wrap(self, net)
        if has_parameters(self.process):
            net = WithSchedule(net, self.process.fresh_gamma())
        return net

    def build_loss(self):
        return self.kind.loss(self)

    def build_denoiser(self) -> Denoiser:
        return self.denoiser_for(self.build_net())

    def denoiser_for(self, net: nn.Module) -> Denoiser:
        """The Denoiser of ``net`` (built by build_net, weights loaded or not): for a learned schedule, a process
        that reads the schedule network inside ``net``."""
        process = self.build_process()
        if has_parameters(process):
            process = process.bound_to(getattr(net, "module", net).schedule)
        return Denoiser(net, process, self.target, learned_variance=self.variance == "learned")

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        if self.data_kind not in DATA_KINDS:
            raise CheckpointError(f"config: data_kind must be one of {DATA_KINDS}, got {self.data_kind!r}")
        if not self.shape or any(s <= 0 for s in self.shape):
            raise CheckpointError(f"config: shape must be positive sizes, got {self.shape}")
        if self.target not in TARGETS:
            raise CheckpointError(f"config: unknown target {self.target!r}; choose one of {TARGETS}")
        kind = self.kind
        t = self.train
        for name in ("steps", "batch_size", "accumulation", "checkpoint_every", "log_every"):
            if getattr(t, name) <= 0:
                raise CheckpointError(f"config: train.{name} must be positive, got {getattr(t, name)}")
        if t.eval_every < 0:
            raise CheckpointError(f"config: train.eval_every must be 0 (never) or positive, got {t.eval_every}")
        if t.augment == "flip":
            refusal = flip_refusal(self.dataset, self.data_kind, self.latent is not None)
            if refusal:
                raise CheckpointError(f"config: {refusal}")
        if t.augment in AUGMENT_DIMS:
            refusal = edm_refusal(
                self.dataset, self.data_kind, self.latent is not None, self.super_resolution is not None, t.augment
            )
            if refusal:
                raise CheckpointError(f"config: {refusal}")
            if getattr(self.net, "augment_dim", None) != AUGMENT_DIMS[t.augment]:
                raise CheckpointError(
                    f"config: train.augment {t.augment!r} needs a U-Net that reads its augmentation labels "
                    f"(net.augment_dim {AUGMENT_DIMS[t.augment]}, presets.with_edm_augment)"
                )
        if not isinstance(t.caption_variants, int) or not 0 <= t.caption_variants <= MAX_CAPTION_VARIANTS:
            raise CheckpointError(
                f"config: train.caption_variants must be an integer from 0 to {MAX_CAPTION_VARIANTS}, "
                f"got {t.caption_variants!r}"
            )
        if t.caption_words not in CAPTION_WORDS:
            raise CheckpointError(
                f"config: train.caption_words must be one of {_choices(CAPTION_WORDS)}, got {t.caption_words!r}"
            )
        if t.caption_variants and self.text is None:
            raise CheckpointError("config: train.caption_variants rephrase captions: they need a text run (--text)")
        if t.caption_words != "dataset" and not t.caption_variants:
            raise CheckpointError(
                f"config: train.caption_words {t.caption_words!r} says the caption variants in other words: "
                "they need train.caption_variants"
            )
        if t.sample_every < 0:
            raise CheckpointError(
                f"config: train.sample_every must be 0 (at the end only) or positive, got {t.sample_every}"
            )
        if t.lr_schedule not in LR_SCHEDULES:
            raise CheckpointError(
                f"config: train.lr_schedule must be one of {_choices(LR_SCHEDULES)}, got {t.lr_schedule!r}"
            )
        if t.precision not in PRECISIONS:
            raise CheckpointError(f"config: train.precision must be one of {_choices(PRECISIONS)}, got {t.precision!r}")
        if t.grad_clip < 0 or not 0 <= t.ema_decay <= 1:
            raise CheckpointError(
                f"config: train.grad_clip must be >= 0 and train.ema_decay in [0, 1], got {t.grad_clip}, {t.ema_decay}"
            )
        if not isinstance(self.process, Process):
            raise CheckpointError(
                f"config: process must be a Process (core/processes.py), got {type(self.process).__name__}"
            )
        self._check_likelihood_options()
        if type(self.loss) is not kind.loss_config:
            raise CheckpointError(
                f"config: loss must be a {kind.loss_config.__name__} for a {kind.name} run, got "
                f"{type(self.loss).__name__}"
            )
        specs = self.conditions
        for i, spec in enumerate(specs):
            if not isinstance(spec, ConditionSpec):
                raise CheckpointError(f"config: conditions[{i}] must be a ConditionSpec, got {type(spec).__name__}")
        try:
            self.build_loss()
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config: {str(e).splitlines()[0]}") from None
        net = self.build_net()
        if kind.check is not None:
            kind.check(self, net, specs)
            return
        try:
            check_accepted(
                condition_names(specs), getattr(net, "accepts", frozenset()), f"the {self.net_kind} of this config"
            )
        except ConditionError as e:
            raise CheckpointError(f"config: {e}") from None

    def _check_likelihood_options(self) -> None:
        """A learned variance needs a DiscreteDDPM, twice the output channels and the hybrid loss; the
        continuous-time bound (objective 'vlb') needs a continuous variance-preserving process."""
        objective = getattr(self.loss, "objective", "simple")
        if self.variance not in RUN_VARIANCES:
            raise CheckpointError(f"config: variance must be one of {_choices(RUN_VARIANCES)}, got {self.variance!r}")
        if self.variance == "learned":
            if not isinstance(self.process, DiscreteDDPM):
                raise CheckpointError(
                    f"config: a learned variance interpolates beta and beta_tilde of a DiscreteDDPM, not a "
                    f"{type(self.process).__name__}"
                )
            out = getattr(self.net, "out_ch", None) or getattr(self.net, "out_dim", None)
            if out != 2 * self.shape[0]:
                raise CheckpointError(
                    f"config: a learned variance needs a network with {2 * self.shape[0]} output channels (the "
                    f"prediction and the variance), this one has {out}"
                )
            if objective != "hybrid":
                raise CheckpointError(
                    "config: a learned variance trains with loss.objective 'hybrid' (L_simple + L_vlb)"
                )
        elif objective == "hybrid":
            raise CheckpointError("config: loss.objective 'hybrid' trains a learned variance: set variance 'learned'")
        if objective == "vlb" and (isinstance(self.process, DiscreteDDPM) or not self.process.variance_preserving):
            raise CheckpointError(
                "config: loss.objective 'vlb' is the continuous-time bound of a variance-preserving process in [0, 1] "
                f"(vp or learned), not {process_name(self.process)!r}"
            )
        if has_parameters(self.process) and objective != "vlb":
            raise CheckpointError("config: a learned schedule trains on the bound: set loss.objective 'vlb'")


# --------------------------------------------------------------------------- field-by-field checks


def _build(cls, d, where: str, parsers: dict | None = None):
    """The dataclass ``cls`` from the dict ``d``: unknown fields, missing ones, plainly wrong types and values
    outside a ``Literal``'s choices raise; fields whose type is a dataclass (or one or None) are built the same
    way. ``parsers`` name -> parse(value, fields so far) read the fields whose type depends on others (the net
    of a net_kind), after every other field has been read."""
    if not isinstance(d, dict):
        raise CheckpointError(f"config: {where} must be an object, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise CheckpointError(
            f"config: unknown field{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} in {where} (known: "
            f"{', '.join(known)})"
        )
    missing = [n for n, f in known.items() if n not in d and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        raise CheckpointError(f"config: {where} lacks {', '.join(map(repr, missing))}")
    parsers = parsers or {}
    hints = typing.get_type_hints(cls)
    kw = {}
    for name, value in d.items():
        if name in parsers:
            continue
        hint = hints[name]
        record = _record_type(hint)
        if record is not None and isinstance(value, dict):
            kw[name] = _build(record, value, f"{where}.{name}" if where != "config" else name)
        elif not _type_ok(value, hint):
            raise CheckpointError(f"config: {where}.{name} must be {_type_name(hint)}, got {value!r}")
        else:
            kw[name] = value
    for name, parse in parsers.items():
        if name in d:
            kw[name] = parse(d[name], kw)
    try:
        return cls(**kw)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: {where}: {str(e).splitlines()[0]}") from None


def _record_type(hint):
    """The dataclass of a field typed ``Record`` or ``Record | None``, else None."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    found = [h for h in options if isinstance(h, type) and is_dataclass(h)]
    return found[0] if found else None


def _type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return isinstance(value, str | int | float | bool) and value in get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    base = origin or hint
    if hint is type(None):
        return value is None
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base in (list, tuple):
        return isinstance(value, (list, tuple))
    if isinstance(base, type) and base is not typing.Any:
        return isinstance(value, base)
    return True


def _type_name(hint) -> str:
    """int, list[int], ..., or for a Literal: one of 'a', 'b' (or None)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return f"one of {_choices(get_args(hint))}"
    options = get_args(hint) if origin in (typing.Union, types.UnionType) else ()
    if any(typing.get_origin(h) is Literal for h in options):
        return " or ".join("None" if h is type(None) else _type_name(h) for h in options)
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _choices(values) -> str:
    return ", ".join(map(repr, values))


# --------------------------------------------------------------------------- the typed fields in JSON


def _record_dict(record) -> dict:
    """A network's or loss's config as JSON holds it: its own ``to_dict`` (lists for tuples), else its fields."""
    return record.to_dict() if hasattr(record, "to_dict") else asdict(record)


def _plain(value):
    """Any other field as JSON holds it: a record's fields, a list copied."""
    if is_dataclass(value):
        return asdict(value)
    return list(value) if isinstance(value, list) else value


def _kind_of(kw: dict) -> RunKind:
    try:
        return kind_named(kw.get("run_kind", "diffusion"))
    except RunKindError as e:
        raise CheckpointError(f"config: {e}") from None


def _parse_process(value, kw: dict) -> Process:
    try:
        return process_from_dict(value)
    except CheckpointError as e:
        raise CheckpointError(f"config: {e}") from None


def _parse_net(value, kw: dict):
    """The run kind's network config for net_kind (its own from_dict where it has one, else field by field)."""
    kind, net_kind = _kind_of(kw), kw["net_kind"]
    if net_kind not in kind.nets:
        raise CheckpointError(
            f"config: unknown net_kind {net_kind!r} for a {kind.name} run; choose one of {', '.join(kind.nets)}"
        )
    config_cls = kind.nets[net_kind][0]
    if not hasattr(config_cls, "from_dict"):
        return _build(config_cls, value, "net")
    if not isinstance(value, dict):
        raise CheckpointError(f"config: net must be an object, got {type(value).__name__}")
    try:
        return config_cls.from_dict(value)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config: net: {str(e).splitlines()[0]}") from None


def _parse_loss(value, kw: dict):
    return _build(_kind_of(kw).loss_config, value, "loss")


def _parse_conditions(value, kw: dict) -> list[ConditionSpec]:
    if not isinstance(value, list):
        raise CheckpointError(f"config: conditions must be a list, got {value!r}")
    return [_build(ConditionSpec, c, f"conditions[{i}]") for i, c in enumerate(value)]


_PARSERS = {"process": _parse_process, "net": _parse_net, "loss": _parse_loss, "conditions": _parse_conditions}


def _upgraded(d) -> dict:
    """A config.json of an earlier difflab in today's layout: ``kind`` -> ``data_kind``; the variants kept as
    keys of ``data`` ('factor'/'aug_max', 'latent', 'text', 'lora', 'personalize') -> their typed records;
    ``run_kind`` from the network and the records."""
    if not isinstance(d, dict) or "data_kind" in d:
        return d
    d = dict(d)
    if "kind" in d:
        d["data_kind"] = d.pop("kind")
    data = dict(d.get("data") or {})
    if "factor" in data:
        d["super_resolution"] = {"factor": data.pop("factor"), "aug_max": data.pop("aug_max", AUG_MAX)}
    for key in ("latent", "text", "lora", "personalize"):
        if key in data:
            d[key] = data.pop(key)
    if isinstance(d.get("personalize"), dict):
        d["personalize"] = {k: v for k, v in d["personalize"].items() if k != "lora"}
    d["data"] = data
    net_kind = d.get("net_kind")
    d.setdefault(
        "run_kind",
        "personalized"
        if "personalize" in d
        else {"classifier": "classifier", "autoencoder": "autoencoder", "clip": "clip"}.get(net_kind, "diffusion"),
    )
    return d


# --------------------------------------------------------------------------- the file


def save_config(run_dir: str | Path, config: RunConfig) -> None:
    with atomic_path(Path(run_dir) / CONFIG) as tmp:
        tmp.write_text(config.to_json())


def load_config(run_dir: str | Path) -> RunConfig:
    """The RunConfig of the run folder (or shipped model) ``run_dir``, checked, upgraded from older layouts."""
    run_dir = locate(run_dir)
    path = run_dir / CONFIG
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {run_dir} is not a difflab run (train one with `difflab train`)")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {e})") from None
    try:
        return RunConfig.from_dict(d)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {str(e).removeprefix('config: ')}") from None
