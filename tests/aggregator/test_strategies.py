import math

import pytest
import torch

from aggregator.staleness import Constant, Hinge, InverseSqrt, Polynomial
from aggregator.strategies import (
    FedAsync,
    FedBuff,
    MergeResult,
    Strategy,
    make_strategy,
)
from schemas.errors import ConfigError
from schemas.messages import TensorMap


def m(values: list[list[float]], name: str = "w") -> TensorMap:
    return {name: torch.tensor(values, dtype=torch.float32)}


def assert_map(actual: TensorMap | None, expected: TensorMap, *, atol: float = 1e-6) -> None:
    assert actual is not None
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0)


def submit(
    strategy: Strategy,
    current: TensorMap,
    delta: TensorMap,
    *,
    staleness: int = 0,
    num_samples: int = 1,
    update_id: str = "u",
    base: TensorMap | None = None,
) -> MergeResult:
    return strategy.submit(
        current=current,
        base=current if base is None else base,
        delta=delta,
        staleness=staleness,
        num_samples=num_samples,
        update_id=update_id,
    )


# --- MergeResult -------------------------------------------------------------------------


def test_merge_result_buffered_has_no_ids() -> None:
    result = MergeResult(new_global=None, weight=1.0)
    assert not result.merged
    assert result.merged_update_ids == ()
    with pytest.raises(ValueError, match="buffered"):
        MergeResult(new_global=None, weight=1.0, merged_update_ids=("a",))


def test_merge_result_new_global_names_its_updates() -> None:
    assert MergeResult(new_global=m([[1.0]]), weight=0.5, merged_update_ids=("a",)).merged
    with pytest.raises(ValueError, match="name the updates"):
        MergeResult(new_global=m([[1.0]]), weight=0.5)
    with pytest.raises(ValueError, match="weight"):
        MergeResult(new_global=None, weight=math.nan)


# --- FedAsync ----------------------------------------------------------------------------

CURRENT = m([[1.0, 2.0], [3.0, 4.0]])
BASE = m([[0.0, 0.0], [2.0, 2.0]])
DELTA = m([[2.0, 4.0], [0.0, 6.0]])  # client model = base + delta = [[2, 4], [2, 8]]


def test_fedasync_mixes_client_model_with_staleness_discount() -> None:
    strategy = FedAsync(0.6, rule=Polynomial(0.5))
    result = submit(strategy, CURRENT, DELTA, base=BASE, staleness=3, update_id="u1")
    # alpha_s = 0.6 * (3 + 1)^-0.5 = 0.3; new = 0.7 * current + 0.3 * [[2, 4], [2, 8]]
    assert result.weight == pytest.approx(0.3)
    assert result.merged_update_ids == ("u1",)
    assert_map(result.new_global, m([[1.3, 2.6], [2.7, 5.2]]))


def test_fedasync_fresh_update_with_constant_rule() -> None:
    result = submit(FedAsync(0.5, rule=Constant()), CURRENT, DELTA, base=BASE, staleness=7)
    # alpha_s = 0.5: the midpoint of current and the client model
    assert result.weight == 0.5
    assert_map(result.new_global, m([[1.5, 3.0], [2.5, 6.0]]))


def test_fedasync_staler_updates_move_the_global_less() -> None:
    strategy = FedAsync(0.6)  # polynomial a = 0.5 by default
    current = m([[0.0]])
    delta = m([[10.0]])
    fresh = submit(strategy, current, delta, staleness=0)
    stale = submit(strategy, current, delta, staleness=8)
    # 0.6 * 10 = 6; 0.6 * 9^-0.5 * 10 = 2
    assert_map(fresh.new_global, m([[6.0]]))
    assert_map(stale.new_global, m([[2.0]]))
    assert stale.weight == pytest.approx(0.2)


def test_fedasync_hinge_rule_keeps_full_rate_up_to_b() -> None:
    strategy = FedAsync(0.6, rule=Hinge(a=10.0, b=4))
    assert submit(strategy, CURRENT, DELTA, staleness=4).weight == pytest.approx(0.6)
    assert submit(strategy, CURRENT, DELTA, staleness=5).weight == pytest.approx(0.6 / 11)


def test_fedasync_ignores_sample_count() -> None:
    strategy = FedAsync(0.6)
    few = submit(strategy, CURRENT, DELTA, num_samples=1)
    many = submit(strategy, CURRENT, DELTA, num_samples=1000)
    assert few.new_global is not None
    assert_map(many.new_global, few.new_global)


