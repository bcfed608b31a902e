"""Forward-gradient trainer on the tiny model: unbiased estimates, exact seeds, real learning."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from peft import PeftModel
from pydantic import ValidationError
from transformers import BertConfig, BertForSequenceClassification, LlamaForCausalLM

from aggregator.fwdgrad import expand_seeds
from edge_agent.trainers import FwdGradConfig, FwdGradTrainer, LoraTrainer, make_trainer
from edge_agent.trainers.fwdgrad import Derivatives
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import (
    TINY_VOCAB,
    adapter_parameters,
    adapter_shapes,
    attach_lora,
    build_model,
    get_adapter,
    set_adapter,
    tiny_config,
)
from edgefed.ml.objectives import batch_loss
from edgefed.ml.perturbation import Layout, estimate, rademacher, rebuild_delta
from edgefed.ml.tokens import IGNORE_INDEX, TokenBatch, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TensorMap, TrainSpec, Update


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny forwards run faster on one thread, and far faster when other work holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small_model() -> tuple[PeftModel, TensorMap]:
    """One block, rank-1 LoRA on q_proj: 128 adapter values, so 1024 perturbations suffice."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_config(layers=1))
    model = attach_lora(base, LoraSpec(rank=1, target_modules=("q_proj",)))
    gen = torch.Generator().manual_seed(1)
    point = {n: 0.3 * torch.randn(t.shape, generator=gen) for n, t in get_adapter(model).items()}
    set_adapter(model, point)  # B != 0, so A has a gradient too
    model.eval()
    return model, point


def _autograd(model: PeftModel, ids: torch.Tensor) -> torch.Tensor:
    params = adapter_parameters(model)
    loss = model(input_ids=ids, labels=ids).loss
    grads = torch.autograd.grad(loss, list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads]).double()


@pytest.mark.parametrize(
    ("mode", "jvp_batch"), [pytest.param("fd", 1, marks=pytest.mark.slow), ("jvp", 128)]
)
def test_fwdgrad_estimate_aligns_with_autograd(mode: str, jvp_batch: int) -> None:
    model, _ = _small_model()
    ids = synthetic_dataset(4, seq_len=12, seed=1).input_ids
    true = _autograd(model, ids)
    trainer = FwdGradTrainer(model, FwdGradConfig(mode=mode, jvp_batch=jvp_batch))  # type: ignore[arg-type]
    assert trainer.layout.size == 128
    indices = tuple(range(1024))
    measured = trainer.derivatives(TokenBatch(ids, ids), seed=42, indices=indices)
    found = estimate(trainer.layout, 42, indices, measured.d)
    cosine = float(torch.nn.functional.cosine_similarity(found.mean, true, dim=0))
    assert cosine >= 0.9, cosine
    # Each derivative is the exact directional derivative, not only on average.
    first = rademacher(42, 0, trainer.layout.size, dtype=torch.float64)
    assert measured.d[0] == pytest.approx(float(first.dot(true)), rel=1e-3, abs=1e-4)


def test_fwdgrad_jvp_batched_matches_sequential() -> None:
    model, _ = _small_model()
    ids = synthetic_dataset(2, seq_len=8, seed=2).input_ids
    one = FwdGradTrainer(model, FwdGradConfig(mode="jvp")).derivatives(
        TokenBatch(ids, ids), seed=5, indices=(0, 3, 4)
    )
    many = FwdGradTrainer(model, FwdGradConfig(mode="jvp", jvp_batch=2)).derivatives(
        TokenBatch(ids, ids), seed=5, indices=(0, 3, 4)
    )
    fd = FwdGradTrainer(model, FwdGradConfig()).derivatives(
        TokenBatch(ids, ids), seed=5, indices=(0, 3, 4)
    )
    assert many.d == pytest.approx(one.d, rel=1e-4, abs=1e-6)
    assert fd.d == pytest.approx(one.d, rel=1e-2, abs=1e-3)
    assert one.loss == pytest.approx(fd.loss, rel=1e-5)


