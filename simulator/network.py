"""Emulating a device profile on this host: links, compute speed and availability.

Each simulated device gets an :class:`EmulatedDevice` that the agent consults around its
work: it waits out offline periods before a fit, stretches a fit to the device's speed
(the step's CPU time on this host divided by ``relative_speed``), drops a fit with the
profile's dropout chance, and delays every transfer by latency plus size / bandwidth (split
learning's per-step exchanges too, which then add to the fit's time).
Delays are real ``asyncio.sleep`` calls, so every device of a fleet shares one clock: the
simulated wall time is seconds since the fleet started divided by ``time_scale``. Stretching
every emulated delay by ``time_scale`` leaves room for the devices' real compute, which
shares this host's few cores: a fit whose real wall time overruns its stretched device time
is counted in ``host_overruns`` (raise ``time_scale`` when that is not zero).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from simulator.profiles import Availability, DeviceSpec

BITS_PER_BYTE = 8


def transfer_s(nbytes: int, *, mbps: float, latency_ms: float) -> float:
    """Seconds one transfer of ``nbytes`` takes on a link of ``mbps`` with ``latency_ms``.

    Raises:
        ValueError: Negative size or latency, or a bandwidth that is not positive.
    """
    if nbytes < 0 or latency_ms < 0 or mbps <= 0:
        raise ValueError(f"bad link: {nbytes} bytes at {mbps} Mbit/s, {latency_ms} ms latency")
    return latency_ms / 1e3 + nbytes * BITS_PER_BYTE / (mbps * 1e6)


def emulated_compute_s(cpu_s: float, *, relative_speed: float) -> float:
    """How long a step that took ``cpu_s`` of host CPU takes on the emulated device."""
    return cpu_s / relative_speed


def offline_wait_s(elapsed_s: float, availability: Availability, *, phase_s: float) -> float:
    """Seconds until the device is online again, ``elapsed_s`` into the run (0 if online).

    Periods alternate online then offline, shifted by ``phase_s`` so a fleet of one class
    does not vanish all at once.
    """
    if availability.offline_s <= 0:
        return 0.0
    cycle = availability.online_s + availability.offline_s
    position = (elapsed_s + phase_s) % cycle
    return 0.0 if position < availability.online_s else cycle - position


@dataclass(slots=True)
class DeviceTimes:
    """Where one emulated device's time went, in simulated seconds."""

    compute_s: float = 0.0
    upload_s: float = 0.0
    download_s: float = 0.0
    offline_s: float = 0.0
    dropped_fits: int = 0
    host_overruns: int = 0
    """Fits this host could not run within their emulated time (contention for the cores)."""
    bytes_up: int = 0
    bytes_down: int = 0
    downloads: list[tuple[float, int]] = field(default_factory=list)
    """(time since the fleet started, bytes) per global model received."""


class EmulatedDevice:
    """One device profile applied to one agent (the agent's ``emulation`` hook)."""

    def __init__(
        self,
        spec: DeviceSpec,
        *,
        seed: int,
        origin: float | None = None,
        time_scale: float = 1.0,
    ) -> None:
        """Emulate ``spec``; ``origin`` (``time.monotonic``) is when the fleet started.

        Raises:
            ValueError: ``time_scale`` is not positive.
        """
        if time_scale <= 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale}")
        self.spec = spec
        self.time_scale = time_scale
        self.times = DeviceTimes()
        self._rng = random.Random(seed)
        cycle = spec.availability.online_s + spec.availability.offline_s
        self._phase = self._rng.uniform(0, cycle) if cycle > 0 else 0.0
        self._origin = time.monotonic() if origin is None else origin
        self._fit_links_s = 0.0
        """Simulated seconds of exchanges inside the running fit."""

    def elapsed(self) -> float:
        """Simulated seconds since the fleet started."""
        return (time.monotonic() - self._origin) / self.time_scale

    async def _sleep(self, simulated_s: float) -> None:
        await asyncio.sleep(simulated_s * self.time_scale)

    async def before_fit(self) -> None:
        """Wait while the device is offline."""
        self._fit_links_s = 0.0
        wait = offline_wait_s(self.elapsed(), self.spec.availability, phase_s=self._phase)
        if wait > 0:
            self.times.offline_s += wait
            await self._sleep(wait)

    async def after_fit(self, *, wall_s: float, cpu_s: float) -> bool:
        """Stretch the fit to the device's speed; False when the device dropped it.

        The fit lasts the device's compute plus the links of its exchanges, which were
        already waited out inside it.
        """
        device_s = emulated_compute_s(cpu_s, relative_speed=self.spec.relative_speed)
        links_s, self._fit_links_s = self._fit_links_s, 0.0
        host_s = wall_s / self.time_scale - links_s  # what this host spent on the rest
        self.times.compute_s += max(device_s, host_s)
        if device_s > host_s:
            await self._sleep(device_s - host_s)
        else:
            self.times.host_overruns += 1
        if self._rng.random() < self.spec.availability.dropout:
            self.times.dropped_fits += 1
            return False
        return True

    async def uplink(self, nbytes: int) -> None:
        """Hold an outgoing message for as long as the device's uplink needs."""
        await self._sleep(self._sent(nbytes))

    async def downlink(self, nbytes: int) -> None:
        """Hold an incoming message for as long as the device's downlink needs."""
        await self._sleep(self._received(nbytes))
        self.times.downloads.append((round(self.elapsed(), 4), nbytes))

    async def exchange(self, *, up: int, down: int) -> None:
        """Hold a request and its reply made during a fit for both links (split steps)."""
        delay = self._sent(up) + self._received(down)
        self._fit_links_s += delay
        await self._sleep(delay)

    def _sent(self, nbytes: int) -> float:
        """Count ``nbytes`` going up; the seconds the uplink takes."""
        delay = transfer_s(nbytes, mbps=self.spec.uplink_mbps, latency_ms=self.spec.latency_ms)
        self.times.upload_s += delay
        self.times.bytes_up += nbytes
        return delay

    def _received(self, nbytes: int) -> float:
        """Count ``nbytes`` coming down; the seconds the downlink takes."""
        delay = transfer_s(nbytes, mbps=self.spec.downlink_mbps, latency_ms=self.spec.latency_ms)
        self.times.download_s += delay
        self.times.bytes_down += nbytes
        return delay