def test_fedasync_never_buffers_or_mutates() -> None:
    strategy = FedAsync()
    current = m([[1.0, 2.0], [3.0, 4.0]])
    submit(strategy, current, DELTA)
    assert_map(current, CURRENT)
    assert strategy.pending == 0
    assert strategy.name == "fedasync"
    assert strategy.state_dict() == {"name": "fedasync", "pending": 0, "update_ids": []}


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.01, math.nan])
def test_fedasync_bad_alpha_raises(alpha: float) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        FedAsync(alpha)


def test_fedasync_layout_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="missing w"):
        submit(FedAsync(), CURRENT, m([[1.0, 1.0], [1.0, 1.0]], name="v"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"staleness": -1}, "staleness"),
        ({"num_samples": 0}, "num_samples"),
        ({"update_id": ""}, "update_id"),
    ],
)
def test_strategy_bad_submission_raises(kwargs: dict[str, object], match: str) -> None:
    for strategy in (FedAsync(), FedBuff()):
        with pytest.raises(ValueError, match=match):
            submit(strategy, CURRENT, DELTA, **kwargs)  # type: ignore[arg-type]


# --- FedBuff -----------------------------------------------------------------------------

D1 = m([[3.0, 0.0], [0.0, 0.0]])
D2 = m([[0.0, 6.0], [0.0, 0.0]])
D3 = m([[0.0, 0.0], [8.0, 0.0]])
ONES = m([[1.0, 1.0], [1.0, 1.0]])


def test_fedbuff_buffers_until_k_then_flushes_weighted_mean() -> None:
    strategy = FedBuff(3, server_lr=1.0, rule=InverseSqrt())
    # weights s(tau) * n: 1 * 1 = 1; (1 / sqrt(4)) * 2 = 1; (1 / sqrt(9)) * 6 = 2
    r1 = submit(strategy, CURRENT, D1, staleness=0, num_samples=1, update_id="u1")
    assert r1.new_global is None
    assert r1.merged_update_ids == ()
    assert r1.weight == pytest.approx(1.0)
    assert strategy.pending == 1
    r2 = submit(strategy, CURRENT, D2, staleness=3, num_samples=2, update_id="u2")
    assert r2.new_global is None
    assert r2.weight == pytest.approx(1.0)
    assert strategy.pending == 2
    r3 = submit(strategy, ONES, D3, staleness=8, num_samples=6, update_id="u3")
    assert r3.weight == pytest.approx(2.0)
    assert r3.merged_update_ids == ("u1", "u2", "u3")
    assert strategy.pending == 0
    # sum w_i D_i / 4 = [[3, 6], [16, 0]] / 4, applied to the global current at flush (ONES)
    assert_map(r3.new_global, m([[1.75, 2.5], [5.0, 1.0]]))


def test_fedbuff_server_lr_scales_the_step() -> None:
    strategy = FedBuff(3, server_lr=0.5)
    submit(strategy, ONES, D1, staleness=0, num_samples=1, update_id="u1")
    submit(strategy, ONES, D2, staleness=3, num_samples=2, update_id="u2")
    result = submit(strategy, ONES, D3, staleness=8, num_samples=6, update_id="u3")
    # 1 + 0.5 * [[0.75, 1.5], [4, 0]]
    assert_map(result.new_global, m([[1.375, 1.75], [3.0, 1.0]]))


def test_fedbuff_staleness_weighting_is_visible() -> None:
    strategy = FedBuff(2, rule=InverseSqrt())
    zero = m([[0.0]])
    submit(strategy, zero, m([[3.0]]), staleness=0, update_id="fresh")  # w = 1
    result = submit(strategy, zero, m([[0.0]]), staleness=3, update_id="old")  # w = 0.5
    # (1 * 3 + 0.5 * 0) / 1.5 = 2, not the unweighted 1.5
    assert_map(result.new_global, m([[2.0]]))


def test_fedbuff_sample_weighting_is_visible() -> None:
    strategy = FedBuff(2, rule=Constant())
    zero = m([[0.0]])
    submit(strategy, zero, m([[4.0]]), num_samples=1, update_id="small")
    result = submit(strategy, zero, m([[0.0]]), num_samples=3, update_id="large")
    # (1 * 4 + 3 * 0) / 4 = 1
    assert_map(result.new_global, m([[1.0]]))


