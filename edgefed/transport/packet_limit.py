"""Finding a broker's packet limit the hard way, and living with it.

A broker whose maximum packet size is below ``max_payload`` closes the connection whenever a
larger packet arrives; MQTT 3.1.1 has no way for it to say why (rumqttd's default limit is
20 KiB, edgefed's chunks 256 KiB). The transport treats a packet that was in flight at
:data:`LOSSES_TO_REFUSE` losses in a row as refused, and sends the message again in smaller
chunks (:func:`smaller_payload`), down to the smallest chunk size.
"""

from __future__ import annotations

import logging
from typing import Final

from edgefed.transport.config import MIN_MAX_PAYLOAD, BrokerURL
from schemas.errors import TransportError

log = logging.getLogger(__name__)

LOSSES_TO_REFUSE: Final = 2
"""Connections lost one after another while the same large packet was in flight before it
counts as over the broker's limit (one loss may be the network's doing)."""


class PacketRefused(Exception):
    """The broker closed the connection each time one packet was in flight."""

    def __init__(self, size: int) -> None:
        """``size``: the refused packet's payload bytes."""
        super().__init__(size)
        self.size = size


def smaller_payload(client_id: str, broker: BrokerURL, current: int, refused: int) -> int:
    """The chunk size to send with after ``broker`` refused a ``refused``-byte packet.

    Logs one warning that names the sizes and the setting.

    Raises:
        TransportError: chunks are at their smallest and the broker still refuses them.
    """
    smaller = max(MIN_MAX_PAYLOAD, min(current, refused) // 2)
    line = (
        f"{client_id}: {broker} closed the connection each time a {refused:,}-byte packet "
        "was in flight: its packet limit is lower"
    )
    if refused <= MIN_MAX_PAYLOAD or smaller >= current:
        raise TransportError(f"{line}, and {MIN_MAX_PAYLOAD:,} bytes is the smallest chunk")
    log.warning(
        "%s; sending chunks of at most %s bytes from now on (set max_payload below the "
        "broker's limit to start there)",
        line,
        f"{smaller:,}",
    )
    return smaller
