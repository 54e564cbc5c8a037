"""Textual inversion through a pretrained CLIP text tower (a text run on `train-clip --init minilm`).

Such a run reads captions through its CLIP run's text tower, frozen and outside the network: the states are
computed once, so a new word's vector would get no gradient. For textual inversion the personalised run takes
the tower inside (``TowerInput``): the condition is the caption's WordPiece ids, in which the identifier's words
are new ids (one per vector, ``PretrainedText.tokenize(new_words=...)``), and the network reads them through the
tower, the new ids' input embeddings being the learned ``rows``, before its U-Net cross-attends to the states.
Every other caption reads exactly as the base run reads it (the same tower, the same states), and the rows are
all that trains. The weights hold the U-Net and the rows; the tower is filled back from the CLIP run (checked
against its recorded fingerprint) when the run is built."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nets.pretrained_text import PretrainedText
from ..runs.config import CheckpointError, RunConfig
from ..text.clip import ClipRun
from ..text.encoders import clip_run_of

ROWS = "rows"  # the learned vectors' parameter
TOWER_INPUTS = frozenset({"tokens", "token_mask"})
STATES = frozenset({"context", "context_mask"})


class TowerInput(nn.Module):
    """net(x, c_noise, tokens=, token_mask=, **cond): the frozen ``tower`` reads the token ids (ids from its
    vocabulary's size on take their input embeddings from ``rows``), and ``net`` cross-attends to the states as
    ``context`` (a masked-out token's state zero, as ClipText gives them)."""

    def __init__(self, net: nn.Module, tower: PretrainedText, rows: int):
        super().__init__()
        self.net, self.tower = net, tower.requires_grad_(False)
        self.rows = nn.Parameter(torch.zeros(rows, tower.width))
        self.accepts = (frozenset(getattr(net, "accepts", frozenset())) - STATES) | TOWER_INPUTS
        self.register_state_dict_post_hook(_drop_tower)
        self.register_load_state_dict_pre_hook(_fill_tower)

    def forward(
        self, x: Tensor, c_noise: Tensor, tokens: Tensor | None = None, token_mask: Tensor | None = None, **cond
    ):
        if tokens is not None:
            if token_mask is None:
                raise ValueError("tokens given without token_mask")
            states = self.tower(tokens, token_mask, self.rows) * token_mask.unsqueeze(-1)
            cond = {**cond, "context": states, "context_mask": token_mask}
        return self.net(x, c_noise, **cond)

    def word_rows(self, words: str) -> Tensor:
        """The mean input embedding of ``words``' WordPiece pieces (the class word: where the rows start)."""
        ids = self.tower.tokenizer(words, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{words!r} has no WordPiece tokens")
        return self.tower.model.get_input_embeddings().weight[ids].detach().mean(0)


def _drop_tower(module: TowerInput, state: dict, prefix: str, local_metadata) -> None:
    for name in [k for k in state if k.startswith(f"{prefix}tower.")]:
        del state[name]


def _fill_tower(module: TowerInput, state: dict, prefix: str, *rest) -> None:
    for name, value in module.tower.state_dict().items():
        state.setdefault(f"{prefix}tower.{name}", value)


def wrap_net(cfg: RunConfig, net: nn.Module) -> nn.Module:
    """A personalised run's network: for textual inversion on a CLIP-conditioned run, ``net`` behind its CLIP
    run's text tower (``TowerInput``); otherwise ``net`` itself."""
    if not cfg.inverts_through_tower:
        return net
    loaded = ClipRun.load(clip_run_of(cfg.text))
    if loaded.fingerprint != cfg.text.fingerprint:
        raise CheckpointError(
            f"the CLIP run {cfg.text.run} changed since this model was trained (fingerprint differs); retrain it"
        )
    tower = loaded.clip.text
    if not isinstance(tower, PretrainedText):
        raise CheckpointError(f"the CLIP run {cfg.text.run} has a word tower: textual inversion needs a pretrained one")
    return TowerInput(net, tower, len(cfg.personalize.tokens))
