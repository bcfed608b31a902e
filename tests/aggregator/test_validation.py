import math

import pytest
import torch

from aggregator.validation import ValidatedDelta, ValidationPolicy, samples_cap, validate_update
from schemas.errors import ConfigError, StaleUpdate, UpdateRejected
from schemas.messages import TensorMap, TrainSpec, Update

SHAPES = {"lora_A": (2, 3), "lora_B": (4, 2)}
CURRENT_VERSION = 7


def good_delta() -> TensorMap:
    # norm = sqrt(6 * 1^2 + 8 * 0.5^2) = sqrt(8)
    return {"lora_A": torch.ones(2, 3), "lora_B": torch.full((4, 2), 0.5)}


def make_update(
    *,
    client_id: str = "dev1",
    task_id: str = "task-1",
    method: str = "lora",
    base_version: int = 5,
    delta: TensorMap | None = None,
    num_samples: int = 10,
) -> Update:
    return Update(
        client_id=client_id,
        task_id=task_id,
        base_version=base_version,
        num_samples=num_samples,
        method=method,
        delta=good_delta() if delta is None else delta,
    )


def check(update: Update, policy: ValidationPolicy | None = None) -> ValidatedDelta:
    return validate_update(
        update,
        task_id="task-1",
        method="lora",
        current_version=CURRENT_VERSION,
        shapes=SHAPES,
        policy=policy or ValidationPolicy(),
    )


def rejected(update: Update, policy: ValidationPolicy | None = None) -> UpdateRejected:
    with pytest.raises(UpdateRejected) as info:
        check(update, policy)
    return info.value


def test_validate_update_accepts_a_good_update() -> None:
    result = check(make_update())
    assert result.staleness == 2
    assert result.norm == pytest.approx(math.sqrt(8))
    assert not result.clipped
    assert set(result.delta) == set(SHAPES)
    for name, tensor in result.delta.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, good_delta()[name])


def test_validate_update_unknown_client() -> None:
    policy = ValidationPolicy(known_clients=frozenset({"dev2"}))
    error = rejected(make_update(client_id="dev1"), policy)
    assert error.reason == "unknown_client"
    assert "'dev1'" in error.detail
    assert check(make_update(client_id="dev2"), policy).staleness == 2


def test_validate_update_anyone_when_no_client_list() -> None:
    assert check(make_update(client_id="stranger")).staleness == 2


def test_validate_update_wrong_task() -> None:
    error = rejected(make_update(task_id="task-0"))
    assert error.reason == "wrong_task"
    assert "'task-0'" in error.detail
    assert "'task-1'" in error.detail


def test_validate_update_wrong_method() -> None:
    error = rejected(make_update(method="fwdgrad"))
    assert error.reason == "wrong_method"
    assert "'fwdgrad'" in error.detail
    assert "'lora'" in error.detail


def test_validate_update_future_version() -> None:
    error = rejected(make_update(base_version=CURRENT_VERSION + 1))
    assert error.reason == "future_version"
    assert "base_version 8" in error.detail
    assert "current version 7" in error.detail


def test_validate_update_stale() -> None:
    policy = ValidationPolicy(max_staleness=3)
    with pytest.raises(StaleUpdate) as info:
        check(make_update(base_version=3), policy)
    assert info.value.reason == "stale"
    assert info.value.staleness == 4
    assert info.value.max_staleness == 3
    assert isinstance(info.value, UpdateRejected)


def test_validate_update_staleness_at_the_limit_is_accepted() -> None:
    assert check(make_update(base_version=4), ValidationPolicy(max_staleness=3)).staleness == 3
    assert check(make_update(base_version=7), ValidationPolicy(max_staleness=0)).staleness == 0


def test_validate_update_missing_tensor() -> None:
    delta = good_delta()
    del delta["lora_B"]
    error = rejected(make_update(delta=delta))
    assert error.reason == "wrong_shape"
    assert "missing tensors lora_B" in error.detail


def test_validate_update_unexpected_tensor() -> None:
    delta = good_delta() | {"lora_C": torch.zeros(1)}
    error = rejected(make_update(delta=delta))
    assert error.reason == "wrong_shape"
    assert "unexpected tensors lora_C" in error.detail


