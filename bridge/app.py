"""Wiring: settings -> storage, keys, queue, scheduler, transport; start, run, stop."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from typing import Any

import aiormq.exceptions

from bridge.config import ConfigError, Settings
from bridge.crypto import CachingKeyProvider, HttpKeyProvider, KeyProvider, KeyringFileProvider
from bridge.domain.cancellation import ConnectionCancelled, is_stray
from bridge.domain.clock import AnchoredClock, Clock, SkewGuard, SystemClock
from bridge.domain.context import CLOCK_OFF_FOR_FILING_MS
from bridge.domain.counting import QueueCounts
from bridge.domain.housekeeping import CounterTrim
from bridge.domain.queue import Limits, Metrics, WorkQueue
from bridge.domain.reconcile import Reconciliation
from bridge.domain.records import QueueKey
from bridge.domain.scheduler import RecoveryScheduler
from bridge.domain.stats import fair_share, service_stats
from bridge.errors import BridgeError
from bridge.gateway.server import GatewayServer
from bridge.observability import storage_metrics
from bridge.observability.http import OpsServer
from bridge.observability.metrics import BridgeMetrics
from bridge.observability.throttled import ThrottledWarning
from bridge.serving import ALL, ServingGate
from bridge.storage.errors import StorageUnavailable, UnknownOutcome
from bridge.storage.repository import CassandraTaskStore
from bridge.storage.schema import SchemaNotReady, ensure_schema, once_served
from bridge.storage.session import open_session
from bridge.transport.amqp import AmqpTransport, Observer
from bridge.transport.capacity import Capacity
from bridge.transport.duty import Duty
from bridge.transport.errors import BrokerUnreachable, amqp_where
from bridge.transport.hints import AmqpHints
from bridge.transport.results import ResultPublisher
from bridge.transport.topology import durable_queue_arguments

COUNTS_FLUSH_S = 1.0  # queue-count deltas are written this often (a kill -9 loses at most this much)
MAX_GAUGE_QUEUES = 1_000
# Registry rows read to choose the gauges' queues from (one small row each, by the duty holder per
# refresh), at most, in a walk that reads GAUGE_FIRST_PER_OWNER services of each owner first
# (20,000 rows: 1,000 owners), then more of those that have more while slots are left: shared out
# among their owners, so that one tenant's many services cannot push the others out.
GAUGE_QUEUES_LISTED = 20 * MAX_GAUGE_QUEUES
GAUGE_FIRST_PER_OWNER = 20
GAUGE_PAGE_MAX = 1_000  # registry rows a page of the walk reads, at most
STOP_STEP_MIN_S = 0.5  # each waiting step of a stop gets this much even past the grace
# The stop's first flush of the queue counts, even past the grace: the partitions are written side
# by side, so a second lets the healthy ones through when one stalled the flusher.
STOP_COUNTS_MIN_S = 1.0
STOP_CLOSE_MIN_S = 2.0  # the broker connections' close, even past the grace (their readers end)
# Long requests still running at the grace's end are cut at their next task's boundary, and given
# this long, even past the grace, to end there and be answered.
STOP_CUT_MIN_S = 2.0
GAUGE_EXPORT_BATCH = 50  # the first refresh after the duty comes: exported every this many queues read
READY_PING_AFTER_S = 30.0  # readiness pings Cassandra only when nothing was answered for this long
# A stop waits this long at most for the scheduler's pass and relay sweep under way to end.
SCHEDULER_STOP_S = 5.0
SCHEDULER_HUNG_AFTER_S = 60.0  # readiness: the scheduler loop has not turned for this long (hung)
START_RETRY_FIRST_S, START_RETRY_MAX_S = 1.0, 15.0  # BRIDGE_START_TIMEOUT's tries


class StartCancelled(Exception):
    """Stopped (SIGTERM) while waiting for a dependency at start."""


def _storage_unreachable() -> tuple[type[BaseException], ...]:
    """What the drivers raise for a Cassandra out of reach at start (acsylla's are mapped to
    StorageUnavailable; the datastax driver's connect is not mapped)."""
    from cassandra import OperationTimedOut
    from cassandra.cluster import NoHostAvailable

    # UnknownOutcome: the schema step's compare-and-set timed out (a node of the cluster going
    # down or coming back); it is idempotent, so tried again like an unreachable node.
    return (StorageUnavailable, UnknownOutcome, NoHostAvailable, OperationTimedOut)


WRITE_LATE_MS = 1_000  # how late a write may land after the time it was stamped with (dispatcher settle)

log = logging.getLogger("bridge.app")


def build_key_provider(settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> KeyProvider:
    """The bridge's key source; a missing or unreadable one is a :class:`ConfigError` naming its
    variable (the CLI's clients need none, so the settings alone do not require one). ``clock``
    (monotonic seconds) times the key-ring's change checks and the cache's ages (tests)."""

    def cached(upstream: KeyProvider, revalidate: Callable[[], object] | None = None) -> CachingKeyProvider:
        return CachingKeyProvider(
            upstream,
            max_entries=settings.key_cache_size,
            max_age=settings.key_cache_seconds,
            clock=clock,
            revalidate=revalidate,
            stale_if_error=settings.key_stale_if_error_seconds,
        )

    if settings.key_server_url:
        token = settings.key_server_token.get_secret_value() if settings.key_server_token else None
        try:
            server = HttpKeyProvider(
                settings.key_server_url,
                token=token,
                allow_plain_http=settings.key_server_allow_plain_http,
                timeout=settings.key_server_timeout,
            )
        except ValueError as exc:
            raise ConfigError(f"BRIDGE_KEY_SERVER_URL: {exc}") from None
        return cached(server)
    if settings.keyring is None:
        raise ConfigError("no key source: set BRIDGE_KEYRING or BRIDGE_KEY_SERVER_URL")
    try:
        ring = KeyringFileProvider(settings.keyring, clock=clock)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"BRIDGE_KEYRING: cannot use {settings.keyring}: {exc}") from None
    # The file is checked on every lookup (a stat at most once a second), hits included, and a
    # changed file empties the cache: a key rotated out (it leaked) stops sealing new tasks and a
    # removed key stops opening them at once, not key_cache_seconds (5 minutes) later.
    cache = cached(ring, ring.maybe_reload)
    ring.on_reload(cache.invalidate)
    return cache


class Bridge:
    """One bridge process: owns every long-lived resource and their order of start and stop."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        metrics: Metrics | None = None,
        observe: Observer | None = None,
    ) -> None:
        self.settings = settings
        host = SystemClock(settings.clock_offset_ms)
        # Cassandra's time, carried by the monotonic clock (unless a test injects its own clock).
        self.anchor = AnchoredClock(host) if clock is None and settings.clock_source == "cassandra" else None
        self.clock: Clock = clock or self.anchor or host
        self.db = open_session(settings, self.clock.now_ms)
        stamps = getattr(self.db, "timestamps", None)
        if self.anchor is not None and stamps is not None:
            self.anchor.on_first_anchor(stamps.rebase)
        self.store = CassandraTaskStore(
            self.db,
            self.clock.now_ms,
            settings.task_ttl_seconds,
            read_unsharded=settings.read_unsharded or settings.read_unmarked_expiries,
            request_timeout_ms=int(settings.cassandra_timeout * 1000),
            skew_margin_ms=int(settings.clock_skew_margin * 1000),
        )
        self.keys = build_key_provider(settings)
        self.metrics = BridgeMetrics(instance=settings.instance_id or socket.gethostname())
        self.metrics.set_paused(frozenset(), ALL)  # a series per queue from the start, not from the first pause
        if isinstance(self.keys, CachingKeyProvider):
            self.metrics.bind_key_cache(self.keys)
        margin_ms = int(settings.clock_skew_margin * 1000)
        self.skew = SkewGuard(
            host if self.anchor is not None else self.clock,
            self.store.server_time_ms,
            margin_ms=margin_ms,
            interval_s=settings.clock_check_interval,
            on_reading=lambda r: self.metrics.set_clock_skew(r.offset_ms, r.error_ms),
            anchor=self.anchor,
        )
        if self.anchor is not None:
            self.metrics.bind_clock_uncertainty(self.anchor.uncertainty_ms)
        # Dispatch by hints on RabbitMQ (attached when the transport connects).
        self.reconcile = Reconciliation(
            grace_ms=int(settings.hint_grace * 1000),
            interval_ms=int(settings.reconcile_interval * 1000),
            max_queues=settings.max_queues_in_memory,
        )
        # With BRIDGE_HINTS=false the bridge takes no hints (every fetch scans) but still publishes
        # them (``AmqpHints.takes``): in a fleet switched pod by pod, the bridges that take hints
        # learn of what it adds and, holding the scheduler duty, re-exposes or finds due.
        self.hints = AmqpHints(
            settings,
            on_loss=lambda: self.reconcile.alarm(self.clock.now_ms()),
            on_queue_loss=lambda q: self.reconcile.alarm_queue(q, self.clock.now_ms()),
            now_ms=self.clock.now_ms,
        )
        # One bridge of the fleet runs the recovery scheduler and the result relay (RabbitMQ elects it).
        self.duty = Duty(f"{settings.queue_prefix}.duty", queue_arguments=durable_queue_arguments(settings))
        self.metrics.bind_duty(lambda: self.duty.held)
        self.duty.on_lost(self._drop_queue_gauges)
        # Wired complete at construction: the queue publishes through this, the transport attaches it.
        self.results = ResultPublisher(settings)
        self.counts = QueueCounts()  # stats deltas, flushed about once a second
        self._start_gives_up = 0.0  # BRIDGE_START_TIMEOUT's end, on the event loop's clock
        # Each queue's last exported gauges: kept while its reads fail, so that its series (and the
        # backlog alerts on them) do not vanish when the queue is in trouble.
        # Each queue's last gauge row and when it was read (this bridge's clock, ms).
        self._gauge_rows: dict[tuple[str, str], tuple[tuple[str, str, dict[str, int], int | None], int]] = {}
        self._gauges_dropped = asyncio.Event()  # set as the duty leaves (its gauges dropped)
        self._warn_gauges_cut = ThrottledWarning(log, every_s=3600.0)
        # The duty holder deletes counter rows past every reader's window (counters take no TTL).
        self.trim = CounterTrim(self.store, self.clock, settings.task_ttl_seconds * 1000)
        self.queue = WorkQueue(
            self.store,
            self.keys,
            self.clock,
            limits=Limits(
                max_value_bytes=settings.max_value_bytes,
                default_ttr_ms=settings.default_time_to_recover_ms,
                max_ttr_ms=settings.max_time_to_recover_ms,
                skew_margin_ms=margin_ms,
                task_ttl_ms=settings.task_ttl_seconds * 1000,
                max_deliveries=settings.max_deliveries,
                service_max_deliveries=settings.service_max_deliveries,
                retry_base_ms=settings.retry_base_ms,
                retry_cap_ms=settings.retry_cap_ms,
                redrive_rate=settings.redrive_rate,
                key_missing_park_after_ms=int(settings.key_missing_park_after_seconds * 1000),
                store_timeout_ms=int(settings.cassandra_timeout * 1000),
            ),
            counts=self.counts,
            # Ready entries may land up to this long behind the clock: the skew between bridges plus
            # a slow write (a paused process), which the margin alone no longer covers once small.
            settle_ms=margin_ms + WRITE_LATE_MS,
            metrics=metrics or self.metrics,
            hints=self.hints,
            reconcile=self.reconcile if settings.hints else None,
            may_grant_leases=self.skew,
            max_lanes=2 * settings.max_queues_in_memory,  # two lanes a queue: fresh and recovered
            results=self.results,
        )
        # One count of the long lifecycle requests (purge, stats, parked, discard, redrive) for
        # AMQP and the HTTP gateway: the bound is the bridge's, whichever way they come.
        self.capacity = Capacity()
        self.transport = AmqpTransport(
            settings,
            self.queue,
            observe or self.metrics.observe,
            results=self.results,
            hints=self.hints,
            duty=self.duty,
            on_channel_down=self.metrics.set_channel_down,
            capacity=self.capacity,
        )
        self.scheduler = RecoveryScheduler(
            self.queue,
            interval_s=settings.scheduler_interval,
            late_ms=int(max(5.0, settings.clock_skew_margin * 5) * 1000),
            republish_after_ms=int(settings.result_republish_after * 1000),
            report_pending=self.metrics.set_results_pending,
            read_unmarked=settings.read_unmarked_expiries,
        )
        self.metrics.bind_scheduler(self.scheduler.state)
        self.metrics.bind_amqp_nodes(self.transport.amqp_nodes)
        storage_metrics.register(self.metrics.registry, self.db.statements, self.db.executed)
        self.ops = OpsServer(
            self.metrics,
            {
                "amqp": self._amqp_ready,
                "cassandra": self._cassandra_ready,
                "scheduler": self._scheduler_ready,
                "clock": self._clock_ready,
            },
            read_timeout=settings.http_read_timeout,
        )
        self.gate = ServingGate(
            self.transport,
            storage_up=lambda: self.db.any_host_up() and not self.db.stalled(),
            clock_ok=lambda: self.skew.ok,
            clock_far_off=self._clock_far_off,
            on_change=self._serving_changed,
            probe_storage=self.store.ping,
        )
        self.http_port: int | None = None  # the bound port once started (BRIDGE_HTTP_PORT=0: no HTTP)
        # The HTTP gateway (opt-in): the same queue, the same contract, bearer API keys.
        self.gateway = (
            GatewayServer(
                settings, self.queue, observe or self.metrics.observe, metrics=self.metrics, capacity=self.capacity
            )
            if settings.gateway_port
            else None
        )
        self.gateway_port: int | None = None
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._scheduler_task: asyncio.Task[None] | None = None
        self._counts_flusher: asyncio.Task[None] | None = None

    # -- readiness checks (GET /health/ready) ----------------------------------------------------
    async def _amqp_ready(self) -> bool:
        return self.transport.is_ready()

    async def _cassandra_ready(self) -> bool:
        """From what the bridge knows already: a node up, nothing stalled, and a statement answered
        lately. Only an idle bridge (nothing answered for READY_PING_AFTER_S) sends a probe: a ping
        per readiness call (Kubernetes' every 5 s) was the largest idle cost of a fleet, 20
        requests a second for 100 bridges."""
        if not self.db.any_host_up() or self.db.stalled():
            return False
        if self.db.answered_within(READY_PING_AFTER_S):
            return True
        await asyncio.wait_for(self.store.ping(), timeout=1.0)
        return True

    async def _scheduler_ready(self) -> bool:
        """The scheduler's loop turns (it is not hung). Not whether its ticks succeed: they run on
        the duty holder alone, and a tick failing there (an expiry partition that cannot be read)
        made that one pod unready, for as long as it lasted, while it kept the duty and served
        requests as well as any; ``scheduler_lag_seconds`` and ``scheduler_last_tick_age_seconds``
        say it, and are what to alert on. A catch-up tick (hundreds of buckets) may take seconds."""
        max_age = max(SCHEDULER_HUNG_AFTER_S, 20 * self.settings.scheduler_interval)
        return time.monotonic() - self.scheduler.state.loop_alive_monotonic < max_age

    def _clock_far_off(self) -> bool:
        """Off by more than a fail, redrive or purge may be (the lifecycle refuses them then)."""
        bound = self.skew.error_bound_ms()
        return bound is None or bound > CLOCK_OFF_FOR_FILING_MS

    async def _clock_ready(self) -> bool:
        return self.skew.ok

    async def start(self) -> None:
        # HTTP first: liveness answers while we connect; readiness stays 503 until everything is up.
        if self.settings.http_port:
            self.http_port = await _listen(
                self.ops.start, "BRIDGE_HTTP_PORT", self.settings.http_host, self.settings.http_port
            )
        # One budget for both dependencies (the Kubernetes example's startupProbe counts the whole start).
        self._start_gives_up = asyncio.get_running_loop().time() + self.settings.start_timeout
        try:
            await self._until_reachable("Cassandra", self._connect_store, _storage_unreachable())
            # Measure the clock before taking any request: a skewed bridge never grants a lease.
            # With BRIDGE_CLOCK_SOURCE=cassandra, Cassandra's time is the bridge's: until it is
            # read, the host's clock stood in for it, and a bridge whose first probe failed took
            # adds and acks on it (task ids, outbox buckets minutes off on a host minutes off).
            # With host, the host's clock is trusted only once measured: a failed first probe was
            # passed over, and with no reading the guard said ok, so a host seconds off served on
            # its own clock (and could take the duty) until the next probe, a whole
            # BRIDGE_CLOCK_CHECK_INTERVAL later (found by review, 2026-12-07). Read as Cassandra is.
            await self._until_reachable("Cassandra's clock", self._read_clock, _storage_unreachable())
            # A stop cuts a RabbitMQ attempt short (each node's attempt is bounded too, by
            # BRIDGE_AMQP_CONNECT_TIMEOUT). Not Cassandra's: acsylla's connect, cancelled, never
            # returns; its attempts end on the driver's own timeouts, and the stop is seen then.
            await self._until_reachable("RabbitMQ", self._start_transport, (BrokerUnreachable,), interruptible=True)
            if self.gateway is not None:
                self.gateway_port = await _listen(
                    self.gateway.start, "BRIDGE_GATEWAY_PORT", self.settings.gateway_host, self.settings.gateway_port
                )
            self._scheduler_task = asyncio.create_task(self.scheduler.run(self._stop, self.duty), name="scheduler")
            self._tasks.append(self._scheduler_task)
            self._tasks.append(asyncio.create_task(self.duty.run(self._stop), name="duty"))
            self._tasks.append(asyncio.create_task(self.skew.run(self._stop), name="clock"))
            self._tasks.append(asyncio.create_task(self.gate.run(self._stop), name="serving gate"))
            self._counts_flusher = asyncio.create_task(self._flush_counts(), name="queue counts")
            self._tasks.append(asyncio.create_task(self._export_queue_stats(), name="queue gauges"))
            self._tasks.append(asyncio.create_task(self.trim.run(self._stop, self.duty), name="counter trim"))
        except BaseException:
            await self._abandon_start()
            raise
        self.ops.started = True
        log.info("bridge started", extra={"http_port": self.http_port, "gateway_port": self.gateway_port})

    async def _abandon_start(self) -> None:
        """A start that failed or was stopped closes what it had opened. A gateway port that could
        not be bound (exit 2) left the bridge consuming its request queues and competing for the
        duty, its Cassandra session open, until the process ended (for ever in-process); a stop
        after Cassandra had connected left that session open."""
        if self.gateway is not None:
            await self.gateway.stop()
        with suppress(Exception):
            await self.duty.release()  # (a step-up under way, too)
        with suppress(Exception):
            await self.transport.close()
        with suppress(Exception):
            await self.db.close()
        await self.ops.stop()

    async def _connect_store(self) -> None:
        try:
            await self.db.connect()
            await ensure_schema(self.db, self.settings)
            await once_served(self.store.prepare)  # a node the schema has not reached yet: waited for
        except BaseException:
            # Closed before another try: a connected session (the schema step failed) left
            # behind was a live connection pool, heartbeats and all, per try.
            with suppress(Exception):
                await self.db.close()
            raise

    async def _read_clock(self) -> None:
        await self.skew.measure()

    async def _until_reachable(
        self,
        what: str,
        connect: Callable[[], Awaitable[None]],
        unreachable: tuple[type[BaseException], ...],
        *,
        interruptible: bool = False,
    ) -> None:
        """``connect``, tried again while ``what`` cannot be reached, for ``BRIDGE_START_TIMEOUT``.
        Exiting at once, a sidecar started during a dependency's outage (or restarted in one) went
        into a crash loop whose backoff, up to 5 minutes in Kubernetes, kept its pod down long
        after the dependency was back.

        A stop meanwhile ends the start with :class:`StartCancelled` (SIGTERM: exit 0): during the
        wait between attempts; during an attempt, which is cancelled (``interruptible``: it
        closes what it opened) or else ends first; and after an attempt that succeeded (the start
        goes no further). Only the wait looked at it: a stop during an attempt ended the start
        with the attempt's own error (exit 1), or, the attempt succeeding, not at all."""
        loop = asyncio.get_running_loop()
        gives_up = self._start_gives_up
        delay = START_RETRY_FIRST_S
        while True:
            if self._stop.is_set():
                raise StartCancelled(f"stopped before {what} was reached at start")
            try:
                if interruptible:
                    await self._unless_stopped(connect())
                else:
                    await connect()
            except unreachable as exc:
                if self._stop.is_set():
                    raise StartCancelled(f"stopped while trying {what} at start") from exc
                if loop.time() + delay > gives_up:
                    raise
                log.warning(
                    "%s at start (%s); trying again in %.0f s (BRIDGE_START_TIMEOUT)",
                    "the schema is not ready" if isinstance(exc, SchemaNotReady) else f"{what} cannot be reached",
                    exc if isinstance(exc, BridgeError) else type(exc).__name__,
                    delay,
                )
            else:
                if self._stop.is_set():  # reached as the stop came: the start goes no further
                    raise StartCancelled(f"stopped as {what} was reached at start")
                return
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            if self._stop.is_set():
                raise StartCancelled(f"stopped while waiting for {what} at start")
            delay = min(delay * 2, START_RETRY_MAX_S)

    async def _unless_stopped(self, attempt: Awaitable[None]) -> None:
        """``attempt``, cancelled if a stop comes first (:class:`StartCancelled` then)."""
        task = asyncio.ensure_future(attempt)
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not task.done():  # stopped (or this start cancelled): the attempt is abandoned
                task.cancel()
                await asyncio.wait({task})
        if task.cancelled():
            raise StartCancelled("stopped during an attempt at start")
        task.result()

    async def _start_transport(self) -> None:
        """Connect to RabbitMQ, declare the topology, consume. What the broker or the network
        refuses here (out of reach, a login refused, a declaration refused) is a
        :class:`BrokerUnreachable`, so that ``queue-bridge run`` tells it in one line."""
        try:
            await self.transport.start()
        except (OSError, aiormq.exceptions.AMQPError) as exc:  # AMQPConnectionError is an OSError
            where, password = amqp_where(self.settings.amqp_url.get_secret_value())
            if self.settings.amqp_hosts:  # every node was tried
                where = ", ".join(self.settings.amqp_hosts)
            with suppress(Exception):
                await self.transport.close()
            raise BrokerUnreachable(where, exc, secret=password) from exc
        except BaseException as exc:  # cancelled (a stop during the attempt): nothing left connected
            with suppress(Exception):
                await self.transport.close()
            if is_stray(exc):
                # Nobody cancelled the attempt: aiormq ended its connection as stuck (the handshake
                # done, then nothing) and cut the calls pending on it. Taken for a stop, the start
                # ended and the process exited 0 ("stopped"); it is an unreachable broker.
                where, password = amqp_where(self.settings.amqp_url.get_secret_value())
                if self.settings.amqp_hosts:
                    where = ", ".join(self.settings.amqp_hosts)
                cut = ConnectionCancelled("the connection was ended as stuck during the attempt")
                raise BrokerUnreachable(where, cut, secret=password) from None
            raise

    def _serving_changed(self, paused: frozenset[str]) -> None:
        self.metrics.set_paused(paused, ALL)
        # Every consumer paused: Cassandra is out of reach from here; fetches alone: this bridge's
        # clock is beyond the skew limit, and the recovery scheduler judges deadlines by it (it
        # parked leases still held and announced delayed tasks early). Either way the fleet's
        # background loops go to a bridge that can run them (``Duty.follow_storage``).
        if not self._stop.is_set():
            self.duty.follow_storage(up=not paused)

    async def _stop_gateway(self, deadline: float) -> None:
        if self.gateway is not None:
            await self.gateway.stop(deadline)

    async def _flush_counts(self) -> None:
        while not self._stop.is_set():
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=COUNTS_FLUSH_S)
            if dropped := await self.counts.flush(self.store):
                self.metrics.inc("count_updates_uncertain", dropped)

    def _count_unwritten_at_stop(self) -> None:
        """Say what of the queue counts a stop could not write (Cassandra stalled or away): they
        drift by it until those tasks leave the counts' window (docs/storage.md, "Queue counts")."""
        dropped, self.counts.dropped_by_cancel = self.counts.dropped_by_cancel, 0
        if dropped:
            self.metrics.inc("count_updates_uncertain", dropped)
        if self.counts.pending or dropped:
            # Logged as well: a counter raised moments before the process ends is rarely scraped.
            log.warning(
                "queue counts at stop: %d delta(s) not written, %d update(s) cut short (they may or may not "
                "have applied): the counts drift by them (Cassandra stalled or away)",
                self.counts.pending,
                dropped,
            )

    async def _flush_counts_once(self, timeout: float) -> None:
        """The queue-count deltas now (a stop's), bounded: a statement a queue, each waiting up to
        the driver's timeout while Cassandra stalls, and it waited for all of them."""
        with suppress(Exception):
            if dropped := await asyncio.wait_for(self.counts.flush(self.store), timeout=timeout):
                self.metrics.inc("count_updates_uncertain", dropped)

    async def _export_queue_stats(self) -> None:
        """Per-queue gauges, from the bridge holding the duty only (a fleet exports them once)."""
        if not self.settings.stats_interval:
            return  # off (the default): the stats RPC and the CLI still answer, on demand
        exported = failed = False
        while not self._stop.is_set():
            # An interval, or less when the duty comes here: the bridge it left dropped its gauges,
            # and waiting out an interval first left the fleet with none (dashboards blank and
            # alerts' `for:` started over at every move; 60 s with BRIDGE_STATS_INTERVAL=60).
            # Exported, the sleep ends as the duty leaves: it may come back to this very bridge
            # (a renewed token the broker dropped, a connection's blip), whose gauges went as it
            # left; sleeping on, it exported none for an interval and a full refresh (found by review).
            wake = self._gauges_dropped if exported else None if failed else self.duty.acquired
            await self._sleep_unless(self.settings.stats_interval, wake)
            if self._gauges_dropped.is_set():
                self._gauges_dropped.clear()
                exported = False  # dropped as the duty left: exported early once it is here again
            if not self.duty.held or self._stop.is_set():
                if exported:
                    # The duty went elsewhere: its new holder exports the queues now. Kept, this
                    # bridge's last values stayed frozen beside the new ones (a sum doubled).
                    self.metrics.set_queue_stats([])
                    exported = False
                self.metrics.set_queue_gauges_unread(0)
                failed = False
                continue
            try:
                # None exported yet (the duty just came here): exported as they are read, a batch at
                # a time. At the end only, a fleet of 1,000 queues had no series for the 8-25 s of
                # the first refresh after every move, and an alert's `for:` started over.
                rows = await self._queue_gauge_rows(None if exported else self._export_early)
            except Exception as exc:
                log.warning("queue gauges not refreshed: %s", type(exc).__name__)
                failed = True  # an interval before the next try, not at once again
                # A queue absent looks healthy: said (a new holder has no counts kept to export).
                if self.duty.held:  # (gone meanwhile: its drop said 0, the new holder says its own)
                    self.metrics.set_queue_gauges_unread(max(1, len(self._gauge_rows)))
                if exported and self.duty.held:
                    # Its last counts kept, and the oldest ready ages growing (as for one queue whose
                    # reads fail: frozen, a backlog alert never fired while the store failed).
                    now = self.clock.now_ms()
                    self.metrics.set_queue_stats(
                        [_aged(row, read_at, now) for row, read_at in self._gauge_rows.values()]
                    )
                continue
            failed = False
            if self.duty.held:  # not lost while the rows were read (its gauges were dropped then)
                self.metrics.set_queue_stats(rows)
                exported = True

    async def _sleep_unless(self, seconds: float, event: asyncio.Event | None) -> None:
        """Sleep ``seconds``, less if the bridge stops or ``event`` is set."""
        waits = [asyncio.ensure_future(self._stop.wait())]
        if event is not None:
            waits.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    def _drop_queue_gauges(self) -> None:
        """The duty left this bridge: its new holder exports the queues from now on. The rows kept
        for queues whose reads fail go too: kept, a bridge taking the duty back days later exported
        a failing queue's values from its last time as the holder."""
        self.metrics.set_queue_stats([])
        self.metrics.set_queue_gauges_unread(0)
        self._gauge_rows.clear()
        self._gauges_dropped.set()

    def _export_early(self, rows: list[tuple[str, str, dict[str, int], int | None]]) -> None:
        """The first refresh's rows read so far (the duty holder's, none exported before them)."""
        if self.duty.held:
            self.metrics.set_queue_stats(rows)

    async def _queue_gauge_rows(
        self, early: Callable[[list[tuple[str, str, dict[str, int], int | None]]], None] | None = None
    ) -> list[tuple[str, str, dict[str, int], int | None]]:
        """The gauges' rows, a queue at a time. A queue whose reads fail (its parked index full of
        tombstones after a mass redrive, a timeout) is left out of this refresh alone: one such
        queue failed the whole refresh, and every tenant's gauges froze."""
        rows = []
        now = self.clock.now_ms()
        ttl = self.settings.task_ttl_seconds * 1000
        margin = int(self.settings.clock_skew_margin * 1000)
        chosen, cut = await self._gauge_queues()
        if cut:
            self._warn_gauges_cut.warning(
                "more than %d queues: gauges for %d, shared out among their owners (the stats RPC answers for any)",
                MAX_GAUGE_QUEUES,
                MAX_GAUGE_QUEUES,
            )
        failed: list[str] = []
        last = self._gauge_rows
        kept: dict[tuple[str, str], tuple[tuple[str, str, dict[str, int], int | None], int]] = {}
        for q in chosen:
            key = (q.owner, q.service)
            try:
                s = await service_stats(
                    self.store, q, now, ttl, margin, margin + WRITE_LATE_MS, move_cursors=self.skew.ok
                )
            except Exception as exc:
                failed.append(f"{q.owner}/{q.service}: {type(exc).__name__}")
                if key in last:  # its last values, as a whole failed refresh keeps them all
                    row, read_at = kept[key] = last[key]
                    # The age of its oldest ready task goes on growing: kept as read, a queue whose
                    # reads fail (its workers dead too, perhaps) never reached a backlog alert's
                    # threshold, however long its task waited.
                    rows.append(_aged(row, read_at, now))
                continue
            states = {"ready": s.ready, "in_flight": s.in_flight, "delayed": s.delayed, "parked": s.parked}
            kept[key] = ((q.owner, q.service, states, s.oldest_ready_age_ms), now)
            rows.append(kept[key][0])
            if early is not None and len(rows) % GAUGE_EXPORT_BATCH == 0:
                early(list(rows))
        if self.duty.held:
            # Lost meanwhile, the duty's release dropped the kept rows: refilled here, a bridge
            # taking the duty back days later exported a failing queue's values from back then.
            self._gauge_rows = kept
        if failed:
            log.warning("queue gauges of %d queues not refreshed: %s", len(failed), "; ".join(failed[:5]))
        # The queues read at no refresh of this holder's have no series at all (found by review,
        # 2026-12-07: a backlog alert on them resolved at every duty move): counted here.
        if self.duty.held:
            self.metrics.set_queue_gauges_unread(len(failed))
        return rows

    async def _gauge_queues(self) -> tuple[list[QueueKey], bool]:
        """The queues whose gauges are exported (``fair_share`` of the registry), and whether some
        were left out. The registry was listed with a plain LIMIT, in token order: one tenant with
        20,000 services (a service named per workflow) took every row, and every owner after it
        lost its gauges (an absent series looks healthy). Walked a page at a time now: the first
        GAUGE_FIRST_PER_OWNER services of each owner, then, while the slots are not all taken,
        more of the owners that have more. What ``fair_share`` picks from these rows is what it
        would pick from the whole registry: an owner read only in part has at least as many rows
        as the round of slots that fills them."""
        by_owner: dict[str, list[QueueKey]] = {}  # in the registry's (token) order
        more: set[str] = set()  # owners with services not read
        kept, size, ended = 0, GAUGE_FIRST_PER_OWNER + 1, False
        after: QueueKey | None = None
        past: str | None = None  # an owner read enough of: the next page begins after it
        # The budget counts the rows kept: the one read past an owner's first services only says
        # it has more (counted, 1,000 owners of 21 services or more left 47 of them out).
        while kept < GAUGE_QUEUES_LISTED:
            limit = min(size, GAUGE_QUEUES_LISTED - kept + 1)
            if past is not None:
                page = await self.store.queues_after_owner(past, limit)
            else:
                page = await self.store.queue_page(after, limit)
            past = None
            for q in page:
                own = by_owner.setdefault(q.owner, [])
                if len(own) < GAUGE_FIRST_PER_OWNER:
                    own.append(q)
                    kept += 1
                    after = q
                else:  # on to the next owner, past this one's services
                    more.add(q.owner)
                    past = q.owner
                    break
            if past is None and len(page) < limit:
                ended = True
                break
            # Small pages where owners have many services (the rest of a page is not used), larger
            # ones while they have few (fewer reads).
            size = GAUGE_FIRST_PER_OWNER + 1 if past is not None else min(2 * size, GAUGE_PAGE_MAX)
        if not ended and past is None and after is not None:
            more.add(after.owner)  # cut by the budget: it may have more
        cap = GAUGE_FIRST_PER_OWNER
        while more and cap < MAX_GAUGE_QUEUES and sum(map(len, by_owner.values())) < MAX_GAUGE_QUEUES:
            cap = min(4 * cap, MAX_GAUGE_QUEUES)
            for owner in list(more):
                own = by_owner[owner]
                want = cap - len(own)
                mine = [q for q in await self.store.queue_page(own[-1], want + 1) if q.owner == owner]
                own.extend(mine[:want])
                if len(mine) <= want:
                    more.discard(owner)
        listed = [q for own in by_owner.values() for q in own]
        return fair_share(listed, MAX_GAUGE_QUEUES), bool(more) or not ended or len(listed) > MAX_GAUGE_QUEUES

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        """Graceful: stop consuming, finish in-flight requests, flush results, then close."""
        self._stop.set()
        grace = self.settings.shutdown_grace
        # One deadline for the steps that wait (each given the whole grace, a stop took several
        # times it, past a pod's termination grace: SIGKILL mid-stop), and each given a moment
        # at least, so that what is quick still happens.
        loop = asyncio.get_running_loop()
        ends = loop.time() + grace

        def left() -> float:
            return max(STOP_STEP_MIN_S, ends - loop.time())

        # The serving gate must not resume consumers during shutdown. The scheduler sees the stop
        # and ends its pass and its relay sweep first (awaited below): cancelled mid-step, a
        # relayed result the broker confirmed was never marked (the next holder sent it again),
        # and a park applied went uncounted.
        scheduler = self._scheduler_task
        for task in self._tasks:
            if task is not scheduler:
                task.cancel()
        # The gateway's stop begins first: new requests are answered 503 (another bridge takes
        # them) and it stops listening; those under way finish within the grace from now. Begun
        # after the duty's release and the consumers' pause (15-21 s with a broker that stopped
        # answering), the open gateway answered new long-polls null at once (the hints closed)
        # and took adds that its stop, its deadline passed, then cut: a reset, not an answer.
        if self.gateway is not None:
            self.gateway.closing()  # at once: the task below takes its first step later
        gateway_stopped = asyncio.ensure_future(self._stop_gateway(ends))
        # No new request taken from here (readiness 503): those consumed while the scheduler ended
        # its pass and the duty went (up to 8 s with a broker that stopped answering) met closed
        # hints, and long-polls were answered null at once with tasks ready (found by review).
        await _stop_step("pausing the consumers", self.transport.pause(), left())
        if scheduler is not None:
            # Bounded; past it cancelled here, before the duty goes: still running, it published
            # and moved positions beside the next holder.
            with suppress(Exception):
                await asyncio.wait_for(asyncio.shield(scheduler), timeout=min(left(), SCHEDULER_STOP_S))
            if not scheduler.done():
                scheduler.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await scheduler
        # Not the queue counts' flusher: cancelled mid-flush, it lost the deltas it had taken and
        # not yet written. It sees the stop, flushes once more and ends (awaited below).
        self.hints.close()  # fetches waiting for a task are answered now (null)
        # Another bridge takes the background loops over now.
        await _stop_step("releasing the duty", self.duty.release(), left())
        # The gateway finishes its requests (within the grace) alongside AMQP's.
        idle, _ = await asyncio.gather(self.transport.wait_idle(left()), gateway_stopped)
        if not idle:
            # Long requests acknowledged early (a redrive, a purge, a discard) end at their next
            # task's boundary and are answered (``unavailable``; a purge its ``more``): the broker
            # delivers them to nobody again. The others run on, as before.
            self.queue.ctx.background.cut_requests()
            idle = await self.transport.wait_idle(max(left(), STOP_CUT_MIN_S))
            log.warning("in-flight requests did not finish within %.1fs%s", grace, "" if idle else " (nor once cut)")
        # The counts of every request answered, written now, before the slower steps below: the
        # flusher ended as the stop began, and a SIGKILL at the grace's end lost them all.
        if self._counts_flusher is not None:
            with suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._counts_flusher), timeout=left())
            if not self._counts_flusher.done():
                # Its last flush held up (a statement stalled): ended now, it keeps what it had not
                # sent, which the flush below tries (after it, they were only logged unwritten).
                self._counts_flusher.cancel()
                with suppress(asyncio.CancelledError, Exception):
                    await self._counts_flusher
        await self._flush_counts_once(max(left(), STOP_COUNTS_MIN_S))
        self.scheduler.cancel_timers()  # best-effort timers: the timer wheel has their entries
        await self.queue.stop_background(timeout=left())
        await self._flush_counts_once(left())  # what the background work counted since
        for task in [*self._tasks, *([self._counts_flusher] if self._counts_flusher else [])]:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        self._count_unwritten_at_stop()
        await _stop_step("closing the broker connections", self.transport.close(), max(left(), STOP_CLOSE_MIN_S))
        await self.keys.close()
        await self.db.close()
        await self.ops.stop()  # liveness answers through the grace period; readiness went 503 at pause()
        log.info("bridge stopped")


