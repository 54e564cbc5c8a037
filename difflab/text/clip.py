"""A CLIP-style run (Radford et al. 2021): an image tower and a text tower trained contrastively on captioned
images by the one loop (``difflab train-clip``); its frozen text tower can condition a text-to-image run
(``--text clip:RUN``, text/encoders.py).

    run = difflab.load("runs/clip")           # a ClipRun
    run.clip                                   # the network (nets/clip.py: Clip)
    clip_scores(run.clip, images, captions)    # cos(image_i, caption_i)

The loss is CLIP's symmetric cross-entropy (core/losses.py: ContrastiveLoss) over each process's batch with a
learned temperature. With ``hard_negatives='sides'`` each caption's sides-swapped twin (swap_sides) is one more
negative for its image, so the towers must read which side a word names (NegCLIP's hard negatives for word order);
'sides+colours' adds its colour-swapped twin (data.pairs.swap_colours), so they must bind each colour to its item. At
the end of training ``clip_report`` measures zero-shot retrieval in groups of 100 and,
where the data has attributes (fashion-pairs), a zero-shot attribute probe (RUN/clip.json)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditions import ConditionSpec
from ..core.losses import HARD_NEGATIVE_TOKENS, ContrastiveLoss, hard_negative_kinds
from ..data.images import ImageSet, to_model
from ..data.loader import TensorDataset
from ..data.pairs import (
    ALL_PHRASINGS,
    ATTRIBUTES,
    COLOURS,
    FIRST_VARIANT,
    NEW_PHRASINGS,
    NOUNS,
    PHRASINGS,
    REWORDED_PHRASINGS,
    caption,
    rephrased,
    swap_colours,
    training_pairs,
)
from ..io import atomic_path
from ..nets.clip import Clip, ClipConfig
from ..nets.pretrained_text import PretrainedTextConfig, load_minilm, minilm_sha256
from ..nets.text import TextConfig, TextError
from ..runs.config import CheckpointError, RunConfig, TrainConfig
from ..runs.kinds import RunKind
from ..runs.run import Run

CLIP_REPORT = "clip.json"
_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_sides(caption: str) -> str:
    """The caption with the words 'left' and 'right' exchanged (case kept): "a red sneaker on the left and a
    blue bag on the right" -> "... on the right and ... on the left", the same items on the other sides. A
    caption without a side word comes back unchanged."""

    def other(m: re.Match) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.upper() if word.isupper() else new.capitalize() if word[0].isupper() else new

    return _SIDE.sub(other, caption)


HARD_NEGATIVE_SWAPS: dict[str, Callable[[str], str]] = {"sides": swap_sides, "colours": swap_colours}


class ClipRun(Run):
    """A `difflab train-clip` run: ``clip`` is its network (EMA weights, frozen)."""

    kinds = ("clip",)
    what = "a CLIP run"

    @property
    def clip(self) -> Clip:
        return self.net


def load_clip(run: str | Path) -> tuple[Clip, str]:
    """A CLIP run's network and its weights' fingerprint."""
    loaded = ClipRun.load(run)
    return loaded.clip, loaded.fingerprint


@torch.no_grad()
def clip_scores(clip: Clip, images: Tensor, captions: Sequence[str], batch: int = 500) -> Tensor:
    """cos(image_i, caption_i) in the CLIP's embedding (N,), images in [-1, 1]."""
    out = []
    for lo in range(0, len(images), batch):
        ids, mask = clip.text.tokenize(captions[lo : lo + batch])
        a = F.normalize(clip.image(images[lo : lo + batch]), dim=-1)
        b = F.normalize(clip.embed_text(ids, mask), dim=-1)
        out.append((a * b).sum(-1))
    return torch.cat(out)


GROUP = 100  # zero-shot retrieval's candidates per query (chance: 1 / GROUP)


@torch.no_grad()
def retrieval_accuracy(clip: Clip, images: Tensor, captions: Sequence[str], group: int = GROUP) -> tuple[float, float]:
    """Zero-shot retrieval in groups of ``group``: how often an image's most similar caption among the
    group's is its own (image -> caption), and a caption's most similar image (caption -> image). Chance: 1/group."""
    hits_i = hits_t = n = 0
    for lo in range(0, len(images) - group + 1, group):
        ids, mask = clip.text.tokenize(captions[lo : lo + group])
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


