"""An agent renews its ack subscription when re-sends go unanswered (pure logic)."""

from __future__ import annotations

from typing import cast

from edge_agent.answers import RENEW_ACKS_EVERY, renew_ack_subscription
from edge_agent.config import AgentConfig
from edgefed.transport.base import Transport
from schemas import topics
from schemas.errors import TransportError

CONFIG = AgentConfig(federation="fed", client_id="dev1", data="synthetic:n=8,seed=1")


class Calls:
    """Records what is asked of the transport; ``refuse`` makes unsubscribing fail."""

    def __init__(self, *, refuse: bool = False) -> None:
        self.calls: list[tuple[str, str]] = []
        self.refuse = refuse

    async def unsubscribe(self, topic_filter: str) -> None:
        self.calls.append(("unsubscribe", topic_filter))
        if self.refuse:
            raise TransportError("no broker")

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        self.calls.append(("subscribe", topic_filter))


async def test_the_ack_subscription_is_renewed_every_few_unanswered_sends() -> None:
    calls = Calls()
    for attempt in range(1, 2 * RENEW_ACKS_EVERY + 1):
        await renew_ack_subscription(cast(Transport, calls), CONFIG, attempt)
    topic = topics.ack("fed", "dev1")
    assert calls.calls == [("unsubscribe", topic), ("subscribe", topic)] * 2


async def test_a_renewal_without_a_broker_is_left_to_the_next_one() -> None:
    calls = Calls(refuse=True)
    await renew_ack_subscription(cast(Transport, calls), CONFIG, RENEW_ACKS_EVERY)
    assert calls.calls == [("unsubscribe", topics.ack("fed", "dev1"))]
