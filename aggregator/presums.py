"""The merger's side of intake replicas: pre-sums, and the device updates inside them.

Behind intake replicas (:mod:`aggregator.intake_replica`) a device update reaches the merger
only inside a replica's pre-sum, whose ``parts`` name each one. The merger merges the
pre-sum as one update and answers every part's device itself, with the pre-sum's commit;
the audit log and the checkpoint record each device update as accepted, and a merge lists
the device updates it took in. A pre-sum naming a device update already taken (its device
sent it again, and another replica took it too) is refused as a ``duplicate`` with those ids,
so that the replica sends the rest again: nothing is merged twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from aggregator.audit import UpdateEntry
from aggregator.strategies import MergeResult
from schemas.errors import ConfigError
from schemas.messages import Ack, Update


class Presums:
    """Which device updates each buffered pre-sum holds, until a merge takes it in."""

    def __init__(self) -> None:
        self.parts: dict[str, list[str]] = {}
        """Device update ids of every accepted pre-sum not merged yet, by pre-sum id."""

    @staticmethod
    def merged_before(update: Update, answered: Mapping[str, Ack]) -> tuple[str, ...]:
        """The parts of ``update`` the merger has already accepted (from any replica)."""
        return tuple(
            part.update_id
            for part in update.parts
            if (ack := answered.get(part.update_id)) is not None and ack.accepted
        )

    def merged(self, update: Update, result: MergeResult) -> MergeResult:
        """``result`` with each merged pre-sum replaced by its parts; keeps ``update``'s."""
        if update.parts:
            self.parts[update.update_id] = [part.update_id for part in update.parts]
        if not result.merged_update_ids:
            return result
        expanded: list[str] = []
        for update_id in result.merged_update_ids:
            expanded.extend(self.parts.pop(update_id, [update_id]))
        return dataclasses.replace(result, merged_update_ids=tuple(expanded))

    @staticmethod
    def answers(update: Update, *, version: int) -> list[tuple[Ack, UpdateEntry]]:
        """The acks (and audit lines) of an accepted pre-sum's devices; none for an update."""
        answers = []
        for part in update.parts:
            ack = Ack(
                update_id=part.update_id, client_id=part.client_id, accepted=True,
                version=version, staleness=part.staleness,
            )  # fmt: skip
            entry = UpdateEntry.from_ack(
                ack, decision="accepted", base_version=part.base_version, size=0
            )
            answers.append((ack, entry))
        return answers

    def state_dict(self) -> dict[str, object]:
        """The buffered pre-sums' parts, for the checkpoint."""
        return {"parts": {key: list(ids) for key, ids in self.parts.items()}}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Restore :meth:`state_dict`'s output."""
        parts = state.get("parts", {})
        if not isinstance(parts, dict) or not all(
            isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in parts.values()
        ):
            raise ConfigError("the checkpoint's pre-sum parts are not lists of update ids")
        self.parts = {str(key): list(ids) for key, ids in parts.items()}