@pytest.mark.parametrize("target", ["all", "lora_B"])
def test_fwdgrad_rebuilt_delta_equals_device_delta(target: str) -> None:
    model = attach_lora(build_model("tiny"), LoraSpec())
    trainer = FwdGradTrainer(model, FwdGradConfig(target=target, lr=100.0))  # type: ignore[arg-type]
    start = get_adapter(model)
    spec = TrainSpec(local_steps=3, perturbations=8)
    fit = trainer.fit(start, synthetic_dataset(32, seed=3), spec, seed=11)
    assert fit.seeds is not None and len(fit.seeds.steps) == 3
    assert any(step.scale < 1 for step in fit.seeds.steps), "clipping was not exercised"
    update = Update(
        client_id="c", task_id="t", base_version=0, num_samples=1, method="fwdgrad", seeds=fit.seeds
    )
    rebuilt = expand_seeds(update, shapes=adapter_shapes(model), max_perturbations=1000).delta
    assert set(rebuilt) == set(fit.delta)
    for name, tensor in fit.delta.items():
        assert torch.allclose(rebuilt[name], tensor, rtol=0, atol=1e-6), name
        if target == "lora_B" and ".lora_A." in name:
            assert not tensor.any()
    assert max(float(t.abs().max()) for t in fit.delta.values()) > 1e-3
    again = FwdGradTrainer(model, FwdGradConfig(target=target, lr=100.0))  # type: ignore[arg-type]
    repeat = again.fit(start, synthetic_dataset(32, seed=3), spec, seed=11)
    assert repeat.seeds == fit.seeds  # same inputs, same seeds and derivatives


def test_fwdgrad_fit_lowers_eval_loss_and_reports_variance() -> None:
    model = attach_lora(build_model("tiny"), LoraSpec())
    trainer = make_trainer("fwdgrad", model, lr=30.0, max_step_rms=0.03)
    data, held_out = synthetic_dataset(256, seed=4), synthetic_dataset(64, seed=99)
    adapter = get_adapter(model)
    before = evaluate(model, held_out).loss
    for round_index in range(4):
        fit = trainer.fit(
            adapter, data, TrainSpec(local_steps=10, perturbations=8), seed=round_index
        )
        assert not fit.diverged and fit.steps == 10
        assert fit.variance is not None and fit.variance > 0
        adapter = {name: adapter[name] + fit.delta[name] for name in adapter}
    set_adapter(model, adapter)
    after = evaluate(model, held_out).loss
    assert after < before - 0.2, (before, after)


def test_fwdgrad_divergence_is_detected_undone_and_backs_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = attach_lora(build_model("tiny"), LoraSpec())
    data = synthetic_dataset(64, seed=5)
    # Start from a trained adapter: a huge step then throws the loss back up (it cannot
    # explode here, the final RMSNorm bounds the logits, so it returns to chance).
    warm = LoraTrainer(model).fit(
        get_adapter(model), data, TrainSpec(local_steps=30, lr=3e-2), seed=0
    )
    start = {name: t + warm.delta[name] for name, t in get_adapter(model).items()}
    config = FwdGradConfig(lr=1e5, scale_lr=False, max_step_rms=None, divergence_ratio=1.3)
    trainer = FwdGradTrainer(model, config)
    spec = TrainSpec(local_steps=6, perturbations=4)
    fit = trainer.fit(start, data, spec, seed=0)
    assert fit.diverged and fit.steps < 6
    assert trainer.lr_backoff == 0.5
    assert "diverged" in caplog.text
    assert fit.seeds is not None and len(fit.seeds.steps) == fit.steps
    rebuilt = rebuild_delta(Layout.from_shapes(adapter_shapes(model)), fit.seeds)
    for name, tensor in fit.delta.items():  # the undone step is in neither
        assert torch.allclose(rebuilt[name], tensor, rtol=1e-6, atol=1e-6), name
    set_adapter(model, {name: start[name] + fit.delta[name] for name in start})
    assert math.isfinite(evaluate(model, data).loss)
    clean = trainer.fit(start, data, TrainSpec(local_steps=1, perturbations=4), seed=1)
    assert not clean.diverged and trainer.lr_backoff == 1.0  # one good fit restores the rate


