"""``edgefed aggregator``: run the aggregator service against a broker."""

from __future__ import annotations

import argparse
import asyncio

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edgefed.config import load_settings
from edgefed.transport import MqttTransport, TransportConfig, broker_for


def run(args: argparse.Namespace) -> int:
    """Serve the federation until ``--max-versions`` (or forever); write results if asked."""
    config = load_settings(
        AggregatorConfig,
        args.config,
        federation=args.federation,
        max_versions=args.max_versions or None,
    )

    async def main() -> None:
        async with broker_for(args.broker) as url:
            transport_config = TransportConfig(
                url=url,
                client_id=f"edgefed-{config.federation}-aggregator",
                max_payload=config.max_payload,
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
