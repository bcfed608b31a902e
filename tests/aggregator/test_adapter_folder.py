"""PEFT in and out of a federation: init_adapter, <checkpoint_dir>/adapter/, export."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from aggregator.adapter_folder import FederationModel, export_version
from aggregator.service import AggregatorService
from edgefed.ml.adapter_files import replace_adapter_folder
from edgefed.ml.models import build_model, get_adapter, set_adapter
from edgefed.transport.memory import MemoryBroker
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TensorMap
from tests.aggregator.test_service_recovery import make_config, make_update, running
from tests.peft_helpers import reload_with_peft


def _logits(tensors: TensorMap, config_lora: LoraSpec) -> torch.Tensor:
    model = FederationModel(model={"name": "tiny"}, lora=config_lora, dataset="synthetic", seed=0)
    peft_model = model.build().eval()
    set_adapter(peft_model, tensors)
    with torch.no_grad():
        return peft_model(input_ids=torch.arange(16).reshape(2, 8)).logits


async def test_a_run_starts_from_an_adapter_and_keeps_and_exports_peft_folders(
    tmp_path: Path,
) -> None:
    seed_config = make_config(tmp_path)
    start_model = FederationModel.of(seed_config).build()
    start = {name: t + 0.1 for name, t in get_adapter(start_model).items()}
    replace_adapter_folder(start_model, start, tmp_path / "given", info={})
    config = make_config(tmp_path, init_adapter=str(tmp_path / "given"))
    async with running(config, MemoryBroker()) as run:
        assert all(torch.equal(run.service.current[n], start[n]) for n in start)
        for client in ("dev1", "dev2"):  # a buffer of two: version 1
            assert (await run.send_and_ack(make_update(start, client))).accepted
        await asyncio.wait_for(run.service.wait_for_version(1), 10)  # its adapter kept
        last = run.service.current
    kept = tmp_path / "ckpt" / "adapter"
    info = json.loads((kept / "edgefed.json").read_text())
    assert info["version"] == 1 and info["run_id"] == run.service.run_id
    expected = _logits(last, config.lora)
    assert torch.allclose(reload_with_peft(build_model("tiny", seed=0), kept)(
        input_ids=torch.arange(16).reshape(2, 8)).logits, expected)  # fmt: skip

    exported = export_version(tmp_path / "ckpt", tmp_path / "v0", 0)
    assert exported.version == 0
    v0 = reload_with_peft(build_model("tiny", seed=0), tmp_path / "v0")
    with torch.no_grad():
        assert torch.allclose(
            v0(input_ids=torch.arange(16).reshape(2, 8)).logits, _logits(start, config.lora)
        )
    assert export_version(tmp_path / "ckpt", tmp_path / "v0", None).version == 1  # replaced
    with pytest.raises(ConfigError, match=r"keeps versions \[0, 1\]"):
        export_version(tmp_path / "ckpt", tmp_path / "v7", 7)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an adapter folder"):
        export_version(tmp_path / "ckpt", tmp_path / "notes", None)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


async def test_an_adapter_of_other_settings_stops_the_start(tmp_path: Path) -> None:
    other = FederationModel.of(make_config(tmp_path, lora=LoraSpec(rank=4))).build()
    replace_adapter_folder(other, get_adapter(other), tmp_path / "given", info={})
    config = make_config(tmp_path, init_adapter=str(tmp_path / "given"))
    transport = MemoryBroker().transport("aggregator")
    async with transport:
        service = AggregatorService(config, transport)
        with pytest.raises(ConfigError, match="r 4"):
            await service.start()
        service.close()


def test_export_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"edgefed\.json is missing"):
        export_version(tmp_path, tmp_path / "out", None)
