"""``stats``: count a queue's tasks, reading Cassandra directly."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Annotated

import typer

from bridge.cli.base import (
    Failure,
    app,
    cassandra_errors,
    cassandra_where,
    fail,
    quiet_driver_logs,
    run_async,
    settings_or_exit,
)
from bridge.config import Settings
from bridge.domain.clock import AnchoredClock, SkewReading, SystemClock

if TYPE_CHECKING:
    from bridge.domain.stats import QueueStats
    from bridge.storage.repository import CassandraTaskStore


#: A queue of an owner with more registered queues than this is not looked up (an empty one is
#: then not told from a typo).
KNOWN_LOOKUP_MAX = 10_000


async def _known(store: CassandraTaskStore, owner: str, service: str) -> bool | None:
    """Whether the pair is a registered queue (an add within the registry's lifetime, 2 TTLs and
    a day); None when the owner has too many queues to look it up."""
    services = await store.services(owner, KNOWN_LOOKUP_MAX + 1)
    if service in services:
        return True
    return None if len(services) > KNOWN_LOOKUP_MAX else False


async def _stats(settings: Settings, owner: str, service: str, limit: int) -> tuple[QueueStats, bool | None]:
    from bridge.app import WRITE_LATE_MS
    from bridge.domain.records import QueueKey
    from bridge.domain.stats import queue_stats, service_stats
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.repository import CassandraTaskStore

    errors = cassandra_errors()
    where = cassandra_where(settings)
    db = CassandraSession(settings)
    try:
        try:
            await db.connect()
        except errors as exc:
            raise Failure(f"cannot connect to Cassandra at {where}: {type(exc).__name__}: {exc}") from None

        host = SystemClock(settings.clock_offset_ms)
        anchor = AnchoredClock(host) if settings.clock_source == "cassandra" else None
        clock = anchor or host
        store = CassandraTaskStore(db, clock.now_ms, settings.task_ttl_seconds)
        try:
            await store.prepare()
        except errors as exc:
            raise Failure(
                f"cannot use keyspace {settings.cassandra_keyspace!r} at {where} ({type(exc).__name__}: {exc}); "
                "does it exist? `queue-bridge schema` creates it"
            ) from None
        try:
            if anchor is not None:
                await _anchor(anchor, store)
            now = clock.now_ms()
            ttl_ms = settings.task_ttl_seconds * 1000
            # A lane with no cursor is walked from a TTL ago, not from its first bucket ever.
            walked = await queue_stats(store, owner, service, now, limit=limit, ttl_ms=ttl_ms)
            # A mistyped owner or service read as an empty, healthy queue: nothing is stored
            # under a pair nobody used. Told apart from a drained queue by the registry.
            known = await _known(store, owner, service)
            # The walk starts at the scan cursors, which scans and the live stats move past claimed
            # entries: a task leased or parked a while ago is behind them, and the walk alone said
            # 0 in flight and 0 parked for a queue with 90 leases held and 10 tasks parked. Those
            # two are also read as the stats RPC reads them (the counters, the parked index).
            margin_ms = int(settings.clock_skew_margin * 1000)
            live = await service_stats(
                store, QueueKey(owner, service), now, ttl_ms, margin_ms, margin_ms + WRITE_LATE_MS, move_cursors=False
            )
            if live.in_flight <= walked.in_flight:
                return replace(walked, parked=max(walked.parked, live.parked)), known
            # The counters' in flight includes the leases that ran out and nobody claimed since,
            # which the walk counts as ready: taken from ready, or each was counted twice (three
            # dead workers' tasks read as 3 ready and 3 in flight, a drift that does not exist).
            ready = max(0, walked.ready - walked.expired_leases)
            return replace(
                walked,
                ready=ready,
                # With none left ready, the oldest "ready" was one of those leases: no age to show.
                oldest_ready_age_s=walked.oldest_ready_age_s if ready else None,
                in_flight=live.in_flight,
                parked=max(walked.parked, live.parked),
            ), known
        except errors as exc:
            raise Failure(f"reading the queue from Cassandra at {where} failed: {type(exc).__name__}: {exc}") from None
    finally:
        await db.close()


async def _anchor(anchor: AnchoredClock, store: CassandraTaskStore) -> None:
    """Set ``anchor`` to Cassandra's time, read once (the bridges' clock with
    BRIDGE_CLOCK_SOURCE=cassandra, the default), carried on by this host's monotonic clock.

    Task ids, due times and lease deadlines are on the bridges' clock: judged against this host's
    wall clock, a host 30 s behind counted tasks ready for a worker now as delayed."""
    # On the anchor's own monotonic clock (the raw one): read on another, the time it carries was
    # off by their difference since boot (NTP's corrections, tens of seconds after weeks).
    m0 = anchor.monotonic()
    reference = await store.server_time_ms()
    m1 = anchor.monotonic()
    # As the bridge's SkewGuard reads it: the reference's true time is within [reference, +1 ms),
    # taken at the middle of the round trip. Its offset from this host is no concern here.
    anchor.offer(SkewReading(0.0, (m1 - m0) * 500 + 0.5, (m0 + m1) / 2, reference + 0.5))


def _format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@app.command()
def stats(
    service: Annotated[str, typer.Argument(metavar="SERVICE", help="The queue's serviceId.")],
    owner: Annotated[str, typer.Option("--owner", help="The queue's owner (the workers' AMQP user).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Read at most this many ready-index entries.")] = 20_000,
) -> None:
    """Count a queue's tasks: ready, in flight, delayed, parked, done, dead (reads Cassandra directly).

    The walk starts at the queue's scan cursors (all before them were claimed), so done/dead cover recent tasks
    only; in flight and parked are also read from the queue's counters and parked index.
    Tasks are judged on the bridges' clock: Cassandra's (BRIDGE_CLOCK_SOURCE=cassandra), or this host's (host).
    """
    settings = settings_or_exit()
    quiet_driver_logs()
    try:
        result, known = run_async(_stats(settings, owner, service, limit))
    except Failure as exc:
        fail(str(exc))
    if known is False:
        typer.echo(
            f"note: owner {owner!r} has no queue {service!r} registered (none of its tasks added in the last two "
            "task TTLs and a day): a typo in SERVICE or --owner?",
            err=True,
        )
    if as_json:
        typer.echo(json.dumps({"owner": owner, "service": service, **asdict(result), "known": known}, indent=2))
        return
    rows = [
        ("queue", f"{owner} / {service}"),
        ("ready", str(result.ready)),
        ("in flight", str(result.in_flight)),
        ("delayed", str(result.delayed)),
        ("parked", str(result.parked)),
        ("done", str(result.done)),
        ("dead", str(result.dead)),
        ("oldest ready", _format_age(result.oldest_ready_age_s)),
        ("scanned", f"{result.scanned} entries"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        typer.echo(f"{name:<{width}}  {value}")
    typer.echo(
        "note: done/dead count only tasks after the queue's scan cursors; in flight and parked include the counters'"
    )
    if result.truncated:
        typer.echo(f"note: stopped after --limit {limit} entries: the counts are lower bounds")
