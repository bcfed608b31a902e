"""Forward-gradient wire fields: seed updates, requested perturbation counts, codec round trips."""

from __future__ import annotations

import msgpack
import pydantic
import pytest
import torch

from schemas.codec import decode, encode
from schemas.errors import CodecError
from schemas.messages import Ack, ModelRef, SeedDelta, SeedStep, Task, TrainSpec, Update

LAYOUT = "0123456789abcdef"


def _seeds(k: int = 64, steps: int = 1) -> SeedDelta:
    return SeedDelta(
        lr=3.5e-4,
        target="lora_B",
        layout=LAYOUT,
        steps=tuple(
            SeedStep(
                seed=(2**64 - 1) - s,
                indices=tuple(range(k)),
                d=tuple((i - k / 2) / 7 for i in range(k)),
                scale=0.5 if s else 1.0,
            )
            for s in range(steps)
        ),
    )


def _seed_update(**changes: object) -> Update:
    fields: dict[str, object] = {
        "client_id": "dev-1",
        "task_id": "task-1",
        "base_version": 3,
        "num_samples": 64,
        "method": "fwdgrad",
        "seeds": _seeds(),
        "variance": 12.5,
        "train_loss": 2.25,
    }
    return Update.model_validate(fields | changes)


def test_seed_update_round_trips_exactly() -> None:
    update = _seed_update(seeds=_seeds(k=16, steps=3))
    decoded = decode(encode(update))
    assert isinstance(decoded, Update)
    assert decoded == update
    assert decoded.delta == {} and decoded.seeds is not None
    assert isinstance(decoded.seeds.steps, tuple) and isinstance(decoded.seeds.steps[0].d, tuple)
    assert decoded.seeds.steps[0].seed == 2**64 - 1
    assert decoded.seeds.steps[1].d == update.seeds.steps[1].d  # type: ignore[union-attr]


def test_seed_update_is_plain_msgpack_and_small() -> None:
    update = _seed_update()
    data = encode(update)
    plain = msgpack.unpackb(data)
    assert plain["seeds"]["steps"][0]["indices"][:3] == [0, 1, 2]
    assert plain["delta"] == {} and plain["variance"] == 12.5
    assert len(data) <= 1024, len(data)  # K = 64, one local step


def test_ack_and_task_carry_perturbation_counts() -> None:
    ack = Ack(update_id="u", client_id="c", accepted=True, version=2, perturbations=48)
    assert decode(encode(ack)) == ack
    assert Ack(update_id="u", client_id="c", accepted=True, version=2).perturbations is None
    task = Task(
        task_id="t",
        federation="f",
        version=0,
        model=ModelRef(name="tiny"),
        method="fwdgrad",
        train=TrainSpec(perturbations=32),
    )
    decoded = decode(encode(task))
    assert isinstance(decoded, Task) and decoded.train.perturbations == 32
    with pytest.raises(pydantic.ValidationError):
        Ack(update_id="u", client_id="c", accepted=True, version=2, perturbations=0)


def test_update_carries_a_delta_or_seeds_never_both() -> None:
    with pytest.raises(pydantic.ValidationError, match="not both"):
        _seed_update(delta={"w": torch.zeros(2)})
    assert _seed_update().delta == {}
    assert Update(client_id="c", task_id="t", base_version=0, num_samples=1).seeds is None


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"d": (1.0,)}, "derivatives"),
        ({"indices": (1, 1), "d": (1.0, 2.0)}, "twice"),
        ({"seed": 2**64}, "less than"),
        ({"seed": -1}, "greater than"),
        ({"indices": (), "d": ()}, "at least 1"),
        ({"scale": 0.0}, "greater than"),
        ({"scale": 1.5}, "less than"),
    ],
)
def test_seed_step_rejects_inconsistent_content(changes: dict[str, object], match: str) -> None:
    fields: dict[str, object] = {"seed": 1, "indices": (0, 1), "d": (0.5, -0.5)}
    with pytest.raises(pydantic.ValidationError, match=match):
        SeedStep.model_validate(fields | changes)


def test_seed_delta_rejects_bad_layout_and_lr() -> None:
    with pytest.raises(pydantic.ValidationError):
        SeedDelta(lr=0.1, layout="not-hex")
    with pytest.raises(pydantic.ValidationError):
        SeedDelta(lr=0.0, layout=LAYOUT)
    with pytest.raises(pydantic.ValidationError):
        SeedDelta(lr=0.1, layout=LAYOUT, target="lora_A")


def test_decode_refuses_malformed_seed_payloads() -> None:
    plain = msgpack.unpackb(encode(_seed_update()))
    plain["seeds"]["steps"][0]["d"] = plain["seeds"]["steps"][0]["d"][:-1]
    with pytest.raises(CodecError, match="derivatives"):
        decode(msgpack.packb(plain))
    plain = msgpack.unpackb(encode(_seed_update()))
    plain["seeds"]["steps"][0]["indices"][0] = "0"  # strict: no string-to-int coercion
    with pytest.raises(CodecError):
        decode(msgpack.packb(plain))
    plain = msgpack.unpackb(encode(_seed_update()))
    plain["seeds"]["extra"] = 1
    with pytest.raises(CodecError):
        decode(msgpack.packb(plain))
