"""What one agent did, kept up to date while it runs, for logs, tests and the simulator."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from edge_agent.trainers.split import SplitHistory
from schemas.messages import AgentState, DeviceProfile, Method, Status


@dataclass(slots=True)
class AgentReport:
    """What one agent did, for logs, tests and the simulator."""

    client_id: str
    updates_sent: int = 0
    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    methods: dict[str, int] = field(default_factory=dict)
    """Updates answered this run, by the method that trained them."""
    last_method: Method | None = None
    resends: int = 0
    last_version: int | None = None
    first_base_version: int | None = None
    diverged: int = 0
    """Fits whose loss blew up and stopped early (forward gradient)."""
    refused_globals: int = 0
    """Global versions refused because their signature was missing or wrong."""
    refused_tasks: int = 0
    """Task messages refused because their signature was missing or wrong."""
    stale_tasks: int = 0
    """Task messages ignored as older versions of the task followed (a replay)."""
    privacy: dict[str, float | int | str] | None = None
    """Local DP: noise multiplier, releases and the (ε, δ) estimate so far."""
    bytes_down: int = 0
    """Bytes of global models received (all chunks), the download side of the traffic."""
    plan: dict[str, str | int | float | bool] | None = None
    """The memory plan (method, shape, estimate, measured peak) or the refusal.

    See docs/architecture.md §7.
    """
    split: list[SplitHistory] = field(default_factory=list)
    """Split learning: per fit, every step's bytes up/down and device compute, and the peak."""

    def answered(self, method: Method) -> None:
        """Count an answered update trained with ``method``."""
        self.methods[method] = self.methods.get(method, 0) + 1
        self.last_method = method

    def status(self, state: AgentState, profile: DeviceProfile, base_version: int | None) -> Status:
        """The status that tells observers what this device is doing and has done."""
        return Status(
            client_id=self.client_id,
            state=state,
            profile=profile,
            plan=self.plan,
            base_version=base_version,
            updates_sent=self.updates_sent,
            accepted=self.accepted,
            rejected=sum(self.rejected.values()),
            method=self.last_method,
        )
