"""FedAsync (Xie et al., 2019): move the global towards each client model as it arrives.

x ← (1 − α_s)·x + α_s·x_client with α_s = α·s(τ) and x_client = base + delta. Old updates
are discounted by the staleness rule, so a straggler cannot drag the global back to where it
was many versions ago. Every submit produces a new global; nothing is buffered.
"""

from __future__ import annotations

import math

from aggregator import ops
from aggregator.staleness import Polynomial, StalenessRule
from aggregator.strategies.base import MergeResult, check_submission
from schemas.errors import ConfigError
from schemas.messages import TensorMap

_DEFAULT_RULE = Polynomial(a=0.5)


class FedAsync:
    """Staleness-weighted mixing of each client model into the global.

    The sample count of an update does not change its weight here: FedAsync weighs by age
    only. Use FedBuff when devices train on very different amounts of data.
    """

    def __init__(self, alpha: float = 0.6, *, rule: StalenessRule = _DEFAULT_RULE) -> None:
        """Configure the base mixing rate and the staleness rule.

        Args:
            alpha: Mixing rate for a fresh update, in (0, 1].
            rule: Discount s(τ) applied to ``alpha``; polynomial with a = 0.5 by default.

        Raises:
            ConfigError: If ``alpha`` is outside (0, 1].
        """
        if isinstance(alpha, bool) or not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
            raise ConfigError(f"fedasync alpha must be in (0, 1], got {alpha!r}")
        self.alpha = float(alpha)
        self.rule = rule

    def __repr__(self) -> str:
        """Show the configuration, for logs."""
        return f"FedAsync(alpha={self.alpha}, rule={self.rule!r})"

    @property
    def name(self) -> str:
        """``fedasync``."""
        return "fedasync"

    @property
    def pending(self) -> int:
        """Always 0: FedAsync never buffers."""
        return 0

    @property
    def interpolates(self) -> bool:
        """True: the global moves toward ``base + delta`` (see ``Strategy``)."""
        return True

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
        """Mix ``base + delta`` into ``current`` with rate α·s(τ); see :class:`Strategy`."""
        check_submission(staleness=staleness, num_samples=num_samples, update_id=update_id)
        rate = self.alpha * self.rule(staleness)
        client = ops.add(base, delta)
        new_global = ops.mix(current, client, alpha=rate)
        return MergeResult(new_global=new_global, weight=rate, merged_update_ids=(update_id,))

    def state_dict(self) -> dict[str, object]:
        """Return the (empty) buffer state, so checkpoints look alike for every strategy."""
        return {"name": self.name, "pending": 0, "update_ids": []}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Accept a FedAsync state; there is nothing to restore.

        Raises:
            ConfigError: If the state belongs to another strategy or holds buffered updates.
        """
        if state.get("name") != self.name:
            raise ConfigError(f"cannot load a {state.get('name')!r} state into {self.name}")
        if state.get("pending", 0) != 0 or state.get("update_ids", []) != []:
            raise ConfigError("a fedasync state cannot hold buffered updates")
