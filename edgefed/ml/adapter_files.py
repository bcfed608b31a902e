"""PEFT adapter folders in and out: what a federation starts from and what it leaves behind.

A folder is what ``PeftModel.save_pretrained`` writes (``adapter_config.json`` and the
weights) and ``PeftModel.from_pretrained(base, folder)`` reads, so an adapter trained
elsewhere can seed a federation and a federation's result can be used without edgefed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from peft import PeftModel
from peft.utils import load_peft_weights

from edgefed.ml.models import export_adapter, get_adapter, set_adapter
from schemas.errors import ConfigError
from schemas.messages import TensorMap

CONFIG_FILE = "adapter_config.json"
_MATCHED = ("r", "lora_alpha", "target_modules", "task_type")
"""Settings of ``adapter_config.json`` the model's own adapter must share: equal shapes
are not enough (``lora_alpha`` scales the product without changing a shape)."""


def read_adapter(model: PeftModel, folder: str | Path) -> TensorMap:
    """Load the adapter in ``folder`` into ``model`` and return it as a tensor map.

    Raises:
        ConfigError: ``folder`` holds no adapter, or one of another rank, scale, target
            modules, task type, or other shapes than ``model``'s adapter.
    """
    path = Path(folder)
    try:
        saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a PEFT adapter folder: {exc}") from exc
    own = model.peft_config[model.active_adapter].to_dict()
    differ = [
        f"{key} {saved.get(key)!r} (the federation's: {own.get(key)!r})"
        for key in _MATCHED
        if _comparable(saved.get(key)) != _comparable(own.get(key))
    ]
    if differ:
        raise ConfigError(
            f"adapter {path} does not fit the federation's [lora] settings: {'; '.join(differ)}"
        )
    try:
        tensors = load_peft_weights(str(path), device="cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the adapter weights in {path}: {exc}") from exc
    set_adapter(model, tensors)  # strict: every name and shape, or nothing
    return get_adapter(model)


def is_adapter(folder: str | Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter (its ``adapter_config.json``)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def _comparable(value: object) -> object:
    """Target modules compare as a set; numbers by value (``16`` is ``16.0``)."""
    if isinstance(value, list | tuple | set):
        return sorted(map(str, value))
    return value


def replace_adapter_folder(
    model: PeftModel, tensors: TensorMap, folder: str | Path, *, info: dict[str, object]
) -> Path:
    """Write ``tensors`` to ``folder`` as a PEFT adapter, with ``info`` in ``edgefed.json``.

    The new folder is written beside the old one and swapped in by renames, so a reader
    finds the previous adapter or the new one, each whole.
    """
    target = Path(folder)
    staging = target.with_name(f".{target.name}.new")
    retired = target.with_name(f".{target.name}.old")
    for leftover in (staging, retired):
        shutil.rmtree(leftover, ignore_errors=True)
    export_adapter(model, tensors, staging)
    (staging / "edgefed.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    if target.exists():
        target.replace(retired)
    staging.replace(target)
    shutil.rmtree(retired, ignore_errors=True)
    return target