def clip_config(
    base,
    captions: Sequence[str],
    embed_dim: int = 64,
    width: int = 128,
    layers: int = 2,
    pool: str = "attention",
    hard_negatives: str | None = None,
    init: str | None = None,
    tune: str = "lora",
    rank: int = 8,
    caption_variants: int = 0,
    attributes: Tensor | None = None,
    caption_words: str = "dataset",
    caption_phrasings: str = "sides",
):
    """A `difflab train-clip` run for the images of ``base`` (a dataset preset) and their ``captions``:
    2000 steps of batch 128 by default (the batch is also the contrastive task's number of candidates).
    ``pool``: the image tower's pooling (nets/clip.py); ``hard_negatives='sides'``: each caption's
    side-swapped twin (swap_sides) is a negative for its image (core/losses.py: contrastive_loss);
    'sides+colours': its colour-swapped twin too (data.pairs.swap_colours: fashion-pairs' captions); None:
    'sides' when a caption names a side, else 'none'. ``init='minilm'``: the text tower starts from the pretrained
    MiniLM, tuned as ``tune`` says (nets/pretrained_text.py; ``rank``: LoRA's), its tuned weights at
    TEXT_LR_SCALE[tune] times the run's learning rate; None: a small transformer on the captions' words.
    ``caption_variants`` K: each training image is also seen with K captions of its ``attributes`` in
    data.pairs.AUGMENT_PHRASINGS (fashion-pairs' caption language only; never the phrasings the figures use);
    ``caption_words='synonyms'``: their colours and items also said in other words (data.pairs.SYNONYMS; never
    the UNSEEN_WORDS the figures use); ``caption_phrasings='sides+labels'``: the variants also take turns in
    data.pairs.LABEL_PHRASINGS (the sides as labels, "left = {L}, right = {R}", either side first)."""
    if hard_negatives is None:
        hard_negatives = "sides" if any(swap_sides(c) != c for c in captions or ()) else "none"
    loss = ContrastiveLoss(hard_negatives)  # the loss checks the name
    if base.data_kind != "images":
        raise TextError(f"a CLIP model needs images; {base.dataset} is a set of {base.data_kind}")
    if not captions:
        raise TextError(
            f"a CLIP model needs captions, and {base.dataset} has none (a folder with a metadata.jsonl, an .npz "
            "with 'captions', or fashion-pairs)"
        )
    C, H, W = base.shape
    if caption_words != "dataset" and not caption_variants:
        raise TextError(
            f"--caption-words {caption_words} says the caption variants in other words: give --caption-variants K"
        )
    if caption_phrasings != "sides" and not caption_variants:
        raise TextError(
            f"--caption-phrasings {caption_phrasings} says the caption variants in more phrasings: give "
            "--caption-variants K"
        )
    if caption_variants:
        captions = [*captions, *rephrased(captions, attributes, caption_variants, caption_words, caption_phrasings)]
    if "colours" in hard_negative_kinds(hard_negatives) and caption_words != "dataset":
        raise TextError(
            f"--hard-negatives {hard_negatives} swaps the dataset's colour words: not with --caption-words "
            f"{caption_words} (its variants say them in other words)"
        )
    for kind in hard_negative_kinds(hard_negatives):
        if not any(HARD_NEGATIVE_SWAPS[kind](c) != c for c in captions):
            raise TextError(
                f"--hard-negatives {hard_negatives}: no training caption of {base.dataset} changes when its "
                f"{kind} are swapped ({'a side word' if kind == 'sides' else 'two items of two named colours'}, "
                "as fashion-pairs' captions have)"
            )
    pretrained = text = None
    if init is not None:
        pretrained = pretrained_tower(init, tune, rank, captions, hard_negatives)
    else:
        text = TextConfig.fitted(captions, width=width, layers=layers).to_dict()
    net = ClipConfig(
        in_channels=C,
        image_size=H,
        image_width=W if W != H else None,
        embed_dim=embed_dim,
        text=text,
        pool=pool,
        pretrained=None if pretrained is None else pretrained.to_dict(),
        text_lr_scale=1.0 if pretrained is None else TEXT_LR_SCALE.get(tune, TEXT_LR_SCALE["last-K"]),
        caption_variants=caption_variants,
        caption_words=caption_words,
        caption_phrasings=caption_phrasings,
    )
    train = TrainConfig(
        steps=2000,
        batch_size=128,
        lr=1e-3,
        warmup=100,
        ema_decay=0.999,
        ema_warmup=True,
        precision=base.train.precision,
        checkpoint_every=250,
        sample_every=0,
        log_every=25,
    )
    swaps = tuple(name for kind in hard_negative_kinds(hard_negatives) for name in HARD_NEGATIVE_TOKENS[kind])
    spec = ConditionSpec("tokens", "tensor", 0.0, companions=("token_mask", *swaps))
    return replace(base, run_kind="clip", net_kind="clip", net=net, loss=loss, conditions=[spec], train=train)


