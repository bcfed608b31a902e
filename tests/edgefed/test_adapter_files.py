"""PEFT adapter folders: read into a model with the same settings, refused otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from edgefed.ml.adapter_files import is_adapter, read_adapter, replace_adapter_folder
from edgefed.ml.models import attach_lora, build_model, get_adapter
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TensorMap
from tests.peft_helpers import reload_with_peft


def _trained(spec: LoraSpec) -> tuple[PeftModel, TensorMap]:
    model = attach_lora(build_model("tiny", seed=0), spec)
    moved = {name: t + 0.25 for name, t in get_adapter(model).items()}
    return model, moved


def test_a_written_folder_reads_back_into_a_fresh_model(tmp_path: Path) -> None:
    model, moved = _trained(LoraSpec())
    folder = replace_adapter_folder(model, moved, tmp_path / "adapter", info={"version": 3})
    assert is_adapter(folder) and (folder / "edgefed.json").read_text().count("3") == 1
    fresh = attach_lora(build_model("tiny", seed=0), LoraSpec())
    loaded = read_adapter(fresh, folder)
    assert loaded.keys() == moved.keys()
    assert all(torch.equal(loaded[name], moved[name]) for name in moved)


def test_replacing_a_folder_leaves_only_the_new_adapter(tmp_path: Path) -> None:
    model, moved = _trained(LoraSpec())
    target = tmp_path / "adapter"
    replace_adapter_folder(model, get_adapter(model), target, info={"version": 0})
    replace_adapter_folder(model, moved, target, info={"version": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    base = build_model("tiny", seed=0)
    reloaded = reload_with_peft(base, target)
    ids = torch.arange(12).reshape(1, 12)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize(
    ("other", "named"),
    [
        (LoraSpec(rank=4), "r 8"),
        (LoraSpec(alpha=32.0), "lora_alpha 16.0"),
        (LoraSpec(target_modules=("q_proj", "k_proj", "v_proj")), "target_modules"),
    ],
)
def test_a_folder_of_other_settings_is_refused_by_name(
    tmp_path: Path, other: LoraSpec, named: str
) -> None:
    model, moved = _trained(LoraSpec())
    folder = replace_adapter_folder(model, moved, tmp_path / "adapter", info={})
    with pytest.raises(ConfigError, match=named):
        read_adapter(attach_lora(build_model("tiny", seed=0), other), folder)


def test_a_folder_without_an_adapter_is_refused(tmp_path: Path) -> None:
    model = attach_lora(build_model("tiny", seed=0), LoraSpec())
    with pytest.raises(ConfigError, match="not a PEFT adapter folder"):
        read_adapter(model, tmp_path)
