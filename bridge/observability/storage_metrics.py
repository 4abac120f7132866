"""Cassandra requests sent by this bridge, by statement: what a fleet of bridges costs the cluster.

Read at scrape time from the session's own counts (``CassandraSession.statements``), so counting
costs one dictionary increment per request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

NAME = "queue_bridge_cassandra_requests"


class CassandraRequests(Collector):
    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = counts

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(NAME, "")]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(
            NAME, "Requests sent to Cassandra, by statement (docs/storage.md lists them).", labels=["statement"]
        )
        for statement, n in sorted(self.counts.items()):
            family.add_metric([statement], n)
        yield family


def register(registry: CollectorRegistry, counts: Mapping[str, int]) -> None:
    registry.register(CassandraRequests(counts))
