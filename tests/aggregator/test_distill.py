"""Server-side distillation math: top-k to probabilities, the ensemble, the KD loss."""

from __future__ import annotations

import pytest
import torch

from aggregator.distill import DistillTarget, distill, ensemble, kd_loss, top_k_probabilities
from edgefed.data.kd_proxy import proxy_logits, top_k
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.models import attach_lora, build_model, get_adapter
from schemas.errors import ConfigError
from schemas.messages import LoraSpec


def test_top_k_probabilities_softmax_over_the_sent_logits_only() -> None:
    probs = top_k_probabilities(
        torch.tensor([[2, 0]]), torch.tensor([[1.0, 1.0]]), vocab=4, temperature=1.0
    )
    assert probs.tolist() == [[0.5, 0.0, 0.5, 0.0]]
    sharp = top_k_probabilities(
        torch.tensor([[1, 3]]), torch.tensor([[2.0, 0.0]]), vocab=4, temperature=1.0
    )
    soft = top_k_probabilities(
        torch.tensor([[1, 3]]), torch.tensor([[2.0, 0.0]]), vocab=4, temperature=4.0
    )
    assert float(sharp[0, 1]) > float(soft[0, 1]) > 0.5


def test_ensemble_is_the_weighted_average_of_probabilities() -> None:
    a = {"indices": torch.tensor([[0]]), "values": torch.tensor([[9.0]])}
    b = {"indices": torch.tensor([[1]]), "values": torch.tensor([[-3.0]])}
    teacher = ensemble([(a, 3.0), (b, 1.0)], vocab=3, temperature=2.0)
    torch.testing.assert_close(teacher, torch.tensor([[0.75, 0.25, 0.0]]))
    with pytest.raises(ConfigError, match="positive total"):
        ensemble([(a, 0.0)], vocab=3, temperature=1.0)


def test_kd_loss_is_zero_at_the_teacher_and_positive_elsewhere() -> None:
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    teacher = torch.softmax(logits / 2.0, dim=-1)
    assert float(kd_loss(logits, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(torch.zeros(1, 3), teacher, 2.0)) > 0.01


def test_distill_moves_the_global_towards_the_teacher() -> None:
    data = synthetic_dataset(8, seq_len=12, seed=5)
    teacher_model = attach_lora(build_model("tiny", seed=9), LoraSpec())
    parts = [(top_k(proxy_logits(teacher_model, data), 8), 1.0)]
    teacher = ensemble(parts, vocab=64, temperature=2.0)
    student = attach_lora(build_model("tiny"), LoraSpec())
    start = get_adapter(student)
    before = float(kd_loss(proxy_logits(student, data), teacher, 2.0))
    target = DistillTarget(data=data, teacher=teacher, weight=1.0)
    adapter, last = distill(student, start, [target], temperature=2.0, steps=10, lr=2e-2)
    after = float(kd_loss(proxy_logits(student, data), teacher, 2.0))
    assert after < 0.9 * before
    assert last < before
    assert any(not torch.equal(adapter[n], start[n]) for n in start)
    with pytest.raises(ConfigError, match="steps"):
        distill(student, start, [target], temperature=2.0, steps=0, lr=1e-2)
