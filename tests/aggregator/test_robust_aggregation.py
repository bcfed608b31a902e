"""A sign-flipped client against the FedBuff reductions, on real LoRA training.

Synchronous and seeded (every round, each of four devices trains once on its shard from the
current global), so the contrast between the plain weighted mean and the robust reductions is
the same on every run; ``tests/simulator/test_robust_fleet.py`` shows the robust side over
MQTT with real asynchrony.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from aggregator.strategies import make_strategy
from aggregator.validation import ValidationPolicy, validate_update
from edge_agent.trainers import make_trainer
from edgefed.data.synthetic import synthetic_dataset, synthetic_shards
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import adapter_shapes, attach_lora, build_model, get_adapter, set_adapter
from schemas.messages import LoraSpec, TrainSpec, Update
from simulator.attacks import Attack

ROUNDS = 6
DEVICES = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _federate(robust: str, *, max_update_norm: float | None) -> list[float]:
    """Eval loss after each round of a 4-device federation whose device 0 is poisoned."""
    model = attach_lora(build_model("tiny"), LoraSpec())
    trainer = make_trainer("lora", model)
    shapes = adapter_shapes(model)
    shards = synthetic_shards(DEVICES, total=400, seq_len=32, seed=1)
    held_out = synthetic_dataset(128, seed=999)
    attack = Attack(kind="sign_flip", factor=10.0, clients=(0,))
    strategy = make_strategy("fedbuff", buffer_size=DEVICES, robust=robust, trim_ratio=0.25)
    policy = ValidationPolicy(max_update_norm=max_update_norm)
    current = get_adapter(model)

    def loss() -> float:
        set_adapter(model, current)
        return evaluate(model, held_out).loss

    losses = [loss()]
    for round_index in range(ROUNDS):
        for device, shard in enumerate(shards):
            fit = trainer.fit(current, shard, TrainSpec(), seed=round_index * DEVICES + device)
            if device in attack.clients:
                fit = attack(fit)
            update = Update(
                client_id=f"dev{device}",
                task_id="t",
                base_version=round_index,
                num_samples=fit.num_samples,
                delta=fit.delta,
            )
            checked = validate_update(
                update,
                task_id="t",
                method="lora",
                current_version=round_index,
                shapes=shapes,
                policy=policy,
            )
            result = strategy.submit(
                current=current,
                base=current,
                delta=checked.delta,
                staleness=0,
                num_samples=update.num_samples,
                update_id=update.update_id,
            )
        assert result.new_global is not None
        current = result.new_global
        losses.append(loss())
    return losses


@pytest.mark.slow
def test_robust_aggregation_sign_flipped_client_hurts_mean_not_median() -> None:
    plain = _federate("mean", max_update_norm=None)
    median = _federate("median", max_update_norm=None)
    # Trim one value at each end of every coordinate, after clipping (honest norms are ~1).
    clipped = _federate("trimmed_mean", max_update_norm=2.0)
    assert plain[-1] > plain[0], plain  # the plain mean walks uphill
    assert median[-1] < 0.8 * median[0], median
    assert clipped[-1] < 0.8 * clipped[0], clipped
