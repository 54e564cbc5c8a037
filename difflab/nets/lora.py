"""Low-rank adapters (Hu et al. 2022) on a network's linear layers, through peft.

    W x  ->  W x + (alpha / rank) * strength * B A x        A: (rank, in), B: (out, rank), B = 0 at the start

``LoraSpec`` says where (a regular expression over module names) and how large; ``alpha / rank`` is the
scale at strength 1 (peft's convention, diffusers' too), and a strength multiplies it (0 is the network
without adapters, exactly). peft is an optional dependency: it is imported when an adapter is first made."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

from torch import nn

LORA_TARGETS = r".*\.(attn|cross)\.(qkv|q|kv|out)"  # the attention projections of the U-Net's blocks
# Named sets of the U-Net's modules an adapter may go on (`--modules`): every attention projection (the default);
# the self-attention's qkv and output; the cross-attention's query, keys/values and output; its keys and values
# alone, the projections of the text (Custom Diffusion, Kumari et al. 2023, tunes only these).
LORA_MODULES = {
    "attention": LORA_TARGETS,
    "self": r".*\.attn\.(qkv|out)",
    "cross": r".*\.cross\.(q|kv|out)",
    "cross-kv": r".*\.cross\.kv",
}


class LoraError(ValueError):
    """An adapter that cannot be made or does not fit."""


@dataclass
class LoraSpec:
    """Adapters W + (alpha / rank) B A on the modules whose names match ``targets`` (a regular expression)."""

    rank: int = 8  # personalisation's default (issue 32: on the flagship G 0.80 at rank 8, 0.70 at rank 4)
    alpha: float = 8.0  # alpha / rank = 1 at the default
    targets: str = LORA_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise LoraError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise LoraError(f"LoRA alpha must be positive, got {self.alpha!r}")

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
        raise LoraError(
            "LoRA needs the peft package: pip install torch==2.13.0 'difflab[personalize]' (or peft)"
        ) from None

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.targets, lora_dropout=0.0)
    try:
        with warnings.catch_warnings():  # several adapters on one network are what --lora A --lora B asks for
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            net = inject_adapter_in_model(config, net, adapter_name=name)
    except ValueError as e:
        raise LoraError(f"LoRA: {str(e).splitlines()[0]}") from None
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