def test_fwdgrad_a_batch_below_chance_is_not_divergence() -> None:
    """A trained head's batch losses swing by more than the ratio; below chance is no harm."""
    trainer = FwdGradTrainer(_tiny_classifier(), FwdGradConfig(divergence_ratio=2.0))
    chance = math.log(3)
    assert not trainer._diverging(Derivatives(loss=0.9, d=(0.1,)), [0.2], chance)
    assert trainer._diverging(Derivatives(loss=1.2, d=(0.1,)), [0.2], chance)
    assert trainer._diverging(Derivatives(loss=2.5, d=(0.1,)), [1.0], chance)
    assert trainer._diverging(Derivatives(loss=0.5, d=(math.nan,)), [], chance)


def test_fwdgrad_dense_upload_and_lr_scaling() -> None:
    model = attach_lora(build_model("tiny"), LoraSpec(mode="ffa"))
    trainer = make_trainer("fwdgrad", model, upload="dense")
    assert isinstance(trainer, FwdGradTrainer)
    assert all(".lora_B." in name for name in trainer.layout.slices)  # ffa: A is not trained
    fit = trainer.fit(
        get_adapter(model), synthetic_dataset(16, seed=6), TrainSpec(local_steps=1), seed=0
    )
    assert fit.seeds is None and fit.delta
    n = trainer.layout.size
    assert trainer.learning_rate(TrainSpec(perturbations=16), 16) == pytest.approx(
        10.0 * 16 / (n + 16)
    )
    unscaled = FwdGradTrainer(model, FwdGradConfig(lr=None, scale_lr=False))
    assert unscaled.learning_rate(TrainSpec(lr=0.25), 16) == 0.25


def test_fwdgrad_discriminative_sampling_prefers_aligned_perturbations() -> None:
    model = attach_lora(build_model("tiny"), LoraSpec())
    trainer = FwdGradTrainer(model, FwdGradConfig(candidates=4))
    data, spec = synthetic_dataset(16, seed=7), TrainSpec(local_steps=1, perturbations=8)
    first = get_adapter(model)
    plain = trainer.fit(first, data, spec, seed=0)
    assert plain.seeds is not None and plain.seeds.steps[0].indices == tuple(range(8))
    second = {name: first[name] + plain.delta[name] for name in first}
    chosen = trainer.fit(second, data, spec, seed=1)
    assert chosen.seeds is not None
    indices = chosen.seeds.steps[0].indices
    assert len(indices) == 8 and max(indices) < 32 and indices != tuple(range(8))
    direction = trainer.layout.flatten(second) - trainer.layout.flatten(first)
    seed = chosen.seeds.steps[0].seed

    def alignment(index: int) -> float:
        return abs(
            float(rademacher(seed, index, trainer.layout.size, dtype=torch.float64).dot(direction))
        )

    scores = sorted((alignment(i) for i in range(32)), reverse=True)
    assert sorted((alignment(i) for i in indices), reverse=True) == scores[:8]


def test_fwdgrad_config_errors() -> None:
    model = attach_lora(build_model("tiny"), LoraSpec())
    with pytest.raises(ConfigError, match="mode"):
        make_trainer("fwdgrad", model, mode="backprop")
    with pytest.raises(ValidationError, match="candidates"):
        FwdGradConfig(candidates=0)
    with pytest.raises(ValidationError, match="eps"):
        FwdGradConfig(eps=0.0)
    with pytest.raises(ValidationError, match="divergence_ratio"):
        FwdGradConfig(divergence_ratio=1.0)
    assert FwdGradConfig(jvp_batch=4.0).jvp_batch == 4  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="target"):
        FwdGradConfig(target="none")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="loss"):
        FwdGradConfig(loss="hinge")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- shared objective


