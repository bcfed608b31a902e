"""``edgefed aggregator``: run the aggregator service against a broker."""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from aggregator.config import AggregatorConfig
from aggregator.connections import (
    aggregator_transport,
    intake_transport,
    split_transport,
    upstream_transport,
)
from aggregator.prometheus import metrics_endpoint
from aggregator.rounds import service_for
from aggregator.service import AggregatorService
from edgefed.process import run_until_stopped
from edgefed.settings import load_settings
from edgefed.transport.broker_choice import broker_for
from edgefed.transport.config import BrokerAddress, TransportConfig
from edgefed.transport.mqtt import MqttTransport


def run(args: argparse.Namespace) -> int:
    """Serve until ``--max-versions`` or ``--max-seconds`` (or forever); write results if asked."""
    config = load_settings(
        AggregatorConfig,
        args.config,
        federation=args.federation,
        max_versions=args.max_versions or None,
        max_seconds=args.max_seconds or None,
        checkpoint_dir=args.checkpoint_dir,
        json_out=args.json_out,
    )

    if config.role == "site":
        run_until_stopped(_run_site(config, args.broker))
        return 0
    if config.role == "intake":
        run_until_stopped(_run_intake(config, args.broker))
        return 0

    async def main() -> None:
        async with broker_for(config.mqtt.broker_url(args.broker), embedded=False) as url:
            # A stable id and a persistent session: updates sent while the aggregator is
            # down (restarting after a crash) wait at the broker (docs/architecture.md §8b).
            transport_config = aggregator_transport(config, url=url)
            async with MqttTransport(transport_config) as transport:
                service = service_for(config, transport)
                try:
                    with _metrics_endpoint(service, transport):
                        if "split" in {config.method, *config.accept_methods}:
                            await _run_with_split(service, transport_config)
                        else:
                            await service.run()
                finally:
                    if config.json_out:
                        service.results.save(config.json_out)
        last = service.results.history[-1]
        print(f"version {last.version}: eval_loss {last.eval_loss}")

    run_until_stopped(main())
    return 0


async def _run_site(config: AggregatorConfig, broker: BrokerAddress | None) -> None:
    """Serve a site: its devices on the site broker, its updates to the root upstream."""
    from aggregator.site import SiteAggregator  # noqa: PLC0415  # sites only

    async with (
        broker_for(config.mqtt.broker_url(broker), embedded=False) as url,
        MqttTransport(aggregator_transport(config, url=url)) as down,
        MqttTransport(upstream_transport(config)) as up,
    ):
        site = SiteAggregator(config, down=down, up=up)
        await site.run()
    sent = f"{site.merged} device updates in {site.uplink.accepted} site updates"
    print(f"root version {site.root.version}: {sent} accepted by the root")


async def _run_intake(config: AggregatorConfig, broker: BrokerAddress | None) -> None:
    """Serve as an intake replica: a share of the devices' updates, summed for the merger."""
    from aggregator.intake_replica import IntakeReplica  # noqa: PLC0415  # replicas only

    async with (
        broker_for(config.mqtt.broker_url(broker), embedded=False) as url,
        MqttTransport(intake_transport(config, url=url)) as transport,
    ):
        replica = IntakeReplica(config, transport)
        await replica.run()
    print(f"intake {replica.replica_id}: {replica.taken} updates taken, {replica.merged} merged")


def _metrics_endpoint(
    service: AggregatorService, transport: MqttTransport
) -> contextlib.AbstractContextManager[object]:
    """The Prometheus endpoint when ``metrics_port`` is set; else nothing."""
    config = service.config
    if config.metrics_port is None:
        return contextlib.nullcontext()

    return metrics_endpoint(
        service, transport.stats, host=config.metrics_host, port=config.metrics_port
    )


async def _run_with_split(service: AggregatorService, transport_config: TransportConfig) -> None:
    """Run ``service`` with the split server beside it, on a connection of its own."""
    from aggregator.split_service import SplitService  # noqa: PLC0415  # split tasks only

    login = service.config.split_mqtt
    async with MqttTransport(split_transport(transport_config, login)) as transport:
        split = SplitService.beside(service, transport)
        serving = asyncio.create_task(split.run(), name="split-server")
        try:
            await service.run()
        finally:
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
