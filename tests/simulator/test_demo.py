"""The default demo's settings: valid for the aggregator and the devices, inside its time bound."""

from __future__ import annotations

import torch

from edge_agent.trainers import LoraTrainer, make_trainer
from edgefed.ml.models import attach_lora, build_model
from simulator.demo import DEMO_FLEET, TRAIN_SECONDS, tail_average
from simulator.fleet import FleetResult, aggregator_config


def test_demo_fleet_trains_label_tokens_in_bf16_with_a_doubled_server_step() -> None:
    agg = aggregator_config(DEMO_FLEET)
    assert agg.model.name == "smollm2-135m" and agg.dataset == "rotten-tomatoes"
    assert agg.strategy.server_lr == 2.0  # the mean of 3 moves, doubled
    # The devices' options must be ones the lora trainer knows (unknown ones raise).
    model = attach_lora(build_model("tiny"), agg.lora)
    trainer = make_trainer("lora", model, **DEMO_FLEET.trainer["lora"])
    assert isinstance(trainer, LoraTrainer) and trainer.config.loss == "choices"
    assert trainer.config.precision == "auto"  # bf16 where the CPU has it: more steps
    assert agg.eval_every == 0  # no scoring competes with the devices while they train
    # Training plus start-up (~8 s) and scoring (base and final, ~70 s) stays within 8 minutes.
    assert DEMO_FLEET.max_seconds == TRAIN_SECONDS <= 8 * 60 - 90


def _adapter(value: float) -> dict[str, torch.Tensor]:
    return {"a": torch.full((2, 3), value), "b": torch.full((4,), -value)}


def test_tail_average_is_the_mean_of_the_last_trained_versions() -> None:
    result = FleetResult(
        results={},
        agents=[],
        final_adapter=_adapter(4.0),
        final_version=4,
        snapshots={0: _adapter(0.0), 1: _adapter(1.0), 3: _adapter(3.0)},  # 2 was missed
    )
    mean, versions = tail_average(result, 2)
    assert versions == [3, 4]
    torch.testing.assert_close(mean["a"], torch.full((2, 3), 3.5))
    torch.testing.assert_close(mean["b"], torch.full((4,), -3.5))
    # Never the untrained version 0 while trained ones exist.
    assert tail_average(result, 10)[1] == [1, 3, 4]
    untrained = FleetResult(results={}, agents=[], final_adapter=_adapter(0.0), final_version=0)
    assert tail_average(untrained, 3)[1] == [0]
