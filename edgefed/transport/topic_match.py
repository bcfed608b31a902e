"""MQTT topic rules: what may be published to, what may be subscribed to, what matches.

Both transports check topics the same way before anything is sent, so a bad topic
fails in unit tests just as it would against a broker; the in-memory broker routes
by :func:`topic_matches`.
"""

from __future__ import annotations

from typing import Final

_SHARE_PREFIX: Final = "$share/"
_MAX_TOPIC_BYTES: Final = 65535


def check_topic(topic: str) -> str:
    """A topic one may publish to: non-empty, no wildcards, no NUL.

    Raises:
        ValueError: the topic cannot be published to.
    """
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise ValueError(f"cannot publish to topic {topic!r}")
    if len(topic.encode()) > _MAX_TOPIC_BYTES:
        raise ValueError("topic is longer than 65535 bytes")
    return topic


def split_shared(topic_filter: str) -> tuple[str | None, str]:
    """``$share/<group>/<filter>`` as ``(group, filter)``; any other filter as ``(None, it)``.

    Raises:
        ValueError: a ``$share/`` filter without a group or a filter.
    """
    if not topic_filter.startswith(_SHARE_PREFIX):
        return None, topic_filter
    _, group, *rest = topic_filter.split("/", 2)
    if not group or "+" in group or "#" in group or not rest:
        raise ValueError(f"malformed shared subscription {topic_filter!r}")
    return group, rest[0]


def check_filter(topic_filter: str) -> str:
    """A valid subscription filter (``+`` and ``#`` whole levels, ``#`` last; ``$share/g/f``).

    Raises:
        ValueError: the filter is malformed.
    """
    _, inner = split_shared(topic_filter)
    if not inner or "\0" in inner or len(topic_filter.encode()) > _MAX_TOPIC_BYTES:
        raise ValueError(f"malformed topic filter {topic_filter!r}")
    levels = inner.split("/")
    for position, level in enumerate(levels):
        if "#" in level and (level != "#" or position != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must be a whole level in {topic_filter!r}")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` by MQTT rules (``$share/g/`` is ignored).

    Wildcards at the first level never match topics that start with ``$``.
    """
    _, inner = split_shared(topic_filter)
    filter_levels = inner.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for position, level in enumerate(filter_levels):
        if level == "#":
            return True
        if position >= len(topic_levels):
            return False
        if level not in ("+", topic_levels[position]):
            return False
    return len(filter_levels) == len(topic_levels)


def check_qos(qos: int) -> int:
    """A QoS level MQTT knows.

    Raises:
        ValueError: ``qos`` is not 0, 1 or 2.
    """
    if qos not in (0, 1, 2):
        raise ValueError(f"QoS must be 0, 1 or 2, not {qos}")
    return qos
