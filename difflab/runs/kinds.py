"""Run kinds: what a run directory holds, as one table.

Every run is a folder with a ``config.json`` (runs/config.py) and checkpoints (runs/store.py), trained by the
one loop (training/loop.py). What differs between a diffusion model, a noise-aware classifier, an
autoencoder, a CLIP model, a personalised run or a feature network is one ``RunKind`` entry:

    name      the ``run_kind`` a config records ('diffusion', 'classifier', ...)
    what      how messages name it ("a noise-aware classifier")
    nets      the network kinds it may hold: net_kind -> (config dataclass, network class)
    loss      its training loss, built from the run's config
    loss_config  the dataclass a config's ``loss`` is (SimpleLoss unless said: AutoencoderLoss, ...)
    run       the object ``difflab.load`` returns for it (a ``runs.run.Run`` subclass): how it loads
    command   the difflab command that trains and continues it ("train-classifier")
    use       how such a run is used, said when it is given where another kind is expected
    check     further checks of a config of this kind (None: the generic ones suffice)
    wrap      (config, network) -> the network the run trains and loads, for a kind whose config asks for more
              around the built network (a personalised run's text tower for textual inversion); None: as built

The table itself is ``KINDS``; runs/load.py registers the built-in entries, each defined beside its run
class, and ``difflab`` registers them on import, so the table is complete wherever difflab is imported. A new
kind is one more entry: ``register(RunKind(...))`` (tests/test_run.py registers a toy kind that trains,
resumes and loads through the table alone)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import nn

from ..core.losses import SimpleLoss


class RunKindError(ValueError):
    """A run of a kind that does not exist, or given where another kind is needed."""


@dataclass(frozen=True)
class RunKind:
    name: str
    what: str
    nets: Mapping[str, tuple[type, type[nn.Module]]]
    loss: Callable
    run: type
    command: str
    use: str = ""
    check: Callable | None = field(default=None, compare=False)
    loss_config: type = SimpleLoss
    wrap: Callable | None = field(default=None, compare=False)


KINDS: dict[str, RunKind] = {}


def register(*kinds: RunKind) -> dict[str, RunKind]:
    """Add kinds to the table (a name registered again is replaced: a test may redefine its toy kind)."""
    for k in kinds:
        KINDS[k.name] = k
    return KINDS


def kind_named(name: str) -> RunKind:
    if name not in KINDS:
        raise RunKindError(f"unknown run kind {name!r}; known kinds: {', '.join(KINDS) or 'none registered'}")
    return KINDS[name]


def kind_for_net(net_kind: str) -> RunKind:
    """The kind whose networks include ``net_kind`` (configs written before run_kind existed say only that)."""
    for k in KINDS.values():
        if net_kind in k.nets:
            return k
    raise RunKindError(
        f"unknown network kind {net_kind!r}; known: {', '.join(n for k in KINDS.values() for n in k.nets)}"
    )
