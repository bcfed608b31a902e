import math

import pytest
import torch
from pydantic import ValidationError

from edge_agent.trainers import TRAINERS, LoraConfig, LoraTrainer, make_trainer
from edgefed.data.synthetic import synthetic_dataset, synthetic_shards
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import adapter_shapes, attach_lora, build_model, get_adapter, set_adapter
from edgefed.ml.objectives import batch_loss
from edgefed.ml.tokens import IGNORE_INDEX, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TensorMap, TrainSpec


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny matrices gain nothing from a second thread, and a contended pool is slow.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(spec: LoraSpec | None = None, **config: object) -> LoraTrainer:
    model = attach_lora(build_model("tiny"), spec or LoraSpec())
    trainer = make_trainer("lora", model, **config)
    assert isinstance(trainer, LoraTrainer)
    return trainer


def _add(a: TensorMap, b: TensorMap) -> TensorMap:
    return {k: a[k] + b[k] for k in a}


def _lora_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_A." in n}


def test_fit_returns_delta_with_adapter_layout():
    trainer = _trainer()
    data = synthetic_dataset(100, seed=1)
    glob = get_adapter(trainer.model)
    result = trainer.fit(glob, data, TrainSpec(local_steps=3, batch_size=8), seed=0)
    shapes = adapter_shapes(trainer.model)
    assert list(result.delta) == list(shapes)
    assert {k: tuple(v.shape) for k, v in result.delta.items()} == shapes
    assert all(v.dtype == torch.float32 for v in result.delta.values())
    assert any(v.abs().sum() > 0 for v in result.delta.values())
    assert result.steps == 3
    assert result.num_samples == 24
    assert math.isfinite(result.train_loss)
    assert result.compute_s > 0
    after = get_adapter(trainer.model)
    for k in glob:
        torch.testing.assert_close(after[k], glob[k] + result.delta[k])


def test_fit_counts_distinct_samples_and_truncates_seq_len():
    trainer = _trainer()
    small = synthetic_dataset(10, seed=1)
    glob = get_adapter(trainer.model)
    result = trainer.fit(glob, small, TrainSpec(local_steps=5, batch_size=8, seq_len=12), seed=0)
    assert result.steps == 5
    assert result.num_samples == 10


def test_fit_is_deterministic_across_models_and_seeded():
    spec = TrainSpec(local_steps=4)
    data = synthetic_dataset(64, seed=2)
    first, second = _trainer(), _trainer()
    glob = get_adapter(first.model)
    glob = {k: v + 0.01 for k, v in glob.items()}  # start somewhere other than init
    a = first.fit(glob, data, spec, seed=11)
    torch.manual_seed(999)  # global RNG state must not matter
    b = second.fit(glob, data, spec, seed=11)
    c = first.fit(glob, data, spec, seed=11)  # same instance, after another fit
    d = first.fit(glob, data, spec, seed=12)
    for k in a.delta:
        assert torch.equal(a.delta[k], b.delta[k])
        assert torch.equal(a.delta[k], c.delta[k])
    assert a.train_loss == b.train_loss
    assert any(not torch.equal(a.delta[k], d.delta[k]) for k in a.delta)


def test_fit_with_dropout_is_deterministic_and_leaves_global_rng_alone():
    spec = LoraSpec(dropout=0.1)
    data = synthetic_dataset(32, seed=2)
    first, second = _trainer(spec), _trainer(spec)
    glob = get_adapter(first.model)
    torch.manual_seed(5)
    a = first.fit(glob, data, TrainSpec(local_steps=3), seed=1)
    probe = torch.rand(2)
    torch.manual_seed(5)
    b = second.fit(glob, data, TrainSpec(local_steps=3), seed=1)
    assert torch.equal(torch.rand(2), probe)
    assert all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)


def test_fit_restores_training_mode():
    trainer = _trainer()
    trainer.model.eval()
    trainer.fit(
        get_adapter(trainer.model), synthetic_dataset(16, seed=0), TrainSpec(local_steps=1), seed=0
    )
    assert not trainer.model.training


def test_fit_rejects_mismatched_global():
    trainer = _trainer()
    glob = get_adapter(trainer.model)
    glob.popitem()
    with pytest.raises(ConfigError, match="missing"):
        trainer.fit(glob, synthetic_dataset(16, seed=0), TrainSpec(local_steps=1), seed=0)


def test_fit_lowers_eval_loss_on_synthetic_task():
    trainer = _trainer()
    data = synthetic_dataset(400, seed=1)
    held_out = synthetic_dataset(128, seed=99)
    glob = get_adapter(trainer.model)
    before = evaluate(trainer.model, held_out)
    result = trainer.fit(glob, data, TrainSpec(local_steps=60), seed=0)
    set_adapter(trainer.model, _add(glob, result.delta))
    after = evaluate(trainer.model, held_out)
    assert after.loss <= 0.8 * before.loss
    assert after.accuracy > before.accuracy + 0.3
    assert result.train_loss < before.loss


