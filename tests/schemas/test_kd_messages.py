"""Knowledge-distillation wire fields: the proxy slice in Task, logits in Update."""

from __future__ import annotations

import msgpack
import pydantic
import pytest
import torch

from schemas.codec import decode, encode
from schemas.errors import CodecError
from schemas.messages import ModelRef, ProxySpec, Task, Update


def _proxy(**changes: object) -> ProxySpec:
    fields: dict[str, object] = {
        "dataset": "synthetic:n=64,seed=7",
        "indices": (1, 5, 9),
        "slice_id": 4,
        "top_k": 3,
    }
    return ProxySpec.model_validate(fields | changes)


def _logits(rows: int = 5, k: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "indices": torch.randint(0, 64, (rows, k), generator=gen, dtype=torch.int32),
        "values": torch.randn(rows, k, generator=gen).to(torch.float16),
    }


def _kd_update(**changes: object) -> Update:
    fields: dict[str, object] = {
        "client_id": "dev-1",
        "task_id": "task-1",
        "base_version": 4,
        "num_samples": 32,
        "method": "kd",
        "logits": _logits(),
        "proxy_slice": 4,
    }
    return Update.model_validate(fields | changes)


def test_task_with_proxy_round_trips() -> None:
    task = Task(
        task_id="t",
        federation="f",
        version=4,
        method="kd",
        model=ModelRef(name="tiny"),
        proxy=_proxy(),
    )
    back = decode(encode(task))
    assert isinstance(back, Task)
    assert back == task
    assert back.proxy is not None
    assert back.proxy.indices == (1, 5, 9)


def test_kd_update_round_trips_with_exact_tensors() -> None:
    update = _kd_update()
    back = decode(encode(update))
    assert isinstance(back, Update)
    assert back.proxy_slice == 4
    assert back.delta == {}
    for name, tensor in update.logits.items():
        assert back.logits[name].dtype == tensor.dtype
        assert torch.equal(back.logits[name], tensor)


def test_kd_update_size_is_six_bytes_per_logit_plus_a_header() -> None:
    small, large = encode(_kd_update(logits=_logits(5))), encode(_kd_update(logits=_logits(50)))
    payload = 45 * 3 * (4 + 2)  # int32 id + fp16 value per logit
    assert payload <= len(large) - len(small) <= payload + 4  # bin headers may widen


def test_update_logits_need_a_slice_and_exclude_deltas() -> None:
    with pytest.raises(pydantic.ValidationError, match="come together"):
        _kd_update(proxy_slice=None)
    with pytest.raises(pydantic.ValidationError, match="come together"):
        _kd_update(logits={})
    with pytest.raises(pydantic.ValidationError, match="not both"):
        _kd_update(delta={"a": torch.zeros(2)})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"indices": ()}, "at least 1"),
        ({"indices": (-1,)}, "greater than or equal"),
        ({"top_k": 0}, "greater than 0"),
        ({"dataset": ""}, "at least 1"),
        ({"seed": 3}, "Extra inputs"),
    ],
)
def test_proxy_spec_rejects_bad_fields(changes: dict[str, object], match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        _proxy(**changes)


def test_decode_refuses_a_proxy_with_unknown_or_wrongly_typed_fields() -> None:
    task = Task(task_id="t", federation="f", version=0, model=ModelRef(name="tiny"), proxy=_proxy())
    raw = msgpack.unpackb(encode(task))
    raw["proxy"]["extra"] = 1
    with pytest.raises(CodecError, match="invalid task"):
        decode(msgpack.packb(raw))
    raw["proxy"].pop("extra")
    raw["proxy"]["slice_id"] = "4"
    with pytest.raises(CodecError, match="invalid task"):
        decode(msgpack.packb(raw))
