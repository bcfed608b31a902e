"""The topic layout of docs/architecture.md §3: the only place topic strings are built or parsed.

Every topic lives under ``edgefed/<federation>/``. Builders return strings;
``parse`` turns a received topic back into a :class:`ParsedTopic` or raises
:class:`~schemas.errors.TopicError`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from schemas.errors import TopicError

ROOT = "edgefed"
TopicKind = Literal[
    "task",
    "global",
    "update",
    "intake",
    "ack",
    "status",
    "ask",
    "split_fwd",
    "split_bwd",
    "metrics",
]

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def check_name(value: str, what: str) -> str:
    """Federation and client names become topic levels, so they may not hold ``/ + #``."""
    if not _NAME.fullmatch(value):
        raise TopicError(f"{what} {value!r} must be 1-128 characters of [A-Za-z0-9_.:-]")
    return value


def _base(federation: str) -> str:
    return f"{ROOT}/{check_name(federation, 'federation')}"


def federation_filter(federation: str) -> str:
    """Every topic of one federation (operators' tools: ``edgefed clear``)."""
    return f"{_base(federation)}/#"


def task(federation: str) -> str:
    """Retained current task."""
    return f"{_base(federation)}/task"


def global_model(federation: str, version: int, chunk: int = 0) -> str:
    """Retained global adapter of ``version``; one topic per chunk so every chunk stays retained."""
    if version < 0 or chunk < 0:
        raise TopicError(f"version {version} and chunk {chunk} must be non-negative")
    return f"{_base(federation)}/global/{version}/{chunk}"


def global_filter(federation: str) -> str:
    """Subscription filter matching every retained global chunk."""
    return f"{_base(federation)}/global/#"


def update(federation: str, client_id: str) -> str:
    """Where one client publishes its updates."""
    return f"{_base(federation)}/update/{check_name(client_id, 'client id')}"


def update_filter(federation: str, *, shared_group: str | None = None) -> str:
    """All clients' updates; with ``shared_group``, an MQTT v5 shared subscription."""
    topic = f"{_base(federation)}/update/+"
    return f"$share/{check_name(shared_group, 'group')}/{topic}" if shared_group else topic


def intake(federation: str, replica_id: str) -> str:
    """Where an intake replica sends its pre-sums to the merger (docs/scaling-out.md)."""
    return f"{_base(federation)}/intake/{check_name(replica_id, 'replica id')}"


def intake_filter(federation: str) -> str:
    """Every intake replica's pre-sums: what a merger behind replicas subscribes to."""
    return f"{_base(federation)}/intake/+"


def ack(federation: str, client_id: str) -> str:
    """Acks and nacks addressed to one client."""
    return f"{_base(federation)}/ack/{check_name(client_id, 'client id')}"


def status(federation: str, client_id: str) -> str:
    """One client's retained presence and heartbeat."""
    return f"{_base(federation)}/status/{check_name(client_id, 'client id')}"


def status_filter(federation: str) -> str:
    """Every client's status."""
    return f"{_base(federation)}/status/+"


def status_json(federation: str, client_id: str) -> str:
    """The aggregator's JSON copy of one client's status (its last will included)."""
    return f"{status(federation, client_id)}/json"


def ask(federation: str, client_id: str) -> str:
    """Where one client asks for the task or global it has waited for."""
    return f"{_base(federation)}/ask/{check_name(client_id, 'client id')}"


def ask_filter(federation: str) -> str:
    """Every client's asks, for the aggregator."""
    return f"{_base(federation)}/ask/+"


def split_fwd(federation: str, client_id: str) -> str:
    """Split learning: activations from the client."""
    return f"{_base(federation)}/split/{check_name(client_id, 'client id')}/fwd"


def split_bwd(federation: str, client_id: str) -> str:
    """Split learning: gradients back to the client."""
    return f"{_base(federation)}/split/{check_name(client_id, 'client id')}/bwd"


def split_fwd_filter(federation: str) -> str:
    """Split learning: every client's activations, for the split server."""
    return f"{_base(federation)}/split/+/fwd"


def metrics(federation: str) -> str:
    """Progress reports for observers (msgpack, retained: the latest)."""
    return f"{_base(federation)}/metrics"


def metrics_json(federation: str) -> str:
    """The same reports as JSON, for operators' own tools (``mosquitto_sub``)."""
    return f"{metrics(federation)}/json"


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    """A received topic, taken apart."""

    federation: str
    kind: TopicKind
    client_id: str | None = None
    version: int | None = None
    chunk: int | None = None


def parse(topic: str) -> ParsedTopic:
    """Take a topic of this layout apart; anything else raises ``TopicError``."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        raise TopicError(f"{topic!r} is not an edgefed topic")
    federation, rest = parts[1], parts[2:]
    check_name(federation, "federation")
    match rest:
        case ["task"] | ["metrics"]:
            return ParsedTopic(federation, rest[0])  # type: ignore[arg-type]
        case ["global", version, chunk] if version.isdigit() and chunk.isdigit():
            return ParsedTopic(federation, "global", version=int(version), chunk=int(chunk))
        case ["update" | "intake" | "ack" | "status" | "ask" as per_client, client_id]:
            return ParsedTopic(federation, per_client, client_id=check_name(client_id, "client id"))
        case ["split", client_id, "fwd" | "bwd" as direction]:
            split_kind: TopicKind = "split_fwd" if direction == "fwd" else "split_bwd"
            return ParsedTopic(federation, split_kind, client_id=check_name(client_id, "client id"))
    raise TopicError(f"{topic!r} is not part of the edgefed topic layout")