async def _stop_step(what: str, step: Awaitable[None], timeout: float) -> None:
    """One broker step of a stop, bounded: past ``timeout`` it is cancelled and left behind, not
    awaited. aiormq's cancelled RPC queues a ``Channel.Close`` on its connection's writer, without
    a bound: with a connection that could not write (a broker alarm, a dead link, its writer
    queue full), ``wait_for`` waited for that cancellation, and the stop never ended (the duty
    held, the consumers not paused, until SIGKILL; found by review, 2026-12-07). A
    ``CancelledError`` of the step's own (aiormq closing a stuck connection under it) is its
    failure, not the stop's: it ended the stop before the rest of it ran."""
    task = asyncio.ensure_future(step)
    done, _ = await asyncio.wait({task}, timeout=max(timeout, STOP_STEP_MIN_S))
    if not done:
        task.cancel()
        task.add_done_callback(_retrieved)
        log.warning("stop: %s took longer than %.1fs: left behind", what, max(timeout, STOP_STEP_MIN_S))
    elif task.cancelled():
        log.warning("stop: %s was cut short by its connection's close", what)
    elif (exc := task.exception()) is not None:
        log.warning("stop: %s failed: %s", what, type(exc).__name__)


def _retrieved(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def _listen(start: Callable[[str, int], Awaitable[int]], variable: str, host: str, port: int) -> int:
    """``start(host, port)``; a port that cannot be bound (taken, not allowed, an address not of
    this machine) is a :class:`ConfigError` naming ``variable``: the operator's to change."""
    try:
        return await start(host, port)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(f"{variable}: cannot listen on {host}:{port}: {reason}") from None


def _on_signal(bridge: Bridge, sig: signal.Signals) -> None:
    """The first SIGTERM or SIGINT stops the bridge gracefully; a second one, during that stop, ends
    the process at once (an operator's second Ctrl-C, or a stop stuck on a dependency that does not
    answer): it set the same flag again, and only SIGKILL ended a stop that hung."""
    if not bridge.stop_requested:
        bridge.request_stop()
        return
    log.warning("a second %s during the stop: exiting now, without finishing it", sig.name)
    logging.shutdown()
    os._exit(128 + sig.value)  # as the signal's default action would report it


async def run_forever(settings: Settings) -> None:
    bridge = Bridge(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, bridge, sig)
    try:
        await bridge.start()
    except StartCancelled:
        log.info("stopped while waiting for a dependency at start")
        return
    try:
        await bridge.wait_stopped()
    finally:
        await bridge.stop()


def _aged(
    row: tuple[str, str, dict[str, int], int | None], read_at: int, now: int
) -> tuple[str, str, dict[str, int], int | None]:
    """A queue's gauge row read at ``read_at``, its oldest ready age as of ``now``."""
    owner, service, states, age = row
    return owner, service, states, None if age is None else age + max(0, now - read_at)
