"""Finding the next claimable task of a queue without scanning consumed ones again.

Each bridge instance keeps, per (queue, lane), a small in-memory buffer of candidates read from
the ``ready`` index, and a *position*: every entry at or before it is known to be claimed. The
buffer is only a hint. The lightweight transaction on ``leases`` decides who gets a task, so
several instances with stale buffers stay correct; they just lose a claim race now and then.

The position never moves past ``now - settle`` in time: an add computes its task id (its place in
the queue) before its write lands, and an instance's clock may lag another's. Entries younger
than the settle window are therefore re-read on later scans instead of being skipped for good.
The position is persisted in ``cursors`` (monotonic: the greatest row wins) so that restarts and
other instances start from it rather than from the beginning of the queue.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.domain.records import LANE_RECOVERED, QueueKey, ReadyEntry
from bridge.domain.store import TaskStore
from bridge.domain.timeline import MIN_TIMEUUID, READY_BUCKET_MS, ms_of, ready_bucket

SCAN_LIMIT = 64
MAX_PAGES = 16  # per refill; a later refill resumes where this one stopped
REFILLS_PER_CANDIDATE = 4  # refills one fetch runs in a row while each stops on its page budget
BUFFER_MAX_AGE_MS = 2_000
PERSIST_EVERY_MS = 1_000
EMPTY_RESCAN_MS = {LANE_RECOVERED: 100, 1: 0}
# A scan that starts afresh reads the fleet's persisted position first if this bridge's is older
# than this: every bridge of a fleet consumes every queue's requests, so each one's own position
# lagged by as long as it went without scanning the queue (about the fleet's size times the queue's
# fetch interval), and each reconciliation scan re-read the history the others had passed.
CURSOR_REREAD_MS = 5_000
RECOVERED_EXTRA_SETTLE_MS = 2_000
SPREAD_WINDOW = 32
CONTENTION_DECAY = 0.95  # per claim: a lost race weighs ~20 claims
CONTENTION_THRESHOLD = 0.1


# How far before the task TTL a walk of a lane with no stored cursor starts (``first_live_bucket``):
# covers the clocks of the bridges that added the tasks and wrote their rows (within the skew
# margin, far less than this), the whole seconds a row's TTL is rounded up to, and the index rows'
# own grace past their entries. An hour of a busy lane is 360 index rows: far from Cassandra's
# tombstone thresholds (1,000 to warn, 100,000 to fail a read).
SCAN_FLOOR_MARGIN_MS = 3_600_000


def first_live_bucket(now_ms: int, ttl_ms: int | None) -> int:
    """The first ready-index bucket a walk of a lane with no stored cursor reads (a queue never
    walked, or quiet for longer than the TTL, so that its cursor rows expired): no live task's entry
    lies in an earlier one. A task's whole life ends a TTL after the time in its id (``expires_at``,
    fixed by its add), and its entry is in the bucket of that time: a delayed task's id is its due
    time, so its entry lies ahead, not behind; a recovered entry's id is the time of its
    re-exposure, within the life of its task. Walked from bucket 0, the walk read every index row
    the lane ever wrote: on Cassandra an expired row is a tombstone, kept ``gc_grace_seconds``, and
    a busy lane's (8,640 rows a day) failed the read with too many tombstones, so fetches and stats
    of that queue answered ``unavailable`` for 10 days and more after a restart lost the hints.

    The price: after ``BRIDGE_TASK_TTL`` is lowered, tasks added under the longer TTL and older than
    the new one are not found by a walk that has no cursor (they are by their hints, and by a walk
    from a stored cursor, which is never moved back to this floor). ``ttl_ms`` None: the TTL is not
    known here, and the walk starts at bucket 0."""
    if ttl_ms is None:
        return 0
    return max(0, ready_bucket(now_ms - ttl_ms - SCAN_FLOOR_MARGIN_MS))


def settled_before(lane: int, now_ms: int, settle_ms: int) -> int:
    """Entries of ``lane`` placed before this moment have landed (no write can land before them any
    more): a position, the persisted cursor included, may move only over taken entries older than
    this. Whoever moves the cursor (a scan here, a purge, stats) follows this one rule."""
    # Recovered entries carry an id up to a second older than their write (see scheduler).
    return now_ms - settle_ms - (RECOVERED_EXTRA_SETTLE_MS if lane == LANE_RECOVERED else 0)


@dataclass
class _Lane:
    position: tuple[int, uuid.UUID | None] | None = None  # (bucket, last seq) ; None seq = bucket start
    loaded: bool = False
    cursor_read_ms: int = 0  # when the persisted position was last read (CURSOR_REREAD_MS)
    buffer: deque[ReadyEntry] = field(default_factory=deque)
    # seqs seen or tried after the position that are known to be taken; pruned as the position moves
    taken: set[uuid.UUID] = field(default_factory=set)
    # seqs handed to a fetch whose claim is still running: not offered twice, position stops before
    inflight: set[uuid.UUID] = field(default_factory=set)
    resume: tuple[int, uuid.UUID | None] | None = None
    # The last refill stopped on its page budget: there is more to read (from ``resume``, or from
    # the position when that refill moved it to where it stopped).
    more: bool = False
    # Decaying count of claim races lost on this lane: > 0 means other instances read the same
    # head, so candidates are spread at random instead of all instances trying the head first.
    contention: float = 0.0
    scanned_at_ms: int = 0
    found_nothing: bool = False  # the last refill found no candidate
    persisted_at_ms: int = 0
    persisted: tuple[int, uuid.UUID | None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _Scan:
    """One refill's walk: what it found and how far the position may move (only over entries that
    are taken and older than the settle window, with nothing unclaimed before them)."""

    def __init__(self, st: _Lane, settled_until: int, start: tuple[int, uuid.UUID | None]) -> None:
        self.st = st
        self.settled_until = settled_until
        self.start = start
        self.position = st.position
        self.movable = st.resume is None  # resuming: rows before `start` were not all re-checked now
        self.found: list[ReadyEntry] = []
        self.pages = 0
        self.resume: tuple[int, uuid.UUID | None] | None = None

    def see(self, bucket: int, row: ReadyEntry) -> None:
        st = self.st
        is_taken = row.claimed or row.seq in st.taken
        if not is_taken and row.seq not in st.inflight:
            self.found.append(row)
        if self.movable and is_taken and ms_of(row.seq) < self.settled_until:
            self.position = (bucket, row.seq)
            st.taken.discard(row.seq)
        else:
            self.movable = False

    def passed_bucket(self, bucket: int) -> None:
        if self.movable and (bucket + 1) * READY_BUCKET_MS < self.settled_until:
            self.position = (bucket + 1, None)  # drained and closed: later scans start after it
        else:
            self.movable = False


class Dispatcher:
    def __init__(
        self,
        store: TaskStore,
        now_ms: Callable[[], int],
        settle_ms: int,
        max_lanes: int = 10_000,
        *,
        ttl_ms: int | None = None,
    ) -> None:
        self.store = store
        self.now_ms = now_ms
        self.settle_ms = settle_ms
        # The tasks' TTL: a lane with no stored cursor is scanned from ``first_live_bucket``.
        self.ttl_ms = ttl_ms
        # Least recently used first. Bounded: any caller can name new serviceIds, so an unbounded map
        # would let fetches grow memory without limit (issue 13.4). A lane forgotten is only a
        # cache miss: its position is persisted in `cursors` and read back on the next fetch.
        self._lanes: OrderedDict[tuple[QueueKey, int], _Lane] = OrderedDict()
        self.max_lanes = max_lanes

    def _lane(self, q: QueueKey, lane: int) -> _Lane:
        key = (q, lane)
        st = self._lanes.get(key)
        if st is None:
            st = self._lanes[key] = _Lane()
            self._evict()
        else:
            self._lanes.move_to_end(key)
        return st

    def _evict(self) -> None:
        excess = len(self._lanes) - self.max_lanes
        if excess <= 0:
            return
        # From the least recently used, stopping once enough went: a copy of the whole map (10,000
        # lanes) at every miss made each fetch of a bridge serving more queues than it keeps walk it.
        kept: list[tuple[tuple[QueueKey, int], _Lane]] = []
        while excess > 0 and self._lanes:
            key, st = self._lanes.popitem(last=False)
            if st.inflight or st.lock.locked():
                kept.append((key, st))  # in use right now: keep it
                continue
            excess -= 1
        for key, st in reversed(kept):  # back at the front, in their order
            self._lanes[key] = st
            self._lanes.move_to_end(key, last=False)

    @property
    def lanes_in_memory(self) -> int:
        return len(self._lanes)

    async def next_candidate(self, q: QueueKey, lane: int, *, spread: bool, oldest: bool = False) -> ReadyEntry | None:
        """Pop a candidate of the lane, the oldest one unless claims on this lane have been lost to
        other instances lately (or ``spread``): then one at random among the first few. ``oldest``:
        the oldest whatever the contention."""
        st = self._lane(q, lane)
        spread = not oldest and (spread or st.contention >= CONTENTION_THRESHOLD)
        now = self.now_ms()
        if st.buffer and now - st.scanned_at_ms > BUFFER_MAX_AGE_MS:
            st.buffer.clear()
        if not st.buffer:
            # A lane found empty is not read again at once (idle workers polling a recovered lane
            # would each cost a scan); a buffer emptied by taking its entries is refilled now.
            if st.found_nothing and now - st.scanned_at_ms < EMPTY_RESCAN_MS.get(lane, 0):
                return None
            async with st.lock:
                # Another fetch may have refilled it while we waited. A refill that stopped on its
                # page budget (long runs of claimed entries) is continued a few times right away.
                for _ in range(REFILLS_PER_CANDIDATE):
                    if st.buffer:
                        break
                    await self._refill(q, lane, st)
                    if not st.more:
                        break
        if not st.buffer:
            return None
        if spread and len(st.buffer) > 1:
            # Load spreading, not secrecy.
            i = random.randrange(min(len(st.buffer), SPREAD_WINDOW))  # nosec B311
            entry = st.buffer[i]
            del st.buffer[i]
        else:
            entry = st.buffer.popleft()
        st.inflight.add(entry.seq)
        return entry

    def taken(self, q: QueueKey, entry: ReadyEntry, *, lost_race: bool = False) -> None:
        """The entry's task was claimed (by us, or by someone else: ``lost_race``): never offer it again."""
        st = self._lane(q, entry.lane)
        st.inflight.discard(entry.seq)
        st.taken.add(entry.seq)
        st.contention = st.contention * CONTENTION_DECAY + (1.0 if lost_race else 0.0)

    def more(self, q: QueueKey, lane: int) -> bool:
        """The lane's last refill stopped on its page budget: an empty answer is not an empty lane."""
        st = self._lanes.get((q, lane))
        return st is not None and st.more

    def release(self, q: QueueKey, entry: ReadyEntry) -> None:
        """The claim attempt failed for a transient reason: a later scan offers the entry again."""
        self._lane(q, entry.lane).inflight.discard(entry.seq)

    async def _refill(self, q: QueueKey, lane: int, st: _Lane) -> None:
        """Read entries after the position until some claimable ones are found (or a page budget ends).

        Entries that are claimed but too young to pass (the settle window) cannot move the
        position, so a scan may have to read past many of them: ``resume`` remembers where the
        last scan stopped so that the next one goes on from there instead of re-reading them.
        """
        now = self.now_ms()
        if not st.loaded:
            cur = await self.store.cursor(q, lane)
            st.position = (cur[0], cur[1]) if cur else None
            st.persisted = st.position
            st.loaded = True
            st.cursor_read_ms = now
        elif st.resume is None and now - st.cursor_read_ms >= CURSOR_REREAD_MS:
            await self._catch_up(q, lane, st, now)
        settled_until = settled_before(lane, now, self.settle_ms)
        # No position (no cursor stored): from the first bucket a live task's entry can be in, not
        # from bucket 0 (``first_live_bucket``). The position stays unset until the scan moves it.
        start = st.resume or st.position or (first_live_bucket(now, self.ttl_ms), None)
        scan = _Scan(st, settled_until, start=start)
        for bucket in await self.store.buckets_from(q, lane, scan.start[0], MAX_PAGES):
            exhausted = await self._scan_bucket(q, lane, bucket, scan)
            if scan.found or scan.pages >= MAX_PAGES or not exhausted:
                break
            scan.passed_bucket(bucket)
        # Went through everything there is: the next scan starts again from the position, so
        # that entries released after a failed claim, or written late, are seen again.
        st.more = scan.pages >= MAX_PAGES and not scan.found
        # Stopped on the budget with the position moved all the way (every entry read was taken
        # and settled): the next refill goes on from the position itself, and may move it again.
        # Resumed from a point past the position, a refill could not move it at all: with hints
        # on, only scans move the cursor, and a queue taking more than a refill chain's entries
        # (4,096) per reconciliation interval fell behind for good (a lost hint was found minutes
        # to days late, and every idle scan re-read the claimed history).
        st.resume = scan.resume if (st.more and not scan.movable) else None
        st.buffer.extend(scan.found)
        st.found_nothing = not scan.found
        st.scanned_at_ms = now
        st.position = scan.position
        await self._maybe_persist(q, lane, st, now)

    async def _catch_up(self, q: QueueKey, lane: int, st: _Lane, now: int) -> None:
        """Take the persisted position if another bridge (or stats, or a purge) moved it past ours:
        every entry before it is taken and settled, by the rule each of them follows."""
        st.cursor_read_ms = now
        cur = await self.store.cursor(q, lane)
        if cur is None or not _ahead(cur, st.position):
            return
        st.position = st.persisted = (cur[0], cur[1])
        # What lies before it is taken, by whoever moved it: no candidate there, nothing to remember.
        st.buffer = deque(e for e in st.buffer if e.seq.time > cur[1].time)
        st.taken = {seq for seq in st.taken if seq.time > cur[1].time}

    async def _scan_bucket(self, q: QueueKey, lane: int, bucket: int, scan: _Scan) -> bool:
        """Read one bucket page by page until something is found. True if the bucket was read to its end."""
        after = scan.start[1] if bucket == scan.start[0] else None
        while not scan.found and scan.pages < MAX_PAGES:
            rows = await self.store.scan(q, lane, bucket, after, SCAN_LIMIT)
            scan.pages += 1
            for row in rows:
                scan.see(bucket, row)
            if rows:
                after = rows[-1].seq
                scan.resume = (bucket, after)
            if len(rows) < SCAN_LIMIT:
                return True
        return False

    async def _maybe_persist(self, q: QueueKey, lane: int, st: _Lane, now: int) -> None:
        if st.position is None or st.position == st.persisted or now - st.persisted_at_ms < PERSIST_EVERY_MS:
            return
        bucket, seq = st.position
        if seq is None:
            # Persist "start of bucket" as the minimal id so that the greatest-row rule still orders it.
            seq = MIN_TIMEUUID
        await self.store.advance_cursor(q, lane, bucket, seq)
        st.persisted = st.position
        st.persisted_at_ms = now


def _ahead(cursor: tuple[int, uuid.UUID], position: tuple[int, uuid.UUID | None] | None) -> bool:
    """Whether a persisted cursor lies strictly after ``position`` in the ready index's order (by
    bucket, then by the time in the id: a tie in time is not taken as ahead, never a step back)."""
    if position is None:
        return True
    if cursor[0] != position[0]:
        return cursor[0] > position[0]
    seq = position[1]
    return seq is None or cursor[1].time > seq.time