def test_validate_update_shape_mismatch() -> None:
    delta = good_delta() | {"lora_A": torch.ones(3, 2)}
    error = rejected(make_update(delta=delta))
    assert error.reason == "wrong_shape"
    assert "lora_A is (3, 2), expected (2, 3)" in error.detail


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.uint8])
def test_validate_update_wrong_dtype(dtype: torch.dtype) -> None:
    delta = good_delta() | {"lora_B": torch.ones(4, 2, dtype=dtype)}
    error = rejected(make_update(delta=delta))
    assert error.reason == "wrong_dtype"
    assert f"lora_B is {dtype}" in error.detail
    assert "bfloat16, float16, float32" in error.detail


def test_validate_update_sparse_tensor_is_wrong_dtype() -> None:
    delta = good_delta() | {"lora_B": torch.ones(4, 2).to_sparse()}
    error = rejected(make_update(delta=delta))
    assert error.reason == "wrong_dtype"
    assert "lora_B has layout torch.sparse_coo" in error.detail


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_validate_update_half_precision_becomes_float32(dtype: torch.dtype) -> None:
    delta = {name: tensor.to(dtype) for name, tensor in good_delta().items()}
    result = check(make_update(delta=delta))
    assert all(tensor.dtype == torch.float32 for tensor in result.delta.values())
    assert result.norm == pytest.approx(math.sqrt(8))


def test_validate_update_custom_allowed_dtypes() -> None:
    policy = ValidationPolicy(allowed_dtypes=frozenset({torch.float32}))
    delta = good_delta() | {"lora_A": torch.ones(2, 3, dtype=torch.float16)}
    error = rejected(make_update(delta=delta), policy)
    assert error.reason == "wrong_dtype"
    assert "allowed: dense tensors of float32" in error.detail


def test_validate_update_non_finite() -> None:
    lora_b = torch.full((4, 2), 0.5)
    lora_b[0, 0] = math.nan
    lora_b[1, 1] = math.inf
    lora_b[2, 1] = -math.inf
    error = rejected(make_update(delta=good_delta() | {"lora_B": lora_b}))
    assert error.reason == "non_finite"
    assert error.detail == "lora_B has 1 NaN and 2 inf values"


def test_validate_update_norm_reject_mode() -> None:
    policy = ValidationPolicy(max_update_norm=2.0, norm_action="reject")
    error = rejected(make_update(), policy)
    assert error.reason == "norm_bound"
    assert "2.82843" in error.detail  # sqrt(8)
    assert "max_update_norm 2" in error.detail


def test_validate_update_norm_clip_mode() -> None:
    policy = ValidationPolicy(max_update_norm=2.0, norm_action="clip")
    result = check(make_update(), policy)
    assert result.clipped
    assert result.norm == pytest.approx(math.sqrt(8))  # as received
    # scale = 2 / sqrt(8) = 1 / sqrt(2)
    scale = 1 / math.sqrt(2)
    torch.testing.assert_close(result.delta["lora_A"], torch.full((2, 3), scale))
    torch.testing.assert_close(result.delta["lora_B"], torch.full((4, 2), 0.5 * scale))


def test_validate_update_norm_within_bound_is_untouched() -> None:
    for action in ("clip", "reject"):
        policy = ValidationPolicy(max_update_norm=3.0, norm_action=action)
        result = check(make_update(), policy)
        assert not result.clipped
        torch.testing.assert_close(result.delta["lora_A"], torch.ones(2, 3))


def test_validate_update_never_mutates_the_update() -> None:
    delta = {"lora_A": torch.full((2, 3), 4.0, dtype=torch.float16), "lora_B": torch.ones(4, 2)}
    before = {name: tensor.clone() for name, tensor in delta.items()}
    update = make_update(delta=delta)
    result = check(update, ValidationPolicy(max_update_norm=1.0))
    assert result.clipped
    for tensor in result.delta.values():  # clipped: fresh tensors, the caller's to change
        tensor.add_(100.0)
    unclipped = check(update)
    assert not unclipped.clipped
    assert all(t.dtype == torch.float32 for t in unclipped.delta.values())
    # Unclipped float32 tensors are handed on without a copy (strategies copy what they
    # keep); a float16 one is converted into a new float32 tensor.
    assert unclipped.delta["lora_B"].data_ptr() == update.delta["lora_B"].data_ptr()
    assert unclipped.delta["lora_A"].data_ptr() != update.delta["lora_A"].data_ptr()
    for name, tensor in update.delta.items():
        assert tensor.dtype == before[name].dtype
        assert torch.equal(tensor, before[name])