@pytest.mark.parametrize("mode", ["standard", "ffa"])
def test_federated_averaging_of_deltas_learns_within_twenty_versions(mode):
    """The target the defaults were chosen for: <= 0.8x eval loss in 20 versions of 5 steps."""
    trainer = _trainer(LoraSpec(mode=mode))
    shards = synthetic_shards(4, total=400, seed=1)
    held_out = synthetic_dataset(128, seed=99)
    glob = get_adapter(trainer.model)
    before = evaluate(trainer.model, held_out).loss
    spec = TrainSpec()  # defaults: 5 local steps, batch 8, seq 32
    for version in range(20):
        deltas = [
            trainer.fit(glob, shards[(version + i) % 4], spec, seed=version * 10 + i).delta
            for i in range(2)
        ]
        glob = {k: glob[k] + (deltas[0][k] + deltas[1][k]) / 2 for k in glob}
    set_adapter(trainer.model, glob)
    assert evaluate(trainer.model, held_out).loss <= 0.8 * before


def test_ffa_keeps_a_frozen_and_merging_b_is_exact():
    trainer = _trainer(LoraSpec(mode="ffa", seed=4))
    model = trainer.model
    shared_a = _lora_a(model)
    glob = get_adapter(model)
    assert all(".lora_B." in k for k in glob)
    shards = synthetic_shards(2, total=80, seed=3)
    fits = [
        trainer.fit(glob, shard, TrainSpec(local_steps=10), seed=i)
        for i, shard in enumerate(shards)
    ]
    after_a = _lora_a(model)
    assert all(torch.equal(shared_a[k], after_a[k]) for k in shared_a)
    assert all(".lora_B." in k for fit in fits for k in fit.delta)
    for b_name in glob:
        a = shared_a[b_name.replace(".lora_B.weight", ".lora_A.default.weight")]
        b_1, b_2 = (glob[b_name] + fit.delta[b_name] for fit in fits)
        assert not torch.allclose(b_1, b_2)  # the clients really diverged
        merged_product = ((b_1 + b_2) / 2) @ a
        mean_of_products = (b_1 @ a + b_2 @ a) / 2
        torch.testing.assert_close(merged_product, mean_of_products, rtol=1e-5, atol=1e-7)


def test_standard_mode_merging_a_and_b_is_not_exact():
    """Why ffa exists: averaging A and B separately differs from averaging B·A."""
    trainer = _trainer(LoraSpec(seed=4))
    glob = get_adapter(trainer.model)
    shards = synthetic_shards(2, total=80, seed=3)
    fits = [
        trainer.fit(glob, shard, TrainSpec(local_steps=10), seed=i)
        for i, shard in enumerate(shards)
    ]
    b_name = next(k for k in glob if ".lora_B." in k)
    a_name = b_name.replace("lora_B", "lora_A")
    a_1, a_2 = (glob[a_name] + f.delta[a_name] for f in fits)
    b_1, b_2 = (glob[b_name] + f.delta[b_name] for f in fits)
    merged = ((b_1 + b_2) / 2) @ ((a_1 + a_2) / 2)
    assert not torch.allclose(merged, (b_1 @ a_1 + b_2 @ a_2) / 2, atol=1e-6)


def test_sgd_optimizer_option():
    trainer = _trainer(optimizer="sgd", momentum=0.9, grad_clip=None)
    assert trainer.config == LoraConfig(optimizer="sgd", momentum=0.9, grad_clip=None)
    glob = get_adapter(trainer.model)
    result = trainer.fit(
        glob, synthetic_dataset(32, seed=0), TrainSpec(local_steps=2, lr=0.1), seed=0
    )
    assert any(v.abs().sum() > 0 for v in result.delta.values())


@pytest.mark.parametrize("loss", ["choices", "vocabulary"])
def test_fit_loss_option_scores_label_tokens_or_whole_vocabulary(loss):
    trainer = _trainer(loss=loss)
    base = synthetic_dataset(16, seq_len=12, seed=4)
    labels = torch.full_like(base.input_ids, IGNORE_INDEX)
    labels[:, -1] = torch.where(torch.arange(16) % 2 == 0, 5, 9)
    ids = base.input_ids.clone()
    ids[:, -1] = labels[:, -1]
    data = TokenDataset(input_ids=ids, labels=labels, choices=(5, 9))
    glob = get_adapter(trainer.model)
    (batch,) = data.batches(16, generator=None)
    with torch.no_grad():
        expected = batch_loss(trainer.model, batch, choices=(5, 9) if loss == "choices" else None)
    result = trainer.fit(glob, data, TrainSpec(local_steps=1, batch_size=16, seq_len=12), seed=0)
    assert result.train_loss == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(ValidationError, match="loss"):
        LoraConfig(loss="label")  # type: ignore[arg-type]


def test_make_trainer_registry_and_errors():
    assert "lora" in TRAINERS
    model = attach_lora(build_model("tiny"), LoraSpec())
    assert make_trainer("lora", model).method == "lora"
    split_model = attach_lora(build_model("tiny"), LoraSpec())
    assert make_trainer("split", split_model, cut=1).method == "split"
    with pytest.raises(ConfigError, match="unknown method"):
        make_trainer("magic", model)
    with pytest.raises(ConfigError, match="no option"):
        make_trainer("lora", model, learning_rate=0.1)
    with pytest.raises(ConfigError, match="optimizer"):
        make_trainer("lora", model, optimizer="adam")
    with pytest.raises(ValidationError, match="grad_clip"):
        LoraConfig(grad_clip=0.0)


def test_trainer_needs_attached_model():
    with pytest.raises(ConfigError, match="attach_lora"):
        LoraTrainer(build_model("tiny"))
