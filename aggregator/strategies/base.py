"""What every merge strategy looks like to the aggregator service (docs/architecture.md §5).

A strategy is pure and synchronous: it is handed tensors and returns tensors. The service
owns versions, acks and checkpoints; a strategy only says whether an update produced a new
global (the version advances) or was buffered (the version stays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from schemas.messages import TensorMap


@dataclass(frozen=True)
class MergeResult:
    """The outcome of submitting one validated update to a strategy.

    Attributes:
        new_global: The next global weights (float32), or None when the update was buffered
            and the version must not advance.
        weight: The effective weight this update got (a mixing rate for FedAsync, an
            unnormalised averaging weight for FedBuff), reported in metrics and acks.
        merged_update_ids: The updates folded into ``new_global``, oldest first; empty while
            buffering. The service marks exactly these as merged in its checkpoint.
    """

    new_global: TensorMap | None
    weight: float
    merged_update_ids: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Keep ``new_global`` and ``merged_update_ids`` consistent with each other."""
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"weight must be finite and >= 0, got {self.weight}")
        if self.new_global is None and self.merged_update_ids:
            raise ValueError("a buffered result cannot report merged updates")
        if self.new_global is not None and not self.merged_update_ids:
            raise ValueError("a new global must name the updates merged into it")

    @property
    def merged(self) -> bool:
        """True when a new global was produced, i.e. the version advances."""
        return self.new_global is not None


class Strategy(Protocol):
    """A server-side merge rule, handed a staleness rule rather than subclassed per rule."""

    @property
    def name(self) -> str:
        """Short name of the algorithm, as used in settings (``fedasync``, ``fedbuff``)."""
        ...

    @property
    def pending(self) -> int:
        """Number of updates buffered and not yet merged into a global."""
        ...

    @property
    def interpolates(self) -> bool:
        """Whether merging moves the global toward the device's model ``base + delta``.

        True for FedAsync; False for FedBuff, which adds deltas to the current global. With
        an interpolating rule a zero delta means "back to the base", so a part the device
        did not train (split learning's server blocks) must come as ``current - base``.
        """
        ...

    def submit(
        self,
        *,
        current: TensorMap,
        base: TensorMap,
        delta: TensorMap,
        staleness: int,
        num_samples: int,
        update_id: str,
    ) -> MergeResult:
        """Fold one validated update in.

        Args:
            current: The global at the current version.
            base: The global at the update's ``base_version``; the client's model is
                ``base + delta``.
            delta: The validated float32 delta.
            staleness: ``current_version - base_version`` (≥ 0).
            num_samples: How many local samples produced the delta (> 0).
            update_id: The update's idempotency key, echoed in ``merged_update_ids``.

        Returns:
            A new global, or None in ``new_global`` when the update was only buffered.
        """
        ...

    def state_dict(self) -> dict[str, object]:
        """Return the buffered content for a checkpoint (update ids, count, deltas, weights)."""
        ...

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state_dict` returned, e.g. after a crash."""
        ...


S = TypeVar("S", bound=Strategy)


class StrategyWrapper(Generic[S]):
    """What a strategy wrapping another (DP noise, split learning) passes straight through.

    Name, buffer, merge rule and checkpointed state are the wrapped strategy's, so the
    service and earlier checkpoints see the same strategy; a wrapper changes ``submit``.
    """

    def __init__(self, inner: S) -> None:
        """Wrap ``inner``."""
        self._inner = inner

    @property
    def name(self) -> str:
        """The wrapped strategy's name (checkpoints stay compatible)."""
        return self._inner.name

    @property
    def pending(self) -> int:
        """Updates the wrapped strategy buffers."""
        return self._inner.pending

    @property
    def interpolates(self) -> bool:
        """As the wrapped strategy."""
        return self._inner.interpolates

    def state_dict(self) -> dict[str, object]:
        """The wrapped strategy's state."""
        return self._inner.state_dict()

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the wrapped strategy's state."""
        self._inner.load_state_dict(state)


def check_submission(*, staleness: int, num_samples: int, update_id: str) -> None:
    """Refuse arguments no validated update can have; shared by the strategies.

    Raises:
        ValueError: On negative staleness, non-positive sample count or an empty id.
    """
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    if not update_id:
        raise ValueError("update_id must not be empty")
