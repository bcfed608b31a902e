"""The aggregator's Prometheus endpoint (``metrics_port``): what Grafana and alerts read.

Values are read from the service when Prometheus scrapes (a custom collector), so the merge
path carries no bookkeeping of its own: the version and evaluations come from the results'
history, update counts and staleness from the tallies it keeps of its records, device states
from the statuses the service hears, bytes from the transport's counters. Only the merge time is observed as it
happens (:data:`MERGE_SECONDS` buckets), since nothing else keeps it.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Final, Protocol, get_args

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from schemas.messages import AgentState

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from aggregator.config import AggregatorConfig
    from aggregator.fleet import Fleet
    from aggregator.results import Results
    from edgefed.transport.frames import TransportStats

log = logging.getLogger(__name__)

STALENESS_BUCKETS: Final = (0.0, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0)
MERGE_SECONDS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Observed(Protocol):
    """What the collector reads of an aggregator service."""

    config: AggregatorConfig
    version: int
    results: Results
    fleet: Fleet
    merge_seconds: Histogram


def merge_histogram() -> Histogram:
    """Seconds each merge took; registered by :class:`FederationCollector`, not globally."""
    return Histogram(
        "edgefed_merge_seconds",
        "Seconds spent merging one accepted update (FedBuff may only buffer it).",
        ["federation"],
        registry=None,
        buckets=MERGE_SECONDS,
    )


class FederationCollector(Collector):
    """Every ``edgefed_*`` metric of one aggregator service, read at scrape time."""

    def __init__(self, service: Observed, stats: TransportStats) -> None:
        """Read ``service`` and the counters of its transport, ``stats``."""
        self._service = service
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        """The metric families, labelled with the federation."""
        service = self._service
        fed = service.config.federation
        yield _gauge("edgefed_global_version", "Current global version.", fed, service.version)
        evaluated = [r for r in service.results.history if r.eval_loss is not None]
        last = evaluated[-1] if evaluated else None
        for name, value in (
            ("loss", None if last is None else last.eval_loss),
            ("accuracy", None if last is None else last.eval_accuracy),
        ):
            if value is not None:
                yield _gauge(
                    f"edgefed_eval_{name}",
                    f"Held-out {name} of the last evaluated global.",
                    fed,
                    value,
                )
        yield from self._updates(fed)
        yield self._agents(fed)
        stats = self._stats
        for direction, value in (
            ("received", stats.received_bytes),
            ("sent", stats.published_bytes),
        ):
            counter = CounterMetricFamily(
                f"edgefed_bytes_{direction}", f"MQTT payload bytes the aggregator {direction}.",
                labels=["federation"],
            )  # fmt: skip
            counter.add_metric([fed], value)
            yield counter
        yield from service.merge_seconds.collect()

    def _updates(self, fed: str) -> Iterator[Metric]:
        results = self._service.results
        answers, staleness = dict(results.answers), dict(results.staleness)  # copies: the loop adds
        updates = CounterMetricFamily(
            "edgefed_updates", "Updates answered, by decision, reason and method.",
            labels=["federation", "decision", "reason", "method"],
        )  # fmt: skip
        for (decision, reason, method), n in sorted(answers.items()):
            updates.add_metric([fed, decision, reason, method], n)
        yield updates
        buckets = [
            (_le(bound), sum(n for s, n in staleness.items() if s <= bound))
            for bound in STALENESS_BUCKETS
        ]
        histogram = HistogramMetricFamily(
            "edgefed_update_staleness", "Staleness of accepted updates, in versions.",
            labels=["federation"],
        )  # fmt: skip
        total = sum(s * n for s, n in staleness.items())
        histogram.add_metric([fed], [*buckets, ("+Inf", sum(staleness.values()))], total)
        yield histogram

    def _agents(self, fed: str) -> Metric:
        statuses = list(self._service.fleet.statuses.values())  # a copy: the loop adds to it
        states = Counter(status.state for status in statuses)
        agents = GaugeMetricFamily(
            "edgefed_agents", "Devices by the state of their latest status.",
            labels=["federation", "state"],
        )  # fmt: skip
        for state in get_args(AgentState):
            agents.add_metric([fed, state], states.get(state, 0))
        return agents


def _gauge(name: str, documentation: str, federation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["federation"])
    gauge.add_metric([federation], value)
    return gauge


def _le(bound: float) -> str:
    return f"{bound:g}" if bound % 1 else f"{bound:.1f}"


@contextlib.contextmanager
def metrics_endpoint(
    service: Observed, stats: TransportStats, *, host: str, port: int
) -> Iterator[int]:
    """Serve ``/metrics`` of ``service`` on ``host:port`` for the block; yields the port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FederationCollector(service, stats))
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
