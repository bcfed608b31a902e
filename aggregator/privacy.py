"""Central client-level DP: FedBuff whose every merged buffer carries Gaussian noise.

The service clips each update to C before it reaches the strategy (validation's norm
bound). FedBuff then applies ``x + η · Σ w_i Δ_i / Σ w_i``; replacing one client's delta moves
that by at most ``η · C · max_i w_i / Σ w_i``, so the noise added to the new global has
standard deviation σ times that bound. Sample counts are left out of the weights here
(every update counts once): a client claiming many samples would otherwise widen its own
share, and the count itself may be private. Staleness discounts stay; they depend on timing,
not on anyone's data. Coordinate-wise median and trimmed mean have no such simple bound, so
they cannot be combined with this.
"""

from __future__ import annotations

from aggregator.strategies import FedBuff, MergeResult, Strategy, StrategyWrapper
from edgefed.ml.privacy import PrivacyAccountant, PrivacySettings, add_gaussian_noise, new_generator
from schemas.errors import ConfigError
from schemas.messages import TensorMap

_STEPS_KEY = "privacy_steps"


class PrivateFedBuff(StrategyWrapper[FedBuff]):
    """A :class:`Strategy` that wraps FedBuff and noises each new global (module docstring)."""

    def __init__(self, inner: Strategy, settings: PrivacySettings) -> None:
        """Wrap ``inner``.

        Raises:
            ConfigError: ``inner`` is not FedBuff with ``robust="mean"``.
        """
        if not isinstance(inner, FedBuff) or inner.robust != "mean":
            raise ConfigError(
                "differential privacy needs strategy fedbuff with robust = 'mean' "
                f"(got {inner!r}): only its merge has a bounded sensitivity"
            )
        super().__init__(inner)
        self.settings = settings
        population = settings.population
        rate = 1.0 if population is None else min(1.0, inner.buffer_size / population)
        self.accountant = PrivacyAccountant(settings, where="aggregator", sample_rate=rate)
        self._generator = new_generator(settings.seed)

    def __repr__(self) -> str:
        return (
            f"PrivateFedBuff({self._inner!r}, noise_multiplier={self.settings.noise_multiplier}, "
            f"clip_norm={self.settings.clip_norm})"
        )

    def noise_std(self, weights: list[float]) -> float:
        """Standard deviation of the noise on a global merged from deltas of ``weights``."""
        share = max(weights) / sum(weights)
        return (
            self.settings.noise_multiplier * self.settings.clip_norm * share * self._inner.server_lr
        )

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
        """Buffer as FedBuff does (each update counting once); noise the global it produces."""
        del num_samples  # every client counts once: see the module docstring
        weights = [entry.weight for entry in self._inner.buffered]
        result = self._inner.submit(
            current=current,
            base=base,
            delta=delta,
            staleness=staleness,
            num_samples=1,
            update_id=update_id,
        )
        return self._noised(result, [*weights, result.weight])

    def flush(self, *, current: TensorMap) -> MergeResult:
        """Apply a partial buffer (a synchronous round's deadline), noised like any release.

        Fewer deltas give each one a larger share, so the noise grows with it; the
        accountant's sampling rate (``buffer_size / population``) only overstates the
        rate of a smaller buffer, so the privacy reported stays an upper bound.
        """
        weights = [entry.weight for entry in self._inner.buffered]
        return self._noised(self._inner.flush(current=current), weights)

    def _noised(self, result: MergeResult, weights: list[float]) -> MergeResult:
        """``result`` with noise on its new global (one release), or as is when none."""
        if result.new_global is None:
            return result
        noised = add_gaussian_noise(result.new_global, self.noise_std(weights), self._generator)
        self.accountant.step()
        return MergeResult(
            new_global=noised, weight=result.weight, merged_update_ids=result.merged_update_ids
        )

    def state_dict(self) -> dict[str, object]:
        """FedBuff's buffer plus the count of noised releases (the privacy spent)."""
        return self._inner.state_dict() | {_STEPS_KEY: self.accountant.steps}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the buffer and the privacy spent, so a restart never forgets a release.

        Raises:
            ConfigError: The state has no or a bad release count.
        """
        steps = state.get(_STEPS_KEY)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ConfigError(f"the checkpoint has no valid {_STEPS_KEY} for a private strategy")
        self._inner.load_state_dict({k: v for k, v in state.items() if k != _STEPS_KEY})
        self.accountant.steps = steps