def test_fedbuff_starts_a_new_buffer_after_flush() -> None:
    strategy = FedBuff(2)
    submit(strategy, ONES, D1, update_id="a")
    submit(strategy, ONES, D2, update_id="b")
    assert submit(strategy, ONES, D3, update_id="c").new_global is None
    result = submit(strategy, ONES, D1, update_id="d")
    assert result.merged_update_ids == ("c", "d")
    # 1 + (D3 + D1) / 2
    assert_map(result.new_global, m([[2.5, 1.0], [5.0, 1.0]]))


def test_fedbuff_buffer_size_one_applies_each_delta() -> None:
    result = submit(FedBuff(1, server_lr=2.0), ONES, D1, staleness=5, num_samples=9)
    assert_map(result.new_global, m([[7.0, 1.0], [1.0, 1.0]]))


def test_fedbuff_ignores_base() -> None:
    strategy = FedBuff(1)
    result = submit(strategy, ONES, D1, base=m([[100.0, 100.0], [100.0, 100.0]]))
    assert_map(result.new_global, m([[4.0, 1.0], [1.0, 1.0]]))


def test_fedbuff_buffer_is_independent_of_caller_tensors() -> None:
    strategy = FedBuff(2)
    delta = m([[1.0, 1.0], [1.0, 1.0]])
    submit(strategy, ONES, delta, update_id="a")
    delta["w"].fill_(1000.0)
    result = submit(strategy, ONES, m([[1.0, 1.0], [1.0, 1.0]]), update_id="b")
    assert_map(result.new_global, m([[2.0, 2.0], [2.0, 2.0]]))


def test_fedbuff_accepts_half_precision_deltas() -> None:
    strategy = FedBuff(2)
    submit(strategy, ONES, {"w": D1["w"].half()}, update_id="a")
    result = submit(strategy, ONES, {"w": D2["w"].bfloat16()}, update_id="b")
    assert_map(result.new_global, m([[2.5, 4.0], [1.0, 1.0]]))


def test_fedbuff_rejects_bad_delta_without_buffering_it() -> None:
    strategy = FedBuff(2)
    with pytest.raises(ValueError, match="shape mismatch"):
        submit(strategy, ONES, m([[1.0, 2.0]]), update_id="bad")
    assert strategy.pending == 0


