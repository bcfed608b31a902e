import math

import pytest
import torch

from aggregator import ops
from schemas.messages import TensorMap


def tm(**tensors: list[float] | list[list[float]]) -> TensorMap:
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in tensors.items()}


def assert_map(actual: TensorMap, expected: TensorMap, *, atol: float = 1e-6) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == torch.float32, name
        torch.testing.assert_close(actual[name], tensor, atol=atol, rtol=0)


X = tm(w=[[1.0, 2.0], [3.0, 4.0]], b=[1.0, -1.0])
D = tm(w=[[0.5, 0.5], [-1.0, 0.0]], b=[2.0, 2.0])


def test_add_scales_delta() -> None:
    out = ops.add(X, D, scale=2.0)
    assert_map(out, tm(w=[[2.0, 3.0], [1.0, 4.0]], b=[5.0, 3.0]))


def test_add_default_scale_is_one() -> None:
    assert_map(ops.add(X, D), tm(w=[[1.5, 2.5], [2.0, 4.0]], b=[3.0, 1.0]))


def test_sub_gives_difference() -> None:
    assert_map(ops.sub(X, D), tm(w=[[0.5, 1.5], [4.0, 4.0]], b=[-1.0, -3.0]))


def test_mix_interpolates() -> None:
    y = tm(w=[[5.0, 6.0], [7.0, 8.0]], b=[5.0, 3.0])
    # 0.75 * x + 0.25 * y
    assert_map(ops.mix(X, y, alpha=0.25), tm(w=[[2.0, 3.0], [4.0, 5.0]], b=[2.0, 0.0]))
    assert_map(ops.mix(X, y, alpha=0.0), X)
    assert_map(ops.mix(X, y, alpha=1.0), y)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_mix_alpha_out_of_range_raises(alpha: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        ops.mix(X, X, alpha=alpha)


def test_weighted_mean_matches_hand_values() -> None:
    m1 = tm(w=[[1.0, 0.0]], b=[3.0])
    m2 = tm(w=[[4.0, 3.0]], b=[0.0])
    # (1 * m1 + 2 * m2) / 3
    out = ops.weighted_mean([m1, m2], weights=[1.0, 2.0])
    assert_map(out, tm(w=[[3.0, 2.0]], b=[1.0]))


def test_weighted_mean_zero_weight_ignores_map() -> None:
    m1 = tm(w=[1.0])
    m2 = tm(w=[100.0])
    assert_map(ops.weighted_mean([m1, m2], weights=[1.0, 0.0]), m1)


@pytest.mark.parametrize(
    ("weights", "match"),
    [([1.0], "2 maps but 1 weights"), ([1.0, -1.0], ">= 0"), ([0.0, 0.0], "sum to zero")],
)
def test_weighted_mean_bad_weights_raise(weights: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.weighted_mean([X, X], weights=weights)


def test_weighted_mean_nan_weight_raises() -> None:
    with pytest.raises(ValueError, match="finite"):
        ops.weighted_mean([X, X], weights=[1.0, math.nan])


def test_weighted_mean_empty_raises() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ops.weighted_mean([], weights=[])


def test_global_norm_spans_all_tensors() -> None:
    assert ops.global_norm(tm(a=[3.0], b=[[0.0, 4.0]])) == pytest.approx(5.0)
    assert ops.global_norm({}) == 0.0


def test_global_norm_accepts_half_precision() -> None:
    x = {"a": torch.tensor([3.0, 4.0], dtype=torch.float16), "b": torch.tensor([12.0]).bfloat16()}
    assert ops.global_norm(x) == pytest.approx(13.0)


def test_clip_by_norm_scales_down() -> None:
    clipped, scale = ops.clip_by_norm(tm(a=[3.0], b=[[0.0, 4.0]]), max_norm=1.0)
    assert scale == pytest.approx(0.2)
    assert_map(clipped, tm(a=[0.6], b=[[0.0, 0.8]]))
    assert ops.global_norm(clipped) == pytest.approx(1.0, rel=1e-6)


def test_clip_by_norm_leaves_small_maps_alone() -> None:
    x = tm(a=[3.0], b=[[0.0, 4.0]])
    clipped, scale = ops.clip_by_norm(x, max_norm=10.0)
    assert scale == 1.0
    assert_map(clipped, x)
    assert clipped["a"].data_ptr() != x["a"].data_ptr()


@pytest.mark.parametrize("max_norm", [0.0, -1.0, math.inf, math.nan])
def test_clip_by_norm_bad_bound_raises(max_norm: float) -> None:
    with pytest.raises(ValueError, match="max_norm"):
        ops.clip_by_norm(X, max_norm=max_norm)


def test_clip_by_norm_non_finite_raises() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        ops.clip_by_norm(tm(a=[math.nan]), max_norm=1.0)


def test_all_finite_detects_nan_and_inf() -> None:
    assert ops.all_finite(X)
    assert ops.all_finite({})
    assert not ops.all_finite(tm(a=[1.0, math.nan]))
    assert not ops.all_finite({"a": torch.tensor([-math.inf], dtype=torch.float16)})


def test_zeros_like_is_float32_zeros() -> None:
    out = ops.zeros_like({"a": torch.ones(2, 3, dtype=torch.bfloat16)})
    assert_map(out, {"a": torch.zeros(2, 3)})


def test_clone_is_independent_float32_copy() -> None:
    source = {"a": torch.tensor([1.0, 2.0])}
    copy = ops.clone(source)
    copy["a"][0] = 9.0
    assert source["a"].tolist() == [1.0, 2.0]
    half = ops.clone({"a": torch.tensor([0.5], dtype=torch.float16)})
    assert half["a"].dtype == torch.float32


def test_ops_compute_in_float32_for_half_inputs() -> None:
    # 1 + 1e-4 rounds back to 1 in float16 (spacing ~1e-3) but not in float32.
    x = {"a": torch.tensor([1.0], dtype=torch.float16)}
    d = {"a": torch.tensor([1e-4], dtype=torch.float16)}
    out = ops.add(x, d)
    assert out["a"].dtype == torch.float32
    assert out["a"].item() == pytest.approx(1.0001, abs=1e-6)
    assert ops.sub(x, d)["a"].dtype == torch.float32
    assert ops.mix(x, d, alpha=0.5)["a"].dtype == torch.float32
    assert ops.weighted_mean([x, d], weights=[1, 1])["a"].dtype == torch.float32


def test_ops_never_mutate_or_alias_inputs() -> None:
    x = tm(w=[[1.0, 2.0], [3.0, 4.0]], b=[1.0, -1.0])
    d = tm(w=[[0.5, 0.5], [-1.0, 0.0]], b=[2.0, 2.0])
    before = ops.clone(x), ops.clone(d)
    results = [
        ops.add(x, d, scale=0.0),
        ops.sub(x, d),
        ops.mix(x, d, alpha=0.0),
        ops.weighted_mean([x], weights=[1.0]),
        ops.clip_by_norm(x, max_norm=100.0)[0],
        ops.coordinate_median([x]),
        ops.trimmed_mean([x], trim_ratio=0.0),
    ]
    for out in results:
        for tensor in out.values():
            tensor.add_(100.0)
    assert_map(x, before[0])
    assert_map(d, before[1])


@pytest.mark.parametrize(
    ("other", "match"),
    [
        (tm(w=[[1.0, 2.0], [3.0, 4.0]]), "missing b"),
        (tm(w=[[1.0, 2.0], [3.0, 4.0]], b=[0.0, 0.0], c=[1.0]), "unexpected c"),
        (tm(w=[[1.0, 2.0]], b=[0.0, 0.0]), r"w \(1, 2\) vs \(2, 2\)"),
    ],
)
def test_ops_layout_mismatch_raises(other: TensorMap, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.add(X, other)
    with pytest.raises(ValueError, match=match):
        ops.weighted_mean([X, other], weights=[1.0, 1.0])
    with pytest.raises(ValueError, match=match):
        ops.coordinate_median([X, other])


def test_coordinate_median_odd_count() -> None:
    maps = [tm(w=[1.0, 9.0]), tm(w=[2.0, -5.0]), tm(w=[100.0, 0.0])]
    assert_map(ops.coordinate_median(maps), tm(w=[2.0, 0.0]))


def test_coordinate_median_even_count_averages_middle_pair() -> None:
    maps = [tm(w=[1.0]), tm(w=[2.0]), tm(w=[4.0]), tm(w=[100.0])]
    assert_map(ops.coordinate_median(maps), tm(w=[3.0]))


def test_trimmed_mean_drops_extremes() -> None:
    maps = [tm(w=[v]) for v in [-50.0, 1.0, 2.0, 3.0, 60.0]]
    # floor(0.2 * 5) = 1 from each end: mean(1, 2, 3) = 2
    assert_map(ops.trimmed_mean(maps, trim_ratio=0.2), tm(w=[2.0]))
    # floor(0.1 * 5) = 0: plain mean (-50 + 1 + 2 + 3 + 60) / 5 = 3.2
    assert_map(ops.trimmed_mean(maps, trim_ratio=0.1), tm(w=[3.2]), atol=1e-5)


@pytest.mark.parametrize("trim_ratio", [-0.1, 0.5, 0.9])
def test_trimmed_mean_bad_ratio_raises(trim_ratio: float) -> None:
    with pytest.raises(ValueError, match="trim_ratio"):
        ops.trimmed_mean([X], trim_ratio=trim_ratio)


def test_robust_reductions_empty_raise() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ops.coordinate_median([])
    with pytest.raises(ValueError, match="at least one"):
        ops.trimmed_mean([], trim_ratio=0.1)


def test_global_norm_falls_back_to_float64_where_float32_squares_overflow() -> None:
    huge = {"a": torch.full((4,), 1e30), "b": torch.tensor([3e30])}
    assert ops.global_norm(huge) == pytest.approx(math.sqrt(4 * 1e60 + 9e60), rel=1e-6)
    assert math.isnan(ops.global_norm({"a": torch.tensor([1.0, float("nan")])}))
    wide = {"a": torch.full((2,), 1e100, dtype=torch.float64)}
    assert ops.global_norm(wide) == pytest.approx(math.sqrt(2) * 1e100)
    half = {"a": torch.full((3,), 300.0, dtype=torch.float16)}  # squares beyond float16
    assert ops.global_norm(half) == pytest.approx(math.sqrt(3) * 300.0, rel=1e-3)
