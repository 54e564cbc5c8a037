"""Personalisation: teach a trained text-to-image run one subject from a few captioned images.

The user gives 3 to 5 images of the subject, each with a caption that names it by an identifier, a rare
word such as "sks", next to its class word: "a red sks sneaker on the left and a blue bag on the right".
Three methods, all trained by the one loop (training.train: its loss_fn, trainable filter and init-from):

* ``dreambooth`` (Ruiz et al. 2023): fine-tune every weight of the denoiser (and of the joint text encoder,
  when the run has one) on the subject's captions, with the **prior-preservation loss**

      L = E ||x_hat(x_t, c) - x||^2  +  lambda E ||x_hat(x'_t, c_pr) - x'||^2,

  where x' are class images drawn once by the frozen base model for the same captions without the
  identifier (c_pr: "a red sneaker on the left and ..."), so the plain class word keeps its meaning. Each
  term is the run's own loss (its target and weighting), each with its own times and noise; lambda = 0 is
  plain fine-tuning.
* ``lora`` (Hu et al. 2022): low-rank adapters W + (alpha / r) B A on the attention projections (the
  self-attention qkv/out and the cross-attention q/kv/out), built with peft; only A and B train (B starts
  at zero, so the adapted run starts as the base). ``alpha / r`` is the scale at strength 1; a strength s
  multiplies it (s = 0 is the base model exactly). The adapters are exported as a small safetensors file
  (``adapter.safetensors``) that loads over the base run: ``difflab sample BASE --lora RUN --lora-scale 0.8``.
* ``textual-inversion`` (Gal et al. 2023): learn only a new word embedding for the identifier, initialised
  from the class word's, everything else frozen. It needs an encoder whose embeddings can be extended: the
  joint encoder (a word tokenizer and a text transformer inside the U-Net). MiniLM is a frozen pretrained
  encoder whose states are computed outside the model, and a clip:RUN encoder's tower is frozen outside it
  too: both are refused with that reason.

The identifier. MiniLM reads any word (WordPiece splits "sks" into known pieces), so nothing is added. The
joint encoder's vocabulary is fitted on the training captions, so the identifier is appended to it as a new
row (initialised from the class word) for every method. A clip:RUN encoder would read it as <unk>; such runs
are refused.

A personalised run is a run directory like any other (config.json with the personalisation recorded under
data['personalize'], checkpoints, resume), so ``sample``, ``eval``, guidance and inverse problems take it
as they are; a LoRA run also holds ``adapter.safetensors``.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..runs import store as ckpt
from ..io import atomic_path, cached_tensor
from ..nets.text import TextConfig, words

METHODS = ("dreambooth", "lora", "textual-inversion")
LORA_TARGETS = r".*\.(attn|cross)\.(qkv|q|kv|out)"  # the attention projections of the U-Net's blocks
ADAPTER = "adapter.safetensors"
CLASS_IMAGES = "class_images.safetensors"
SUBJECT = "subject.safetensors"  # the subject images, kept in the run
EMBEDDING = "text.embed.weight"  # the joint encoder's word embeddings
PREVIEW_GUIDANCE = 3.0
DEFAULTS = {"dreambooth": (400, 1e-4), "lora": (400, 1e-3), "textual-inversion": (400, 5e-3)}  # steps, learning rate


class PersonalizeError(ValueError):
    """A personalisation the run or the images cannot support."""


# --------------------------------------------------------------------------- LoRA (through peft)


@dataclass
class LoraSpec:
    """Adapters W + (alpha / rank) B A on the modules whose names match ``targets`` (a regular expression)."""

    rank: int = 4
    alpha: float = 4.0
    targets: str = LORA_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise PersonalizeError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise PersonalizeError(f"LoRA alpha must be positive, got {self.alpha!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(**d)


def with_lora(net: nn.Module, spec: LoraSpec, name: str = "default") -> nn.Module:
    """``net`` with LoRA adapter ``name`` on the modules ``spec.targets`` names (peft; in place)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise PersonalizeError("LoRA needs the peft package: pip install torch==2.13.0 'difflab[personalize]' (or peft)") from None

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.targets, lora_dropout=0.0)
    try:
        with warnings.catch_warnings():  # several adapters on one network are what --lora A --lora B asks for
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            net = inject_adapter_in_model(config, net, adapter_name=name)
    except ValueError as e:
        raise PersonalizeError(f"LoRA: {str(e).splitlines()[0]}") from None
    return net


