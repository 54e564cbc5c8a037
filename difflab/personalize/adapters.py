"""LoRA adapters apart from training: the small file a LoRA personalisation exports, and loading several of
them over the base run they were trained on (diffusers' ``load_lora_adapter`` / ``set_adapters`` in spirit).

    RUN/adapter.safetensors     the EMA adapter weights (A and B of every adapted projection), and for a joint
                                run the identifier's embedding rows; metadata: the LoRA spec, the identifiers,
                                the base run and its weights' fingerprint

``difflab.load(BASE, lora=[(RUN, 0.8)])`` (or ``--lora RUN --lora-scale 0.8``) adds each adapter under its own
name, at its strength, all active at once: their updates add up. An adapter trained over other weights is
refused in one line."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import Tensor, nn

from ..io import atomic_path
from ..nets.lora import LoraSpec, is_lora, lora_layers, set_lora_scale, with_lora
from ..runs.config import RunConfig, load_config
from ..runs.store import load_into, load_weights
from .identifier import EMBEDDING, PersonalizeError, with_token_rows, with_tokens

ADAPTER = "adapter.safetensors"


def export_adapter(run: str | Path) -> Path:
    """Write RUN/adapter.safetensors from a finished LoRA personalisation (see the module doc)."""
    run = Path(run)
    cfg = load_config(run)
    state = load_weights(run, "ema")
    tensors = {k: v.contiguous() for k, v in state.items() if is_lora(k)}
    p = cfg.personalize
    tokens = p.tokens if cfg.net.text else []
    if tokens:
        tensors["token_rows"] = state[EMBEDDING][-len(tokens) :].contiguous()
    meta = {
        "lora": json.dumps(cfg.lora.to_dict()),
        "tokens": json.dumps(tokens),
        "base": p.base,
        "base_fingerprint": p.base_fingerprint,
    }
    with atomic_path(run / ADAPTER) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return run / ADAPTER


def read_adapter(run: str | Path) -> tuple[dict[str, Tensor], dict]:
    """(tensors, metadata) of RUN/adapter.safetensors, checked."""
    path = Path(run) / ADAPTER
    if not path.is_file():
        raise PersonalizeError(
            f"{run} holds no {ADAPTER} (a finished `difflab personalize --method lora` run writes one)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
        meta = {
            "lora": LoraSpec.from_dict(json.loads(meta["lora"])),
            "tokens": json.loads(meta["tokens"]),
            "base": meta["base"],
            "base_fingerprint": meta["base_fingerprint"],
        }
        if len(meta["tokens"]) != (len(tensors["token_rows"]) if "token_rows" in tensors else 0):
            raise ValueError("its identifiers and embedding rows do not match")
    except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
        raise PersonalizeError(f"{path} is missing or corrupt ({type(e).__name__}: {e})") from None
    return tensors, meta


def with_adapters(
    net: nn.Module, cfg: RunConfig, base_run, fingerprint: str, adapters: Sequence[tuple[str | Path, float]]
) -> tuple[nn.Module, RunConfig]:
    """The base run's network (its weights' ``fingerprint``) with the LoRA adapters of ``adapters`` ((run,
    strength), ...) added, all active; each is checked to have been trained over these very weights. Returns
    (network, config): a joint run's config gains the adapters' identifiers."""
    if cfg.lora is not None:
        raise PersonalizeError(
            f"{base_run} is itself a LoRA run; load its adapters over its base run {cfg.personalize.base}"
        )
    loaded = []
    for run, strength in adapters:
        tensors, meta = read_adapter(run)
        if meta["base_fingerprint"] != fingerprint:
            raise PersonalizeError(
                f"the adapter {run} was trained over {meta['base']} (fingerprint {meta['base_fingerprint']}); "
                f"{base_run} has other weights ({fingerprint})"
            )
        loaded.append((run, strength, tensors, meta))
    tokens = [t for *_, meta in loaded for t in meta["tokens"]]
    if tokens:
        if not cfg.net.text:
            raise PersonalizeError("the adapters carry word embeddings for a joint encoder, and the base run has none")
        vocabulary = cfg.net.text_config.vocabulary
        rows = torch.cat([tensors["token_rows"] for _, _, tensors, meta in loaded if meta["tokens"]])
        state = with_token_rows(net.state_dict(), vocabulary, rows)
        cfg = with_tokens(cfg, tokens)
        net = cfg.build_net()
        load_into(net, state, base_run)
    names = []
    for i, (run, strength, tensors, meta) in enumerate(loaded):
        name = f"adapter{i}"
        net = with_lora(net, meta["lora"], name)
        state = {k.replace(".default.", f".{name}."): v for k, v in tensors.items() if is_lora(k)}
        missing = [k for k in net.state_dict() if f".{name}." in k and k not in state]
        if missing:
            raise PersonalizeError(f"the adapter {run} does not fit this network (no weights for {missing[0]})")
        try:
            net.load_state_dict(state, strict=False)
        except RuntimeError as e:
            raise PersonalizeError(
                f"the adapter {run} does not fit this network ({str(e).strip().splitlines()[-1].strip()})"
            ) from None
        set_lora_scale(net, strength, name)
        names.append(name)
    for layer in lora_layers(net):
        layer.set_adapter(names)
    return net.eval().requires_grad_(False), cfg
