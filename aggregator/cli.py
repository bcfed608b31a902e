"""``edgefed aggregator``: run the aggregator service against a broker."""

from __future__ import annotations

import argparse
import asyncio

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edgefed.config import load_settings
from edgefed.transport import MqttTransport, broker_for


def run(args: argparse.Namespace) -> int:
    """Serve the federation until ``--max-versions`` (or forever); write results if asked."""
    config = load_settings(
        AggregatorConfig,
        args.config,
        federation=args.federation,
        max_versions=args.max_versions or None,
        checkpoint_dir=args.checkpoint_dir,
    )

    async def main() -> None:
        async with broker_for(config.mqtt.broker_url(args.broker)) as url:
            # A stable id and a persistent session: updates sent while the aggregator is
            # down (restarting after a crash) wait at the broker (DESIGN §8b).
            transport_config = config.mqtt.transport_config(
                url=url,
                client_id=f"edgefed-{config.federation}-aggregator",
                max_payload=config.max_payload,
                max_message_bytes=config.max_message_bytes,
                clean_session=False,
            )
            async with MqttTransport(transport_config) as transport:
                service = AggregatorService(config, transport)
                try:
                    await service.run()
                finally:
                    if args.json_out:
                        service.results.save(args.json_out)
        last = service.results.history[-1]
        print(f"version {last.version}: eval_loss {last.eval_loss}")

    asyncio.run(main())
    return 0
