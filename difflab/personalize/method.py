"""Personalisation: teach a trained text-to-image run one subject from a few captioned images.

The user gives 3 to 5 images of the subject, each with a caption that names it by an identifier, a rare
word such as "sks", next to its class word: "a red sks sneaker on the left and a blue bag on the right".
Three methods, all trained by the one loop (training.loop.train: its loss_fn, trainable filter and init-from):

* ``dreambooth`` (Ruiz et al. 2023): fine-tune every weight of the denoiser (and of the joint text encoder,
  when the run has one) on the subject's captions, with the prior-preservation loss (personalize/prior.py).
* ``lora`` (Hu et al. 2022): low-rank adapters W + (alpha / r) B A on the attention projections (the
  self-attention qkv/out and the cross-attention q/kv/out; nets/lora.py), with the same loss; only A and B train
  (B starts at zero, so the adapted run starts as the base). ``alpha / r`` is the scale at strength 1; a strength
  s multiplies it (s = 0 is the base model exactly). The adapters are exported as a small file
  (personalize/adapters.py) that loads over the base run: ``difflab sample BASE --lora RUN --lora-scale 0.8``.
* ``textual-inversion`` (Gal et al. 2023): learn only new word embeddings for the identifier (one, or
  ``vectors`` of them), initialised from the class word's, everything else frozen. It needs an encoder whose
  embeddings can be extended and whose states a gradient can pass through: the joint encoder (a word tokenizer
  and a text transformer inside the U-Net), or a clip:RUN encoder with a pretrained tower, which the personalised
  run takes inside its network (personalize/tower.py: the identifier's words are new WordPiece ids whose input
  embeddings are the learned rows). MiniLM alone (``--text minilm``) is refused: its states are computed outside
  the model and it has no tuned tower of the run's to carry.

The identifier (personalize/identifier.py): MiniLM reads any word, and so does a clip:RUN encoder whose text tower
is pretrained (``train-clip --init minilm``: WordPiece); the joint encoder's vocabulary gains it as new rows. A
clip:RUN encoder on a word tower would read it as <unk>; such runs are refused.

A personalised run is a run directory like any other (its config records the personalisation; the run kind
``personalized`` loads as a DiffusionRun), so ``sample``, ``eval``, guidance and inverse problems take it as
they are; a LoRA run also holds ``adapter.safetensors``. While personalising, the captions are dropped with
``caption_dropout`` (default: the base's own rate), which trains the null prediction as well.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..core.conditions import ConditionSpec
from ..core.processes import has_parameters
from ..data.images import read_captioned_folder, to_model, to_uint8
from ..data.loader import TensorDataset
from ..guidance.config import GuidanceConfig
from ..io import atomic_path
from ..nets.lora import LoraSpec, is_lora, with_lora
from ..runs.config import CONFIG, Personalization, RunConfig, load_config
from ..runs.data import load_split
from ..runs.diffusion import NETS, DiffusionRun, _check, diffusion_loss
from ..runs.kinds import RunKind
from ..runs.shipped import SHIPPED_DIR, from_record, recorded_path, refuse_writes
from ..runs.shipped import names as shipped_names
from ..runs.store import clear_checkpoints, load_into, load_weights, weights_fingerprint, weights_step
from ..text.encoders import reads_any_word, text_condition
from ..training.distributed import launched_rank
from ..training.loop import train
from ..viz import plots
from .adapters import export_adapter
from .identifier import (
    EMBEDDING,
    PersonalizeError,
    check_captions,
    class_prompt,
    initial_rows,
    says,
    with_token_rows,
    with_tokens,
)
from .prior import PriorPreservationLoss, class_samples
from .tower import ROWS, wrap_net

METHODS = ("dreambooth", "lora", "textual-inversion")
CLASS_IMAGES = "class_images.safetensors"
SUBJECT = "subject.safetensors"  # the subject images, kept in the run
PREVIEW_GUIDANCE = 3.0
DEFAULTS = {
    "dreambooth": (700, 1.5e-4),
    "lora": (400, 1e-3),
    "textual-inversion": (400, 5e-3),
}  # steps, learning rate (benchmarks/README.md, issues 24 and 32: DreamBooth 700 steps, G 0.91 against 0.85 at 600)
# textual inversion through a pretrained tower: on the flagship's first stage G 0.51 with four against 0.27 with one;
# on its second, 0.43 with eight against 0.34 with four (benchmarks/README.md)
TOWER_VECTORS = 8


def default_vectors(base: RunConfig, method: str) -> int:
    """Textual inversion's vectors when none are asked for: ``TOWER_VECTORS`` through a CLIP's pretrained tower
    (WordPiece captions have room), one in a joint encoder (its captions' length is fixed at training)."""
    text = base.text
    return TOWER_VECTORS if method == "textual-inversion" and text is not None and text.kind == "clip" else 1


def class_prompts(p: Personalization) -> list[str]:
    """The subject's captions without the identifier."""
    return [class_prompt(c, p.token) for c in p.captions]


def prior_prompts(p: Personalization, base: RunConfig) -> list[str]:
    """The captions the prior-preservation term keeps the base's images for (``p.prior_prompts``):

    * ``subject``: the subject's captions without the identifier (DreamBooth's class prompt), cycled;
    * ``data``: ``p.class_images`` captions of the base's own training split that name the class word (and not the
      identifier), drawn without replacement by a fixed seed, so the term keeps the class word's meaning in the
      compositions the base was trained on rather than in the subject's few."""
    if p.prior_prompts == "subject":
        return class_prompts(p)
    every = load_split(base, "train").every_caption() or []
    found = sorted({c for c in every if says(c, p.class_word) and not says(c, p.token)})
    if not found:
        raise PersonalizeError(
            f"no training caption of {base.dataset} says {p.class_word!r}; use --prior-prompts subject"
        )
    order = np.random.default_rng(0).permutation(len(found))
    return [found[order[i % len(found)]] for i in range(p.class_images)]


def check_base(cfg: RunConfig, run, method: str, tokens: Sequence[str] = ()) -> str:
    """The base run's text encoder kind, after checking that ``method`` can personalise it (and that a joint
    encoder does not know ``tokens`` already)."""
    if cfg.personalize is not None or cfg.lora is not None:
        raise PersonalizeError(
            f"{run} is itself personalised; personalise its base run {cfg.personalize.base if cfg.personalize else ''}"
        )
    if cfg.run_kind != "diffusion":
        raise PersonalizeError(f"{run} is {cfg.kind.what}: personalisation needs a text-to-image run")
    if cfg.text is None:
        raise PersonalizeError(
            f"{run} takes no text: personalisation needs a text-to-image run (difflab train ... --text)"
        )
    kind = cfg.text.kind
    if kind == "clip" and not reads_any_word(cfg):
        raise PersonalizeError(
            f"{run} reads text through the frozen CLIP run {cfg.text.run}, whose vocabulary has no identifier "
            "(it would read as <unk>); personalise a minilm or joint run, or one on a CLIP trained with --init minilm"
            + _shipped_alternatives(cfg.dataset)
        )
    if method == "textual-inversion" and kind == "clip" and has_parameters(cfg.process):
        raise PersonalizeError(
            f"{run} has a learned noise schedule; textual inversion through its CLIP's tower is not built for it "
            "(use --method dreambooth or lora)"
        )
    if method == "textual-inversion" and kind == "minilm":
        raise PersonalizeError(
            f"textual inversion learns a new word embedding, and {run}'s encoder (MiniLM) is a frozen one computed "
            "outside the model; use --method dreambooth or lora, a joint run, or a run on a CLIP trained with "
            "--init minilm"
        )
    if kind == "joint" and tokens:
        with_tokens(cfg, tokens)
    return kind


def personalized_config(
    base: RunConfig, p: Personalization, steps: int, lr: float, batch_size: int, lora: LoraSpec | None = None
) -> RunConfig:
    """The run's config: the base's, with the identifier in the joint vocabulary, LoRA adapters for the lora
    method, the personalisation's caption dropout and a short fine-tuning schedule."""
    if p.vectors is None:
        p = replace(p, vectors=default_vectors(base, p.method))
    cfg = replace(with_tokens(base, p.tokens) if base.text.kind == "joint" else base, personalize=p)
    spec = cfg.text_spec()
    if cfg.inverts_through_tower:  # the network reads the ids through the tower
        ids = ConditionSpec("tokens", "tensor", spec.p_drop, companions=("token_mask",))
        cfg = replace(cfg, conditions=[ids if c.name == spec.name else c for c in cfg.conditions])
        spec = ids
    if p.caption_dropout is not None:
        cfg = replace(
            cfg, conditions=[replace(c, p_drop=p.caption_dropout) if c.name == spec.name else c for c in cfg.conditions]
        )
    train_cfg = replace(
        cfg.train,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        accumulation=1,
        warmup=max(1, min(50, steps // 10)),
        weight_decay=0.0,
        lr_schedule="constant",
        ema_decay=0.99,
        ema_warmup=False,
        checkpoint_every=max(1, min(100, steps)),
        sample_every=0,
        log_every=10,
        precision="auto",  # a base trained in bf16 on a GPU may be personalised on a CPU that only emulates it
        caption_variants=0,  # the subject's own captions only (the base's variants are not its data)
        caption_words="dataset",
    )
    return replace(
        cfg,
        run_kind="personalized",
        personalize=p,
        lora=(lora or LoraSpec()) if p.method == "lora" else None,
        train=train_cfg,
    )


def initial_state(cfg: RunConfig, base_run) -> dict[str, Tensor]:
    """The personalised network's first weights: the base's EMA, the identifier's rows from the class word,
    and for LoRA fresh adapters (B = 0: the base function)."""
    p = cfg.personalize
    state = load_weights(base_run, "ema")
    if cfg.inverts_through_tower:  # the base's U-Net behind the tower; the rows start at the class word's
        net = cfg.build_net()
        load_into(net.net, state, base_run)
        with torch.no_grad():
            net.rows.copy_(net.word_rows(p.class_word).expand_as(net.rows))
        return {k: v.detach().clone() for k, v in net.state_dict().items()}
    if cfg.net.text:
        vocabulary = cfg.net.text_config.vocabulary[: -len(p.tokens)]
        state = with_token_rows(state, vocabulary, initial_rows(state, vocabulary, p.class_word, len(p.tokens)))
    if cfg.lora is not None:
        net = replace(cfg, lora=None).build_net()
        load_into(net, state, base_run)
        torch.manual_seed(cfg.train.seed)  # A's random start, the same on every rank and every run
        state = with_lora(net, cfg.lora).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def trainable_filter(cfg: RunConfig):
    """Which weights train: all (dreambooth), the adapters and the identifier's rows (lora), or those rows
    alone (textual-inversion)."""
    method, rows = cfg.personalize.method, len(cfg.personalize.tokens)
    if method == "dreambooth":
        return None

    def trainable(name: str, p: nn.Parameter):
        if name == ROWS:  # textual inversion through a CLIP tower (personalize/tower.py)
            return True
        if name == EMBEDDING:
            mask = torch.zeros(p.shape, dtype=torch.bool)
            mask[-rows:] = True  # the identifier's rows (appended last)
            return mask
        return method == "lora" and is_lora(name)

    return trainable


def read_subject(folder, shape, token: str, class_word: str) -> tuple[Tensor, list[str]]:
    """The subject's images (uint8, each exactly ``shape``) and captions from ``folder`` (metadata.jsonl;
    without one, every image is captioned "a TOKEN CLASS")."""
    images, captions = read_captioned_folder(folder, shape, "subject image")
    captions = captions or [f"a {token} {class_word}"] * len(images)
    check_captions(captions, token, class_word)
    return images, captions


def _shipped_alternatives(dataset: str) -> str:
    """' (shipped: NAME, ...)': the shipped text models of ``dataset`` that personalisation takes, or ''."""
    found = []
    for name in shipped_names():
        cfg = load_config(SHIPPED_DIR / name)
        if cfg.dataset == dataset and cfg.text is not None and (cfg.text.kind == "joint" or reads_any_word(cfg)):
            found.append(name)
    return f" (shipped: {', '.join(found)})" if found else ""


def personalize(
    base_run,
    folder,
    out,
    p: Personalization | None,
    *,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 8,
    lora: LoraSpec | None = None,
    resume: bool = False,
    device="auto",
    progress: bool = True,
    max_minutes: float | None = None,
    stop_after: int | None = None,
):
    """Personalise ``base_run`` on the subject images in ``folder`` into the run ``out``, or continue the run
    ``out`` (``resume``: its base, images and settings are in it); returns the EMA denoiser. A LoRA run's
    adapters are exported when it finishes. Under torchrun every rank draws the same class images (they are
    deterministic) and rank 0 alone writes files."""
    refuse_writes(out, "personalise a shipped model")
    out, main = Path(out), launched_rank() == 0
    if resume:
        cfg = load_config(out)
        if cfg.personalize is None:
            raise PersonalizeError(
                f"{out} is not a personalised run (start one with `difflab personalize BASE --images DIR ...`)"
            )
        p = cfg.personalize
        base_run = from_record(p.base)
        if weights_fingerprint(base_run) != p.base_fingerprint:
            raise PersonalizeError(
                f"the base run {base_run} changed since {out} started (fingerprint differs); start over"
            )
        try:
            images = load_file(str(out / SUBJECT))["images"]
        except (SafetensorError, OSError, KeyError) as e:
            raise PersonalizeError(
                f"{out / SUBJECT} is missing or corrupt ({type(e).__name__}); start the run over"
            ) from None
    else:
        base_cfg = load_config(base_run)
        if p.vectors is None:
            p = replace(p, vectors=default_vectors(base_cfg, p.method))
        check_base(base_cfg, base_run, p.method, p.tokens)
        images, captions = read_subject(folder, tuple(base_cfg.data_shape), p.token, p.class_word)
        p = replace(p, captions=captions, base=recorded_path(base_run), base_fingerprint=weights_fingerprint(base_run))
        default_steps, default_lr = DEFAULTS[p.method]
        cfg = personalized_config(base_cfg, p, steps or default_steps, lr or default_lr, batch_size, lora)
    base = DiffusionRun.load(base_run)
    # textual inversion cannot drift (the class word's rows never change): no prior term
    keeps_prior = bool(p.prior_weight) and p.method != "textual-inversion"
    prompts = prior_prompts(p, base.config) if keeps_prior else []  # refused here, before anything is written
    if main and not resume:
        if (out / CONFIG).exists():  # --force: nothing of the old run may meet the new subject
            clear_checkpoints(out)
            (out / CONFIG).unlink()
        with atomic_path(out / SUBJECT) as tmp:  # the run keeps its subject: resume needs nothing else
            save_file({"images": images.contiguous()}, str(tmp))
    with torch.no_grad():
        x = base.encode(to_model(images))  # the base's space: its autoencoder for a latent run
    rows = cfg.train.batch_size * int(os.environ.get("WORLD_SIZE", "1"))  # one global batch (accumulation is 1)
    repeat = -(-rows // len(x))  # tile the few images to fill it
    cond = text_condition(cfg, p.captions)  # as the personalised run reads them (its identifier's rows)
    data = TensorDataset(
        x.repeat(repeat, *[1] * (x.ndim - 1)), {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in cond.items()}
    )
    loss = cfg.build_loss()
    if keeps_prior:
        xc = class_samples(base, prompts, p.class_images, p.class_guidance, out / CLASS_IMAGES, progress and main)
        loss = PriorPreservationLoss(
            loss, xc, text_condition(cfg, [prompts[i % len(prompts)] for i in range(len(xc))]), p.prior_weight
        )
    ema = train(
        out,
        cfg,
        data,
        device=device,
        resume=resume,
        progress=progress,
        loss_fn=loss,
        trainable=trainable_filter(cfg),
        init_from=None if resume else initial_state(cfg, base_run),
        max_minutes=max_minutes,
        stop_after=stop_after,
        preview=preview,
        command="personalize",
    )
    if main and cfg.lora is not None and weights_step(out) >= cfg.train.steps:
        export_adapter(out)
    return ema


def preview(denoiser, step: int, run: Path) -> None:
    """samples.png: each subject caption and its class prompt, two samples each, guided at PREVIEW_GUIDANCE."""
    cfg = load_config(run)
    p = cfg.personalize
    captions = [c for pair in zip(p.captions, class_prompts(p)) for c in pair for _ in range(2)][:16]
    x = DiffusionRun(run, cfg, denoiser.net).sample(
        len(captions), prompt=captions, guidance=GuidanceConfig(scale=PREVIEW_GUIDANCE), batch=16
    )
    plots.captioned_grid(to_uint8(x), captions, run / "samples.png")
    plots.loss_curve(run / "metrics.jsonl", run / "loss.png")


PERSONALIZED = RunKind(
    "personalized",
    "a personalised run",
    NETS,
    diffusion_loss,
    DiffusionRun,
    "personalize",
    use="sample it with `difflab sample {run} --prompt ...`",
    check=_check,
    wrap=wrap_net,
)