def _objective_gradient(
    trainer: FwdGradTrainer, batch: TokenBatch, choices: tuple[int, ...] | None = None
) -> torch.Tensor:
    """Autograd of ``batch_loss`` (what the lora trainer minimises), in the trainer's layout."""
    params = adapter_parameters(trainer.model)
    names = list(trainer.layout.slices)
    loss = batch_loss(trainer.model, batch, choices=choices)
    grads = torch.autograd.grad(loss, [params[name] for name in names])
    return torch.cat([g.reshape(-1) for g in grads]).double()


def _directional(trainer: FwdGradTrainer, grad: torch.Tensor, seed: int, count: int) -> list[float]:
    size = trainer.layout.size
    return [float(rademacher(seed, i, size, dtype=torch.float64).dot(grad)) for i in range(count)]


def _padded_text_batch() -> TokenBatch:
    """Rows of different lengths, left-padded with junk tokens the mask must hide."""
    gen = torch.Generator().manual_seed(8)
    ids = torch.randint(1, TINY_VOCAB, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[1, :3] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, IGNORE_INDEX)  # real context
    return TokenBatch(ids, labels, mask)


@pytest.mark.parametrize("mode", ["fd", "jvp"])
def test_fwdgrad_padded_text_uses_the_masked_loss(mode: str) -> None:
    model, _ = _small_model()
    batch = _padded_text_batch()
    trainer = FwdGradTrainer(model, FwdGradConfig(mode=mode))  # type: ignore[arg-type]
    masked = _objective_gradient(trainer, batch)
    unmasked = _objective_gradient(trainer, TokenBatch(batch.input_ids, batch.labels))
    assert float((masked - unmasked).norm()) > 0.05 * float(masked.norm())  # the mask matters
    measured = trainer.derivatives(batch, seed=3, indices=(0, 1, 2))
    expected = _directional(trainer, masked, 3, 3)
    assert measured.d == pytest.approx(expected, rel=1e-2, abs=1e-3 if mode == "fd" else 1e-5)
    with torch.no_grad():
        assert measured.loss == pytest.approx(float(batch_loss(model, batch)), rel=1e-4)


def _tiny_classifier() -> PeftModel:
    """A one-block BERT with a 3-class head, LoRA rank 1 on query/value (the MiniLM layout)."""
    config = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = BertForSequenceClassification(config)
    model = attach_lora(base, LoraSpec(rank=1, target_modules=("q_proj", "v_proj")))
    gen = torch.Generator().manual_seed(2)
    set_adapter(
        model, {n: 0.3 * torch.randn(t.shape, generator=gen) for n, t in get_adapter(model).items()}
    )
    model.eval()
    return model


