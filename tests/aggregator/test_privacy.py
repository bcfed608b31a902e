"""Client-level DP: clipping, the noise's scale, the accountant, and the config plumbing."""

from __future__ import annotations

import math

import pytest
import torch

from aggregator.config import AggregatorConfig
from aggregator.privacy import PrivateFedBuff
from aggregator.service import AggregatorService
from aggregator.strategies import FedAsync, FedBuff
from edge_agent.privacy import DevicePrivacy
from edge_agent.trainers.base import FitResult
from edgefed.ml.privacy import PrivacySettings, clip, gaussian_epsilon, global_norm
from edgefed.transport.memory import MemoryBroker
from schemas.errors import ConfigError

SIGMA, CLIP = 0.5, 2.0
ZEROS = {"w": torch.zeros(20_000)}


def _settings(**extra: object) -> PrivacySettings:
    return PrivacySettings.model_validate(
        {"noise_multiplier": SIGMA, "clip_norm": CLIP, "seed": 7} | extra
    )


def test_privacy_noise_std_is_sigma_c_times_the_largest_share() -> None:
    private = PrivateFedBuff(FedBuff(4), _settings())
    for index in range(4):
        result = private.submit(
            current=ZEROS,
            base=ZEROS,
            delta=ZEROS,
            staleness=0,
            num_samples=1000 * (index + 1),  # ignored: every client counts once
            update_id=f"u{index}",
        )
    assert result.new_global is not None
    noise = result.new_global["w"]
    expected = SIGMA * CLIP / 4  # equal weights: each client's share is 1/4
    assert float(noise.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(noise.mean())) < 0.05 * expected
    assert private.accountant.steps == 1
    # A stale update weighs less, so the fresh ones' shares and the noise grow.
    assert private.noise_std([1.0, 1.0, 0.5]) == pytest.approx(SIGMA * CLIP / 2.5)


def test_privacy_flush_of_a_partial_buffer_is_noised_for_its_own_shares() -> None:
    private = PrivateFedBuff(FedBuff(4), _settings())
    for index in range(2):  # a round's deadline passes with 2 of 4 devices in
        private.submit(
            current=ZEROS, base=ZEROS, delta=ZEROS, staleness=0, num_samples=1,
            update_id=f"u{index}",
        )  # fmt: skip
    result = private.flush(current=ZEROS)
    assert result.new_global is not None and result.merged_update_ids == ("u0", "u1")
    # Two equal shares: each client moves the global by C/2, so the noise is sigma C / 2.
    assert float(result.new_global["w"].std()) == pytest.approx(SIGMA * CLIP / 2, rel=0.05)
    assert private.accountant.steps == 1 and private.pending == 0
    empty = private.flush(current=ZEROS)  # nothing buffered: no release, nothing spent
    assert empty.new_global is None and private.accountant.steps == 1


def test_privacy_state_keeps_the_releases_across_a_restart() -> None:
    private = PrivateFedBuff(FedBuff(1), _settings())
    private.submit(
        current=ZEROS, base=ZEROS, delta=ZEROS, staleness=0, num_samples=1, update_id="a"
    )
    state = private.state_dict()
    restored = PrivateFedBuff(FedBuff(1), _settings())
    restored.load_state_dict(state)
    assert restored.accountant.steps == 1
    with pytest.raises(ConfigError, match="privacy_steps"):
        restored.load_state_dict(FedBuff(1).state_dict())


def test_privacy_refuses_strategies_without_a_bounded_sensitivity() -> None:
    with pytest.raises(ConfigError, match="robust"):
        PrivateFedBuff(FedBuff(3, robust="median"), _settings())
    with pytest.raises(ConfigError, match="fedbuff"):
        PrivateFedBuff(FedAsync(0.5), _settings())


def test_privacy_epsilon_comes_from_the_accountant_and_behaves() -> None:
    def eps(sigma: float, rate: float, steps: int) -> float:
        return gaussian_epsilon(noise_multiplier=sigma, sample_rate=rate, steps=steps, delta=1e-5)

    assert eps(1.0, 1.0, 0) == 0.0
    assert math.isfinite(eps(1.0, 1.0, 10))
    assert eps(2.0, 1.0, 10) < eps(1.0, 1.0, 10)  # more noise, less spent
    assert eps(1.0, 1.0, 20) > eps(1.0, 1.0, 10)  # more releases, more spent
    assert eps(1.0, 0.1, 10) < eps(1.0, 1.0, 10)  # subsampling amplifies
    report = PrivateFedBuff(FedBuff(2), _settings(population=8)).accountant.report()
    assert report["sample_rate"] == 0.25
    assert report["epsilon"] == 0.0


def test_privacy_device_clips_then_noises_and_drops_seeds() -> None:
    device = DevicePrivacy(_settings())
    big = {"a": torch.full((3, 4), 10.0), "b": torch.full((5,), -10.0)}
    clipped, norm = clip(big, CLIP)
    assert norm == pytest.approx(global_norm(big))
    assert global_norm(clipped) == pytest.approx(CLIP)
    fit = FitResult(delta=ZEROS, num_samples=8, train_loss=1.0, compute_s=0.1, steps=1)
    private = device.apply(fit)
    assert private.seeds is None
    assert float(private.delta["w"].std()) == pytest.approx(SIGMA * CLIP, rel=0.05)
    assert device.accountant.report()["where"] == "device"
    assert device.accountant.steps == 1


def test_privacy_and_robust_settings_reach_the_strategy() -> None:
    transport = MemoryBroker().transport("aggregator")
    robust = AggregatorConfig.model_validate(
        {
            "federation": "f",
            "max_update_norm": 3.0,
            "strategy": {"name": "fedbuff", "robust": "trimmed_mean", "trim_ratio": 0.3},
        }
    )
    strategy = AggregatorService(robust, transport).strategy
    assert isinstance(strategy, FedBuff)
    assert (strategy.robust, strategy.trim_ratio) == ("trimmed_mean", 0.3)
    private = AggregatorConfig.model_validate(
        {
            "federation": "f",
            "max_update_norm": 5.0,
            "privacy": {"noise_multiplier": 1, "clip_norm": 1},
        }
    )
    service = AggregatorService(private, transport)
    assert isinstance(service.strategy, PrivateFedBuff)
    assert service._policy.max_update_norm == 1.0  # clipped to C, whatever else is set
    with pytest.raises(ConfigError, match="fedasync"):
        AggregatorService(
            AggregatorConfig.model_validate(
                {"federation": "f", "strategy": {"name": "fedasync", "robust": "median"}}
            ),
            transport,
        )
