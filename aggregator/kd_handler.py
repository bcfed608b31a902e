"""KD updates in the aggregator: proxy slices, logit checks, a buffer, and distillation.

A ``kd`` update carries top-k logits on a proxy slice instead of a delta (docs/architecture.md §6
``kd``). The service routes it here rather than to the delta strategy: :meth:`KdHandler.check`
validates it (slice, names, shapes, dtypes, finiteness, token ids) without touching any
state, :meth:`KdHandler.submit` buffers it and, once ``buffer_size`` are in, ensembles
and distills them into the global adapter (math in ``aggregator.distill``). Staleness
weighs each device's logits, as it weighs deltas in FedBuff.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

import torch
from peft import PeftModel

from aggregator.config import AggregatorConfig, KdSettings
from aggregator.distill import DistillTarget, distill, ensemble
from aggregator.staleness import StalenessName, StalenessRule, staleness_rule
from aggregator.strategies.base import MergeResult
from aggregator.validation import ValidationPolicy, check_metadata
from edgefed.data.kd_proxy import (
    LOGIT_KEYS,
    load_proxy,
    proxy_logits,
    scored_positions,
    select_indices,
    source_size,
)
from edgefed.ml.tokens import TokenDataset
from schemas.errors import ConfigError, UpdateRejected
from schemas.messages import Method, ModelRef, ProxySpec, TensorMap, Update

_VALUE_DTYPES: Final = frozenset({torch.float16, torch.bfloat16, torch.float32})
_INDEX_DTYPES: Final = frozenset({torch.int32, torch.int64})


@dataclass(frozen=True)
class KdContribution:
    """One checked KD update, ready to be buffered.

    Attributes:
        weight: Staleness factor times sample count: its share of the ensemble.
        factor: The staleness factor alone, which also damps the server's step size.
    """

    update_id: str
    slice_id: int
    indices: torch.Tensor
    values: torch.Tensor
    staleness: int
    weight: float
    factor: float


class KdHandler:
    """Announces proxy slices, checks and buffers KD updates, distills them into the global."""

    def __init__(
        self,
        settings: KdSettings,
        *,
        task_id: str,
        method: Method,
        policy: ValidationPolicy,
        model: PeftModel,
        model_ref: ModelRef,
        seq_len: int,
        seed: int,
        max_staleness: int,
        buffer_size: int,
        staleness: StalenessRule,
    ) -> None:
        """Load the proxy source once and measure the global model's output width.

        Raises:
            ConfigError: The proxy source cannot be loaded or is smaller than a slice.
        """
        self._settings = settings
        self._task_id = task_id
        self._method = method
        self._policy = policy
        self._model = model
        self._model_ref = model_ref
        self._seq_len = seq_len
        self._seed = seed
        self._max_staleness = max_staleness
        self._buffer_size = buffer_size
        self._staleness = staleness
        self._pool = source_size(settings.proxy_dataset, seq_len=seq_len, model=model_ref)
        if settings.proxy_size > self._pool:
            raise ConfigError(
                f"kd proxy_size {settings.proxy_size} exceeds the {self._pool} rows of "
                f"{settings.proxy_dataset!r}"
            )
        self._slices: dict[int, TokenDataset] = {}
        self._width = 0  # the slice that measures it needs no top_k
        self._width = int(proxy_logits(model, self._slice(0)).shape[-1])
        self._pending: list[KdContribution] = []
        self.last_loss: float | None = None
        """KD loss of the last server step, for logs."""

    @property
    def pending(self) -> int:
        """Checked updates waiting for the buffer to fill."""
        return len(self._pending)

    @property
    def top_k(self) -> int:
        """Logits per position asked of devices: the setting, or every output if fewer.

        A 4-class head has 4 logits, and all of them are the whole distribution.
        """
        return min(self._settings.top_k, self._width) if self._width else self._settings.top_k

    def proxy_spec(self, version: int) -> ProxySpec:
        """The slice announced with ``version``'s task: fresh rows for every version."""
        return ProxySpec(
            dataset=self._settings.proxy_dataset,
            indices=select_indices(
                pool=self._pool, size=self._settings.proxy_size, seed=self._seed, slice_id=version
            ),
            slice_id=version,
            top_k=self.top_k,
        )

    def _slice(self, slice_id: int) -> TokenDataset:
        data = self._slices.get(slice_id)
        if data is None:
            spec = self.proxy_spec(slice_id)
            data = load_proxy(spec, seq_len=self._seq_len, model=self._model_ref)
            self._slices[slice_id] = data
        return data

    def forget_before(self, version: int) -> None:
        """Drop cached slices no update may name any more (older than ``max_staleness``)."""
        for slice_id in [s for s in self._slices if s < version - self._max_staleness]:
            del self._slices[slice_id]

    def check(self, update: Update, *, current_version: int) -> KdContribution:
        """Validate a KD update against the task and its logits; never changes any state.

        Order: the metadata checks every update passes (``check_metadata``), then malformed
        (no logits), wrong_proxy, wrong_shape, wrong_dtype, non_finite, malformed (token
        ids out of range or repeated in a row).

        Raises:
            UpdateRejected: With the reason and what exactly was wrong.
        """
        staleness = check_metadata(
            update,
            task_id=self._task_id,
            method=self._method,
            current_version=current_version,
            policy=self._policy,
        )
        slice_id = self._check_slice(update, current_version)
        indices, values = self._check_logit_layout(update, slice_id)
        if not bool(torch.isfinite(values).all()):
            raise UpdateRejected("non_finite", "logit values hold NaN or inf")
        ids = self._check_token_ids(indices)
        factor = self._staleness(staleness)
        return KdContribution(
            update_id=update.update_id,
            slice_id=slice_id,
            indices=ids.clone(),
            values=values.float().clone(),
            staleness=staleness,
            weight=factor * update.num_samples,
            factor=factor,
        )

    def _check_slice(self, update: Update, current_version: int) -> int:
        """The proxy slice the logits were computed on, if it is one still announced."""
        slice_id = update.proxy_slice
        if not update.logits or slice_id is None:
            raise UpdateRejected("malformed", "a kd update carries logits on a proxy slice")
        if not current_version - self._max_staleness <= slice_id <= current_version:
            raise UpdateRejected(
                "wrong_proxy",
                f"proxy slice {slice_id} is not one of the slices of versions "
                f"{max(0, current_version - self._max_staleness)}..{current_version}",
            )
        return slice_id

    def _check_logit_layout(
        self, update: Update, slice_id: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k token ids and values, once names, shapes and dtypes fit the slice."""
        if set(update.logits) != set(LOGIT_KEYS):
            raise UpdateRejected(
                "wrong_shape",
                f"logits need exactly {list(LOGIT_KEYS)}, got {sorted(update.logits)}",
            )
        indices, values = update.logits["indices"], update.logits["values"]
        expected = (scored_positions(self._slice(slice_id)), self.top_k)
        for name, tensor in update.logits.items():
            if tuple(tensor.shape) != expected:
                raise UpdateRejected(
                    "wrong_shape", f"{name} is {tuple(tensor.shape)}, slice needs {expected}"
                )
        if values.dtype not in _VALUE_DTYPES or indices.dtype not in _INDEX_DTYPES:
            raise UpdateRejected(
                "wrong_dtype",
                f"values are {values.dtype} and indices {indices.dtype}; "
                "need float16/bfloat16/float32 values and int32/int64 indices",
            )
        return indices, values

    def _check_token_ids(self, indices: torch.Tensor) -> torch.Tensor:
        """The ids as int64, once each lies in the vocabulary and appears once per position."""
        ids = indices.long()
        if int(ids.min()) < 0 or int(ids.max()) >= self._width:
            raise UpdateRejected("malformed", f"token ids must lie in 0..{self._width - 1}")
        if bool((ids.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise UpdateRejected("malformed", "a token id appears twice in one position's top-k")
        return ids

    def submit(self, contribution: KdContribution, *, current: TensorMap) -> MergeResult:
        """Buffer ``contribution``; when the buffer is full, distill it into a new global.

        Logits are grouped by slice and ensembled (weights: staleness x samples); the
        server's learning rate is scaled by the buffer's sample-weighted staleness factor,
        so a buffer of stale logits moves the global less, as in FedAsync/FedBuff.
        """
        self._pending.append(contribution)
        if len(self._pending) < self._buffer_size:
            return MergeResult(new_global=None, weight=contribution.weight)
        buffer, self._pending = self._pending, []
        targets: list[DistillTarget] = []
        for slice_id in sorted({c.slice_id for c in buffer}):
            group = [c for c in buffer if c.slice_id == slice_id]
            parts = [({"indices": c.indices, "values": c.values}, c.weight) for c in group]
            teacher = ensemble(parts, vocab=self._width, temperature=self._settings.temperature)
            weight = math.fsum(c.weight for c in group)
            targets.append(
                DistillTarget(data=self._slice(slice_id), teacher=teacher, weight=weight)
            )
        samples = math.fsum(c.weight / c.factor for c in buffer)
        damping = math.fsum(c.weight for c in buffer) / samples
        new_global, self.last_loss = distill(
            self._model,
            current,
            targets,
            temperature=self._settings.temperature,
            steps=self._settings.server_steps,
            lr=self._settings.server_lr * damping,
        )
        return MergeResult(
            new_global=new_global,
            weight=contribution.weight,
            merged_update_ids=tuple(c.update_id for c in buffer),
        )

    def state_dict(self) -> dict[str, object]:
        """The buffered contributions, so a restart neither loses nor repeats an acked one."""
        return {
            "pending": [
                {
                    "update_id": c.update_id,
                    "slice_id": c.slice_id,
                    "indices": c.indices,
                    "values": c.values,
                    "staleness": c.staleness,
                    "weight": c.weight,
                    "factor": c.factor,
                }
                for c in self._pending
            ]
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore the buffer :meth:`state_dict` saved (indices come back as floats)."""
        entries = state.get("pending")
        if not isinstance(entries, list):
            raise ConfigError("kd state has no list of pending contributions")
        pending: list[KdContribution] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ConfigError("kd state holds a pending entry that is not a mapping")
            pending.append(
                KdContribution(
                    update_id=str(entry["update_id"]),
                    slice_id=int(entry["slice_id"]),
                    indices=torch.as_tensor(entry["indices"]).long(),
                    values=torch.as_tensor(entry["values"]).float(),
                    staleness=int(entry["staleness"]),
                    weight=float(entry["weight"]),
                    factor=float(entry["factor"]),
                )
            )
        self._pending = pending


def make_kd_handler(
    config: AggregatorConfig, model: PeftModel, policy: ValidationPolicy
) -> KdHandler:
    """The handler an aggregator running ``kd`` needs, from its settings and global model.

    The staleness rule is the strategy's (its default when unset); the buffer is FedBuff's
    size, or 1 (distill every update) under FedAsync.
    """
    strategy = config.strategy
    default: StalenessName = "inverse_sqrt" if strategy.name == "fedbuff" else "polynomial"
    rule = staleness_rule(strategy.staleness or default, **strategy.staleness_params)
    return KdHandler(
        config.kd,
        task_id=config.task_id,
        method=config.method,
        policy=policy,
        model=model,
        model_ref=config.model,
        seq_len=config.train.seq_len,
        seed=config.seed,
        max_staleness=config.max_staleness,
        buffer_size=strategy.buffer_size if strategy.name == "fedbuff" else 1,
        staleness=rule,
    )
