"""bf16 autocast for local steps: resolved from the hardware, and it still trains."""

import pytest
import torch

from edge_agent.trainers import LoraTrainer, make_trainer
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml import precision
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import attach_lora, build_model, get_adapter, set_adapter
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TrainSpec

CPU = torch.device("cpu")


def test_resolve_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    assert precision.resolve("fp32", CPU) == "fp32"
    assert precision.resolve("bf16", CPU) == "bf16"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve("auto", CPU) == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve("auto", CPU) == "bf16"


def test_a_cpu_with_bf16_instructions_still_needs_bf16_to_be_faster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: True)
    monkeypatch.setattr(precision, "_cpu_bf16_faster", lambda: False)
    assert precision.resolve("auto", CPU) == "fp32"
    monkeypatch.setattr(precision, "_cpu_bf16_faster", lambda: True)
    assert precision.resolve("auto", CPU) == "bf16"
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: False)
    assert precision.resolve("auto", CPU) == "fp32"  # emulated bf16 is never timed


def test_autocast_runs_matmuls_in_bf16_only_when_asked() -> None:
    a = torch.randn(4, 4)
    with precision.autocast("bf16", CPU):
        assert (a @ a).dtype == torch.bfloat16
    with precision.autocast("fp32", CPU):
        assert (a @ a).dtype == torch.float32


def test_lora_fit_under_bf16_lowers_the_loss_and_keeps_fp32_deltas() -> None:
    torch.manual_seed(0)
    model = attach_lora(build_model("tiny"), LoraSpec())
    trainer = make_trainer("lora", model, precision="bf16")
    assert isinstance(trainer, LoraTrainer)
    data = synthetic_dataset(64, seed=3)
    start = get_adapter(model)
    before = evaluate(model, data).loss
    fit = trainer.fit(start, data, TrainSpec(local_steps=30, batch_size=8, lr=1e-2), seed=0)
    assert all(d.dtype == torch.float32 for d in fit.delta.values())
    set_adapter(model, {k: start[k] + fit.delta[k] for k in start})
    assert evaluate(model, data).loss < before - 0.05


def test_unknown_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="precision"):
        make_trainer("lora", attach_lora(build_model("tiny"), LoraSpec()), precision="fp8")
