"""The KD trainer: local training on the device's own model, then compact proxy logits."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from edge_agent.trainers import KdConfig, KdTrainer, make_trainer
from edgefed.data.synthetic import synthetic_dataset
from edgefed.ml.models import attach_lora, build_model
from schemas.codec import encode
from schemas.errors import ConfigError
from schemas.messages import LoraSpec, ModelRef, ProxySpec, TrainSpec, Update

SPEC = TrainSpec(local_steps=3, batch_size=8, seq_len=16, lr=1e-2)
PROXY = ProxySpec(dataset="synthetic:n=64,seed=4242", indices=(3, 9, 17, 40), slice_id=2, top_k=5)


def _trainer(model: str, **config: object) -> KdTrainer:
    trainer = make_trainer("kd", attach_lora(build_model(model), LoraSpec()), **config)
    assert isinstance(trainer, KdTrainer)
    trainer.use_proxy(PROXY, seq_len=SPEC.seq_len, model=ModelRef(name=model))
    return trainer


def _upload(trainer: KdTrainer, seed: int = 0) -> bytes:
    fit = trainer.fit({}, synthetic_dataset(32, seq_len=16, seed=1), SPEC, seed=seed)
    assert fit.logits is not None
    assert fit.delta == {}
    update = Update(
        client_id="dev",
        task_id="t",
        base_version=2,
        num_samples=fit.num_samples,
        method="kd",
        logits=fit.logits,
        proxy_slice=fit.proxy_slice,
    )
    return encode(update.model_copy(update={"update_id": "x" * 32, "sent_at": 0.0}))


def test_kd_upload_size_does_not_depend_on_the_device_model() -> None:
    shallow, deep = _upload(_trainer("tiny")), _upload(_trainer("tiny-4l"))
    assert len(shallow) == len(deep)
    assert len(shallow) < 4 * 15 * 5 * 6 + 1024  # 4 rows x 15 positions x k=5 x 6 bytes


def test_kd_fit_answers_the_proxy_slice_with_top_k_logits() -> None:
    trainer = _trainer("tiny")
    fit = trainer.fit({}, synthetic_dataset(32, seq_len=16, seed=1), SPEC, seed=0)
    assert fit.proxy_slice == PROXY.slice_id
    assert fit.logits is not None
    assert tuple(fit.logits["indices"].shape) == (4 * 15, PROXY.top_k)
    assert fit.logits["values"].dtype == torch.float16
    values = fit.logits["values"].float()
    assert bool((values[:, :-1] >= values[:, 1:]).all()), "top-k comes sorted, largest first"


def test_kd_device_keeps_its_own_adapter_between_rounds() -> None:
    trainer = _trainer("tiny")
    data = synthetic_dataset(32, seq_len=16, seed=1)
    first = trainer.fit({}, data, SPEC, seed=0)
    after_one = {n: t.clone() for n, t in trainer.adapter.items()}
    second = trainer.fit({}, data, SPEC, seed=1)
    assert second.train_loss < first.train_loss  # it continued from where it was
    assert any(not torch.equal(after_one[n], trainer.adapter[n]) for n in after_one)


def test_kd_config_and_missing_proxy_are_refused() -> None:
    model = attach_lora(build_model("tiny"), LoraSpec())
    with pytest.raises(ConfigError, match="proxy slice"):
        KdTrainer(model).fit({}, synthetic_dataset(8, seq_len=16, seed=1), SPEC, seed=0)
    with pytest.raises(ValidationError, match="local"):
        KdConfig(local="sgd")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="top_k"):
        KdConfig(top_k=0)


def test_kd_with_forward_gradient_local_training_and_own_k() -> None:
    trainer = _trainer("tiny", local="fwdgrad", top_k=3)
    spec = SPEC.model_copy(update={"local_steps": 1, "perturbations": 2})
    fit = trainer.fit({}, synthetic_dataset(8, seq_len=16, seed=1), spec, seed=0)
    assert fit.logits is not None
    assert tuple(fit.logits["values"].shape) == (4 * 15, 3)
