"""A CLIP-style run (Radford et al. 2021): an image tower and a text tower trained contrastively on captioned
images by the one loop (``difflab train-clip``); its frozen text tower can condition a text-to-image run
(``--text clip:RUN``, text/encoders.py).

    run = difflab.load("runs/clip")           # a ClipRun
    run.clip                                   # the network (nets/text.py: Clip)
    clip_scores(run.clip, images, captions)    # cos(image_i, caption_i)

The loss is CLIP's symmetric cross-entropy (core/losses.py: ContrastiveLoss) over each process's batch with a
learned temperature. At the end of training ``clip_report`` measures zero-shot retrieval in groups of 100 and,
where the data has attributes (fashion-pairs), a zero-shot attribute probe (RUN/clip.json)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.conditions import ConditionSpec
from ..core.losses import ContrastiveLoss
from ..data.images import ImageSet, to_model
from ..data.loader import TensorDataset
from ..data.pairs import ATTRIBUTES, COLOURS, NOUNS, caption
from ..io import atomic_path
from ..nets.text import Clip, ClipConfig, TextConfig, TextError
from ..runs.config import CheckpointError, RunConfig, TrainConfig
from ..runs.kinds import RunKind
from ..runs.run import Run

CLIP_REPORT = "clip.json"


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



def clip_config(base, captions: Sequence[str], embed_dim: int = 64, width: int = 128, layers: int = 2):
    """A `difflab train-clip` run for the images of ``base`` (a dataset preset) and their ``captions``:
    2000 steps of batch 128 by default (the batch is also the contrastive task's number of candidates)."""
    if base.data_kind != "images":
        raise TextError(f"a CLIP model needs images; {base.dataset} is a set of {base.data_kind}")
    if not captions:
        raise TextError(f"a CLIP model needs captions, and {base.dataset} has none (a folder with a metadata.jsonl, or fashion-pairs)")
    C, H, W = base.shape
    text = TextConfig.fitted(captions, width=width, layers=layers)
    net = ClipConfig(in_channels=C, image_size=H, image_width=W if W != H else None, embed_dim=embed_dim, text=text.to_dict())
    train = TrainConfig(steps=2000, batch_size=128, lr=1e-3, warmup=100, ema_decay=0.999, ema_warmup=True, precision=base.train.precision,
                        checkpoint_every=250, sample_every=0, log_every=25)
    spec = ConditionSpec("tokens", "tensor", 0.0, companions=("token_mask",))
    return replace(base, run_kind="clip", net_kind="clip", net=net.to_dict(), loss={}, conditions=[spec.to_dict()], train=train)


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



def clip_data(cfg, images: Tensor, captions: Sequence[str]):
    """The training data of a CLIP run: the images, with their captions' word ids as 'tokens' / 'token_mask'."""
    tokens, mask = cfg.build_net().config.text_config.tokenize(list(captions))
    return TensorDataset(images, {"tokens": tokens, "token_mask": mask})


def clip_report(run: str | Path, test: ImageSet, n: int = 2000, group: int = 100) -> dict:
    """Retrieval accuracies (and, with attributes, the attribute probe) of the run's EMA model on the first
    ``n`` test images; written to RUN/clip.json."""
    loaded = ClipRun.load(run)
    clip = loaded.clip
    x = to_model(test.images[:n])
    i2c, c2i = retrieval_accuracy(clip, x, test.captions[:n], group)
    report = {"step": loaded.step, "fingerprint": loaded.fingerprint, "images": len(x), "group": group,
              "image_to_caption": i2c, "caption_to_image": c2i, "logit_scale": float(clip.logit_scale.exp())}
    if test.attributes is not None:
        k = min(500, len(x))  # the probe reads 32 captions per image: 500 images keep it to about 8 s on 2 CPU cores
        sizes = [len(NOUNS), len(COLOURS), len(NOUNS), len(COLOURS)]
        report["attribute_probe"] = attribute_probe(clip, x[:k], test.attributes[:k], caption, ATTRIBUTES, sizes)
    with atomic_path(Path(run) / CLIP_REPORT) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return report


def _check(cfg: RunConfig, net, specs) -> None:
    if [s.name for s in specs] != ["tokens"]:
        raise CheckpointError("config: a CLIP run's condition is its captions' tokens")


CLIP = RunKind("clip", "a CLIP run", {"clip": (ClipConfig, Clip)}, lambda cfg: ContrastiveLoss(**cfg.loss), ClipRun, "train-clip",
               use="condition a model on it with `difflab train DATASET --text clip:{run}`", check=_check)
