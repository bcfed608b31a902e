"""A causal LM cut in two at a block boundary, for split learning.

The device runs the embeddings and blocks ``[0, cut)``; the server runs blocks
``[cut, n)``; the head (final norm + lm_head) runs on the server, or on the device in the
U-shaped variant. Each piece is computed exactly as the whole model computes it (the same
causal mask, rotary embeddings and scoring as ``edgefed.ml.objectives``), so gradients through
the pieces equal the whole model's. Both sides build the same base model and adapter; the
device may then drop what it never runs (:func:`keep_device_part`).

See docs/architecture.md §6 ``split``.
"""

from __future__ import annotations

import re
from typing import cast

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PretrainedConfig

from edgefed.ml.models import adapter_parameters
from edgefed.ml.objectives import logits_loss
from edgefed.ml.tokens import IGNORE_INDEX
from schemas.errors import ConfigError

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _decoder(model: PeftModel) -> nn.Module:
    """The Llama-style decoder (``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``)."""
    inner = model.get_base_model()
    decoder = getattr(inner, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not isinstance(decoder, nn.Module) or not all(hasattr(decoder, a) for a in needed):
        raise ConfigError(
            f"split learning needs a Llama-style causal LM, not {type(inner).__name__}"
        )
    return decoder


def _part(decoder: nn.Module, name: str) -> nn.Module:
    return cast("nn.Module", getattr(decoder, name))


def _layers(decoder: nn.Module) -> nn.ModuleList:
    return cast("nn.ModuleList", decoder.layers)


def model_config(model: PeftModel) -> PretrainedConfig:
    """The base model's config (sizes, attention implementation)."""
    return cast("PretrainedConfig", getattr(model.get_base_model(), "config"))  # noqa: B009


def num_blocks(model: PeftModel) -> int:
    """Transformer blocks of the whole model (from its config, even after a cut)."""
    return int(model_config(model).num_hidden_layers)


def check_cut(model: PeftModel, cut: int) -> int:
    """``cut`` if the device part is 1..n-1 blocks; raises ``ConfigError`` otherwise."""
    total = num_blocks(model)
    if not 1 <= cut < total:
        raise ConfigError(f"cut must lie in 1..{total - 1} for a {total}-block model, got {cut}")
    return cut


def block_of(name: str) -> int | None:
    """The block index an adapter tensor belongs to, or None (head, embeddings)."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def part_names(model: PeftModel, start: int, stop: int) -> list[str]:
    """Adapter tensor names (wire names) of blocks ``[start, stop)``."""
    return [
        name
        for name in adapter_parameters(model)
        if (block := block_of(name)) is not None and start <= block < stop
    ]


def causal_mask(hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
    """The additive ``[b, 1, s, s]`` mask a decoder block takes: causal, padding masked out.

    Built here with torch alone (0 where a query may attend, the dtype's minimum where
    not), as the eager and SDPA attention of transformers accept it, so the cut never
    depends on transformers' internal mask helpers, whose signature changes between
    releases.
    """
    batch, length = hidden.shape[0], hidden.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()
    allowed = allowed.expand(batch, 1, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    blocked = torch.finfo(hidden.dtype).min
    return torch.zeros_like(allowed, dtype=hidden.dtype).masked_fill(~allowed, blocked)


def _mask_and_positions(
    model: PeftModel, hidden: Tensor, attention_mask: Tensor | None
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    rotary = cast("tuple[Tensor, Tensor]", _part(_decoder(model), "rotary_emb")(hidden, positions))
    return causal_mask(hidden, attention_mask), rotary


def embed(model: PeftModel, input_ids: Tensor) -> Tensor:
    """Token embeddings, the input of block 0."""
    return cast("Tensor", _part(_decoder(model), "embed_tokens")(input_ids))


def run_blocks(
    model: PeftModel, hidden: Tensor, attention_mask: Tensor | None, start: int, stop: int
) -> Tensor:
    """Blocks ``[start, stop)`` on ``hidden`` (``[b, s, h]``), as the whole model runs them."""
    decoder = _decoder(model)
    mask, rotary = _mask_and_positions(model, hidden, attention_mask)
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    for block in _layers(decoder)[start:stop]:
        hidden = block(
            hidden, attention_mask=mask, position_embeddings=rotary, position_ids=positions
        )
    return hidden


def head_loss(
    model: PeftModel, hidden: Tensor, labels: Tensor, choices: tuple[int, ...] | None = None
) -> Tensor:
    """Final norm, lm_head and mean cross-entropy over scored positions (``batch_loss``'s).

    Like ``edgefed.ml.objectives.scored_logits`` only positions from the first scored one on go
    through the head; with ``choices`` only those tokens compete, as in ``batch_loss``.

    Raises:
        ValueError: Nothing in the batch is scored, or a target is not among ``choices``.
    """
    decoder = _decoder(model)
    head = _part(model.get_base_model(), "lm_head")
    norm = _part(decoder, "norm")
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX
    columns = scored.any(dim=0).nonzero()
    first = int(columns[0]) if len(columns) else 0
    logits = head(norm(hidden[:, first:]))[:, :-1]
    keep = scored[:, first:]
    if not bool(keep.any()):
        raise ValueError("batch has no scored positions")
    return logits_loss(logits[keep].float(), targets[:, first:][keep], choices)


def keep_device_part(model: PeftModel, cut: int, *, keep_head: bool) -> None:
    """Drop the blocks from ``cut`` on (and the head unless ``keep_head``) from ``model``.

    What the device never runs it need not hold: memory then scales with ``cut``. The
    adapter of the dropped blocks disappears with them.
    """
    check_cut(model, cut)
    decoder = _decoder(model)
    decoder.layers = nn.ModuleList(list(_layers(decoder))[:cut])
    if not keep_head:
        inner = model.get_base_model()
        inner.lm_head = nn.Identity()
        decoder.norm = nn.Identity()
