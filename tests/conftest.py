"""Shared fixtures: brokers to test against and a fresh federation name per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from edgefed.transport.broker import MosquittoProcess, embedded_broker, mosquitto_binary, port_open
from tests.brokers import BrokerKind, BrokerPool, missing

SYSTEM_BROKER = ("127.0.0.1", 1883)
REQUIRE_MOSQUITTO = "EDGEFED_REQUIRE_MOSQUITTO"


def _missing(reason: str) -> None:
    """Skip, or fail where the run promised a broker (CI sets EDGEFED_REQUIRE_MOSQUITTO=1)."""
    if os.environ.get(REQUIRE_MOSQUITTO) == "1":
        pytest.fail(f"{reason}, and {REQUIRE_MOSQUITTO}=1 says it must be there")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """The system Mosquitto on 127.0.0.1:1883."""
    if not port_open(*SYSTEM_BROKER):
        _missing("no MQTT broker answers on 127.0.0.1:1883")
    return "mqtt://{}:{}".format(*SYSTEM_BROKER)


@pytest.fixture
def mosquitto_installed() -> None:
    """For tests that start Mosquittos of their own: skip (or fail) where it is missing."""
    if mosquitto_binary() is None:
        _missing("the mosquitto binary is not installed")


@pytest.fixture
def mosquitto_process(mosquitto_installed: None) -> Iterator[MosquittoProcess]:
    """A private Mosquitto (broker_config/dev.conf) on a free port, for tests that kill it."""
    with MosquittoProcess() as broker:
        yield broker


@pytest.fixture
async def embedded_broker_url() -> AsyncIterator[str]:
    """An embedded amqtt broker on a free port, for the duration of one test."""
    async with embedded_broker() as url:
        yield url


@pytest.fixture(scope="session")
def broker_pool() -> Iterator[BrokerPool]:
    """Private brokers of every kind the tests use, each started once when first asked for."""
    pool = BrokerPool()
    yield pool
    pool.close()


def broker_url(pool: BrokerPool, kind: BrokerKind) -> str:
    """A running broker of ``kind`` (skipped, or failed in CI, when it is not installed)."""
    reason = missing(kind)
    if reason is not None:
        _missing(reason)
    return pool.url(kind)


@pytest.fixture
def federation() -> str:
    """A federation name no other test uses, so retained messages never leak between tests."""
    return f"test-{uuid.uuid4().hex[:12]}"
