"""Bare MQTT clients: the raw-broker baseline of benchmarks, and operators' retained tools.

:class:`~edgefed.transport.mqtt.MqttTransport` is the product's path (codec, chunks,
reconnects). These clients carry bytes as they are, so benchmarks measure the product against
the broker alone, and ``edgefed clear`` reads and deletes retained messages byte for byte.
"""

from __future__ import annotations

import asyncio
from typing import Final

import aiomqtt

from edgefed.transport.config import (
    BrokerAddress,
    BrokerURL,
    TransportConfig,
    resolve_credentials,
)

RawClient = aiomqtt.Client
"""An MQTT client without edgefed's codec; enter it with ``async with``."""

QUIET_S: Final = 1.0
"""A broker hands retained messages over right after SUBSCRIBE: this long without one more,
all have come."""


def tls_parameters(config: TransportConfig) -> aiomqtt.TLSParameters | None:
    """TLS for an ``mqtts`` URL or a configured CA or client certificate; else None."""
    if not (config.broker.tls or config.ca_file or config.cert_file):
        return None
    return aiomqtt.TLSParameters(
        ca_certs=config.ca_file, certfile=config.cert_file, keyfile=config.key_file
    )


def raw_client(url: BrokerAddress, client_id: str) -> RawClient:
    """A bare client (no codec, chunking or reconnects), used as an async context manager.

    It is the raw-broker baseline benchmarks measure the product's path against.
    """
    return raw_client_as(TransportConfig(url=url, client_id=client_id))


def raw_client_as(config: TransportConfig, broker: BrokerURL | None = None) -> RawClient:
    """:func:`raw_client` connecting as ``config`` says: TLS and credentials, clean session.

    It dials ``broker`` (one of ``config.brokers``), else the first of them. It reads and
    clears retained messages byte for byte (``edgefed clear``).
    """
    username, password = resolve_credentials(config)
    broker = broker or config.broker
    return aiomqtt.Client(
        broker.host,
        broker.port,
        username=username,
        password=password,
        identifier=config.client_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        tls_params=tls_parameters(config),
    )


async def retained_messages(
    client: RawClient, topic_filters: list[str], quiet_s: float = QUIET_S
) -> dict[str, bytes]:
    """Subscribe to ``topic_filters``: the retained messages the broker hands over, by topic."""
    if not topic_filters:
        return {}
    await client.subscribe([(topic_filter, 1) for topic_filter in topic_filters])
    found: dict[str, bytes] = {}
    messages = aiter(client.messages)
    while True:
        try:
            async with asyncio.timeout(quiet_s):
                message = await anext(messages)
        except TimeoutError:
            break
        payload = message.payload
        if message.retain and isinstance(payload, bytes) and payload:
            found[message.topic.value] = payload
    await client.unsubscribe(topic_filters)
    return found


async def delete_retained(client: RawClient, topics: list[str]) -> None:
    """Publish an empty retained message on each of ``topics``, which deletes what is kept."""
    for topic in topics:
        await client.publish(topic, b"", qos=1, retain=True)
