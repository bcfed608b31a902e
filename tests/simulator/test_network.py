"""Network, compute and availability emulation: the delay math and the device's clock."""

from __future__ import annotations

import time

import pytest

from simulator.network import EmulatedDevice, emulated_compute_s, offline_wait_s, transfer_s
from simulator.profiles import Availability, DeviceSpec


def _spec(**fields: object) -> DeviceSpec:
    base: dict[str, object] = {
        "name": "dev",
        "memory_budget_mb": 1000,
        "relative_speed": 0.5,
        "uplink_mbps": 8.0,
        "downlink_mbps": 80.0,
        "latency_ms": 20.0,
    }
    return DeviceSpec.model_validate(base | fields)


def test_transfer_is_latency_plus_size_over_bandwidth() -> None:
    # 1 MB at 8 Mbit/s is one second, plus 20 ms of latency.
    assert transfer_s(1_000_000, mbps=8.0, latency_ms=20.0) == pytest.approx(1.02)
    assert transfer_s(0, mbps=8.0, latency_ms=20.0) == pytest.approx(0.02)
    assert transfer_s(125_000, mbps=100.0, latency_ms=0.0) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="bad link"):
        transfer_s(10, mbps=0.0, latency_ms=1.0)


def test_compute_scales_host_cpu_time_by_relative_speed() -> None:
    assert emulated_compute_s(0.2, relative_speed=0.1) == pytest.approx(2.0)
    assert emulated_compute_s(0.2, relative_speed=2.0) == pytest.approx(0.1)


def test_offline_periods_alternate_after_online_ones() -> None:
    cycle = Availability(online_s=10.0, offline_s=5.0)
    assert offline_wait_s(3.0, cycle, phase_s=0.0) == 0.0
    assert offline_wait_s(12.0, cycle, phase_s=0.0) == pytest.approx(3.0)
    assert offline_wait_s(16.0, cycle, phase_s=0.0) == 0.0  # the next online period
    assert offline_wait_s(3.0, cycle, phase_s=9.0) == pytest.approx(3.0)
    assert offline_wait_s(12.0, Availability(), phase_s=0.0) == 0.0


async def test_device_stretches_fits_and_delays_transfers_on_a_scaled_clock() -> None:
    device = EmulatedDevice(_spec(), seed=1, time_scale=2.0)
    started = time.monotonic()
    kept = await device.after_fit(wall_s=0.0, cpu_s=0.05)  # 0.1 s on the device
    await device.uplink(10_000)  # 20 ms latency + 10 ms of bandwidth
    await device.downlink(100_000)  # 20 ms + 10 ms
    real = time.monotonic() - started
    assert kept
    assert device.times.compute_s == pytest.approx(0.1)
    assert device.times.upload_s == pytest.approx(0.03)
    assert device.times.download_s == pytest.approx(0.03)
    assert (device.times.bytes_up, device.times.bytes_down) == (10_000, 100_000)
    assert 0.32 <= real < 0.6  # 0.16 simulated seconds at time_scale 2
    assert device.times.downloads[0][1] == 100_000
    assert device.times.host_overruns == 0
    assert await device.after_fit(wall_s=1.0, cpu_s=0.05)  # the host was slower: no wait
    assert device.times.host_overruns == 1


async def test_dropout_loses_about_its_share_of_fits() -> None:
    device = EmulatedDevice(
        _spec(relative_speed=100.0, availability={"dropout": 0.3}), seed=7, time_scale=1.0
    )
    kept = [await device.after_fit(wall_s=0.0, cpu_s=0.0) for _ in range(400)]
    assert device.times.dropped_fits == kept.count(False)
    assert 80 <= kept.count(False) <= 160


async def test_device_adds_exchange_links_to_the_fit_instead_of_overlapping_compute() -> None:
    device = EmulatedDevice(_spec(), seed=1, time_scale=2.0)
    await device.before_fit()
    started = time.monotonic()
    await device.exchange(up=10_000, down=100_000)  # 30 ms up and 30 ms down, simulated
    await device.exchange(up=10_000, down=100_000)
    inside = time.monotonic() - started
    assert await device.after_fit(wall_s=inside, cpu_s=0.05)  # 0.1 s of device compute
    real = time.monotonic() - started
    assert device.times.upload_s == pytest.approx(0.06)
    assert device.times.download_s == pytest.approx(0.06)
    assert (device.times.bytes_up, device.times.bytes_down) == (20_000, 200_000)
    assert device.times.downloads == []  # no global model came down
    # compute plus links, 0.22 simulated seconds at time_scale 2: not max(compute, links)
    assert 0.44 <= real < 0.7
    assert device.times.compute_s == pytest.approx(0.1, abs=0.02)
    assert device.times.host_overruns == 0