def check_init_from(cfg: RunConfig, source: RunConfig, name: str) -> None:
    """Refuse, in one line, to start the CLIP run ``cfg`` from the run ``source`` (called ``name``) unless its towers
    are the same: every ClipConfig field that shapes or reads the weights (a word tower's vocabulary, its order
    included: the same shapes with the words in another order would give each word another word's embedding), and
    a pretrained tower's base, weights and tuning; the caption variants, phrasings and training length may differ."""
    if source.run_kind != "clip":
        raise TextError(f"--init-from {name} is a {source.run_kind} run, not a CLIP run")
    a, b = cfg.net, source.net
    apart = ("caption_variants", "caption_words", "caption_phrasings", "text_lr_scale", "text", "pretrained")
    differ = [f for f in vars(a) if f not in apart and getattr(a, f) != getattr(b, f)]
    if a.pretrained is None and a.text_config != b.text_config:
        differ.append("text (the word tower's vocabulary and sizes: fitted to each run's own captions)")
    elif a.pretrained is not None:
        pa, pb = a.pretrained_config, b.pretrained_config
        if pb is None:
            differ.append("pretrained (a word tower there)")
        else:
            differ += [
                f"pretrained.{f}" for f in ("base", "sha256", "tune", "rank") if getattr(pa, f) != getattr(pb, f)
            ]
    if differ:
        raise TextError(f"--init-from {name}: its towers differ from this run's in {', '.join(differ)}")


TEXT_LR_SCALE = {"head": 1.0, "lora": 1.0, "last-K": 0.1, "full": 0.1}  # pretrained weights move 10x slower


def pretrained_tower(
    init: str, tune: str, rank: int, captions: Sequence[str], hard_negatives: str
) -> PretrainedTextConfig:
    """The pretrained text tower ``init`` tuned as ``tune``, its training length fitted to ``captions`` (and their
    swapped twins, which it reads as ``hard_negatives``)."""
    cfg = PretrainedTextConfig(base=init, sha256=minilm_sha256(), tune=tune, rank=rank)
    tokenizer, _, _, limit = load_minilm()
    twins = [HARD_NEGATIVE_SWAPS[kind](c) for kind in hard_negative_kinds(hard_negatives) for c in captions]
    longest = max(len(ids) for ids in tokenizer([*captions, *twins])["input_ids"])
    if longest > limit:
        raise TextError(f"a training caption has {longest} tokens; {init} reads at most {limit}")
    return replace(cfg, max_len=longest)


@torch.no_grad()
def attribute_probe(
    clip: Clip, images: Tensor, attributes: Tensor, caption_of, names: Sequence[str], sizes: Sequence[int]
) -> dict[str, float]:
    """Zero-shot, per attribute a: the share of images whose most similar caption, among the captions that
    differ from the true one in a alone (every value of a), is the true one. ``caption_of(attrs)`` -> str."""
    out = {}
    img = F.normalize(clip.image(images), dim=-1)  # (N, E)
    tok = clip.text.tokenize
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


def clip_data(cfg, data: ImageSet):
    """The training data of a CLIP run on the train split ``data``: the images, with their captions' word ids as
    'tokens' / 'token_mask' (and, with hard negatives, the swapped captions' as core.losses.HARD_NEGATIVE_TOKENS
    names them: 'swap_tokens' / 'swap_token_mask' for the sides). An image with several captions comes once per
    caption (ImageSet.caption_pairs); with caption variants (fashion-pairs), each image again with each of its
    rephrased captions."""
    net = cfg.net
    index, captions = training_pairs(data, net.caption_variants, net.caption_words, net.caption_phrasings)
    tokenize = cfg.build_net().text.tokenize
    tokens, mask = tokenize(list(captions))
    cond = {"tokens": tokens, "token_mask": mask}
    for kind in hard_negative_kinds(cfg.loss.hard_negatives):
        ids, mask_name = HARD_NEGATIVE_TOKENS[kind]
        cond[ids], cond[mask_name] = tokenize([HARD_NEGATIVE_SWAPS[kind](c) for c in captions])
    return TensorDataset(data.images, cond, {"x": index})  # each image stored once, read once per caption


@torch.no_grad()
def swap_discrimination(
    clip: Clip, images: Tensor, captions: Sequence[str], batch: int = 500, swap: Callable[[str], str] = swap_sides
) -> float | None:
    """The share of images that are closer to their own caption than to its twin ``swap(caption)`` (default
    swap_sides: the same items on the other sides; data.pairs.swap_colours: the colours exchanged between the
    items), over the captions the swap changes; 0.5 is a coin flip (an encoder that cannot tell them apart scores
    it). None when the swap changes no caption."""
    keep = [i for i, c in enumerate(captions) if swap(c) != c]
    if not keep:
        return None
    own = clip_scores(clip, images[keep], [captions[i] for i in keep], batch)
    swapped = clip_scores(clip, images[keep], [swap(captions[i]) for i in keep], batch)
    return float((own > swapped).float().mean())


