"""How the aggregator (and the split server beside it) connect to the broker.

``edgefed aggregator`` and the simulator's in-process aggregator use these same settings, so
what a fleet run shows about lost or queued updates holds for the real service.

The aggregator keeps a stable client id and a persistent session: updates published while
it is briefly away (a restart, a dropped link) are queued by the broker and delivered when
it comes back (docs/architecture.md §8b). The split server uses a clean session on a connection of
its own: a split request is answered within the device's timeout or sent again by the device,
so old ones queued for it would only be answered too late.
"""

from __future__ import annotations

import dataclasses

from aggregator.config import AggregatorConfig
from edgefed.transport.config import BrokerAddress, TransportConfig
from edgefed.transport.connection import MqttSettings
from schemas.errors import ConfigError


def aggregator_client_id(federation: str) -> str:
    """The aggregator's MQTT client id: stable, because the broker keys sessions by it."""
    return f"edgefed-{federation}-aggregator"


def aggregator_transport(config: AggregatorConfig, *, url: BrokerAddress) -> TransportConfig:
    """The aggregator's connection to ``url``: TLS and identity from ``config.mqtt``.

    Raises:
        ConfigError: a connection setting cannot work.
    """
    return config.mqtt.transport_config(
        url=url,
        client_id=aggregator_client_id(config.federation),
        max_payload=config.max_payload,
        max_message_bytes=config.max_message_bytes,
        clean_session=False,
    )


def split_transport(
    aggregator: TransportConfig, login: MqttSettings | None = None
) -> TransportConfig:
    """The split server's connection beside the aggregator's: same broker, own clean session.

    It logs in as ``login`` (the ``[split_mqtt]`` table) when the configuration gives one.

    Raises:
        ConfigError: a setting of ``login`` cannot work.
    """
    client_id = f"{aggregator.client_id}-split"
    if login is None:
        return dataclasses.replace(aggregator, client_id=client_id, clean_session=True)
    return login.transport_config(
        url=login.broker_url(None) or aggregator.brokers,
        client_id=client_id,
        clean_session=True,
        max_payload=aggregator.max_payload,
        max_message_bytes=aggregator.max_message_bytes,
        connect_timeout_s=aggregator.connect_timeout_s,
    )


def upstream_transport(config: AggregatorConfig) -> TransportConfig:
    """A site's connection to the root broker (``[upstream]``), as client ``site_id``.

    Its session is persistent, so the root's answers to site updates wait for a site that
    is restarting.

    Raises:
        ConfigError: ``config`` is not a site's, or a connection setting cannot work.
    """
    upstream, site_id = config.upstream, config.site_id
    url = None if upstream is None else upstream.broker_url(None)
    if upstream is None or url is None or site_id is None:
        raise ConfigError('role = "site" needs site_id and an [upstream] table with a url')
    return upstream.transport_config(
        url=url,
        client_id=site_id,
        max_payload=config.max_payload,
        max_message_bytes=config.max_message_bytes,
        clean_session=False,
    )


def intake_transport(config: AggregatorConfig, *, url: BrokerAddress) -> TransportConfig:
    """An intake replica's connection, with a clean session.

    While a replica is away, the broker hands its share of the updates to the others
    instead of queueing them for it.

    Raises:
        ConfigError: ``config`` is not a replica's, or a connection setting cannot work.
    """
    if config.site_id is None:
        raise ConfigError('role = "intake" needs a site_id, the replica\'s client id')
    return config.mqtt.transport_config(
        url=url,
        client_id=f"edgefed-{config.federation}-intake-{config.site_id}",
        max_payload=config.max_payload,
        max_message_bytes=config.max_message_bytes,
        clean_session=True,
    )
