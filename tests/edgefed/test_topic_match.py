"""Topic and filter rules, and MQTT matching."""

from __future__ import annotations

import pytest

from edgefed.transport.topic_match import (
    check_filter,
    check_qos,
    check_topic,
    split_shared,
    topic_matches,
)


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b/c", "a/b/c", True),
        ("a/b/c", "a/b", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("a/+", "a/", True),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/+", "a/b", True),
        ("+", "a/b", False),
        ("#", "$SYS/broker", False),
        ("+/broker", "$SYS/broker", False),
        ("$SYS/#", "$SYS/broker", True),
        ("$share/agg/edgefed/f/update/+", "edgefed/f/update/dev-1", True),
        ("edgefed/f/update/+", "edgefed/f/update/dev-1/x", False),
    ],
)
def test_topic_matches(topic_filter: str, topic: str, *, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(
    "bad", ["", "a/#/b", "a/b#", "a+/b", "$share/g", "$share//a", "$share/+/a"]
)
def test_check_filter_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match=r"malformed|must be"):
        check_filter(bad)


@pytest.mark.parametrize("bad", ["", "a/+", "a/#", "a\0b"])
def test_check_topic_rejects_what_cannot_be_published_to(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot publish"):
        check_topic(bad)


def test_split_shared_separates_the_group() -> None:
    assert split_shared("$share/agg/a/+") == ("agg", "a/+")
    assert split_shared("a/+") == (None, "a/+")


def test_check_qos_rejects_unknown_levels() -> None:
    assert check_qos(2) == 2
    with pytest.raises(ValueError, match="QoS"):
        check_qos(3)
