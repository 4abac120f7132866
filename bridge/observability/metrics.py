"""Prometheus metrics of one bridge, in a registry of its own.

``BridgeMetrics`` is both the queue's ``Metrics`` (``inc(name, amount, **labels)``) and the
transport's ``Observer`` (``observe(method, outcome, seconds)``). Every name the queue and the
scheduler pass to ``inc`` is mapped to a Prometheus counter in ``ROUTES``; an unknown name, an
undeclared label or a missing label raises ``KeyError`` so that a typo fails the unit tests
(``tests/unit/test_metrics.py`` calls every name the domain code uses) instead of silently
losing a series.

Labels are bounded on purpose (method, outcome code, kind, reason): never an owner, a service,
a task id or a correlation id.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "queue_bridge"

# Request latency: from a cache-hot fetch (~0.5 ms) to a slow LWT round or a timeout (~5 s), and
# a fetch's long-poll wait (waitMs up to 30 s: the Python Worker waits 30 s at a time). Without the
# top three, every idle long-poll fell in +Inf and a quantile of fetch said 5 s for an idle fleet.
REQUEST_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    32.0,
)

# The request methods (``bridge.transport.topology.ROUTING_KEYS``, tied by tests/unit/test_metrics.py).
METHODS = frozenset(
    {"add", "fetch", "ack", "extend", "fail", "cancel", "purge", "stats", "parked", "redrive", "discard", "unknown"}
)
_OUTCOME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


@dataclass(frozen=True, slots=True)
class Route:
    """Where one ``inc`` name goes: a counter (name without ``_total``) and the labels it keeps.

    ``dropped`` are labels the caller passes that this counter deliberately does not keep
    (for example ``kind`` on ``tasks_delivered``, whose only value is ``claim``).
    """

    metric: str
    help: str
    labels: tuple[str, ...] = ()
    dropped: frozenset[str] = frozenset()


# The one table from the queue's names to the exported counters.
ROUTES: dict[str, Route] = {
    "tasks_added": Route(
        "tasks_added",
        "Tasks accepted by add (excluding deduplicated retries; delayed ones included).",
        dropped=frozenset({"kind"}),
    ),
    "tasks_due": Route("tasks_due", "Delayed tasks announced by the scheduler when their time came."),
    "leases_extended": Route(
        "leases_extended", "extend requests, by outcome (ok; refused: not the worker's lease).", labels=("outcome",)
    ),
    "tasks_failed": Route("tasks_failed", "Tasks given back by their worker with fail, to be retried after a backoff."),
    "tasks_parked": Route(
        "tasks_parked",
        "Tasks parked, by reason (delivery_limit: leases ran out that often; failed: failed at the limit; "
        "key_missing: its key missing at every claim for BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS).",
        labels=("reason",),
    ),
    "tasks_redriven": Route("tasks_redriven", "Parked tasks put back in their queue by redrive."),
    "tasks_discarded": Route("tasks_discarded", "Parked tasks dropped for good by discard."),
    "tasks_cancelled": Route("tasks_cancelled", "Tasks cancelled by cancel."),
    "tasks_purged": Route("tasks_purged", "Ready tasks cancelled by purge."),
    "adds_deduplicated": Route("tasks_deduplicated", "Adds answered from an earlier add with the same message id."),
    "adds_entered_again": Route(
        "tasks_entered_again",
        "Tasks stored too late for the scans' positions (a write held up), given a second entry in their queue.",
    ),
    "tasks_delivered": Route(
        "tasks_delivered", "Tasks handed to a worker for the first time.", dropped=frozenset({"kind"})
    ),
    "tasks_redelivered": Route(
        "tasks_redelivered",
        "Tasks handed out again: kind=claim after a lease expired, kind=resend for a repeated fetch.",
        labels=("kind",),
    ),
    "tasks_recovered": Route(
        "tasks_recovered", "Leases that ran out (a worker lost or too slow), re-exposed by the recovery scheduler."
    ),
    "tasks_completed": Route("tasks_completed", "Tasks acked by their worker, by outcome.", labels=("outcome",)),
    "tasks_dead_lettered": Route(
        "tasks_dead_lettered", "Tasks removed without a result, by reason.", labels=("reason",)
    ),
    "claim_conflicts": Route("claim_conflicts", "Claims lost to a concurrent claim (lightweight transaction)."),
    "adds_deferred": Route(
        "adds_deferred",
        "Adds moved to the retry lane: their owner's key-server entry is unusable and the owner held its share of "
        "the add window already.",
    ),
    "long_polls_abandoned": Route(
        "long_polls_abandoned",
        "Waiting fetches whose worker was gone (its reply-to closed) when a task came: the task went to another.",
    ),
    "claims_stale": Route(
        "claims_stale",
        "Claims refused because the task had finished (a cancelled, purged or done task's hint or index "
        "entry): not a race between claims.",
    ),
    "claims_refiled": Route(
        "claims_refiled",
        "Deadlines of claims filed again: a claim so slow (a paused bridge, a slow round) or of "
        "unknown outcome (filed at once and once its lookups end) that the scheduler may have met the first.",
    ),
    "claims": Route(
        "claims",
        "Claims tried, by source (hint: handed out by the broker; scan: found in the ready index; pointer: "
        "the task a worker's pointer announces while that claim may be on its way) and outcome (won, lost; "
        "passed: a late add's second entry whose task was leased already, passed over after a read).",
        labels=("source", "outcome"),
    ),
    "hint_payloads_refused": Route(
        "hint_payloads_refused",
        "Payload copies carried by hints that failed authentication (the stored row was used instead).",
    ),
    "acks_named_fast": Route(
        "acks_named_fast",
        "Acks that named their task and completed it without a read first (no token on the lease).",
    ),
    "results_published": Route("results_published", "Results published and confirmed by the broker."),
    "results_republished": Route("results_republished", "Pending results re-published by the scheduler."),
    "results_left_to_relay": Route(
        "results_left_to_relay",
        "Results left to the relay: 1,000 were on their way already (a broker that blocks publishing).",
    ),
    "count_updates_uncertain": Route(
        "count_updates_uncertain",
        "Queue-count updates that timed out or lost their connection, not repeated (the counts may miss them).",
    ),
    "results_dropped": Route("results_dropped", "Results that could not be published, by reason.", labels=("reason",)),
    "leases_refused": Route(
        "leases_refused",
        "Fetches and extends refused without touching a lease, by reason (clock_skew).",
        labels=("reason",),
    ),
    "acks_without_task_id": Route(
        "acks_without_task_id", "Acks that name no taskId (clients of contract v1.0): upgrade those clients."
    ),
    "acks_refused": Route(
        "acks_refused", "Acks answered false because they were late copies, by reason.", labels=("reason",)
    ),
    "deliveries_failed": Route(
        "deliveries_failed",
        "Claimed tasks that could not be handed out, by reason (key_missing, key_unavailable, expired).",
        labels=("reason",),
    ),
    "amqp_channels_lost": Route(
        "amqp_channels_lost", "AMQP channels closed under the bridge (restored on reconnect).", labels=("channel",)
    ),
    "requests_expired": Route(
        "requests_expired",
        "Requests dropped unexecuted because their caller's deadline had passed.",
        labels=("method",),
    ),
}


class CacheCounters(Protocol):
    """What the key cache exposes (``CachingKeyProvider``): monotonically increasing counts."""

    @property
    def hits(self) -> int: ...

    @property
    def misses(self) -> int: ...


class SchedulerStateView(Protocol):
    """What the recovery scheduler exposes (``RecoveryScheduler.state``)."""

    @property
    def last_tick_monotonic(self) -> float: ...

    @property
    def lag_ms(self) -> int: ...


def package_version() -> str:
    try:
        return importlib.metadata.version("queue-bridge")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class _CallbackCollector(Collector):
    """Values read at scrape time from the key cache and the scheduler (bound after construction)."""

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self.key_cache: CacheCounters | None = None
        self.scheduler: SchedulerStateView | None = None
        # connection name -> (RabbitMQ node "host:port", connections opened so far)
        self.amqp_nodes: Callable[[], dict[str, tuple[str, int]]] | None = None
        self._monotonic = monotonic

    def describe(self) -> Iterable[Metric]:
        # Names only, so that the registry rejects a clash at registration time.
        return [
            CounterMetricFamily(f"{PREFIX}_key_cache_hits", ""),
            CounterMetricFamily(f"{PREFIX}_key_cache_misses", ""),
            CounterMetricFamily(f"{PREFIX}_key_cache_coalesced", ""),
            CounterMetricFamily(f"{PREFIX}_key_cache_stale", ""),
            GaugeMetricFamily(f"{PREFIX}_keyring_file_rejected", ""),
            GaugeMetricFamily(f"{PREFIX}_keyring_loaded_info", ""),
            GaugeMetricFamily(f"{PREFIX}_scheduler_lag_seconds", ""),
            GaugeMetricFamily(f"{PREFIX}_scheduler_last_tick_age_seconds", ""),
            GaugeMetricFamily(f"{PREFIX}_amqp_node_info", ""),
            CounterMetricFamily(f"{PREFIX}_amqp_connections_opened", ""),
        ]

    def collect(self) -> Iterable[Metric]:
        cache = self.key_cache
        if cache is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_key_cache_hits", "Key lookups answered from the key cache.", value=cache.hits
            )
            yield CounterMetricFamily(
                f"{PREFIX}_key_cache_misses", "Key lookups that called the key source.", value=cache.misses
            )
            coalesced = getattr(cache, "coalesced", None)
            if isinstance(coalesced, int):
                yield CounterMetricFamily(
                    f"{PREFIX}_key_cache_coalesced",
                    "Key lookups that joined another caller's call to the key source.",
                    value=coalesced,
                )
            stale = getattr(cache, "stale", None)
            if isinstance(stale, int):
                yield CounterMetricFamily(
                    f"{PREFIX}_key_cache_stale",
                    "Keys served past the cache's age because the key source could not answer (stale-if-error).",
                    value=stale,
                )
            ring = getattr(cache, "upstream", None)
            reload = getattr(ring, "maybe_reload", None)
            if callable(reload):  # a key-ring file: checked (once a second at most) as it is scraped,
                with contextlib.suppress(Exception):  # not only on a lookup: an idle bridge's stayed stale
                    reload()
            rejected = getattr(ring, "rejected", None)
            if isinstance(rejected, bool):  # a key-ring file (BRIDGE_KEYRING)
                yield GaugeMetricFamily(
                    f"{PREFIX}_keyring_file_rejected",
                    "1 while the key-ring file on disk is not the one in use (gone, unreadable or malformed): "
                    "the previous keys are kept, and a restart would fail.",
                    value=int(rejected),
                )
            digest, keys = getattr(ring, "digest", None), getattr(ring, "key_count", None)
            if isinstance(digest, str) and isinstance(keys, int):
                info = GaugeMetricFamily(
                    f"{PREFIX}_keyring_loaded_info",
                    "The key-ring in use: a digest of its owners, key ids and current ids (no secret), and its "
                    "number of keys as the value. Every bridge should show one digest before `keyring promote`.",
                    labels=["digest"],
                )
                info.add_metric([digest], keys)
                yield info
        state = self.scheduler
        if state is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_scheduler_lag_seconds",
                "How far the recovery scheduler's first pass is behind the clock.",
                value=state.lag_ms / 1000.0,
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_scheduler_last_tick_age_seconds",
                "Seconds since the recovery scheduler last finished a tick.",
                value=max(0.0, self._monotonic() - state.last_tick_monotonic),
            )
        if self.amqp_nodes is not None:
            nodes = self.amqp_nodes()
            info = GaugeMetricFamily(
                f"{PREFIX}_amqp_node_info",
                "1 for the RabbitMQ node (host:port) each AMQP connection of this bridge is on, or last was "
                "(BRIDGE_AMQP_HOSTS: how the fleet is spread over the nodes).",
                labels=("connection", "node"),
            )
            opened = CounterMetricFamily(
                f"{PREFIX}_amqp_connections_opened",
                "AMQP connections opened: 1 at start, one more per reconnection (to any node).",
                labels=("connection",),
            )
            for name, (node, count) in sorted(nodes.items()):
                info.add_metric((name, node), 1)
                opened.add_metric((name,), count)
            yield info
            yield opened


class BridgeMetrics:
    """All metrics of one bridge; ``registry`` is private to this object (never the global one)."""

    def __init__(
        self,
        *,
        instance: str,
        version: str | None = None,
        key_cache: CacheCounters | None = None,
        scheduler: SchedulerStateView | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests",
            "AMQP requests handled, by method and outcome (ok or an error code).",
            ("method", "outcome"),
            registry=r,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving an AMQP request to answering it, by method (a fetch's includes its long-poll wait).",
            ("method",),
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._counters: dict[str, Counter] = {}
        for route in ROUTES.values():
            if route.metric not in self._counters:
                self._counters[route.metric] = Counter(f"{PREFIX}_{route.metric}", route.help, route.labels, registry=r)
        self.queue_tasks = Gauge(
            f"{PREFIX}_queue_tasks",
            "Tasks per queue by state (ready, in_flight, delayed, parked); exported by the bridge holding "
            "the scheduler duty, refreshed every BRIDGE_STATS_INTERVAL (off by default).",
            ["owner", "service", "state"],
            registry=r,
        )
        self.queue_oldest_ready = Gauge(
            f"{PREFIX}_queue_oldest_ready_age_seconds",
            "Age of the oldest ready task per queue (same exporter as queue_tasks).",
            ["owner", "service"],
            registry=r,
        )
        self.results_pending = Gauge(
            f"{PREFIX}_results_pending", "Results written to the outbox and not yet published.", registry=r
        )
        self.queue_gauges_unread = Gauge(
            f"{PREFIX}_queue_gauges_unread",
            "Queues whose counts the duty holder could not read at its last refresh (all it exports, at least "
            "1, when it could not list them): their queue_tasks series are old or absent, not healthy.",
            registry=r,
        )
        self.clock_skew = Gauge(
            f"{PREFIX}_clock_skew_seconds",
            "This host's clock minus Cassandra's (positive: ahead), from the last measurement. With "
            "BRIDGE_CLOCK_SOURCE=cassandra the bridge does not use the host's clock: see clock_uncertainty.",
            registry=r,
        )
        self.clock_skew_error = Gauge(
            f"{PREFIX}_clock_skew_error_seconds",
            "Uncertainty of the last clock skew measurement (half its round trip).",
            registry=r,
        )
        self.clock_uncertainty = Gauge(
            f"{PREFIX}_clock_uncertainty_seconds",
            "How far this bridge's clock may be from Cassandra's now (BRIDGE_CLOCK_SOURCE=cassandra: the "
            "last probe's half round trip plus drift since; leases are refused above half the margin).",
            registry=r,
        )
        self.paused = Gauge(
            f"{PREFIX}_consumers_paused",
            "1 for each request queue this bridge stopped consuming because it cannot serve it now.",
            ("queue",),
            registry=r,
        )
        self.channels_down = Gauge(
            f"{PREFIX}_amqp_channel_down",
            "1 while an AMQP channel is closed and being reopened (for consume and adds: until its "
            "consumers are back too). consume, adds: their requests are not served and the bridge is "
            "unready meanwhile. results, replies: not a readiness check, requests are still served and "
            "results wait in the outbox.",
            ("channel",),
            registry=r,
        )
        self.duty_held = Gauge(
            f"{PREFIX}_duty_held",
            "1 while this bridge holds the fleet's duty (the recovery scheduler and the result relay). "
            "Summed over the fleet it is 1; 0 for a minute means no bridge takes expired leases back "
            "or publishes owed results, though every bridge reports no scheduler lag.",
            registry=r,
        )
        self.info = Info(PREFIX, "Build and instance of this bridge.", registry=r)
        self.info.info({"version": version or package_version(), "instance": instance})
        self._callbacks = _CallbackCollector(monotonic)
        r.register(self._callbacks)
        if key_cache is not None:
            self.bind_key_cache(key_cache)
        if scheduler is not None:
            self.bind_scheduler(scheduler)

    # -- late binding (the key cache and the scheduler are built after the queue) -------------
    def bind_key_cache(self, cache: CacheCounters) -> None:
        self._callbacks.key_cache = cache

    def bind_scheduler(self, state: SchedulerStateView) -> None:
        self._callbacks.scheduler = state

    def bind_amqp_nodes(self, nodes: Callable[[], dict[str, tuple[str, int]]]) -> None:
        self._callbacks.amqp_nodes = nodes

    # -- the queue's Metrics protocol ---------------------------------------------------------
    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        route = ROUTES[name]  # KeyError on an unknown name: a typo in the caller
        unexpected = labels.keys() - set(route.labels) - route.dropped
        if unexpected:
            raise KeyError(f"metric {name!r} does not take labels {sorted(unexpected)}")
        counter = self._counters[route.metric]
        if route.labels:
            missing = [label for label in route.labels if label not in labels]
            if missing:
                raise KeyError(f"metric {name!r} needs labels {missing}")
            counter.labels(*(labels[label] for label in route.labels)).inc(amount)
        else:
            counter.inc(amount)

    def counter_value(self, name: str) -> float:
        """A counter's total over all its labels (tests and benchmarks read it in process)."""
        counter = self._counters[ROUTES[name].metric]
        return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))

    # -- the transport's Observer ---------------------------------------------------------------
    def observe(self, method: str, outcome: str, seconds: float) -> None:
        if method not in METHODS:
            method = "unknown"
        if not _OUTCOME.match(outcome):
            outcome = "other"
        self.requests.labels(method, outcome).inc()
        self.request_duration.labels(method).observe(max(0.0, seconds))

    # -- gauges set by the code that knows ------------------------------------------------------
    def set_results_pending(self, n: int) -> None:
        self.results_pending.set(n)

    def set_queue_gauges_unread(self, n: int) -> None:
        self.queue_gauges_unread.set(n)

    def set_queue_stats(self, rows: Iterable[tuple[str, str, dict[str, int], int | None]]) -> None:
        """The fleet's queue counts (owner, service, {state: n}, oldest ready age in ms), exported by
        the bridge that holds the scheduler duty (one exporter, not one per bridge)."""
        self.queue_tasks.clear()
        self.queue_oldest_ready.clear()
        for owner, service, states, oldest_ms in rows:
            for state, n in states.items():
                self.queue_tasks.labels(owner, service, state).set(n)
            if oldest_ms is not None:
                self.queue_oldest_ready.labels(owner, service).set(oldest_ms / 1000)

    def set_channel_down(self, channel: str, down: bool) -> None:
        """Told by the transport (bridge.transport.amqp) as one of its channels (consume, adds,
        results, replies) goes down and comes back."""
        self.channels_down.labels(channel).set(1 if down else 0)

    def set_paused(self, paused: frozenset[str], consumed: Iterable[str]) -> None:
        """``consumed``: every request queue the bridge consumes (one series each, 0 or 1)."""
        for queue in consumed:
            self.paused.labels(queue).set(1 if queue in paused else 0)

    def bind_duty(self, held: Callable[[], bool]) -> None:
        self.duty_held.set_function(lambda: 1.0 if held() else 0.0)

    def bind_clock_uncertainty(self, uncertainty_ms: Callable[[], float | None]) -> None:
        def seconds() -> float:
            u = uncertainty_ms()
            return math.inf if u is None else u / 1000

        self.clock_uncertainty.set_function(seconds)

    def set_clock_skew(self, offset_ms: float, error_ms: float) -> None:
        self.clock_skew.set(offset_ms / 1000)
        self.clock_skew_error.set(error_ms / 1000)

    def render(self) -> bytes:
        """The Prometheus text exposition of this bridge's registry."""
        return generate_latest(self.registry)
