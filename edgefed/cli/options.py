"""Options several commands share."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from schemas.errors import ConfigError

if TYPE_CHECKING:
    from edgefed.transport.config import BrokerList


def broker_option(
    parser: argparse.ArgumentParser, *, service: bool = False, default: str | None = None
) -> None:
    """``--broker URL``: where the command connects (``default`` says where when not given).

    A ``service`` (agent, aggregator) waits for its broker and never starts a private one;
    a one-off run (simulate, demo, bench) starts an embedded broker when none answers.
    """
    if default is None:
        default = (
            "the [mqtt] url of --config, else 127.0.0.1:1883, waited for until it answers"
            if service
            else "127.0.0.1:1883 when something answers there, else an embedded broker "
            "started for this run"
        )
    parser.add_argument(
        "--broker",
        default=None,
        type=_broker_url,
        help="broker URL, mqtt://host:port or mqtts://host:port; a clustered broker's nodes "
        f"separated by commas, tried in turn when one is lost; default: {default}",
    )


def _broker_url(text: str) -> BrokerList:
    """``--broker`` parsed where it is typed: a bad URL is a usage error that says why."""
    # Imported only now: the transport's settings import the wire schemas (torch).
    from edgefed.transport.config import BrokerList  # noqa: PLC0415
    from edgefed.transport.connection import refuse_password_in_url  # noqa: PLC0415

    try:
        url = BrokerList.parse(text)
        refuse_password_in_url(url, where="--broker")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return url


def max_payload_option(parser: argparse.ArgumentParser) -> None:
    """``--max-payload BYTES``: the largest MQTT payload every participant publishes."""
    parser.add_argument(
        "--max-payload",
        type=int,
        default=None,
        metavar="BYTES",
        help="largest MQTT payload the aggregator and every device publish; a larger message "
        "travels in chunks (default 262144; give a broker's own limit, e.g. rumqttd's 20480)",
    )