def lora_layers(net: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in net.modules() if isinstance(m, LoraLayer)]


def set_lora_scale(net: nn.Module, strength: float, name: str = "default") -> None:
    """Adapter ``name`` at ``strength`` (its update is strength * alpha / rank * B A; 0 turns it off)."""
    for layer in lora_layers(net):
        layer.set_scale(name, strength)


def merge_lora(net: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (W <- W + scale B A), in place: the same function
    with no extra cost per call."""
    for layer in lora_layers(net):
        layer.merge()
    return net


def is_lora(name: str) -> bool:
    return ".lora_" in name


# --------------------------------------------------------------------------- the identifier


def class_prompt(caption: str, token: str) -> str:
    """The caption without the identifier: "a red sks sneaker ..." -> "a red sneaker ..."."""
    return " ".join(re.sub(rf"(?i)\b{re.escape(token)}\b", " ", caption).split())


def check_captions(captions: Sequence[str], token: str, class_word: str) -> None:
    for c in captions:
        ws = words(c)
        if token not in ws:
            raise PersonalizeError(f"the caption {c!r} does not name the subject by its identifier {token!r}")
        cw = words(class_word)
        if not any(ws[i : i + len(cw)] == cw for i in range(len(ws))):
            raise PersonalizeError(f"the caption {c!r} does not contain the class word {class_word!r}")


def check_token(token: str) -> None:
    if words(token) != [token]:
        raise PersonalizeError(f"the identifier must be one lower-case word of letters and digits (e.g. sks), got {token!r}")


def with_tokens(cfg: ckpt.RunConfig, tokens: Sequence[str]) -> ckpt.RunConfig:
    """A joint-encoder run with ``tokens`` appended to its vocabulary (new embedding rows)."""
    text = TextConfig.from_dict(cfg.net["text"])
    if len(set(tokens)) < len(tokens):
        raise PersonalizeError(f"two subjects share an identifier ({', '.join(tokens)}); each needs its own word")
    known = [t for t in tokens if t in text.vocabulary]
    if known:
        raise PersonalizeError(f"{known[0]!r} is a word the model already knows; choose a rare identifier (e.g. sks)")
    text = replace(text, vocabulary=text.vocabulary + tuple(tokens))
    return replace(cfg, net={**cfg.net, "text": text.to_dict()})


def with_token_rows(state: dict[str, Tensor], vocabulary: Sequence[str], rows: Tensor) -> dict[str, Tensor]:
    """``state`` with ``rows`` appended to the joint encoder's word embeddings."""
    if state[EMBEDDING].shape[0] != len(vocabulary):
        raise PersonalizeError(f"the weights have {state[EMBEDDING].shape[0]} word embeddings for a vocabulary of {len(vocabulary)}")
    return {**state, EMBEDDING: torch.cat([state[EMBEDDING], rows.to(state[EMBEDDING].dtype)])}


def initial_rows(state: dict[str, Tensor], vocabulary: Sequence[str], init_words: str, count: int) -> Tensor:
    """New embedding rows initialised from the mean of ``init_words``' rows (the class word)."""
    index = {w: i for i, w in enumerate(vocabulary)}
    ids = [index[w] for w in words(init_words) if w in index]
    if not ids:
        raise PersonalizeError(f"the class word {init_words!r} is not in the model's vocabulary")
    return state[EMBEDDING][ids].mean(0, keepdim=True).repeat(count, 1)


# --------------------------------------------------------------------------- the prior-preservation loss


@dataclass
class PriorPreservationLoss:
    """The subject's loss plus ``weight`` (lambda) times the same loss on class samples.

    Per call: the subject batch gets the times and noise of the training step; the class batch (as many
    rows) draws its rows, times and noise from torch's global generator, which the training loop seeds per
    step and rank, so a resumed run draws the same. weight = 0 is the subject's loss alone (no class pass)."""

    loss: object  # the run's loss: loss(model, x0, t=, noise=, cond=) -> scalar
    x: Tensor  # class samples in the model's space (M, ...)
    cond: dict[str, Tensor]  # their conditions (M rows each)
    weight: float = 1.0

    def __call__(self, model, x0: Tensor, *, t: Tensor, noise: Tensor, cond: dict) -> Tensor:
        own = self.loss(model, x0, t=t, noise=noise, cond=cond)
        if self.weight == 0:
            return own
        return own + self.weight * self.prior_term(model, len(x0), x0.device, x0.dtype)

    def prior_term(self, model, n: int, device, dtype) -> Tensor:
        idx = torch.randint(len(self.x), (n,))
        t = model.process.sample_t(n).to(device)
        x = self.x[idx].to(device, dtype)
        noise = torch.randn(x.shape).to(device, dtype)
        return self.loss(model, x, t=t, noise=noise, cond={k: v[idx].to(device) for k, v in self.cond.items()})


# --------------------------------------------------------------------------- a personalised run


@dataclass
class Personalization:
    """What ``difflab personalize`` was asked for (saved in the run's config as data['personalize'])."""

    method: str
    class_word: str
    token: str = "sks"
    prior_weight: float = 1.0  # lambda; 0: no prior preservation
    class_images: int = 64  # class samples drawn once by the base model
    class_guidance: float = 1.0  # their guidance scale: 1, the model's own conditional law, which is what the term preserves
    lora: dict | None = None  # the LoRA spec (lora only; LoraSpec's defaults when None)
    captions: list[str] = field(default_factory=list)  # the subject images' captions
    base: str = ""  # the base run (resolved) and its weights' fingerprint
    base_fingerprint: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise PersonalizeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        check_token(self.token)
        if not words(self.class_word):
            raise PersonalizeError("give the subject's class word (--class-word, e.g. sneaker)")
        if not self.prior_weight >= 0:
            raise PersonalizeError(f"the prior-preservation weight must be >= 0, got {self.prior_weight}")
        if self.method == "textual-inversion" and self.prior_weight:
            self.prior_weight = 0.0  # the class word's rows never change: there is no drift to preserve against
        if self.class_images <= 0:
            raise PersonalizeError(f"--class-images must be positive, got {self.class_images}")
        if self.method == "lora":
            self.lora = LoraSpec.from_dict(self.lora or {}).to_dict()
        elif self.lora is not None:
            raise PersonalizeError("a LoRA spec is for --method lora")

    @property
    def class_prompts(self) -> list[str]:
        return [class_prompt(c, self.token) for c in self.captions]


def check_base(cfg: ckpt.RunConfig, run, method: str, token: str | None = None) -> str:
    """The base run's text encoder kind, after checking that ``method`` can personalise it (and that a joint
    encoder does not know ``token`` already)."""
    if "personalize" in cfg.data or "lora" in cfg.data:
        raise PersonalizeError(f"{run} is itself personalised; personalise its base run {cfg.data.get('personalize', {}).get('base')}")
    rec = cfg.data.get("text")
    if rec is None:
        raise PersonalizeError(f"{run} takes no text: personalisation needs a text-to-image run (difflab train ... --text)")
    kind = rec["kind"]
    if kind == "clip":
        raise PersonalizeError(f"{run} reads text through the frozen CLIP run {rec['run']}, whose vocabulary has no identifier "
                               "(it would read as <unk>); personalise a minilm or joint run")
    if method == "textual-inversion" and kind != "joint":
        raise PersonalizeError(f"textual inversion learns a new word embedding, and {run}'s encoder (MiniLM) is a frozen pretrained "
                               "one computed outside the model; use --method dreambooth or lora, or a joint run")
    if kind == "joint" and token is not None:
        with_tokens(cfg, [token])
    return kind


def personalized_config(base: ckpt.RunConfig, p: Personalization, steps: int, lr: float, batch_size: int) -> ckpt.RunConfig:
    """The run's config: the base's, with the identifier in the joint vocabulary, room for the longer
    captions of a frozen encoder, LoRA adapters for the lora method, and a short fine-tuning schedule."""
    cfg = base
    rec = cfg.data["text"]
    if rec["kind"] == "joint":
        cfg = with_tokens(cfg, [p.token])
    else:
        from ..text.encoders import frozen_encoder

        encoder = frozen_encoder({k: v for k, v in rec.items() if k != "max_tokens"})
        extra = encoder.length([p.token]) - encoder.length([""])  # the identifier's tokens: any training caption with it fits
        length = max(rec["max_tokens"] + extra, encoder.length(p.captions))
        cfg = replace(cfg, data={**cfg.data, "text": {**rec, "max_tokens": length}})
    data = {**cfg.data, "personalize": asdict(p)}
    if p.method == "lora":
        data["lora"] = dict(p.lora)
    train = replace(cfg.train, steps=steps, lr=lr, batch_size=batch_size, accumulation=1, warmup=max(1, min(50, steps // 10)), weight_decay=0.0,
                    ema_decay=0.99, checkpoint_every=max(1, min(100, steps)), sample_every=0, log_every=10)
    return replace(cfg, data=data, train=train)


def initial_state(cfg: ckpt.RunConfig, base_run) -> dict[str, Tensor]:
    """The personalised network's first weights: the base's EMA, the identifier's row from the class word,
    and for LoRA fresh adapters (B = 0: the base function)."""
    p = Personalization(**cfg.data["personalize"])
    state = ckpt.load_weights(base_run, "ema")
    if cfg.net.get("text"):
        vocabulary = TextConfig.from_dict(cfg.net["text"]).vocabulary[:-1]
        state = with_token_rows(state, vocabulary, initial_rows(state, vocabulary, p.class_word, 1))
    if "lora" in cfg.data:
        net = replace(cfg, data={k: v for k, v in cfg.data.items() if k != "lora"}).build_net()
        ckpt.load_into(net, state, base_run)
        torch.manual_seed(cfg.train.seed)  # A's random start, the same on every rank and every run
        state = with_lora(net, LoraSpec.from_dict(cfg.data["lora"])).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def trainable_filter(cfg: ckpt.RunConfig):
    """Which weights train: all (dreambooth), the adapters and the identifier's row (lora), or that row
    alone (textual-inversion)."""
    method = cfg.data["personalize"]["method"]
    if method == "dreambooth":
        return None

    def trainable(name: str, p: nn.Parameter):
        if name == EMBEDDING:
            mask = torch.zeros(p.shape, dtype=torch.bool)
            mask[-1] = True  # the identifier's row (appended last)
            return mask
        return method == "lora" and is_lora(name)

    return trainable


def class_samples(base_run, base: ckpt.RunConfig, prompts: Sequence[str], n: int, scale: float, cache: Path,
                  progress: bool = True, seed: int = 0) -> Tensor:
    """n samples of the frozen base model in its own space for ``prompts`` (cycled), guided at ``scale``;
    drawn once and cached in ``cache`` (keyed by the base weights, the prompts, n, scale and seed)."""
    from ..sampling.generate import generate, identity
    from ..guidance.config import GuidanceConfig, guided
    from ..text.encoders import text_condition

    captions = [prompts[i % len(prompts)] for i in range(n)]
    key = hashlib.sha256(json.dumps([ckpt.weights_fingerprint(base_run), captions, scale, seed]).encode()).hexdigest()[:16]

    def draw() -> Tensor:
        denoiser, _ = ckpt.load_denoiser(base_run)
        denoiser = guided(denoiser, base, GuidanceConfig(scale=scale), str(base_run))
        return generate(denoiser, base, n, sampler="dpmpp-2m", steps=20, cond=text_condition(base, captions), seed=seed, batch=64,
                        progress=progress, decode=identity)

    return cached_tensor(cache, {"key": key}, draw)


def read_subject(folder, shape, token: str, class_word: str) -> tuple[Tensor, list[str]]:
    """The subject's images (uint8, each exactly ``shape``) and captions from ``folder`` (metadata.jsonl;
    without one, every image is captioned "a TOKEN CLASS")."""
    from ..data.images import read_captioned_folder

    images, captions = read_captioned_folder(folder, shape, "subject image")
    captions = captions or [f"a {token} {class_word}"] * len(images)
    check_captions(captions, token, class_word)
    return images, captions


def personalize(base_run, folder, out, p: Personalization | None, *, steps: int | None = None, lr: float | None = None,
                batch_size: int = 8, resume: bool = False, device="auto", progress: bool = True, max_minutes: float | None = None,
                stop_after: int | None = None):
    """Personalise ``base_run`` on the subject images in ``folder`` into the run ``out``, or continue the run
    ``out`` (``resume``: its base, images and settings are in it); returns the EMA denoiser. A LoRA run's
    adapters are exported when it finishes. Under torchrun every rank draws the same class images (they are
    deterministic) and rank 0 alone writes files."""
    import os

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from ..latent.space import data_shape, to_model_space
    from ..data.images import to_model
    from ..data.loader import TensorDataset
    from ..training.distributed import launched_rank
    from ..text.encoders import text_condition
    from ..training.loop import train

    out, main = Path(out), launched_rank() == 0
    if resume:
        cfg = ckpt.load_config(out)
        if "personalize" not in cfg.data:
            raise PersonalizeError(f"{out} is not a personalised run (start one with `difflab personalize BASE --images DIR ...`)")
        p = Personalization(**cfg.data["personalize"])
        base_run = p.base
        if ckpt.weights_fingerprint(base_run) != p.base_fingerprint:
            raise PersonalizeError(f"the base run {base_run} changed since {out} started (fingerprint differs); start over")
        base = ckpt.load_config(base_run)
        try:
            images = load_file(str(out / SUBJECT))["images"]
        except (SafetensorError, OSError, KeyError) as e:
            raise PersonalizeError(f"{out / SUBJECT} is missing or corrupt ({type(e).__name__}); start the run over") from None
    else:
        base = ckpt.load_config(base_run)
        check_base(base, base_run, p.method, p.token)
        images, captions = read_subject(folder, tuple(data_shape(base)), p.token, p.class_word)
        p = replace(p, captions=captions, base=str(Path(base_run).resolve()), base_fingerprint=ckpt.weights_fingerprint(base_run))
        s, l = DEFAULTS[p.method]
        cfg = personalized_config(base, p, steps or s, lr or l, batch_size)
        if main:
            if (out / ckpt.CONFIG).exists():  # --force: nothing of the old run may meet the new subject
                ckpt.clear_checkpoints(out)
                (out / ckpt.CONFIG).unlink()
            with atomic_path(out / SUBJECT) as tmp:  # the run keeps its subject: resume needs nothing else
                save_file({"images": images.contiguous()}, str(tmp))
    with torch.no_grad():
        x = to_model_space(cfg, to_model(images))
    rows = cfg.train.batch_size * int(os.environ.get("WORLD_SIZE", "1"))  # one global batch (accumulation is 1)
    repeat = -(-rows // len(x))  # tile the few images to fill it
    cond = text_condition(cfg, p.captions)
    data = TensorDataset(x.repeat(repeat, *[1] * (x.ndim - 1)), {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in cond.items()})
    loss = cfg.build_loss()
    if p.prior_weight:
        xc = class_samples(base_run, base, p.class_prompts, p.class_images, p.class_guidance, out / CLASS_IMAGES, progress and main)
        prompts = [p.class_prompts[i % len(p.captions)] for i in range(len(xc))]
        loss = PriorPreservationLoss(loss, xc, text_condition(cfg, prompts), p.prior_weight)
    ema = train(out, cfg, data, device=device, resume=resume, progress=progress, loss_fn=loss, trainable=trainable_filter(cfg),
                init_from=None if resume else initial_state(cfg, base_run), max_minutes=max_minutes, stop_after=stop_after,
                preview=_preview, command="personalize")
    if main and "lora" in cfg.data and ckpt.weights_step(out) >= cfg.train.steps:
        export_adapter(out)
    return ema


def _preview(denoiser, step: int, run: Path) -> None:
    """samples.png: each subject caption and its class prompt, two samples each, guided at PREVIEW_GUIDANCE."""
    from ..viz import plots
    from ..data.images import to_uint8
    from ..sampling.generate import generate
    from ..guidance.config import GuidanceConfig, guided
    from ..text.encoders import text_condition

    cfg = ckpt.load_config(run)
    p = Personalization(**cfg.data["personalize"])
    captions = [c for pair in zip(p.captions, p.class_prompts) for c in pair for _ in range(2)][:16]
    g = guided(denoiser, cfg, GuidanceConfig(scale=PREVIEW_GUIDANCE), str(run))
    x = generate(g, cfg, len(captions), sampler="dpmpp-2m", steps=20, cond=text_condition(cfg, captions), batch=16)
    plots.captioned_grid(to_uint8(x), captions, run / "samples.png")
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


# --------------------------------------------------------------------------- adapters over a base run


def export_adapter(run) -> Path:
    """Write RUN/adapter.safetensors: the EMA adapter weights (and the identifier's embedding row for a
    joint run), with the LoRA spec, the identifier and the base run's fingerprint in its metadata."""
    from safetensors.torch import save_file

    run = Path(run)
    cfg = ckpt.load_config(run)
    state = ckpt.load_weights(run, "ema")
    tensors = {k: v.contiguous() for k, v in state.items() if is_lora(k)}
    p = cfg.data["personalize"]
    tokens = [p["token"]] if cfg.net.get("text") else []
    if tokens:
        tensors["token_rows"] = state[EMBEDDING][-len(tokens):].contiguous()
    meta = {"lora": json.dumps(cfg.data["lora"]), "tokens": json.dumps(tokens), "base": p["base"], "base_fingerprint": p["base_fingerprint"],
            "max_tokens": str(cfg.data["text"].get("max_tokens", 0))}
    with atomic_path(run / ADAPTER) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return run / ADAPTER


def read_adapter(run) -> tuple[dict[str, Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(run) / ADAPTER
    if not path.is_file():
        raise PersonalizeError(f"{run} holds no {ADAPTER} (a finished `difflab personalize --method lora` run writes one)")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
        meta = {"lora": LoraSpec.from_dict(json.loads(meta["lora"])), "tokens": json.loads(meta["tokens"]),
                "base": meta["base"], "base_fingerprint": meta["base_fingerprint"], "max_tokens": int(meta["max_tokens"])}
        if len(meta["tokens"]) != (len(tensors["token_rows"]) if "token_rows" in tensors else 0):
            raise ValueError("its identifiers and embedding rows do not match")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise PersonalizeError(f"{path} is missing or corrupt ({type(e).__name__}: {e})") from None
    return tensors, meta


def with_adapters(denoiser, cfg: ckpt.RunConfig, base_run, adapters: Sequence[tuple[str, float]]):
    """The base run's denoiser with the LoRA adapters of ``adapters`` ((run, strength), ...) added and all
    active (their updates add up); each is checked to have been trained over these very weights. Returns
    (denoiser, config): a joint run's config gains the adapters' identifiers."""
    from ..core.parameterize import Denoiser

    if "lora" in cfg.data:
        raise PersonalizeError(f"{base_run} is itself a LoRA run; load its adapters over its base run {cfg.data['personalize']['base']}")
    fingerprint = ckpt.weights_fingerprint(base_run)
    loaded = []
    for run, strength in adapters:
        tensors, meta = read_adapter(run)
        if meta["base_fingerprint"] != fingerprint:
            raise PersonalizeError(f"the adapter {run} was trained over {meta['base']} (fingerprint {meta['base_fingerprint']}); "
                                   f"{base_run} has other weights ({fingerprint})")
        loaded.append((run, strength, tensors, meta))
    net = denoiser.net
    if "max_tokens" in cfg.data.get("text", {}):  # a frozen encoder: room for the identifiers' tokens
        longest = max([cfg.data["text"]["max_tokens"], *(meta["max_tokens"] for *_, meta in loaded)])
        cfg = replace(cfg, data={**cfg.data, "text": {**cfg.data["text"], "max_tokens": longest}})
    tokens = [t for *_, meta in loaded for t in meta["tokens"]]
    if tokens:
        if not cfg.net.get("text"):
            raise PersonalizeError("the adapters carry word embeddings for a joint encoder, and the base run has none")
        vocabulary = TextConfig.from_dict(cfg.net["text"]).vocabulary
        rows = torch.cat([tensors["token_rows"] for _, _, tensors, meta in loaded if meta["tokens"]])
        state = with_token_rows(net.state_dict(), vocabulary, rows)
        cfg = with_tokens(cfg, tokens)
        net = cfg.build_net()
        ckpt.load_into(net, state, base_run)
    names = []
    for i, (run, strength, tensors, meta) in enumerate(loaded):
        name = f"adapter{i}"
        net = with_lora(net, meta["lora"], name)
        state = {k.replace(".default.", f".{name}."): v for k, v in tensors.items() if is_lora(k)}
        missing = [k for k, v in net.state_dict().items() if f".{name}." in k and k not in state]
        if missing:
            raise PersonalizeError(f"the adapter {run} does not fit this network (no weights for {missing[0]})")
        try:
            net.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise PersonalizeError(f"the adapter {run} does not fit this network ({str(e).strip().splitlines()[-1].strip()})") from None
        set_lora_scale(net, strength, name)
        names.append(name)
    for layer in lora_layers(net):
        layer.set_adapter(names)
    return Denoiser(net, denoiser.process, denoiser.target).eval().requires_grad_(False), cfg


# --------------------------------------------------------------------------- measuring it (fashion-pairs subjects)


@torch.no_grad()
def subject_similarity(net, images: Tensor, sides: Tensor, references: Tensor, center: Tensor | None = None) -> Tensor:
    """cos(f(subject half of image i) - center, f(reference i) - center) in the feature network ``net``'s
    features (N,), where f reads a half placed on its side of a black 32x64 canvas (so the other half does
    not count); ``images`` uint8 (N, 3, 32, 64), ``references`` uint8 (N, 3, 32, 32) halves, ``sides`` (N,)
    0 left / 1 right. ``center`` (feature_center) removes what every item shares: the attribute network's
    features are non-negative, and uncentred any two sneakers of one tint sit at cosine 0.99."""
    import torch.nn.functional as F

    from ..data.pairs import half, place
    from ..evaluation.features import embed

    a, _ = embed(net, place(half(images, sides), sides))
    b, _ = embed(net, place(references, sides))
    if center is not None:
        a, b = a - center, b - center
    return F.cosine_similarity(a, b, dim=1)


@torch.no_grad()
def feature_center(net, n: int = 2000, seed: int = 0) -> Tensor:
    """The mean feature of n real test-split Fashion-MNIST items, each in a random tint on a random side."""
    from ..data.images import load_images
    from ..data.pairs import RGB, place, tint
    from ..evaluation.features import embed

    items = load_images("fashion-mnist", split="test")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(items.images), generator=g)[:n]
    colours = RGB[torch.randint(len(RGB), (len(idx),), generator=g).numpy()]
    halves = torch.from_numpy(tint(items.images[idx, 0].numpy(), colours))
    return embed(net, place(halves, torch.randint(2, (len(idx),), generator=g)))[0].mean(0)


def shape_similarity(images: Tensor, sides: Tensor, references: Tensor) -> Tensor:
    """The Pearson correlation, over the 32x32 pixels, between the luminance of each image's ``sides`` half
    and of its reference (N,): the item's shape, blind to its tint (a tint scales the luminance) and to the
    other half. uint8 ``images`` (N, 3, 32, 64), ``references`` (N, 3, 32, 32)."""
    from ..data.pairs import half

    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def centred(x):
        lum = (x.double() * weights).sum(1).flatten(1)  # (N, 1024)
        lum = lum - lum.mean(1, keepdim=True)
        return lum / lum.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return (centred(half(images, sides)) * centred(references)).sum(1).float()
