"""A sentence encoder classifies from the pooling it was trained with.

A sentence-transformers folder (all-MiniLM-L6-v2 among them) says in
``1_Pooling/config.json`` how its sentence embedding is made: for MiniLM, the mean of the
token states. transformers' ``...ForSequenceClassification`` ignores that and classifies
from the first token through the inherited BERT pooler, which sentence training never
tuned. Pooling as the model was trained starts every method from the embedding the model
is known for (measured in docs/architecture.md §6).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from torch import Tensor, nn

from schemas.errors import ConfigError

POOLING_CONFIG: Final = Path("1_Pooling") / "config.json"


class MaskedMeanPooler(nn.Module):
    """Stands in for a BERT-style pooler: the mean of the token states the mask keeps.

    A pooler is called with the token states only, so the encoder's attention mask is
    taken from its call by :meth:`remember_mask`, a hook registered on the encoder. It has
    no parameters: the adapter and the head are unchanged on the wire.
    """

    def __init__(self) -> None:
        super().__init__()
        self._mask: Tensor | None = None

    def remember_mask(
        self, _encoder: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        """Forward pre-hook of the encoder: keep this call's attention mask."""
        self._mask = kwargs.get("attention_mask")

    def forward(self, hidden: Tensor) -> Tensor:
        """``[batch, seq, hidden]`` -> ``[batch, hidden]``: the mean over unmasked tokens."""
        if self._mask is None or self._mask.shape != hidden.shape[:2]:
            return hidden.mean(dim=1)
        weights = self._mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def trained_pooling(folder: Path) -> str | None:
    """``"mean"`` when ``folder``'s sentence-transformers config pools by the mean, else None.

    Raises:
        ConfigError: The pooling config exists but cannot be read.
    """
    path = folder / POOLING_CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the pooling config {str(path)!r}: {exc}") from exc
    return "mean" if isinstance(config, dict) and config.get("pooling_mode_mean_tokens") else None


def pool_by_mean(model: nn.Module) -> bool:
    """Replace the pooler of ``model``'s encoder with :class:`MaskedMeanPooler`, in place.

    Returns:
        Whether ``model`` had a pooler to replace (BERT-style encoders do).
    """
    prefix = getattr(model, "base_model_prefix", "")
    encoder = getattr(model, prefix, None) if prefix else None
    if not isinstance(encoder, nn.Module) or not isinstance(
        getattr(encoder, "pooler", None), nn.Module
    ):
        return False
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler
    encoder.register_forward_pre_hook(pooler.remember_mask, with_kwargs=True)
    return True


__all__ = ["POOLING_CONFIG", "MaskedMeanPooler", "pool_by_mean", "trained_pooling"]
