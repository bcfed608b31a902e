"""A fit running in a worker thread stops at its next forward pass once asked to."""

import threading
import time

import pytest
import torch

from edge_agent.fit_stop import stoppable
from edge_agent.trainers import LoraTrainer, make_trainer
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.models import attach_lora, build_model, get_adapter
from schemas.errors import FitStopped
from schemas.messages import LoraSpec, TrainSpec


def _trainer() -> LoraTrainer:
    trainer = make_trainer("lora", attach_lora(build_model("tiny"), LoraSpec()))
    assert isinstance(trainer, LoraTrainer)
    return trainer


def test_stoppable_fit_stops_mid_run_and_leaves_no_hook() -> None:
    trainer = _trainer()
    data = synthetic_dataset(64, seed=1)
    start = get_adapter(trainer.model)
    forwards = 0

    def count(_module: torch.nn.Module, _args: object) -> None:
        nonlocal forwards
        forwards += 1

    counting = trainer.model.register_forward_pre_hook(count)
    stop = threading.Event()
    fit = stoppable(
        lambda: trainer.fit(start, data, TrainSpec(local_steps=100_000, batch_size=4), seed=0),
        stop,
        trainer.model,
    )
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fit()
            outcome.append(None)
        except FitStopped as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while forwards < 3:  # it is training
        time.sleep(0.01)
    stop.set()
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert isinstance(outcome[0], FitStopped)
    assert forwards < 100_000
    counting.remove()
    # The stop hook went with the fit: the same model trains again to the end.
    result = trainer.fit(start, data, TrainSpec(local_steps=2, batch_size=4), seed=0)
    assert result.steps == 2


def test_stoppable_without_a_model_runs_to_the_end() -> None:
    stop = threading.Event()
    stop.set()
    assert stoppable(lambda: 7, stop, object())() == 7


def test_unset_event_changes_nothing() -> None:
    trainer = _trainer()
    data = synthetic_dataset(32, seed=2)
    start = get_adapter(trainer.model)
    spec = TrainSpec(local_steps=3, batch_size=4)
    plain = trainer.fit(start, data, spec, seed=5)
    wrapped = stoppable(
        lambda: trainer.fit(start, data, spec, seed=5), threading.Event(), trainer.model
    )()
    for name in plain.delta:
        torch.testing.assert_close(plain.delta[name], wrapped.delta[name])
    with pytest.raises(FitStopped):
        done = threading.Event()
        done.set()
        stoppable(lambda: trainer.fit(start, data, spec, seed=5), done, trainer.model)()
