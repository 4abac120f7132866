"""Cassandra requests sent by this bridge, by statement: what a fleet of bridges costs the cluster.

Read at scrape time from the session's own counts (``CassandraSession.statements`` and
``executed``), so counting costs one dictionary increment per request.

Two counters, because a batch is one request but several statements:
``queue_bridge_cassandra_requests_total{statement}`` counts requests (a batch once, under the
batch's name, e.g. ``add.recorded``); ``queue_bridge_cassandra_statements_total{statement}``
counts the statements Cassandra executes (each member of a batch under its own name, e.g.
``idem.record`` and ``ready.insert``; a statement sent alone as in the first).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

NAME = "queue_bridge_cassandra_requests"
STATEMENTS_NAME = "queue_bridge_cassandra_statements"


REQUESTS_HELP = "Requests sent to Cassandra, by statement (docs/storage.md lists them)."
STATEMENTS_HELP = (
    "Statements Cassandra executed for this bridge, by statement: each member of a batch counted under its "
    "own name (cassandra_requests counts the batch once)."
)


class CountsByStatement(Collector):
    """A counter family read from a session's counts at scrape time, one sample per statement."""

    def __init__(self, name: str, help_text: str, counts: Mapping[str, int]) -> None:
        self.name, self.help_text, self.counts = name, help_text, counts

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, "")]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.help_text, labels=["statement"])
        for statement, n in sorted(self.counts.items()):
            family.add_metric([statement], n)
        yield family


def register(registry: CollectorRegistry, counts: Mapping[str, int], executed: Mapping[str, int] | None = None) -> None:
    registry.register(CountsByStatement(NAME, REQUESTS_HELP, counts))
    if executed is not None:
        registry.register(CountsByStatement(STATEMENTS_NAME, STATEMENTS_HELP, executed))