def test_fedbuff_duplicate_update_id_raises() -> None:
    strategy = FedBuff(3)
    submit(strategy, ONES, D1, update_id="same")
    with pytest.raises(ValueError, match="already buffered"):
        submit(strategy, ONES, D2, update_id="same")
    assert strategy.pending == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buffer_size": 0}, "buffer_size"),
        ({"buffer_size": 2.5}, "buffer_size"),
        ({"server_lr": 0.0}, "server_lr"),
        ({"robust": "mode"}, "robust"),
        ({"trim_ratio": 0.5}, "trim_ratio"),
    ],
)
def test_fedbuff_bad_config_raises(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FedBuff(**kwargs)  # type: ignore[arg-type]


PATTERN = [[1.0, -2.0], [0.5, 3.0]]


def scaled(c: float) -> TensorMap:
    return m([[c * v for v in row] for row in PATTERN])


@pytest.mark.parametrize(
    ("robust", "poison", "c_expected"),
    [
        # honest c in {0.9, 1.0, 1.05, 1.1}; poisoned c = 100 (scaled x100)
        ("median", 100.0, 1.05),  # middle of {0.9, 1.0, 1.05, 1.1, 100}
        ("trimmed_mean", 100.0, 1.05),  # mean of {1.0, 1.05, 1.1}
        # poisoned c = -100 (sign-flipped and scaled)
        ("median", -100.0, 1.0),  # middle of {-100, 0.9, 1.0, 1.05, 1.1}
        ("trimmed_mean", -100.0, 2.95 / 3),  # mean of {0.9, 1.0, 1.05}
    ],
)
def test_fedbuff_robust_modes_resist_a_poisoned_delta(
    robust: str, poison: float, c_expected: float
) -> None:
    strategy = FedBuff(5, robust=robust, trim_ratio=0.2)  # type: ignore[arg-type]
    zero = m([[0.0, 0.0], [0.0, 0.0]])
    for i, c in enumerate([0.9, 1.0, poison, 1.05]):
        # the attacker also claims a huge sample count: robust modes ignore weights
        n = 10_000 if c == poison else 10
        assert submit(strategy, zero, scaled(c), num_samples=n, update_id=f"u{i}").weight == 1.0
    result = submit(strategy, zero, scaled(1.1), num_samples=10, update_id="u4")
    assert_map(result.new_global, scaled(c_expected), atol=1e-5)


def test_fedbuff_mean_mode_is_dragged_by_a_poisoned_delta() -> None:
    strategy = FedBuff(5, rule=Constant())
    zero = m([[0.0, 0.0], [0.0, 0.0]])
    for i, c in enumerate([0.9, 1.0, 100.0, 1.05]):
        submit(strategy, zero, scaled(c), update_id=f"u{i}")
    result = submit(strategy, zero, scaled(1.1), update_id="u4")
    # (0.9 + 1.0 + 100 + 1.05 + 1.1) / 5 = 20.81
    assert_map(result.new_global, scaled(20.81), atol=1e-4)


def test_fedbuff_state_dict_round_trip() -> None:
    strategy = FedBuff(3, rule=InverseSqrt())
    submit(strategy, ONES, D1, staleness=0, num_samples=1, update_id="u1")
    submit(strategy, ONES, D2, staleness=3, num_samples=2, update_id="u2")
    state = strategy.state_dict()
    assert state["pending"] == 2
    assert state["update_ids"] == ["u1", "u2"]
    assert state["weights"] == pytest.approx([1.0, 1.0])
    assert state["staleness"] == [0, 3]
    assert state["num_samples"] == [1, 2]

    restored = FedBuff(3, rule=InverseSqrt())
    restored.load_state_dict(state)
    assert restored.pending == 2
    result = submit(restored, ONES, D3, staleness=8, num_samples=6, update_id="u3")
    assert result.merged_update_ids == ("u1", "u2", "u3")
    assert_map(result.new_global, m([[1.75, 2.5], [5.0, 1.0]]))


def test_fedbuff_load_state_dict_keeps_an_overfull_buffer_for_the_next_flush() -> None:
    big = FedBuff(3)
    submit(big, ONES, D1, update_id="u1")
    submit(big, ONES, D2, update_id="u2")
    small = FedBuff(1)
    small.load_state_dict(big.state_dict())
    result = submit(small, ONES, D3, update_id="u3")
    assert result.merged_update_ids == ("u1", "u2", "u3")
    assert_map(result.new_global, m([[2.0, 3.0], [11.0 / 3.0, 1.0]]))


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"name": "fedasync", "pending": 0, "update_ids": []}, "cannot load"),
        (
            {
                "name": "fedbuff",
                "update_ids": ["a"],
                "weights": [],
                "staleness": [],
                "num_samples": [],
                "deltas": [],
            },
            "differ in length",
        ),
        (
            {
                "name": "fedbuff",
                "update_ids": ["a"],
                "weights": [1.0],
                "staleness": [0],
                "num_samples": [1],
                "deltas": [{"w": [1.0]}],
            },
            "tensor map",
        ),
        ({"name": "fedbuff", "update_ids": "a"}, "needs a list"),
    ],
)
def test_fedbuff_load_state_dict_rejects_bad_state(state: dict[str, object], match: str) -> None:
    strategy = FedBuff(3)
    with pytest.raises(ConfigError, match=match):
        strategy.load_state_dict(state)
    assert strategy.pending == 0


def test_fedasync_load_state_dict_rejects_buffered_state() -> None:
    FedAsync().load_state_dict({"name": "fedasync", "pending": 0, "update_ids": []})
    with pytest.raises(ConfigError, match="buffered"):
        FedAsync().load_state_dict({"name": "fedasync", "pending": 1, "update_ids": ["a"]})
    with pytest.raises(ConfigError, match="cannot load"):
        FedAsync().load_state_dict(FedBuff().state_dict())


# --- LoRA: federated freeze-A (FFA) exactness as pure math -------------------------------


def test_fedbuff_ffa_merge_of_b_is_exact_for_shared_frozen_a() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 3, generator=gen)  # shared frozen A (rank 2, in 3)
    b0 = torch.randn(4, 2, generator=gen)  # global B (out 4, rank 2)
    clients = [b0 + torch.randn(4, 2, generator=gen) for _ in range(3)]
    strategy = FedBuff(3, rule=InverseSqrt())
    staleness, samples = [0, 3, 8], [5, 2, 9]
    result = None
    for i, (b_i, tau, n) in enumerate(zip(clients, staleness, samples, strict=True)):
        result = submit(
            strategy,
            {"lora_B": b0},
            {"lora_B": b_i - b0},
            staleness=tau,
            num_samples=n,
            update_id=f"c{i}",
        )
    assert result is not None
    assert result.new_global is not None
    merged_product = result.new_global["lora_B"] @ a
    weights = [1.0 * 5, 0.5 * 2, (1 / 3) * 9]
    mean_of_products = torch.stack([w * (b @ a) for w, b in zip(weights, clients, strict=True)])
    expected = mean_of_products.sum(dim=0) / sum(weights)
    torch.testing.assert_close(merged_product, expected, atol=1e-5, rtol=0)


