"""Reloading exported adapters the way a user of plain peft does."""

from __future__ import annotations

import warnings
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel


def reload_with_peft(base: PreTrainedModel, folder: str | Path) -> PeftModel:
    """``PeftModel.from_pretrained(base, folder)`` in eval mode."""
    with warnings.catch_warnings():  # peft asks transformers for a renamed attribute
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, str(folder)).eval()
