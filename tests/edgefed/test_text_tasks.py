"""Text as token datasets: prompts for SmolLM2, a classification head for MiniLM."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from edge_agent.trainers import LoraTrainer
from edgefed.data.loading import load_data
from edgefed.data.sources import TextExamples
from edgefed.data.text_tasks import encode_causal, label_tokens
from edgefed.ml.evaluation import evaluate
from edgefed.ml.models import (
    adapter_parameters,
    attach_lora,
    build_model,
    export_adapter,
    get_adapter,
    load_tokenizer,
    model_kind,
)
from edgefed.ml.objectives import batch_loss, choice_cross_entropy, predictions, scored_logits
from edgefed.ml.pooling import pool_by_mean
from edgefed.ml.tokens import IGNORE_INDEX, TokenBatch, TokenDataset
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, TrainSpec
from tests.assets_helpers import require_minilm, require_smollm2

POSITIVE, NEGATIVE = 2731, 3524  # SmolLM2's " positive" / " negative"


def test_sentiment_prompt_is_left_padded_with_the_answer_last():
    require_smollm2()
    tokenizer = load_tokenizer("smollm2-135m")
    assert label_tokens(tokenizer, ["negative", "positive"]) == (NEGATIVE, POSITIVE)
    examples = TextExamples(
        texts=("a joy", "dull and " * 40), labels=(1, 0), label_names=("negative", "positive")
    )
    data = encode_causal(examples, tokenizer, seq_len=24)
    assert data.choices == (NEGATIVE, POSITIVE)
    assert data.attention_mask is not None and data.labels is not None
    short = data.attention_mask[0]
    assert short.tolist() == sorted(short.tolist())  # zeros (padding) first
    assert data.attention_mask[1].all()  # the long review is cut to fit
    assert data.input_ids[:, -1].tolist() == [POSITIVE, NEGATIVE]
    assert (data.labels[:, :-1] == IGNORE_INDEX).all()
    assert data.labels[:, -1].tolist() == [POSITIVE, NEGATIVE]
    prompt = tokenizer.decode(data.input_ids[1, :-1])
    assert prompt.startswith("Review: dull and") and prompt.endswith("\nSentiment:")
    with pytest.raises(ConfigError, match="too short"):
        encode_causal(examples, tokenizer, seq_len=6)


def test_scored_logits_on_the_last_position_match_the_full_forward():
    model = build_model("tiny", seed=1)
    ids = torch.randint(1, 64, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    batch = TokenBatch(input_ids=ids, labels=labels, attention_mask=mask)
    logits, targets = scored_logits(model, batch)
    full = model(input_ids=ids, attention_mask=mask).logits[:, -2]
    assert logits.shape == (3, 64) and targets.tolist() == ids[:, -1].tolist()
    torch.testing.assert_close(logits, full)
    expected = torch.nn.functional.cross_entropy(full, ids[:, -1])
    torch.testing.assert_close(batch_loss(model, batch), expected)
    assert predictions(logits, (5, 9)).tolist() == [(5, 9)[int(row[9] > row[5])] for row in logits]


def test_choice_loss_scores_the_answer_among_the_label_tokens_only():
    model = build_model("tiny", seed=2)
    ids = torch.randint(1, 64, (4, 8))
    ids[:, -1] = torch.tensor([5, 9, 9, 5])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -1] = ids[:, -1]
    batch = TokenBatch(input_ids=ids, labels=labels, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -2]
        two_way = torch.stack([full[:, 5], full[:, 9]], dim=1)
        expected = torch.nn.functional.cross_entropy(two_way, torch.tensor([0, 1, 1, 0]))
        torch.testing.assert_close(batch_loss(model, batch, choices=(5, 9)), expected)
        # Order of the choices does not matter; the vocabulary-wide loss is another number.
        torch.testing.assert_close(batch_loss(model, batch, choices=(9, 5)), expected)
        assert float(batch_loss(model, batch)) > float(expected) + 1.0
    with pytest.raises(ValueError, match=r"targets \[9\] are not among"):
        choice_cross_entropy(full, ids[:, -1], (5, 7))


def test_batches_drop_columns_that_are_padding_everywhere():
    ids = torch.arange(12).reshape(2, 6)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    data = TokenDataset(input_ids=ids, labels=ids.clone(), attention_mask=mask)
    (batch,) = data.batches(2, generator=None)
    assert batch.input_ids.tolist() == [[2, 3, 4, 5], [8, 9, 10, 11]]
    assert batch.attention_mask is not None and batch.attention_mask[0, 0] == 0


def test_smollm2_scores_reviews_by_the_label_tokens():
    require_smollm2()
    assert model_kind("smollm2-135m") == "causal"
    data = load_data("rotten-tomatoes:split=test,n=24", seq_len=48, model="smollm2-135m")
    model = attach_lora(build_model("smollm2-135m"), LoraSpec())
    result = evaluate(model, data, batch_size=12)
    assert result.tokens == 24
    # Zero-shot SmolLM2 is ~0.79 on these reviews: far above always-one-answer luck.
    assert result.accuracy >= 0.6


def test_minilm_classifies_with_a_lora_adapter_and_head(tmp_path):
    require_minilm()
    assert model_kind("minilm-l6") == "classifier"
    train = load_data("rotten-tomatoes:n=480", seq_len=32, model="minilm-l6")
    held_out = load_data("rotten-tomatoes:split=test,n=160", seq_len=32, model="minilm-l6")
    assert train.labels is not None and train.labels.dim() == 1
    model = attach_lora(build_model("minilm-l6", seed=3, num_labels=2), LoraSpec(rank=8))
    names = set(adapter_parameters(model))
    assert "base_model.model.classifier.weight" in names
    assert any(".query.lora_A." in n for n in names) and any(".value.lora_B." in n for n in names)
    before = evaluate(model, held_out)
    trainer = LoraTrainer(model)
    spec = TrainSpec(local_steps=40, batch_size=16, seq_len=32, lr=5e-3)
    fit = trainer.fit(get_adapter(model), train, spec, seed=0)
    assert set(fit.delta) == names
    adapter = get_adapter(model)
    after = evaluate(model, held_out)
    # 40 steps from a random head: clearly learning, far from MiniLM's ~0.80 after 150.
    assert after.loss < before.loss - 0.03, (before, after)
    assert after.accuracy > 0.6, after

    folder = export_adapter(model, adapter, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(
        require_minilm(), num_labels=2, local_files_only=True
    )
    assert pool_by_mean(base)  # as its sentence-transformers config says
    with warnings.catch_warnings():  # peft asks transformers for a renamed attribute
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = PeftModel.from_pretrained(base, str(folder)).eval()
    model.eval()
    batch = next(held_out.batches(8, generator=None))
    with torch.inference_mode():
        ours = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = reloaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_answer_rows_of_a_tied_lm_train_its_head_and_export_as_a_peft_adapter(tmp_path):
    folder = require_smollm2()
    spec = LoraSpec(head_tokens=(NEGATIVE, POSITIVE))
    model = attach_lora(build_model("smollm2-135m"), spec)
    (rows,) = [n for n in adapter_parameters(model) if "lora_" not in n]
    assert rows.endswith("embed_tokens.token_adapter.trainable_tokens_delta")
    adapter = get_adapter(model)
    embedding = model.get_input_embeddings().weight  # the tied rows start as they were
    torch.testing.assert_close(adapter[rows], embedding[[NEGATIVE, POSITIVE]].detach())
    adapter[rows] = adapter[rows] + torch.linspace(-0.5, 0.5, adapter[rows].numel()).view(2, -1)
    exported = export_adapter(model, adapter, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with warnings.catch_warnings():  # peft asks transformers for a renamed attribute
        warnings.simplefilter("ignore", FutureWarning)
        reloaded = PeftModel.from_pretrained(base, str(exported)).eval()
    ids = torch.tensor([[504, 1344, 314, 2292, 28]])
    with torch.inference_mode():
        ours = model.eval()(input_ids=ids).logits[0, -1]
        theirs = reloaded(input_ids=ids).logits[0, -1]
        plain = build_model("smollm2-135m")(input_ids=ids).logits[0, -1]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    moved = (ours - plain).abs()
    assert float(moved[[NEGATIVE, POSITIVE]].min()) > 1e-2  # the answer logits moved
    assert float(moved.max()) == pytest.approx(float(moved[[NEGATIVE, POSITIVE]].max()))