ORDER = [
    "unknown_client",
    "wrong_task",
    "wrong_method",
    "too_many_samples",
    "future_version",
    "wrong_shape",
    "wrong_dtype",
    "non_finite",
    "norm_bound",
]


def faulty_update(faults: set[str]) -> Update:
    delta = good_delta()
    if "wrong_shape" in faults:
        delta["extra"] = torch.zeros(1)
    if "wrong_dtype" in faults:
        delta["lora_A"] = delta["lora_A"].double()
    if "norm_bound" in faults:
        delta["lora_B"][0, 0] = 1000.0
    if "non_finite" in faults:
        delta["lora_B"][1, 1] = math.nan
    base_version = 5
    if "future_version" in faults:
        base_version = CURRENT_VERSION + 1
    elif "stale" in faults:
        base_version = 0
    return make_update(
        client_id="intruder" if "unknown_client" in faults else "dev1",
        task_id="task-0" if "wrong_task" in faults else "task-1",
        method="kd" if "wrong_method" in faults else "lora",
        base_version=base_version,
        delta=delta,
        num_samples=11 if "too_many_samples" in faults else 10,
    )


@pytest.mark.parametrize("version_fault", ["future_version", "stale"])
def test_validate_update_checks_in_documented_order(version_fault: str) -> None:
    order = [version_fault if fault == "future_version" else fault for fault in ORDER]
    policy = ValidationPolicy(
        max_staleness=3,
        max_update_norm=10.0,
        norm_action="reject",
        known_clients=frozenset({"dev1"}),
        max_samples=10,
    )
    for i, expected in enumerate(order):
        error = rejected(faulty_update(set(order[i:])), policy)
        assert error.reason == expected, (order[i:], error)
    assert check(faulty_update(set()), policy).staleness == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_staleness": -1}, "max_staleness"),
        ({"max_staleness": 1.5}, "max_staleness"),
        ({"max_update_norm": 0.0}, "max_update_norm"),
        ({"max_update_norm": math.inf}, "max_update_norm"),
        ({"norm_action": "drop"}, "norm_action"),
        ({"allowed_dtypes": frozenset()}, "allowed_dtypes"),
        ({"allowed_dtypes": frozenset({torch.int64})}, "allowed_dtypes"),
        ({"max_samples": 0}, "max_samples"),
        ({"max_samples": True}, "max_samples"),
        ({"max_samples": 2.5}, "max_samples"),
    ],
)
def test_validation_policy_bad_settings_raise(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ValidationPolicy(**kwargs)  # type: ignore[arg-type]


def test_validation_policy_normalises_sets() -> None:
    policy = ValidationPolicy(known_clients={"a", "b"})  # type: ignore[arg-type]
    assert policy.known_clients == frozenset({"a", "b"})
    assert isinstance(policy.known_clients, frozenset)
    assert hash(policy) == hash(ValidationPolicy(known_clients=frozenset({"a", "b"})))


def test_validate_update_caps_num_samples_at_the_policy_bound() -> None:
    policy = ValidationPolicy(max_samples=40)
    assert check(make_update(num_samples=40), policy).staleness == 2  # at the cap: accepted
    update = make_update(num_samples=10**9)  # a client inflating its merge weight
    before = {name: tensor.clone() for name, tensor in update.delta.items()}
    error = rejected(update, policy)
    assert error.reason == "too_many_samples"
    assert "1000000000" in error.detail and "40" in error.detail
    for name, tensor in update.delta.items():
        assert torch.equal(tensor, before[name])
    assert check(make_update(num_samples=10**9)).staleness == 2  # no cap configured


def test_samples_cap_is_one_epoch_of_the_task_unless_configured() -> None:
    train = TrainSpec(local_steps=5, batch_size=8)
    assert samples_cap(train) == 40
    assert samples_cap(train, 100) == 100
