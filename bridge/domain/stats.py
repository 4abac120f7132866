"""Queue statistics for operators (``queue-bridge stats``): what is waiting, running, finished.

The bridge keeps no counters in Cassandra, so the numbers are computed by walking the ``ready``
index of a queue the way the dispatcher does (both lanes, from their persisted cursors, through
the registered buckets) and reading the lease of every task found. This is an operator tool: it
favours clear, explainable numbers over speed, and it is bounded by ``limit`` entries.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from bridge.domain.counting import DAY_MS, MINUTE_MS
from bridge.domain.dispatch import first_live_bucket, settled_before
from bridge.domain.records import LANE_FRESH, LANE_RECOVERED, Lease, LeaseState, ParkedEntry, QueueKey, ReadyEntry
from bridge.domain.store import TaskStore
from bridge.domain.timeline import ms_of

DEFAULT_LIMIT = 20_000
LEASE_READ_CONCURRENCY = 32
_BUCKET_PAGE = 100
_SCAN_PAGE = 1_000


@dataclass(frozen=True, slots=True)
class QueueStats:
    ready: int  # claimable now: never claimed, or its lease has expired (due for recovery)
    in_flight: int  # leased to a worker and the lease has not expired
    done: int  # acked, with a result or an error (only tasks at or after the cursors, see queue_stats)
    dead: int  # dead-lettered by the bridge: its stored ciphertext failed authentication
    oldest_ready_age_s: float | None  # how long the longest-waiting ready task has been claimable
    scanned: int  # ready-index entries read (both lanes)
    truncated: bool  # the walk stopped at ``limit``: the counts are lower bounds
    parked: int = 0  # delivered their limit of times unacked (1.4): see ``queue-bridge parked``
    delayed: int = 0  # added with a delay that has not passed yet (1.4)
    # Of ``ready``: leases that ran out and nobody claimed since (the queue's counters count them
    # in flight until then: a reader of both counts each once, ``bridge.cli.stats``).
    expired_leases: int = 0


async def walk_lane(
    store: TaskStore,
    q: QueueKey,
    lane: int,
    budget: int,
    *,
    resume: tuple[int, uuid.UUID] | None = None,
    first_bucket: int = 0,
    until_ms: int | None = None,
) -> tuple[list[ReadyEntry], bool]:
    """The entries of one lane after its persisted cursor (or after the entry ``resume``: a walk
    resumed), at most ``budget`` of them. A lane with no cursor is walked from ``first_bucket``:
    pass ``first_live_bucket`` (from bucket 0, the walk reads every index row the lane ever wrote,
    on Cassandra the expired ones as tombstones, see ``bridge.domain.dispatch``). ``until_ms``:
    the walk ends at the first entry placed later (a lane is in time order; a delayed task's entry
    sits at its due time, up to a TTL ahead, and nothing past the present is ready).

    Returns (entries, truncated); truncated is True only if at least one more entry exists.
    """
    cursor = resume if resume is not None else await store.cursor(q, lane)
    start_bucket, cursor_seq = cursor if cursor is not None else (first_bucket, None)
    entries: list[ReadyEntry] = []
    next_bucket = start_bucket
    while True:
        buckets = await store.buckets_from(q, lane, next_bucket, _BUCKET_PAGE)
        for bucket in buckets:
            after = cursor_seq if cursor is not None and bucket == start_bucket else None
            while True:
                remaining = budget - len(entries)
                # Ask for one entry more than we may take: if it comes back, the walk is truncated.
                rows = await store.scan(q, lane, bucket, after, min(_SCAN_PAGE, remaining + 1))
                if until_ms is not None and rows and ms_of(rows[-1].seq) > until_ms:
                    entries.extend(r for r in rows[:remaining] if ms_of(r.seq) <= until_ms)
                    return entries, False  # the present reached: nothing past it is ready
                if len(rows) > remaining:
                    entries.extend(rows[:remaining])
                    return entries, True
                entries.extend(rows)
                if len(rows) < min(_SCAN_PAGE, remaining + 1):
                    break  # bucket exhausted
                after = rows[-1].seq
        if len(buckets) < _BUCKET_PAGE:
            return entries, False
        next_bucket = buckets[-1] + 1


class _Counts:
    def __init__(self) -> None:
        self.ready = self.in_flight = self.done = self.dead = self.parked = self.delayed = 0
        self.expired_leases = 0
        self.oldest_ready_since: int | None = None

    def add(self, task_id: uuid.UUID, lease: Lease | None, now_ms: int) -> None:
        ready_since: int | None = None
        if lease is None and ms_of(task_id) > now_ms:
            self.delayed += 1  # a delayed task's id is its due time
        elif lease is None:
            ready_since = ms_of(task_id)
        elif lease.state is LeaseState.LEASED:
            until = lease.lease_until_ms
            if until is not None and until > now_ms:
                self.in_flight += 1
            else:
                ready_since = until if until is not None else ms_of(task_id)
                # (A redriven lease nobody claimed since, its epoch its base, is ready in the
                # counters too: not one the counters hold in flight.)
                if lease.base_epoch != lease.epoch:
                    self.expired_leases += 1
        elif lease.state in (LeaseState.DONE, LeaseState.CANCELLED, LeaseState.DISCARDED):
            self.done += 1
        elif lease.state is LeaseState.PARKED:
            self.parked += 1
        else:
            self.dead += 1
        if ready_since is not None:
            self.ready += 1
            if self.oldest_ready_since is None or ready_since < self.oldest_ready_since:
                self.oldest_ready_since = ready_since


async def queue_stats(
    store: TaskStore,
    owner: str,
    service: str,
    now_ms: int,
    *,
    limit: int = DEFAULT_LIMIT,
    ttl_ms: int | None = None,
) -> QueueStats:
    """Count the tasks of queue (owner, service) by state.

    What is walked: both lanes of the ``ready`` index, each from its persisted cursor (or, if it has
    none, from the first bucket a live task can be in, ``ttl_ms`` ago and a margin: pass the tasks'
    TTL, without it the walk starts at bucket 0), through the registered buckets, reading at most
    ``limit`` entries in all (lane 0 first). Every task found is counted once, by task id: lane-0
    entries are re-exposure pointers to tasks that also have a lane-1 entry, so a task seen in
    both lanes is one task. Its state comes from its lease (a plain, non-serial read):

    - no lease: ``ready`` (never claimed);
    - ``leased`` with ``lease_until`` > now: ``in_flight``;
    - ``leased`` with an expired lease: ``ready`` (due for recovery, or already re-exposed);
    - ``done`` (acked with a result or an error): ``done``; ``dead`` (dead-lettered): ``dead``.

    Limits, by construction of the cursors: every entry before a lane's cursor has been claimed at
    least once, so the walk does not see it. Hence ``done`` and ``dead`` count only tasks at or
    after the cursors (not the queue's history), and a task claimed long ago whose entry is behind
    the cursor shows up in ``in_flight`` / ``ready`` only once its expired lease has been
    re-exposed in lane 0 (the recovery scheduler does this shortly after the deadline). ``ready``
    is complete for never-claimed tasks. If ``truncated`` is set, all counts are lower bounds.
    ``oldest_ready_age_s`` is measured from the task's creation (never claimed) or from the expiry
    of its last lease (recovered), and is never negative.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    q = QueueKey(owner, service)
    scanned = 0
    truncated = False
    task_ids: dict[uuid.UUID, None] = {}  # insertion-ordered set
    first = first_live_bucket(now_ms, ttl_ms)
    for lane in (LANE_RECOVERED, LANE_FRESH):
        entries, lane_truncated = await walk_lane(store, q, lane, limit - scanned, first_bucket=first)
        scanned += len(entries)
        for entry in entries:
            task_ids.setdefault(entry.task_id, None)
        if lane_truncated:
            truncated = True
            break

    semaphore = asyncio.Semaphore(LEASE_READ_CONCURRENCY)

    async def read(task_id: uuid.UUID) -> Lease | None:
        async with semaphore:
            return await store.lease(q, task_id, serial=False)

    ids = list(task_ids)
    leases = await asyncio.gather(*(read(task_id) for task_id in ids))

    counts = _Counts()
    for task_id, lease in zip(ids, leases, strict=True):
        counts.add(task_id, lease, now_ms)
    ready, in_flight, done, dead = counts.ready, counts.in_flight, counts.done, counts.dead
    oldest_ready_since = counts.oldest_ready_since

    oldest_age = None if oldest_ready_since is None else max(0.0, (now_ms - oldest_ready_since) / 1000)
    return QueueStats(
        ready=ready,
        in_flight=in_flight,
        done=done,
        dead=dead,
        oldest_ready_age_s=oldest_age,
        scanned=scanned,
        truncated=truncated,
        parked=counts.parked,
        delayed=counts.delayed,
        expired_leases=counts.expired_leases,
    )


# -- live counts (the stats RPC and the gauges): no walk of the queue ---------------------------------
OLDEST_LOOKAHEAD = 64  # entries read first after a lane's cursor to find the oldest ready task
# Entries read at most per lane and request, in pages growing fourfold (64, 256, 1,024, ...), and
# only past entries already taken: a queue whose cursor lags its head costs more reads once, then
# the cursor moves past them (``_oldest_of_lane``).
OLDEST_SCAN_MAX = 4_096
LEASES_PER_READ = 50
PARKED_COUNT_MAX = 10_000
# Up to this many parked-index rows are checked against their leases (4 reads): a row outlives its
# park when a bridge dies (or a delete times out) between a redrive's, discard's or cancel's
# compare-and-set and the row's delete, and only a listing removes such rows. Counted raw, stats
# and the gauge showed tasks parked that a worker held, or that were done, until someone listed
# the queue. Past it, the rows are counted as they are (an upper bound; a listing cleans them).
PARKED_CHECKED_MAX = 200


@dataclass(frozen=True, slots=True)
class ServiceStats:
    service: str
    ready: int
    in_flight: int
    delayed: int
    parked: int
    oldest_ready_age_ms: int | None


class StatsFound(list[ServiceStats]):
    """The counts of the queues asked for (a list, as before), and the queues whose counts could
    not be read now (``unavailable``)."""

    def __init__(self, services: Iterable[ServiceStats], unavailable: Iterable[str] = ()) -> None:
        super().__init__(services)
        self.unavailable = list(unavailable)


async def service_stats(
    store: TaskStore,
    q: QueueKey,
    now_ms: int,
    ttl_ms: int,
    margin_ms: int,
    settle_ms: int,
    *,
    move_cursors: bool = True,
) -> ServiceStats:
    """The queue's counts from its counters (``bridge.domain.counting``), its parked index, and the
    first few entries after each lane's cursor (for the oldest ready task): a handful of reads,
    whatever the queue's length; the delayed read returns a row per minute that has delayed tasks
    counted (from the day a TTL ago to the last due minute: up to about 20,000 rows for a service
    that delays tasks over a week, one a minute or more). ``settle_ms`` is the dispatcher's
    (``settled_before``): stats move a lane's cursor past the taken entries they read, by the
    dispatcher's rule.

    What the counts guarantee (docs/storage.md, "Queue counts"): exact while no bridge was killed
    and no counter update timed out; otherwise they may drift, for the tasks' TTL plus up to a day.
    A ready task is never hidden by a counter drifted to zero or below: when one is found ready,
    ``ready`` is at least 1 (a lower bound then) and its age is given."""
    # The delayed minutes are read from the same day as the day counts: a delayed task's add is
    # +1 under its due minute and its claim (or cancel, purge) -1 ready under its due day. Read
    # from the minute a TTL ago, the +1 left the window up to a day before the -1, and every
    # delayed task handled hid a ready task for that long.
    first_day = (now_ms - ttl_ms) // DAY_MS
    (ready, in_flight), by_minute, parked = await asyncio.gather(
        store.counts(q, first_day),
        store.delayed(q, first_day * DAY_MS // MINUTE_MS),
        store.parked(q, PARKED_COUNT_MAX, in_order=False),  # each index's first (a task is in both)
    )
    # A delayed task is ready once its due minute has passed (to the minute).
    this_minute = now_ms // MINUTE_MS
    delayed = sum(n for minute, n in by_minute.items() if minute >= this_minute)
    ready += sum(n for minute, n in by_minute.items() if minute < this_minute)
    # The oldest ready task is looked for whatever the counter says: a counter that drifted below
    # the truth (a bridge killed -9 loses its last second of deltas) must not hide waiting tasks
    # (this age is the natural backlog alert). On a queue with nothing ready this costs up to 3
    # small reads per lane, 6 in all (its cursor, its bucket list, one page of <= 64 entries of its
    # first bucket; a lease read more for entries not yet marked taken; taken entries are paged
    # past only until the cursor moves past them): per stats request, and per
    # BRIDGE_STATS_INTERVAL for the gauges, which only the duty bridge refreshes (once per fleet,
    # whatever its size: ``App._export_queue_stats``).
    oldest, never_claimed = await _oldest_ready(
        store, q, now_ms, first_live_bucket(now_ms, ttl_ms), margin_ms, settle_ms, move_cursors
    )
    if never_claimed and ready <= 0:
        # A task never claimed waits: at least one is ready (a lower bound) whatever the drifted
        # counter says. Not for a lease that ran out (the oldest waiting may be one): that task
        # counts in flight by the contract, and was counted twice, ready and in flight.
        ready = 1
    # A task has a row in each index (one per park in ``parks``): counted once, up to the bound.
    tasks = min(len({e.task_id for e in parked}), PARKED_COUNT_MAX)
    parked_now = await _still_parked(store, q, parked) if tasks <= PARKED_CHECKED_MAX else tasks
    return ServiceStats(q.service, max(ready, 0), max(in_flight, 0), max(delayed, 0), parked_now, oldest)


async def _still_parked(store: TaskStore, q: QueueKey, rows: list[ParkedEntry]) -> int:
    """How many of the tasks of the parked-index ``rows`` have a lease that is parked (at a row's
    epoch): a task counted once, whatever its rows."""
    ids = list(dict.fromkeys(e.task_id for e in rows))
    chunks = [ids[i : i + LEASES_PER_READ] for i in range(0, len(ids), LEASES_PER_READ)]
    leases: dict[uuid.UUID, Lease] = {}
    for found in await asyncio.gather(*(store.leases_of(q, chunk) for chunk in chunks)):
        leases.update(found)
    return len(
        {
            e.task_id
            for e in rows
            if (lease := leases.get(e.task_id)) is not None
            and lease.state is LeaseState.PARKED
            and lease.epoch == e.epoch
        }
    )


async def _oldest_ready(
    store: TaskStore, q: QueueKey, now_ms: int, first_bucket: int, margin_ms: int, settle_ms: int, move: bool
) -> tuple[int | None, bool]:
    """The age of the oldest task waiting to be claimed, and whether a never-claimed one waits.
    A lane with no cursor is read from ``first_bucket`` (``walk_lane``)."""
    since: int | None = None
    never_claimed = False
    for lane in (LANE_FRESH, LANE_RECOVERED):
        at = await _oldest_of_lane(store, q, lane, now_ms, first_bucket, margin_ms, settle_ms, move)
        if at is not None:
            since = at if since is None else min(since, at)
            never_claimed = never_claimed or lane == LANE_FRESH
    return (None if since is None else max(0, now_ms - since)), never_claimed


def _ready_since(e: ReadyEntry, lease: Lease | None, now_ms: int, margin_ms: int) -> int | None:
    """When the entry's task became claimable through this entry, if it is now."""
    if e.lane == LANE_FRESH:
        return ms_of(e.task_id) if lease is None else None
    if (
        lease is not None
        and lease.is_leased
        and lease.epoch == e.epoch
        and lease.lease_until_ms is not None
        and lease.lease_until_ms + margin_ms <= now_ms
    ):
        return lease.lease_until_ms
    return None


def _taken(e: ReadyEntry, lease: Lease | None, read: bool) -> bool:
    """No claim can ever succeed through this entry (what a scan's failed claim tells the
    dispatcher): marked claimed, or its lease (if read) shows a fresh task claimed or finished, or
    a recovered one moved past the entry's epoch."""
    if e.claimed:
        return True
    if not read:
        return False
    if e.lane == LANE_FRESH:
        return lease is not None
    return lease is None or not lease.is_leased or lease.epoch != e.epoch


async def _oldest_of_lane(
    store: TaskStore,
    q: QueueKey,
    lane: int,
    now_ms: int,
    first_bucket: int,
    margin_ms: int,
    settle_ms: int,
    move: bool = True,
) -> int | None:
    """When the lane's first ready task became claimable; None if none is found within
    ``OLDEST_SCAN_MAX`` entries after the lane's cursor.

    The cursor moves only in scans (reconciliation) and purges; a queue worked through hints has
    every entry after it taken (marked claimed after each claim), and stats that read only the
    first 64 entries answered null under a backlog once 64 tasks had been handed out. So taken
    entries are paged past, and a leading run of them older than the settle window (the
    dispatcher's rule, ``settled_before``) moves the cursor past them, so later stats, scans and
    purges start after them."""
    settled = settled_before(lane, now_ms, settle_ms)
    resume: tuple[int, uuid.UUID] | None = None
    lead: tuple[int, uuid.UUID] | None = None  # the cursor may move past the entries up to here
    leading, passed, read, page = True, 0, 0, OLDEST_LOOKAHEAD
    found: int | None = None
    while found is None and read < OLDEST_SCAN_MAX:
        budget = min(page, OLDEST_SCAN_MAX - read)
        entries, more = await walk_lane(store, q, lane, budget, resume=resume, first_bucket=first_bucket)
        read += len(entries)
        leases: dict[uuid.UUID, Lease] = {}
        looked: set[uuid.UUID] = set()  # entries whose lease was read
        candidates = [e for e in entries if not e.claimed and ms_of(e.seq) <= now_ms]
        for i in range(0, len(candidates), LEASES_PER_READ):
            batch = candidates[i : i + LEASES_PER_READ]
            leases.update(await store.leases_of(q, [e.task_id for e in batch]))
            looked.update(e.seq for e in batch)
            for e in batch:
                found = _ready_since(e, leases.get(e.task_id), now_ms, margin_ms)
                if found is not None:
                    break
            if found is not None:
                break
        for e in entries:
            leading = leading and ms_of(e.seq) < settled and _taken(e, leases.get(e.task_id), e.seq in looked)
            if not leading:
                break
            lead = (e.bucket, e.seq)
            passed += 1
        # Past the present there is nothing ready: a lane is in time order.
        if not more or not entries or ms_of(entries[-1].seq) > now_ms:
            break
        resume = (entries[-1].bucket, entries[-1].seq)
        page *= 4
    if move and lead is not None and passed >= OLDEST_LOOKAHEAD:
        # Only when it saves the next stats a page: one row per advance (``cursors``). Not for
        # `queue-bridge stats` (``move`` False): a read-only command, whose host clock in host
        # mode is nobody's check, must not move a scan cursor past entries still being written.
        await store.advance_cursor(q, lane, *lead)
    return found


def fair_share(queues: list[QueueKey], limit: int) -> list[QueueKey]:
    """At most ``limit`` of ``queues``, taken a queue of each owner in turn (in the order listed,
    each owner's in its own order): the first ``limit`` as listed (Cassandra's token order of the
    owner) let one tenant with that many services push every other tenant's queues out of the
    gauges, and alerts on series that vanished never fired."""
    by_owner: dict[str, list[QueueKey]] = {}
    for q in queues:
        by_owner.setdefault(q.owner, []).append(q)
    chosen: list[QueueKey] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(own) for own in by_owner.values()):
        for own in by_owner.values():
            if depth < len(own) and len(chosen) < limit:
                chosen.append(own[depth])
        depth += 1
    return chosen


__all__ = [
    "DEFAULT_LIMIT",
    "QueueStats",
    "ServiceStats",
    "StatsFound",
    "fair_share",
    "queue_stats",
    "service_stats",
    "walk_lane",
]
