"""Which broker to use: the one named, a local one that answers, or an embedded one.

The command-line tools take an optional broker URL; this is where a missing one is
filled in, so a demo on a laptop works with or without Mosquitto installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from edgefed.transport.config import BrokerAddress, BrokerList, BrokerURL

log = logging.getLogger(__name__)

LOCAL_BROKER_URL: Final = "mqtt://127.0.0.1:1883"
"""Where a development broker is looked for when no URL is given."""
LOCAL_BROKER: Final = BrokerURL.parse(LOCAL_BROKER_URL)


async def port_answers(host: str, port: int, *, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def first_answering(brokers: BrokerList) -> BrokerURL:
    """The first of ``brokers`` that accepts TCP connections; the first when none does."""
    for url in brokers.urls:
        if await port_answers(url.host, url.port, timeout_s=2.0):
            return url
    return brokers.first


@contextlib.asynccontextmanager
async def broker_for(
    url: BrokerAddress | None, *, embedded: bool = True
) -> AsyncIterator[BrokerList]:
    """The brokers to use: ``url`` when given (one or several), else a local or an embedded one.

    Without a URL, ``mqtt://127.0.0.1:1883`` is used when something answers there;
    otherwise, with ``embedded``, an embedded broker is started on a free port for the
    duration of the block (MQTT 3.1.1 only, no shared subscriptions). A long-running
    service passes ``embedded=False``: it waits for the local broker instead of keeping a
    private one nobody else reaches. The URL is parsed here, once.

    Raises:
        ConfigError: ``url`` is not a broker URL.
    """
    if url is not None:
        yield BrokerList.of(url)
        return
    if not embedded or await port_answers(LOCAL_BROKER.host, LOCAL_BROKER.port):
        yield BrokerList.of(LOCAL_BROKER)
        return
    from edgefed.transport.broker import embedded_broker, free_port  # noqa: PLC0415 (amqtt)

    ws_port = free_port(LOCAL_BROKER.host)  # for `edgefed dashboard --ws-url`
    async with embedded_broker(ws_port=ws_port) as embedded_url:
        log.warning(
            "no broker at %s; started an embedded one on %s (WebSockets: ws://%s:%d)",
            LOCAL_BROKER, embedded_url, LOCAL_BROKER.host, ws_port,
        )  # fmt: skip
        yield BrokerList.parse(embedded_url)