def test_fedbuff_standard_lora_merge_is_not_the_mean_of_products() -> None:
    # rank 1, 1x1 matrices: client 1 has A = B = 1, client 2 has A = B = 3, global starts at 0.
    strategy = FedBuff(2, rule=Constant())
    zero = {"lora_A": torch.zeros(1, 1), "lora_B": torch.zeros(1, 1)}
    submit(strategy, zero, {"lora_A": torch.ones(1, 1), "lora_B": torch.ones(1, 1)}, update_id="1")
    result = submit(
        strategy, zero, {"lora_A": torch.full((1, 1), 3.0), "lora_B": torch.full((1, 1), 3.0)}
    )
    assert result.new_global is not None
    merged_product = result.new_global["lora_B"] @ result.new_global["lora_A"]
    # mean(B) * mean(A) = 2 * 2 = 4, but mean(B_i * A_i) = (1 + 9) / 2 = 5
    assert merged_product.item() == pytest.approx(4.0)
    assert merged_product.item() != pytest.approx(5.0)


# --- factory -----------------------------------------------------------------------------


def test_make_strategy_defaults_match_the_classes() -> None:
    fedasync = make_strategy("fedasync")
    assert isinstance(fedasync, FedAsync)
    assert (fedasync.alpha, fedasync.rule) == (FedAsync().alpha, FedAsync().rule)
    fedbuff = make_strategy("fedbuff")
    assert isinstance(fedbuff, FedBuff)
    default = FedBuff()
    assert (fedbuff.buffer_size, fedbuff.server_lr, fedbuff.rule, fedbuff.robust) == (
        default.buffer_size,
        default.server_lr,
        default.rule,
        default.robust,
    )
    assert fedbuff.trim_ratio == default.trim_ratio


def test_make_strategy_accepts_a_settings_dict_of_floats() -> None:
    params: dict[str, float] = {"buffer_size": 2.0, "server_lr": 0.5}
    strategy = make_strategy("fedbuff", staleness=None, staleness_params={}, **params)
    assert isinstance(strategy, FedBuff)
    assert (strategy.buffer_size, strategy.server_lr, strategy.robust) == (2, 0.5, "mean")


def test_make_strategy_passes_parameters_and_rule() -> None:
    fedasync = make_strategy("fedasync", staleness="hinge", alpha=0.5, a=2.0, b=1.0)
    assert isinstance(fedasync, FedAsync)
    assert fedasync.alpha == 0.5
    assert fedasync.rule == Hinge(a=2.0, b=1)
    fedbuff = make_strategy(
        "fedbuff",
        staleness="polynomial",
        staleness_params={"a": 1.0},
        robust="trimmed_mean",
        buffer_size=4.0,
        server_lr=0.5,
        trim_ratio=0.25,
    )
    assert isinstance(fedbuff, FedBuff)
    assert fedbuff.buffer_size == 4
    assert (fedbuff.server_lr, fedbuff.trim_ratio, fedbuff.robust) == (0.5, 0.25, "trimmed_mean")
    assert fedbuff.rule == Polynomial(1.0)
    assert fedbuff.name == "fedbuff"


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("fedavg", {}, "unknown strategy"),
        ("fedbuff", {"staleness": "linear"}, "unknown staleness rule"),
        ("fedbuff", {"alpha": 0.5}, "does not take alpha"),
        ("fedasync", {"buffer_size": 3.0}, "does not take buffer_size"),
        ("fedasync", {"a": 1.0}, "need a staleness rule"),
        ("fedasync", {"staleness": "constant", "a": 1.0}, "does not take a"),
        ("fedasync", {"staleness": "polynomial", "staleness_params": {"a": 1}, "a": 2}, "twice"),
        ("fedasync", {"robust": "median"}, "robust"),
        ("fedasync", {"alpha": 1.5}, "alpha"),
        ("fedasync", {"alpha": "high"}, "must be a number"),
        ("fedbuff", {"buffer_size": 2.5}, "integer"),
        ("fedbuff", {"robust": "mode"}, "robust must be one of"),
        ("fedbuff", {"robust": 1.0}, "robust must be one of"),
        ("fedbuff", {"b": 1.0}, "takes buffer_size, robust, server_lr, trim_ratio"),
    ],
)
def test_make_strategy_rejects_bad_settings(
    name: str, kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        make_strategy(name, **kwargs)  # type: ignore[arg-type]
