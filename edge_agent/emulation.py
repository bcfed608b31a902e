"""The hook through which a simulator emulates a device's conditions around an agent's work.

The agent calls it around every fit and every transfer; ``simulator.network`` implements it
from a device profile. Without one the agent runs at this host's speed on this host's links.
"""

from __future__ import annotations

from typing import Protocol


class DeviceEmulation(Protocol):
    """Emulated device conditions around the agent's work (the simulator's profiles)."""

    async def before_fit(self) -> None:
        """Return once the device is online."""
        ...

    async def after_fit(self, *, wall_s: float, cpu_s: float) -> bool:
        """Stretch a fit to the device's speed; False when the device lost it."""
        ...

    async def uplink(self, nbytes: int) -> None:
        """Delay an outgoing message of ``nbytes``."""
        ...

    async def downlink(self, nbytes: int) -> None:
        """Delay an incoming message of ``nbytes``."""
        ...

    async def exchange(self, *, up: int, down: int) -> None:
        """Delay one request and reply made during a fit (split learning's steps).

        The fit is blocked for the whole exchange, so its links add to the fit's time
        rather than overlapping the device's compute.
        """
        ...
