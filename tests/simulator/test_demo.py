"""The default demo's settings: valid for the aggregator and the devices, inside its time bound."""

from __future__ import annotations

from edge_agent.trainers import LoraTrainer, make_trainer
from edgefed.modeling import attach_lora, build_model
from simulator.demo import DEMO_FLEET, TRAIN_SECONDS
from simulator.fleet import aggregator_config


def test_demo_fleet_devices_train_on_the_label_tokens_under_a_plain_server_step() -> None:
    agg = aggregator_config(DEMO_FLEET)
    assert agg.model.name == "smollm2-135m" and agg.dataset == "rotten-tomatoes"
    assert agg.strategy.server_lr == 1.0  # larger steps made the global swing
    # The devices' options must be ones the lora trainer knows (unknown ones raise).
    model = attach_lora(build_model("tiny"), agg.lora)
    trainer = make_trainer("lora", model, **DEMO_FLEET.trainer["lora"])
    assert isinstance(trainer, LoraTrainer) and trainer.config.loss == "choices"
    assert trainer.config.precision == "auto"  # bf16 where the CPU has it: more steps
    assert agg.eval_every == 0  # no scoring competes with the devices while they train
    # Training plus start-up and scoring (base and final, about 80 s when idle) stays within 8 minutes.
    assert DEMO_FLEET.max_seconds == TRAIN_SECONDS <= 8 * 60 - 80