@pytest.mark.parametrize("mode", ["fd", "jvp"])
def test_fwdgrad_trains_a_sequence_classifier(mode: str) -> None:
    model = _tiny_classifier()
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 64, (6, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = TokenBatch(ids, labels, mask)
    trainer = FwdGradTrainer(model, FwdGradConfig(mode=mode))  # type: ignore[arg-type]
    assert any("classifier" in name for name in trainer.layout.slices)  # the head trains too
    measured = trainer.derivatives(batch, seed=4, indices=(0, 1))
    expected = _directional(trainer, _objective_gradient(trainer, batch), 4, 2)
    assert measured.d == pytest.approx(expected, rel=1e-2, abs=1e-3 if mode == "fd" else 1e-5)
    data = TokenDataset(input_ids=ids, labels=labels, attention_mask=mask)
    fit = trainer.fit(
        get_adapter(model), data, TrainSpec(local_steps=2, batch_size=6, perturbations=4), seed=0
    )
    assert fit.steps == 2 and not fit.diverged
    assert math.isfinite(fit.train_loss)
    assert any(float(t.abs().max()) > 0 for t in fit.delta.values())


@pytest.mark.parametrize(("loss", "scored"), [("choices", (5, 9)), ("vocabulary", None)])
def test_fwdgrad_scores_label_tokens_like_the_lora_trainer(
    loss: str, scored: tuple[int, ...] | None
) -> None:
    model, point = _small_model()
    base = synthetic_dataset(8, seq_len=10, seed=4)
    labels = torch.full_like(base.input_ids, IGNORE_INDEX)
    labels[:, -1] = torch.where(torch.arange(8) % 2 == 0, 5, 9)
    ids = base.input_ids.clone()
    ids[:, -1] = labels[:, -1]
    data = TokenDataset(input_ids=ids, labels=labels, choices=(5, 9))
    batch = TokenBatch(ids, labels)
    trainer = FwdGradTrainer(model, FwdGradConfig(mode="jvp", loss=loss))  # type: ignore[arg-type]
    spec = TrainSpec(local_steps=1, batch_size=8, seq_len=10, perturbations=3)
    fit = trainer.fit(point, data, spec, seed=0)
    assert fit.seeds is not None
    (step,) = fit.seeds.steps
    set_adapter(model, point)
    expected = _directional(trainer, _objective_gradient(trainer, batch, scored), step.seed, 3)
    assert step.d == pytest.approx(expected, rel=2e-3, abs=1e-5)
    other = (5, 9) if scored is None else None
    wrong = _directional(trainer, _objective_gradient(trainer, batch, other), step.seed, 3)
    assert step.d != pytest.approx(wrong, rel=2e-3, abs=1e-5)


def _three_class_batch() -> TokenBatch:
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(1, 64, (6, 8), generator=gen)
    mask = torch.ones_like(ids)
    mask[::2, 5:] = 0
    return TokenBatch(ids, torch.tensor([0, 1, 2, 0, 1, 2]), mask)


def test_fwdgrad_head_target_runs_the_trunk_once_per_step() -> None:
    model = _tiny_classifier()
    trainer = FwdGradTrainer(model, FwdGradConfig())  # auto: the adapter carries a head
    assert trainer.layout.target == "head"
    assert trainer.layout.slices and all("classifier" in n for n in trainer.layout.slices)
    batch = _three_class_batch()
    trunk_runs: list[int] = []
    embeddings = model.get_base_model().bert.embeddings
    handle = embeddings.register_forward_hook(lambda *_: trunk_runs.append(1))
    try:
        measured = trainer.derivatives(batch, seed=4, indices=tuple(range(8)))
    finally:
        handle.remove()
    assert len(trunk_runs) == 1  # 16 perturbed losses, one trunk forward
    expected = _directional(trainer, _objective_gradient(trainer, batch), 4, 8)
    assert measured.d == pytest.approx(expected, rel=1e-2, abs=1e-3)
    with torch.no_grad():
        assert measured.loss == pytest.approx(float(batch_loss(model, batch)), rel=1e-4)


def test_fwdgrad_head_fit_moves_only_the_head_and_rebuilds_on_the_aggregator() -> None:
    model = _tiny_classifier()
    trainer = FwdGradTrainer(model, FwdGradConfig(head_perturbations=32))
    batch = _three_class_batch()
    data = TokenDataset(
        input_ids=batch.input_ids, labels=batch.labels, attention_mask=batch.attention_mask
    )
    start = get_adapter(model)
    with torch.no_grad():
        before = float(batch_loss(model, batch))
    fit = trainer.fit(start, data, TrainSpec(local_steps=20, batch_size=6, perturbations=4), seed=1)
    assert fit.seeds is not None and fit.seeds.target == "head"
    assert {len(step.indices) for step in fit.seeds.steps} == {32}  # at least head_perturbations
    for name, tensor in fit.delta.items():
        assert bool(tensor.any()) == ("classifier" in name), name
    with torch.no_grad():
        assert float(batch_loss(model, batch)) < before - 0.05
    update = Update(
        client_id="c", task_id="t", base_version=0, num_samples=1, method="fwdgrad", seeds=fit.seeds
    )
    rebuilt = expand_seeds(update, shapes=adapter_shapes(model), max_perturbations=1000).delta
    for name, tensor in fit.delta.items():
        assert torch.allclose(rebuilt[name], tensor, rtol=0, atol=1e-6), name


ANSWERS = (5, 9)


def _answer_model() -> PeftModel:
    """The one-block tiny Llama whose adapter carries the rows of answer tokens 5 and 9."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(tiny_config(layers=1))
    model = attach_lora(base, LoraSpec(rank=1, target_modules=("q_proj",), head_tokens=ANSWERS))
    model.eval()
    return model


def _answer_data(rows: int = 8) -> TokenDataset:
    """Rows answered by token 5 or 9 in the last column; neither occurs before it."""
    ids = synthetic_dataset(rows, seq_len=10, seed=4).input_ids.clone()
    ids[torch.isin(ids, torch.tensor(ANSWERS))] = 1
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = torch.where(torch.arange(rows) % 2 == 0, 5, 9)
    ids[:, -1] = labels[:, -1]
    return TokenDataset(input_ids=ids, labels=labels, choices=ANSWERS)


def test_fwdgrad_perturbs_a_causal_lms_answer_rows_on_one_forward_per_step() -> None:
    model = _answer_model()
    trainer = FwdGradTrainer(model, FwdGradConfig())
    assert trainer.layout.target == "head"
    (name,) = trainer.layout.slices
    assert name.endswith(".trainable_tokens_delta") and trainer.layout.size == 2 * 64
    data = _answer_data()
    batch = TokenBatch(data.input_ids, data.labels)
    forwards: list[int] = []
    handle = model.get_base_model().model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        measured = trainer.derivatives(batch, seed=4, indices=tuple(range(8)), choices=ANSWERS)
    finally:
        handle.remove()
    assert len(forwards) == 1  # 16 perturbed losses, one forward of the model
    gradient = _objective_gradient(trainer, batch, ANSWERS)
    expected = _directional(trainer, gradient, 4, 8)
    assert measured.d == pytest.approx(expected, rel=1e-2, abs=1e-3)
    with torch.no_grad():
        whole = float(batch_loss(model, batch, choices=ANSWERS))
    assert measured.loss == pytest.approx(whole, rel=1e-4)


def test_fwdgrad_runs_the_whole_model_when_an_answer_token_is_in_the_input() -> None:
    model = _answer_model()
    trainer = FwdGradTrainer(model, FwdGradConfig())
    data = _answer_data()
    ids = data.input_ids.clone()
    ids[0, 3] = ANSWERS[0]  # its embedding row moves with the perturbation too
    batch = TokenBatch(ids, data.labels)
    forwards: list[int] = []
    handle = model.get_base_model().model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        measured = trainer.derivatives(batch, seed=4, indices=(0, 1), choices=ANSWERS)
    finally:
        handle.remove()
    assert len(forwards) == 4  # plus and minus per perturbation
    expected = _directional(trainer, _objective_gradient(trainer, batch, ANSWERS), 4, 2)
    assert measured.d == pytest.approx(expected, rel=1e-2, abs=1e-3)


def test_fwdgrad_answer_rows_learn_and_rebuild_on_the_aggregator() -> None:
    model = _answer_model()
    trainer = FwdGradTrainer(model, FwdGradConfig(head_perturbations=64))
    data = _answer_data(16)
    batch = TokenBatch(data.input_ids, data.labels)
    with torch.no_grad():
        before = float(batch_loss(model, batch, choices=ANSWERS))
    start = get_adapter(model)
    fit = trainer.fit(start, data, TrainSpec(local_steps=30, batch_size=16, seq_len=10), seed=1)
    assert fit.seeds is not None and fit.seeds.target == "head" and not fit.diverged
    for name, tensor in fit.delta.items():
        assert bool(tensor.any()) == name.endswith(".trainable_tokens_delta"), name
    with torch.no_grad():
        assert float(batch_loss(model, batch, choices=ANSWERS)) < before - 0.05
    update = Update(
        client_id="c", task_id="t", base_version=0, num_samples=1, method="fwdgrad", seeds=fit.seeds
    )
    rebuilt = expand_seeds(update, shapes=adapter_shapes(model), max_perturbations=10_000).delta
    for name, tensor in fit.delta.items():
        assert torch.allclose(rebuilt[name], tensor, rtol=0, atol=1e-6), name
