"""How much memory a device may use, and how much one training step really used.

The budget covers the whole process: a device either states it (``memory_budget_mb`` in its
profile) or takes what the OS can give it: its own resident memory plus what is still
available (``MemAvailable``, or the cgroup limit minus the cgroup's usage when that is
smaller), minus a safety margin. On a GPU the budget is CUDA memory instead.

Peaks are measured, not guessed: on Linux the process's resident high-water mark (``VmHWM``)
is reset through ``/proc/self/clear_refs`` before a step and read afterwards; elsewhere
``getrusage`` gives the high-water mark of the whole process life, which can only
overstate. On a GPU, torch's max-allocated counter is reset and read the same way.

See docs/architecture.md §7.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

MB = 2**20
SAFETY_MARGIN_MB = 256.0
"""Kept free beyond the margin fraction: page cache, the broker client, allocator slack."""
SAFETY_MARGIN_FRACTION = 0.1
"""Fraction of the available memory never planned for."""
_PROC = Path("/proc/self")
_CGROUP = Path("/sys/fs/cgroup")

BudgetSource = Literal["config", "os", "cgroup", "cuda"]


@dataclass(frozen=True)
class Budget:
    """A device's memory budget in MiB and where the number came from."""

    mb: float
    source: BudgetSource


def current_rss_mb() -> float:
    """Resident memory of this process now, MiB."""
    try:
        pages = int((_PROC / "statm").read_text(encoding="ascii").split()[1])
    except OSError:
        return peak_rss_mb()
    return pages * resource.getpagesize() / MB


def peak_rss_mb() -> float:
    """Resident high-water mark of this process (since the last :func:`reset_peak`), MiB."""
    try:
        status = (_PROC / "status").read_text(encoding="ascii")
    except OSError:  # not Linux: the whole life's high-water mark from getrusage
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak() -> bool:
    """Reset the resident high-water mark to the current RSS; False where it cannot be."""
    try:
        (_PROC / "clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" = no limit


def cgroup_headroom_mb() -> float | None:
    """Memory the cgroup still allows (limit minus usage), MiB; None without a limit."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),  # cgroup v2
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(_CGROUP / limit_file), _read_int(_CGROUP / usage_file)
        if limit is not None and usage is not None and limit < 2**60:
            return max(0.0, (limit - usage) / MB)
    return None


def available_mb() -> float | None:
    """``MemAvailable`` from ``/proc/meminfo``, MiB; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def os_budget(*, device: str = "cpu", margin_mb: float = SAFETY_MARGIN_MB) -> Budget:
    """The budget the OS (or CUDA) allows this process now, after the safety margin.

    Raises:
        ValueError: Nothing to read the free memory from.
    """
    if device.startswith("cuda"):
        free_bytes, _total = torch.cuda.mem_get_info(torch.device(device))
        used = torch.cuda.memory_allocated(torch.device(device))
        return Budget(mb=_after_margin((free_bytes + used) / MB, margin_mb), source="cuda")
    free = available_mb()
    source: BudgetSource = "os"
    headroom = cgroup_headroom_mb()
    if headroom is not None and (free is None or headroom < free):
        free, source = headroom, "cgroup"
    if free is None:
        raise ValueError("cannot tell how much memory is available; set memory_budget_mb")
    return Budget(mb=_after_margin(current_rss_mb() + free, margin_mb), source=source)


def _after_margin(total_mb: float, margin_mb: float) -> float:
    return max(0.0, total_mb * (1 - SAFETY_MARGIN_FRACTION) - margin_mb)


def device_budget(configured_mb: float | None, *, device: str = "cpu") -> Budget:
    """The configured budget when there is one, else what the OS allows."""
    if configured_mb is not None:
        return Budget(mb=float(configured_mb), source="config")
    return os_budget(device=device)


class PeakMeter:
    """Measures the peak memory of one block: ``with meter: step()`` then ``meter.peak_mb``.

    ``exact`` is False when the high-water mark could not be reset, so the reading covers
    the whole life of the process and may overstate the block's peak.
    """

    def __init__(self, device: str = "cpu") -> None:
        """Measure CPU resident memory, or CUDA allocations on a ``cuda`` device."""
        self.device = device
        self.peak_mb = 0.0
        self.exact = True

    def __enter__(self) -> PeakMeter:
        """Reset the high-water mark."""
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        else:
            self.exact = reset_peak()
        return self

    def __exit__(self, *exc: object) -> None:
        """Read the high-water mark reached inside the block."""
        if self.device.startswith("cuda"):
            self.peak_mb = torch.cuda.max_memory_allocated(torch.device(self.device)) / MB
        else:
            self.peak_mb = peak_rss_mb()