def binding_by_phrasing(clip: Clip, test: ImageSet, n: int) -> dict[str, dict[str, float | None]]:
    """Per phrasing of data.pairs.ALL_PHRASINGS but the tuning ones (the training phrasings, then NEW_PHRASINGS and
    REWORDED_PHRASINGS), the first ``n`` fashion-pairs test images captioned in it: side-swap and colour-swap
    discrimination (swap_sides, data.pairs.swap_colours). A tower can read the sides of a phrasing and still bind
    its colours to the wrong items."""
    if test.attributes is None:
        raise TextError("the phrasings say fashion-pairs' attributes: they need its test split")
    x, rows = to_model(test.images[:n]), test.attributes[:n].tolist()
    out = {}
    for k in range(FIRST_VARIANT):
        texts = [caption(a, k) for a in rows]
        out[ALL_PHRASINGS[k]] = {
            "sides": swap_discrimination(clip, x, texts),
            "colours": swap_discrimination(clip, x, texts, swap=swap_colours),
        }
    return out


def unseen_phrasing_swaps(clip: Clip, test: ImageSet, n: int) -> dict[str, float]:
    """Side-swap discrimination of the first ``n`` fashion-pairs test images with their attributes said in the two
    phrasing sets no training caption uses, data.pairs.NEW_PHRASINGS and REWORDED_PHRASINGS (image i in the set's
    phrasing i mod its size): does the tower read the sides, or the training templates?"""
    if test.attributes is None:
        raise TextError("unseen phrasings say fashion-pairs' attributes: they need its test split")
    x, rows = to_model(test.images[:n]), test.attributes[:n].tolist()
    first, out = len(PHRASINGS), {}
    for key, count in (("swap_new_phrasings", len(NEW_PHRASINGS)), ("swap_reworded", len(REWORDED_PHRASINGS))):
        out[key] = swap_discrimination(clip, x, [caption(a, first + i % count) for i, a in enumerate(rows)])
        first += count
    return out


def clip_report(run: str | Path, test: ImageSet, n: int = 2000, group: int = GROUP) -> dict:
    """``clip_figures``, written to RUN/clip.json."""
    report = clip_figures(run, test, n, group)
    with atomic_path(Path(run) / CLIP_REPORT) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return report


def clip_figures(run: str | Path, test: ImageSet, n: int = 2000, group: int = GROUP) -> dict:
    """Retrieval accuracies, side-swap discrimination (and, with attributes, the attribute probe) of the run's
    EMA model on the first ``n`` test images; retrieval in groups of ``group``, or of all of them when fewer."""
    loaded = ClipRun.load(run)
    clip = loaded.clip
    x = to_model(test.images[:n])
    if len(x) < 2:
        raise TextError(f"the test split has {len(x)} captioned image(s): retrieval needs two at least")
    group = min(group, len(x))  # a small folder's test split: one smaller group (chance 1 / group)
    i2c, c2i = retrieval_accuracy(clip, x, test.captions[:n], group)
    report = {
        "step": loaded.step,
        "fingerprint": loaded.fingerprint,
        "images": len(x),
        "group": group,
        "image_to_caption": i2c,
        "caption_to_image": c2i,
        "logit_scale": float(clip.logit_scale.exp()),
        "swap_discrimination": swap_discrimination(clip, x, test.captions[:n]),
    }
    if test.attributes is not None:
        k = min(500, len(x))  # the probe reads 32 captions per image: 500 images keep it to about 8 s on 2 CPU cores
        sizes = [len(NOUNS), len(COLOURS), len(NOUNS), len(COLOURS)]
        report["attribute_probe"] = attribute_probe(clip, x[:k], test.attributes[:k], caption, ATTRIBUTES, sizes)
    return report


def _check(cfg: RunConfig, net, specs) -> None:
    if [s.name for s in specs] != ["tokens"]:
        raise CheckpointError("config: a CLIP run's condition is its captions' tokens")
    swaps = [name for kind in hard_negative_kinds(cfg.loss.hard_negatives) for name in HARD_NEGATIVE_TOKENS[kind]]
    if list(specs[0].companions) != ["token_mask", *swaps]:
        raise CheckpointError(
            f"config: a CLIP run with hard negatives {cfg.loss.hard_negatives!r} reads token_mask"
            f"{''.join(', ' + n for n in swaps)} beside its tokens, not {', '.join(specs[0].companions)}"
        )


CLIP = RunKind(
    "clip",
    "a CLIP run",
    {"clip": (ClipConfig, Clip)},
    lambda cfg: cfg.loss,
    ClipRun,
    "train-clip",
    use="condition a model on it with `difflab train DATASET --text clip:{run}`",
    check=_check,
    loss_config=ContrastiveLoss,
)
