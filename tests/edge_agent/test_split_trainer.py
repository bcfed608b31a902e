"""Split learning's device half against the whole model: same loss, same gradients."""

import pytest
import torch

from aggregator.split_training import SplitServer, SplitServerConfig
from edge_agent.split_channel import DirectSplitChannel
from edge_agent.trainers import SplitTrainer, make_trainer
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.models import (
    adapter_parameters,
    adapter_shapes,
    attach_lora,
    build_model,
    get_adapter,
    set_adapter,
)
from edgefed.ml.objectives import batch_loss
from edgefed.ml.split_model import part_names
from edgefed.ml.tokens import TokenBatch
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TensorMap, TrainSpec

SPEC = LoraSpec(rank=4, target_modules=("q_proj", "v_proj", "o_proj"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model():
    return attach_lora(build_model("tiny-4l"), SPEC)


def _random_adapter() -> TensorMap:
    gen = torch.Generator().manual_seed(7)
    shapes = adapter_shapes(_model())
    return {n: torch.randn(s, generator=gen) * 0.2 for n, s in shapes.items()}


def _batch() -> TokenBatch:
    data = synthetic_dataset(6, seed=3)
    return next(iter(data.batches(6, generator=torch.Generator().manual_seed(0))))


@pytest.mark.parametrize("variant", ["vanilla", "u_shaped"])
@pytest.mark.parametrize("cut", [1, 3])
def test_split_step_gradients_equal_whole_model(cut: int, variant: str):
    adapter, batch = _random_adapter(), _batch()
    whole = _model()
    set_adapter(whole, adapter)
    loss = batch_loss(whole, batch)
    loss.backward()
    expected = {n: p.grad for n, p in adapter_parameters(whole).items()}

    server_model = _model()
    set_adapter(server_model, adapter)
    server = SplitServer(server_model, task_id="t", config=SplitServerConfig(keep_grads=True))
    trainer = make_trainer("split", _model(), cut=cut, variant=variant, compression="none")
    assert isinstance(trainer, SplitTrainer)
    trainer.connect(DirectSplitChannel(server, client_id="dev"))
    device_params = adapter_parameters(trainer.model)
    set_adapter(trainer.model, {n: adapter[n] for n in device_params})
    record = trainer.step(batch)

    assert record.loss == pytest.approx(float(loss.detach()), abs=1e-6)
    assert record.bytes_up > 0 and record.bytes_down > 0
    device_names = part_names(whole, 0, cut)
    assert set(device_params) == set(device_names)  # the rest was dropped on the device
    server_names = part_names(whole, cut, 4)
    assert set(server.last_grads) == set(server_names)
    for name in device_names:
        grad = device_params[name].grad
        assert grad is not None
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=0)
    for name in server_names:
        torch.testing.assert_close(server.last_grads[name], expected[name], atol=1e-5, rtol=0)
    assert any(float(expected[n].abs().max()) > 1e-3 for n in device_names)


def test_split_fit_trains_only_the_device_part_and_lowers_loss():
    adapter = get_adapter(_model())
    server = SplitServer(_model(), task_id="t")
    trainer = make_trainer("split", _model(), cut=2, compression="int8")
    assert isinstance(trainer, SplitTrainer)
    trainer.connect(DirectSplitChannel(server, client_id="dev", compression="int8"))
    data = synthetic_dataset(64, seed=1)
    result = trainer.fit(adapter, data, TrainSpec(local_steps=30, batch_size=8, lr=2e-2), seed=0)
    assert set(result.delta) == set(adapter)
    device = set(part_names(_model(), 0, 2))
    for name, delta in result.delta.items():
        assert bool(delta.any()) == (name in device), name
    losses = [s.loss for s in trainer.history.steps]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert trainer.history.peak_mb > 0
    assert all(s.bytes_up > 0 and s.compute_s > 0 for s in trainer.history.steps)


def test_split_config_errors():
    with pytest.raises(ConfigError, match="cut"):
        make_trainer("split", _model(), cut=4)
    with pytest.raises(ConfigError, match="variant"):
        make_trainer("split", _model(), variant="sideways")
    trainer = make_trainer("split", _model(), cut=1)
    with pytest.raises(ConfigError, match="channel"):
        trainer.fit(get_adapter(_model()), synthetic_dataset(8, seed=0), TrainSpec(), seed=0)


def test_planner_gives_small_budgets_a_small_cut():
    from edge_agent.budget import Budget
    from edge_agent.memory_estimate import model_shape
    from edge_agent.planner import Plan, plan_training

    cuts = []
    for mb in (700.0, 1000.0, 1400.0):
        plan = plan_training(
            model_shape("smollm2-135m"),
            budget=Budget(mb=mb, source="config"),
            methods=("split",),
            train=TrainSpec(batch_size=8, seq_len=128),
            lora=LoraSpec(),
        )
        assert isinstance(plan, Plan) and plan.method == "split" and plan.cut is not None
        cuts.append(plan.cut)
    assert cuts == sorted(cuts) and cuts[0] < cuts[-1]
    assert cuts[0] <= 2


@pytest.mark.parametrize("variant", ["vanilla", "u_shaped"])
def test_a_split_step_among_choices_equals_the_whole_models_choice_loss(variant: str):
    adapter, batch = _random_adapter(), _batch()
    choices = tuple(sorted({int(t) for t in batch.labels[:, 1:].flatten()}))[:8]
    keep = torch.isin(batch.labels, torch.tensor(choices))
    labels = torch.where(keep, batch.labels, torch.full_like(batch.labels, -100))
    labels[:, 0] = -100  # the first token predicts nothing
    batch = TokenBatch(input_ids=batch.input_ids, labels=labels)
    whole = _model()
    set_adapter(whole, adapter)
    expected = float(batch_loss(whole, batch, choices=choices).detach())
    server = SplitServer(_model(), task_id="t")
    set_adapter(server.model, adapter)
    trainer = make_trainer("split", _model(), cut=2, variant=variant, compression="none")
    assert isinstance(trainer, SplitTrainer)
    trainer.connect(DirectSplitChannel(server, client_id="dev"))
    set_adapter(trainer.model, {n: adapter[n] for n in adapter_parameters(trainer.model)})
    assert trainer.step(batch, choices).loss == pytest.approx(expected, abs=1e-5)
    assert expected < 0.8 * float(batch_loss(whole, batch).detach())  # fewer candidates, lower loss
