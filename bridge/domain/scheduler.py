"""The recovery scheduler and the result relay: the fleet's background loops.

One bridge of the fleet runs them at a time (``run(stop, duty)``: the duty is elected on RabbitMQ,
``bridge.transport.duty``), so their reads are paid once, not once per bridge; every action they
take is idempotent or fenced by a lease's compare-and-set, so two holders for a moment are safe.

Recovery: a bucket of lease deadlines is read once its time has passed (first pass, for speed)
and once more ``late_ms`` later (second pass, for deadlines whose write-ahead landed late); then
the cursor moves past it. Only buckets marked as holding deadlines are read (``expiry_marks``).
An expired lease is re-exposed by writing a lane-0 ``ready`` entry that points at the task and
announcing it with a hint; the next fetch of any worker claims it with ``epoch + 1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from bridge.domain.cancellation import stray_as_failure
from bridge.domain.dispatch import settled_before
from bridge.domain.errors import KeyMissing, KeysUnavailable, Unavailable
from bridge.domain.hints import Hint
from bridge.domain.lifecycle import PARK_DELIVERY_LIMIT
from bridge.domain.queue import WorkQueue
from bridge.domain.records import (
    DUE_EPOCH,
    LANE_FRESH,
    LANE_RECOVERED,
    ExpiryEntry,
    Lease,
    LeaseState,
    OutboxEntry,
    OutboxKey,
    QueueKey,
)
from bridge.domain.relay import PublishedUnmarked, may_still_land, names_entry
from bridge.domain.store import TaskStore
from bridge.domain.timeline import (
    EXPIRY_BUCKET_MS,
    MARKS_REFRESH_MS,
    OUTBOX_BUCKET_MS,
    deterministic_timeuuid,
    expiry_bucket,
    outbox_bucket,
    ready_bucket,
)
from bridge.errors import BridgeError
from bridge.observability.throttled import ThrottledWarning

log = logging.getLogger("bridge.scheduler")

EXPIRY_CURSOR = "expiries"
OUTBOX_CURSOR = "outbox"
# The expiry position is persisted on a 10 s grid (40 buckets), rounded down: every instance writes
# the same few rows (one per 10 s, whatever the fleet size) and a restart re-reads at most 10 s.
EXPIRY_PERSIST_GRID = 40
HANDLE_CONCURRENCY = 32
LEASES_PER_READ = 50  # leases read in one request (IN on the partition key: keep it small)
CATCH_UP_BATCH = 400  # expiry buckets read per tick at most (a long outage is caught up in steps)
# Outbox buckets (10 s each) swept per tick at most: a relay days behind (its saved position waits
# at the oldest result it still owes) catches up in steps, between the lease recovery passes, not
# in one tick that held recovery up (a day behind: 8,640 reads, 14 s here).
RELAY_CATCH_UP_BATCH = 50
MARKS_AHEAD = 8  # buckets (2 s) of marks read ahead of the clock: more than a refresh and a bucket
MAX_TIMERS = 100_000  # in-process timers for wheel entries due within moments (``handle_soon``)
ENTRY_RETRY_MS = 10_000  # a deadline that could not be handled is met again this much later
EXPOSE_ATTEMPTS = 2  # writes of a re-exposure: a second, placed ahead, when the first landed later than scans wait for
# A position (saved, or this holder's own) further ahead of the present than the skew margin and
# this is not trusted: a holder whose clock had jumped ahead (an NTP step of a host clock, a probe
# answered by a coordinator ahead) saved it there, and the saved positions are read greatest-first,
# so every later holder started from it and, its clock right, never read the buckets in between
# (leases of dead workers kept until their TTL, owed results never relayed, a lag of 0). Read from
# ``REWIND_LOOKBACK_MS`` before the present instead: a bucket read twice is harmless (each deadline
# is checked against its lease, each owed result against its flag), and the look-back covers what
# the holder whose clock was wrong read too early before its clock was found wrong.
# (A sound holder's position is never past its bucket of the present, and a saved one is behind the
# saver's present by the second pass's delay: two buckets beyond the margin never trip it.)
AHEAD_TOLERANCE_MS = 2 * EXPIRY_BUCKET_MS
REWIND_LOOKBACK_MS = 60_000  # at least; see ``RecoveryScheduler._lookback_ms``


RELAY_INTERVAL_S = 1.0  # the result relay sweeps once a second
RELAY_RETRY_FIRST_MS = 1_000
RELAY_RETRY_MAX_MS = 60_000
RELAY_RETRY_BUDGET_S = 2.0  # a sweep's time for buckets owing results, after its new buckets
RELAY_RETRY_KEYS_MAX = 256  # owed entries of a bucket remembered for its retry (past it: its keys read)
# Owed entries remembered over all buckets (about 440 bytes each): a service whose engine has no
# queue took a result every 10 s bucket for its results' whole life (8 days: 69,120 buckets, up
# to 256 keys each, gigabytes on the duty holder). Past it, a bucket's retry reads its keys.
RELAY_KEYS_KEPT_MAX = 100_000
RELAY_RECORD_AGAIN_MAX = 16  # owed buckets whose failed record is tried again, a sweep
# Owed results remembered as decided (about 150 bytes each): past it the oldest are read again.
OWED_DECIDED_KEPT = 100_000
STUCK_WARNING_EVERY_S = 60.0
# Each outbox bucket is read once more this long after its first sweep: a result filed under it
# can land later than that sweep (its ack took the bucket when it began, then a key lookup and
# a write near their timeouts, or a paused process), and when its own publish failed too, it
# stayed owed in a bucket nobody read again.
RELAY_SECOND_PASS_MS = 30_000


PUT_OFF_WARNINGS_KEPT = 1_000  # owners whose put-off deadlines are warned of apart (the least recent forgotten)


@dataclass(frozen=True, slots=True)
class _Retry:
    """An outbox bucket owing results: when to try it again, and how many it owes."""

    not_before_ms: int
    backoff_ms: int
    stuck: int  # results that could not be published (what ``results_stuck`` reports)
    # Its owed entries as its last read found them: the retry reads those alone. Each retry read
    # the bucket's keys whole (10,000 rows a bucket at 1,000 results a second), and a trickle of
    # results nobody could take (one a minute for a service whose engine has no queue) had the
    # duty holder re-read a day of buckets a minute, growing for the results' whole life. None:
    # not known (a bucket taken over, or too many owed), or due a whole read again (its second
    # pass: results may land late): the retry reads the bucket's keys.
    owed: tuple[OutboxKey, ...] | None = None

    @staticmethod
    def first(now: int, owed: _Owed, keys: tuple[OutboxKey, ...] | None) -> _Retry:
        return _Retry(now + RELAY_RETRY_FIRST_MS, RELAY_RETRY_FIRST_MS, owed.stuck, keys)

    def again(self, now: int, owed: _Owed, keys: tuple[OutboxKey, ...] | None) -> _Retry:
        backoff = min(self.backoff_ms * 2, RELAY_RETRY_MAX_MS)
        return _Retry(now + backoff, backoff, owed.stuck, keys)


@dataclass(frozen=True, slots=True)
class _Owed:
    """What a sweep of one outbox bucket left owed."""

    stuck: int = 0  # results that could not be published
    # Results whose decision is not on the lease yet but may still land (``may_still_land``): they
    # keep the bucket owed (retried at the backoff), but nothing failed, so they are not "stuck".
    undecided: int = 0
    keys: tuple[OutboxKey, ...] = ()  # where the owed ones are (up to RELAY_RETRY_KEYS_MAX + 1)
    unread: bool = False  # the bucket could not be read (the store failed): owed, all of it
    # Results published whose mark failed (``PublishedUnmarked``): owed a mark, not "stuck". Not
    # counted, a bucket owing only marks was taken for settled: the mark never tried again, and a
    # later holder sent the result again (found by re-review).
    unmarked: int = 0

    def __bool__(self) -> bool:
        return bool(self.stuck or self.undecided or self.unread or self.unmarked)

    def remembered(self) -> tuple[OutboxKey, ...] | None:
        return self.keys if len(self.keys) <= RELAY_RETRY_KEYS_MAX and not self.unread else None


EntryKey = tuple[str, str, object, int]  # (owner, service, task id, epoch): one deadline of one lease


def entry_key(entry: ExpiryEntry) -> EntryKey:
    return (entry.queue.owner, entry.queue.service, entry.task_id, entry.epoch)


class Duty(Protocol):
    """Whether this bridge runs the fleet's background loops now (``bridge.transport.duty``)."""

    @property
    def held(self) -> bool: ...


@dataclass
class SchedulerState:
    last_tick_monotonic: float = field(default_factory=time.monotonic)
    # Each turn of the loop, a tick that failed included: readiness asks whether the loop runs
    # (not hung), and the failures are the lag's and the last tick's age's to tell (alerts).
    loop_alive_monotonic: float = field(default_factory=time.monotonic)
    lag_ms: int = 0
    recovered: int = 0
    republished: int = 0
    results_stuck: int = 0  # unpublished results the relay could not publish (at their last try)


class RecoveryScheduler:
    def __init__(
        self,
        queue: WorkQueue,
        *,
        interval_s: float,
        late_ms: int,
        republish_after_ms: int,
        report_pending: Callable[[int], None] | None = None,
        progress_prefix: str = "",
        read_unmarked: bool = False,
    ) -> None:
        self.queue = queue
        self.store: TaskStore = queue.store
        self.interval_s = interval_s
        self.late_ms = late_ms
        self.republish_after_ms = republish_after_ms
        # A result published beside its ack keeps trying its mark until this relay would re-send it.
        queue.relay.republish_after_ms = republish_after_ms
        self.report_pending = report_pending
        self.read_unmarked = read_unmarked  # a rolling upgrade from 1.1: its deadlines carry no marks
        # Names of the persisted positions (a separate prefix gives a separate timeline, e.g. per test).
        self._expiry_cursor = progress_prefix + EXPIRY_CURSOR
        self._outbox_cursor = progress_prefix + OUTBOX_CURSOR
        # Outbox buckets still owing a publish, recorded apart from the position (which moves past
        # them): held in the position, one result nobody could take (a service whose engine has no
        # queue bound) held it back for the rest of its life, and every duty holder after a
        # handover (each rolling deploy) read a week of empty buckets, 50 a second, before the
        # results owed since (a bridge killed between an ack and its publish) went out.
        self._outbox_owed = self._outbox_cursor + ".owed"
        self._owed_recorded: set[int] = set()
        self.state = SchedulerState()
        self._timers: set[asyncio.Task[None]] = set()
        self._timer_keys: set[tuple[str, str, object, int, int]] = set()  # an entry's key and deadline
        queue.due_soon = self.handle_soon
        self._expiry_next: int | None = None  # first bucket not yet read at all
        self._expiry_confirmed: int | None = None  # first bucket not yet read for the second time
        self._handled: dict[int, set[EntryKey]] = {}
        # Deadlines whose lease was read ahead (a timer set if still held): not read ahead again.
        self._armed: dict[int, set[EntryKey]] = {}
        self._outbox_next: int | None = None
        self._outbox_retry: dict[int, _Retry] = {}  # outbox buckets owing a publish
        self._keys_left = RELAY_KEYS_KEPT_MAX  # owed keys the retries may still remember (a sweep's)
        # Owed results whose decision this holder read as applied (task id, completion id), oldest first.
        self._owed_decided: OrderedDict[tuple[uuid.UUID, uuid.UUID], None] = OrderedDict()
        # Owed results this holder published whose mark failed (``PublishedUnmarked``): only marked
        # next. Apart from ``_owed_decided``, whose oldest go first when it is full (thousands of
        # results nobody takes): evicted from there, a result was sent again (found by re-review).
        self._owed_marks: OrderedDict[tuple[uuid.UUID, uuid.UUID], None] = OrderedDict()
        self._warn_stuck = ThrottledWarning(log, every_s=STUCK_WARNING_EVERY_S)
        self._warn_exposed_late = ThrottledWarning(log)  # a slow store makes many re-exposures late at once
        self._warn_unread = ThrottledWarning(log)  # a relay read failing, for each entry of a pass
        self._outbox_second: dict[int, int] = {}  # outbox bucket -> when it is read once more
        self._outbox_persisted: int | None = None
        self._expiry_persisted: int | None = None
        self._last_outbox_ms = 0
        self._marks: set[int] = set()
        self._marks_hi = -1
        self._marks_read_ms = -(10**15)
        self._warn_ahead = ThrottledWarning(log)  # a position ahead of the present, rewound (each loop apart)
        self._warn_relay_ahead = ThrottledWarning(log)
        self._warn_tick = ThrottledWarning(log)
        self._warn_sweep = ThrottledWarning(log)
        self._put_off_warnings: dict[str, ThrottledWarning] = {}  # by owner (PUT_OFF_WARNINGS_KEPT at most)
        self._duty: Duty | None = None
        self._running = False  # ``run`` was called: with no duty (no election) this bridge is the holder

    def _forget_positions(self) -> None:
        """Not this bridge's loops any more: if the duty comes back, they start again from the
        persisted positions. Its gauges of them (lag, results the relay could not publish) would
        stay frozen at the last holder tick beside the new holder's."""
        self._forget_recovery()
        self._forget_relay()

    def _forget_recovery(self) -> None:
        self.state.lag_ms = 0
        self._expiry_next = self._expiry_confirmed = self._expiry_persisted = None
        self._handled.clear()
        self._armed.clear()
        self._marks_read_ms = -(10**15)

    def _forget_relay(self) -> None:
        if self.state.results_stuck:
            self.state.results_stuck = 0
            if self.report_pending is not None:
                self.report_pending(self.queue.results_in_flight)
        self._outbox_next = self._outbox_persisted = None
        self._outbox_retry.clear()
        self._owed_decided.clear()
        self._owed_marks.clear()
        self._outbox_second.clear()
        self._owed_recorded.clear()

    async def _refresh_marks(self, now: int, due: int) -> None:
        """Which buckets hold deadlines: read once a second (``MARKS_REFRESH_MS``), two seconds
        ahead (``MARKS_AHEAD``), so the fleet's duty holder reads one small partition a second
        instead of one per bucket (4 a second, until 2026-12-06: more than all of an idle fleet's
        other bridges' own requests). A bucket's first pass then knows of every deadline filed at
        least a refresh and a bucket before the bucket ended (a lease's own, filed its
        timeToRecover ahead) and of every one this process filed (``marked_here``: the holder's
        own, such as a heartbeated lease watched again). One another bridge files moments ahead
        (a short lease, backoff or delay, a claimer's re-arm) is met at its time by that bridge's
        own timer (``WorkQueue.soon``), and, should the timer never run (that bridge stopped or
        died), by the first pass of the bucket it is filed under once more
        (``NEAR_DEADLINE_MS`` ahead, ``CassandraTaskStore._backstop``): a second or so late."""
        assert self._expiry_confirmed is not None and self._expiry_next is not None
        # Up to the end of this tick's first-pass batch, which starts at the first pass's position
        # (about 20 buckets ahead of the second's): counted from the second's, the batch's last
        # buckets had no marks after a stall of over 100 s, and both passes skipped them as empty.
        needed = min(due + 1, max(self._expiry_next, self._expiry_confirmed) + CATCH_UP_BATCH)
        if now - self._marks_read_ms < MARKS_REFRESH_MS and needed <= self._marks_hi:
            return
        hi = needed + MARKS_AHEAD
        self._marks = await self.store.marked_expiry_buckets(self._expiry_confirmed, hi)
        self._marks_hi, self._marks_read_ms = hi, now

    def _marked(self, bucket: int) -> bool:
        return bucket in self._marks or self.store.marked_here(bucket)

    @property
    def holder(self) -> bool:
        """Whether this bridge holds the duty: its own filings need no second one (``watch_expiry``'s
        backstop), its passes know them (``marked_here``), and a successor reads every mark from
        the persisted position. A bridge that never ran the loops (no duty yet) is no holder."""
        duty = self._duty
        return self._running and (duty is None or duty.held)

    @property
    def expiry_position(self) -> int | None:
        """The first expiry bucket not yet read twice (None before the first tick)."""
        return self._expiry_confirmed

    async def run(self, stop: asyncio.Event, duty: Duty | None = None) -> None:
        """Tick while this bridge holds the fleet's scheduler duty (always, without an election).
        The result relay runs beside the recovery passes, in a loop of its own: in the same tick,
        a sweep retrying a few hundred results nobody could take (an engine with no queue bound)
        lasted seconds, and every lease of the fleet came back that much late."""
        self._duty, self._running = duty, True
        relay = asyncio.create_task(self._run_relay(stop, duty), name="result relay")
        try:
            while not stop.is_set():
                self.state.loop_alive_monotonic = time.monotonic()
                # A bridge whose clock is beyond the skew limit acts on no deadline either: it would
                # park a lease still held and announce delayed tasks early, judged by its clock (its
                # duty goes to another bridge meanwhile: ``Bridge._serving_changed``).
                if (duty is not None and not duty.held) or not self.queue.ctx.gate.ok:
                    # Another bridge runs the loops. If the duty comes here, start again from the
                    # persisted positions (the last holder's), not from what this bridge saw long ago.
                    self._forget_recovery()
                    self.state.last_tick_monotonic = time.monotonic()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=self.interval_s)
                    continue
                try:
                    with stray_as_failure():
                        await self.tick(relay=False)
                except Unavailable as exc:
                    # Throttled: a tick every 0.1 s while a token range has no quorum wrote ten
                    # lines a second on the duty holder (found by review, 2026-12-07).
                    self._warn_tick.warning("scheduler tick failed: %s", exc)
                except Exception:
                    log.exception("scheduler tick crashed; continuing")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self.pause_s())
        except BaseException:
            relay.cancel()
            raise
        finally:
            # Stopped (not cancelled): the relay ends its sweep first. Cancelled mid-sweep, results
            # the broker then confirmed were never marked, and the next holder sent them again
            # (the bridge's stop waits for both loops, bounded: ``Bridge.stop``).
            with contextlib.suppress(asyncio.CancelledError):
                await relay

    async def _run_relay(self, stop: asyncio.Event, duty: Duty | None) -> None:
        while not stop.is_set():
            if duty is not None and not duty.held:
                self._forget_relay()
                if self.report_pending is not None:
                    # This bridge's own publishes still waiting for confirms, and nothing else: the
                    # holder's figure it reported last stayed in the gauge for good once the duty
                    # had gone (an alert on pending results fired until the pod restarted).
                    self.report_pending(self.queue.results_in_flight)
            else:
                try:
                    with stray_as_failure():
                        await self._relay_sweep(self.queue.clock.now_ms())
                except Unavailable as exc:
                    self._warn_sweep.warning("result relay sweep failed: %s", exc)
                except Exception:
                    log.exception("result relay sweep crashed; continuing")
            # Once a second, holder or not: the relay never needed the tick's 100 ms, and every
            # bridge of the fleet runs this loop.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=RELAY_INTERVAL_S)

    def pause_s(self) -> float:
        """How long to wait before the next tick: the tick interval while a deadline is near (the
        running or the next bucket is marked, or the passes are catching up); otherwise until the
        next bucket begins, whose first pass then comes right after its end as before. An idle
        duty holder ticks 4 times a second instead of 10 (its CPU: 1.05-1.2% -> 0.85% of a core,
        docs/performance.md); the fleet's other bridges do not tick."""
        if self._expiry_next is None or self.read_unmarked:
            return self.interval_s
        now = self.queue.clock.now_ms()
        running = expiry_bucket(now)
        if self._expiry_next < running or self._marked(running) or self._marked(running + 1):
            return self.interval_s
        until_next_ms = (running + 1) * EXPIRY_BUCKET_MS - now + 1
        return max(self.interval_s, until_next_ms / 1000)

    async def tick(self, *, relay: bool = True) -> None:
        """One recovery pass and (``relay``; ``run`` sweeps in a loop of its own) a relay sweep."""
        now = self.queue.clock.now_ms()
        # The two loops fail apart: an expiry partition that cannot be read (a timeout, a
        # partition over Cassandra's tombstone limit) must not stop results from going out.
        failure: Exception | None = None
        try:
            await self._recover(now)
        except Exception as exc:
            failure = exc
            if self._expiry_next is not None:
                # Grows while the passes fail (an expiry partition that cannot be read): set only
                # after a bucket was read, it stayed at its last healthy value, and an alert on the
                # lag never fired for a scheduler stuck for good.
                self.state.lag_ms = max(0, now - self._expiry_next * EXPIRY_BUCKET_MS)
        if relay:
            await self._relay_tick(now)
        if failure is not None:
            raise failure
        self.state.last_tick_monotonic = time.monotonic()

    async def _relay_tick(self, now: int) -> None:
        """A relay sweep, at most once a second (or at once after the clock was set back)."""
        if now - self._last_outbox_ms >= RELAY_INTERVAL_S * 1000 or now < self._last_outbox_ms:
            await self._relay_sweep(now)

    async def _relay_sweep(self, now: int) -> None:
        await self._relay(now)
        self._last_outbox_ms = now
        if self.report_pending is not None:
            self.report_pending(self.queue.results_in_flight + self.state.results_stuck)

    # -- positions ahead of the present ------------------------------------------------------
    def _too_far_ahead(self, position_ms: int, now: int) -> bool:
        """Whether a position (the start of its bucket) is ahead of the present by more than any
        holder's clock could be (the skew margin) and the normal look-ahead (``AHEAD_TOLERANCE_MS``)."""
        return position_ms > now + self.queue.skew_margin_ms + AHEAD_TOLERANCE_MS

    def _lookback_ms(self) -> int:
        """How far before the present a rewound loop reads again: what a sound holder may still
        have to read there (its second passes, ``late_ms`` behind, the relay's second reads,
        ``republish_after`` and 30 s behind), a minute at least."""
        margin = self.queue.skew_margin_ms
        return max(
            REWIND_LOOKBACK_MS,
            self.late_ms + margin + 10_000,
            self.republish_after_ms + RELAY_SECOND_PASS_MS + OUTBOX_BUCKET_MS + margin,
        )

    def _say_rewound(self, warning: ThrottledWarning, loop: str, whose: str, ahead_ms: int) -> None:
        warning.warning(
            "%s: %s position is %.0f s ahead of the present (a clock that jumped ahead): "
            "read again from %d s before the present",
            *(loop, whose, ahead_ms / 1000, self._lookback_ms() // 1000),
        )

    def _rewind_recovery(self, now: int, position: int, whose: str) -> int:
        """A recovery position ahead of the present (``AHEAD_TOLERANCE_MS``): read from shortly
        before the present instead. What this holder knew of the buckets ahead (settled deadlines,
        leases read ahead, marks read as of a time to come) is forgotten: read once more."""
        start = expiry_bucket(now - self._lookback_ms())
        self._say_rewound(self._warn_ahead, "recovery scheduler", whose, position * EXPIRY_BUCKET_MS - now)
        self._handled.clear()
        self._armed.clear()
        self._marks, self._marks_hi, self._marks_read_ms = set(), -1, -(10**15)
        return start

    def _rewind_relay(self, now: int, position: int, whose: str) -> int:
        """As ``_rewind_recovery``, for the relay: its second reads and retries due at a time to come
        (dated by the clock ahead) are due now; the buckets ahead are read again as the walk comes."""
        start = outbox_bucket(now - self._lookback_ms())
        self._say_rewound(self._warn_relay_ahead, "result relay", whose, position * OUTBOX_BUCKET_MS - now)
        self._outbox_second = {b: min(at, now) for b, at in self._outbox_second.items() if b < start}
        late = now + RELAY_RETRY_MAX_MS
        for bucket, retry in list(self._outbox_retry.items()):
            if retry.not_before_ms > late:
                self._outbox_retry[bucket] = replace(retry, not_before_ms=now)
        self._outbox_persisted = None
        return start

    # -- recovery ----------------------------------------------------------------------------
    async def _recover(self, now: int) -> None:
        if self._expiry_next is not None and self._too_far_ahead(self._expiry_next * EXPIRY_BUCKET_MS, now):
            # This holder's own position, its clock set back (an NTP step): as for a saved one.
            start = self._rewind_recovery(now, self._expiry_next, "its")
            self._expiry_next = start
            # Never moved forward: its second passes below where they were still to come.
            confirmed = self._expiry_confirmed
            self._expiry_confirmed = start if confirmed is None else min(confirmed, start)
            self._expiry_persisted = None
        if self._expiry_next is None:
            saved = await self.store.scheduler_cursor(self._expiry_cursor, now)
            start = saved if saved is not None else expiry_bucket(now) - 1
            if saved is not None and self._too_far_ahead(saved * EXPIRY_BUCKET_MS, now):
                start = self._rewind_recovery(now, saved, "the saved")
            if saved is None:
                # The first scheduler of this keyspace: persist where it starts, or a successor
                # taking the duty before the first grid position is written would start at its
                # own present and skip every deadline in between (a broker restarted 3 s after
                # the fleet started: those leases stayed leased for good).
                await self.store.advance_scheduler_cursor(self._expiry_cursor, start, start * EXPIRY_BUCKET_MS)
                self._expiry_persisted = start
            self._expiry_next = start
            self._expiry_confirmed = start
        assert self._expiry_confirmed is not None
        due = expiry_bucket(now)  # buckets strictly below this one have fully passed
        await self._refresh_marks(now, due)
        # First pass over newly passed buckets: bounded per tick so a long outage catches up in steps.
        batch = 0
        while self._expiry_next < due and batch < CATCH_UP_BATCH:
            await self._process_bucket(self._expiry_next, now)
            self._expiry_next += 1
            batch += 1
        self.state.lag_ms = max(0, now - self._expiry_next * EXPIRY_BUCKET_MS)
        if self._expiry_next == due:
            # Caught up: also look at the bucket still running, for deadlines already past, so a
            # lease is re-exposed about one tick after it ends rather than after its whole bucket;
            # and at the deadlines still to come in it and in the next one (read once), so a lease
            # still held just before its deadline is taken back at that moment, by a timer.
            ahead = await self._process_bucket(due, now, only_expired=True)
            await self._arm(due, ahead)
            if due + 1 not in self._armed and (self._marked(due + 1) or self.read_unmarked):
                await self._arm(due + 1, await self.store.expiries(due + 1))
        # Second pass, then persist the cursor: nothing can still arrive in these buckets.
        # Only buckets that ended ``late_ms`` before the marks were read: read up to a second
        # before this tick, the marks would leave a mark stored late (a paused claimer) a second
        # less than ``late_ms`` to be seen, and a bucket passed twice unseen is never read again.
        confirm_due = expiry_bucket(min(now, self._marks_read_ms) - self.late_ms)
        moved = False
        while self._expiry_confirmed < min(confirm_due, self._expiry_next):
            await self._process_bucket(self._expiry_confirmed, now)
            self._handled.pop(self._expiry_confirmed, None)
            self._armed.pop(self._expiry_confirmed, None)
            self._expiry_confirmed += 1
            moved = True
        grid = self._expiry_confirmed - self._expiry_confirmed % EXPIRY_PERSIST_GRID
        if moved and grid != self._expiry_persisted:
            await self.store.advance_scheduler_cursor(self._expiry_cursor, grid, grid * EXPIRY_BUCKET_MS)
            self._expiry_persisted = grid

    async def _process_bucket(self, bucket: int, now: int, *, only_expired: bool = False) -> list[ExpiryEntry]:
        """Handle the bucket's deadlines (with ``only_expired``, those already past); returns the
        ones left for later (not yet past)."""
        if not self._marked(bucket) and not self.read_unmarked:
            return []  # no deadline was ever filed here
        entries = await self.store.expiries(bucket)
        later: list[ExpiryEntry] = []
        if only_expired:
            later = [e for e in entries if self._due_ms(e) > now]
            entries = [e for e in entries if self._due_ms(e) <= now]
        handled = self._handled.setdefault(bucket, set())

        async def handle(entry: ExpiryEntry, lease: Lease | None, stored: bool) -> None:
            try:
                settled = await self._handle(entry, lease, now, bucket, stored=stored)
            except Exception as exc:
                if isinstance(exc, Unavailable) and not isinstance(exc, KeyMissing | KeysUnavailable):
                    raise  # the store: the bucket is retried at the next tick, as every other entry's
                settled = await self._put_off(entry, now, exc)  # this entry's own trouble (its owner's key)
            if settled:
                handled.add(entry_key(entry))

        # Many leases can run out in the same 250 ms (a crashed worker pool): handled side by side,
        # or the last one would be re-exposed seconds after its deadline.
        errors = await self._with_leases(entries, handled, set(), handle)
        if errors:
            raise errors[0]  # the tick is retried; handled entries are not redone
        return later

    async def _put_off(self, entry: ExpiryEntry, now: int, exc: Exception) -> bool:
        """One entry that cannot be handled now (its owner's key is gone, the key server is away)
        is filed again ENTRY_RETRY_MS later, so that its bucket is done: raised, the tick retried
        the whole bucket for ever and the fleet's scheduler never got past it, so no lease of any
        owner was taken back. When even that write fails (Cassandra is away), the bucket is."""
        try:
            await self.store.watch_expiry(expiry_bucket(now + ENTRY_RETRY_MS), entry)
        except Exception:
            raise exc from None
        if not isinstance(exc, BridgeError):  # not a key trouble: a bug, traced each time
            log.warning(
                "deadline of task %s put off by %d s: %s",
                entry.task_id,
                ENTRY_RETRY_MS // 1000,
                type(exc).__name__,
                extra={"owner": entry.queue.owner, "service": entry.queue.service},
                exc_info=exc,
            )
            return True
        # Throttled per owner: an owner whose key is gone with N leases at their limit wrote N/10
        # lines a second until their TTL, hiding every other owner's (found by review, 2026-12-07).
        self._warn_put_off(entry.queue.owner).warning(
            "deadline of task %s (owner %s, service %s) put off by %d s: %s",
            entry.task_id,
            entry.queue.owner,
            entry.queue.service,
            ENTRY_RETRY_MS // 1000,
            type(exc).__name__,
        )
        return True

    def _warn_put_off(self, owner: str) -> ThrottledWarning:
        warn = self._put_off_warnings.pop(owner, None) or ThrottledWarning(log)
        self._put_off_warnings[owner] = warn  # the most recent last
        if len(self._put_off_warnings) > PUT_OFF_WARNINGS_KEPT:
            del self._put_off_warnings[next(iter(self._put_off_warnings))]
        return warn

    async def _with_leases(
        self,
        entries: list[ExpiryEntry],
        handled: set[EntryKey],
        seen: set[EntryKey],
        then: Callable[[ExpiryEntry, Lease | None, bool], Awaitable[None]],
    ) -> list[BaseException]:
        """Read the leases of the entries neither ``handled`` nor ``seen`` and pass each to ``then``
        with whether its task's row is stored (read only for due entries with no lease; True for
        the others). Entries this instance completed are settled without a read. The leases of a
        queue are read 50 to a request (most are done, acked on some bridge of the fleet: reading
        them one by one would cost a request per task), up to HANDLE_CONCURRENCY requests at once;
        so are the rows of due tasks nobody claimed yet (one by one, the reads ran in series with
        the batch's announcements: 10,000 tasks due in a minute were announced up to 285 late)."""
        by_queue: dict[QueueKey, list[ExpiryEntry]] = {}
        for entry in entries:
            key = entry_key(entry)
            if key in handled or key in seen:
                continue
            if self.queue.completed_here(entry.task_id, entry.epoch):
                handled.add(key)  # this instance acked it: no need to read the lease
                continue
            by_queue.setdefault(entry.queue, []).append(entry)
        limit = asyncio.Semaphore(HANDLE_CONCURRENCY)

        async def some(batch: list[ExpiryEntry]) -> None:
            async with limit:
                q = batch[0].queue
                leases = await self.store.leases_of(q, [e.task_id for e in batch])
                unclaimed = {e.task_id for e in batch if e.epoch == DUE_EPOCH and e.task_id not in leases}
                stored = await self.store.stored_of(q, list(unclaimed)) if unclaimed else set()
                for entry in batch:
                    t = entry.task_id
                    await then(entry, leases.get(t), t not in unclaimed or t in stored)

        groups = by_queue.values()
        pending = [some(g[i : i + LEASES_PER_READ]) for g in groups for i in range(0, len(g), LEASES_PER_READ)]
        results = await asyncio.gather(*pending, return_exceptions=True)
        return [r for r in results if isinstance(r, BaseException)]

    def _due_ms(self, entry: ExpiryEntry) -> int:
        """When the entry may be acted on: its time + the skew margin. A lease's deadline is on the
        granting bridge's clock; a delayed task's due time is on the adding bridge's (``delayMs``)
        or the engine's (``notBefore``): a bridge ahead of them by up to the margin would announce
        the task early in true time (a claim has no time condition on a due task)."""
        return entry.lease_until_ms + self.queue.skew_margin_ms

    async def _arm(self, bucket: int, entries: list[ExpiryEntry]) -> None:
        """Deadlines moments away: read their leases now (as a pass would, and only once per
        entry). Done ones are settled here; one still held gets a timer of this bridge at its
        deadline + margin (``handle_soon``), so that it is taken back then and not at the next
        tick. The passes over the bucket stay the guarantee. Delayed tasks' due entries are left to
        the adding bridge's timer and the passes."""
        handled = self._handled.setdefault(bucket, set())
        armed = self._armed.setdefault(bucket, set())

        async def arm(entry: ExpiryEntry, lease: Lease | None, _stored: bool) -> None:
            armed.add(entry_key(entry))  # read ahead once: the next ticks do not read it again
            if lease is None:
                return  # no claim yet (or one on its way): the passes look again
            if lease.state is LeaseState.PARKED and lease.epoch == entry.epoch:
                # A redrive's deadline (filed one bucket ahead, the bucket read here) whose unpark is
                # on its way keeps this epoch: taken for final, every pass of the bucket skipped it
                # and the task stayed leased to nobody until its TTL (as in ``_handle``).
                return
            if lease.is_leased and lease.epoch < entry.epoch:
                return  # its claim not seen yet (on its way, or in a Paxos round): the passes decide
            if not lease.is_leased or lease.epoch != entry.epoch:
                handled.add(entry_key(entry))  # completed or re-claimed: final for this entry
            elif lease.lease_until_ms is None or lease.lease_until_ms <= entry.lease_until_ms:
                self.handle_soon(entry, handled)  # (extended by a heartbeat: the pass re-files it)

        leases = [e for e in entries if e.epoch != DUE_EPOCH]
        for error in await self._with_leases(leases, handled, armed, arm):
            log.debug("look-ahead at bucket %s failed: %s", bucket, type(error).__name__)  # the passes handle it

    async def _lease_as_decided(
        self, entry: ExpiryEntry, lease: Lease | None, now: int, bucket: int
    ) -> Lease | bool | None:
        """The lease as the entry is judged on: read again (SERIAL) where a plain read may not show a
        decision Paxos accepted; or whether the entry is settled (a bool) without more."""
        q = entry.queue
        if lease is None and now - entry.lease_until_ms < self.late_ms:
            # No claim yet: it never applied, or it is still on its way (a claimer paused between its
            # write-ahead and its claim). Not handled: the second pass looks again.
            return False
        if lease is None or (lease.is_leased and lease.epoch < entry.epoch):
            # The lease does not show the claim this deadline was written ahead for. A claim whose
            # compare-and-set Paxos accepted but did not commit (its coordinator timed out before
            # the commit, its bridge killed -9 before any lookup) is invisible to a plain read until
            # the next round on the partition completes it: let go now, that round (another
            # bridge's claim, refused) committed it later, and the task stayed leased to a dead
            # worker with no deadline left until its TTL. A SERIAL read completes such a round
            # first. Rare: a claim written ahead and never applied. A SERIAL read fails where the
            # batched plain read did not (a round in progress to finish, an LWT-timeout storm):
            # this entry alone is put off, not every later deadline of the fleet behind it.
            try:
                lease = await self.store.lease(q, entry.task_id, serial=True)
            except Unavailable as exc:
                return await self._put_off(entry, now, exc)
        if lease is not None and lease.state is LeaseState.PARKED and lease.epoch == entry.epoch:
            # Parked at this epoch, or a redrive on its way: it files this deadline, then unparks
            # (same epoch). Settled here, the entry's key was skipped by every later pass of the
            # bucket and, the redriving bridge's own timer failing, the task stayed leased to
            # nobody for its TTL. Left unsettled, the second pass reads it again.
            if now - entry.lease_until_ms < self.late_ms:
                return False
            if bucket <= expiry_bucket(entry.lease_until_ms + self.queue.skew_margin_ms):
                # Filed in its deadline's own bucket: a claim's, whose task a fail or a pass
                # parked at this epoch since. A redrive files its deadline past that bucket.
                return True
            # The second pass over an entry filed past its deadline's bucket (a redrive's, or one
            # filed again): an unpark Paxos accepted and did not commit is invisible to a plain
            # read until the next round on the partition completes it, and after this pass
            # nothing reads the entry again. A SERIAL read completes it (rare: a redrive refused,
            # or one whose round was cut short).
            try:
                lease = await self.store.lease(q, entry.task_id, serial=True)
            except Unavailable as exc:
                return await self._put_off(entry, now, exc)
            if lease is not None and lease.state is LeaseState.PARKED and lease.epoch == entry.epoch:
                return True
        return lease

    async def _handle(
        self, entry: ExpiryEntry, lease: Lease | None, now: int, bucket: int, *, stored: bool | None = None
    ) -> bool:
        """``stored``: for a due entry with no lease, whether its task's row is stored (None: read it)."""
        q = entry.queue
        if entry.epoch == DUE_EPOCH:
            return await self._announce_due(entry, lease, now, stored)
        read = await self._lease_as_decided(entry, lease, now, bucket)
        if isinstance(read, bool):
            return read
        lease = read
        if lease is None or not lease.is_leased or lease.epoch != entry.epoch or lease.lease_until_ms is None:
            return True  # completed, re-claimed, expired by TTL, or a claim that never applied
        until = lease.lease_until_ms
        if lease.not_claimable_before(now, self.queue.skew_margin_ms):
            # Extended, or not yet past its deadline plus the skew margin (no claim could take it
            # back yet): watch it again then (idempotent row).
            again = expiry_bucket(until + self.queue.skew_margin_ms)
            await self.store.watch_expiry(
                again, ExpiryEntry(until, q, entry.task_id, lease.epoch, entry.has_token), backstop=not self.holder
            )
            # Filed again in this very bucket (extended at its deadline by less than a bucket): it
            # has the same key, so handled, every later pass of the bucket skipped it and nobody
            # ever took the task back. Left unhandled, the next pass meets the later deadline.
            return again != bucket
        # Expired. Delivered its limit of times without an ack: parked, not handed out again.
        ctx = self.queue.ctx
        limit = ctx.limits.delivery_limit(q, (await self.store.task_options(q, entry.task_id)).max_deliveries)
        if lease.deliveries_counted >= limit:
            has_token = lease.has_token if lease.has_token is not None else entry.has_token
            parked = await self.queue.lifecycle.park(
                q,
                entry.task_id,
                lease.epoch,
                has_token,
                PARK_DELIVERY_LIMIT,
                lease.deliveries_counted,
                expired_before_ms=now - self.queue.skew_margin_ms,
                # As read: an operator's redrive since (after the worker's fail parked it) leaves the
                # lease leased at this epoch and expired, and this park must not apply to it.
                base_epoch=lease.base_epoch,
                earlier_park_id=lease.park_id,
            )
            return parked or await self._watch_if_renewed(entry, now, bucket)
        # Re-expose it in the recovered lane. The id is derived from (task, epoch, time
        # of this second) so instances running the same pass write the same row. The second is
        # the clock's now, not the tick's start: scans move their position over taken entries
        # older than a couple of seconds (``dispatch``), and an entry of a tick that ran long (a
        # catch-up, thousands of deadlines at once, a slow store) dated from its start landed
        # behind them: never handed out again while its hint was lost (or with hints off).
        ahead_ms = 0
        for _ in range(EXPOSE_ATTEMPTS):
            written = self.queue.clock.now_ms()
            # (Ahead, rounded up: a second write placed as far ahead as the first one took.)
            seq_ms = max(until, written - written % 1000) if not ahead_ms else -(-(written + ahead_ms) // 1000) * 1000
            # The expiry's bucket is part of the id: a re-armed deadline (a claim that found the
            # lease not yet claimable) re-exposes the task as a new entry, which dispatchers that
            # skipped the first one will offer again.
            seq = deterministic_timeuuid(seq_ms, f"{entry.task_id}:{bucket}", entry.epoch)
            await self.store.expose_recovered(q, ready_bucket(seq_ms), seq, entry.task_id, entry.epoch, entry.has_token)
            # Its place is taken before its write: a write held up past what the scans wait for
            # (a slow store) landed behind a position that moved on, and with its hint lost (or
            # hints off) the task stayed leased to nobody. Written once more then, placed ahead by
            # as long as this write took (claimable from there): a write as slow lands in time.
            done = self.queue.clock.now_ms()
            # In time if every scan still meets it: one on a clock up to the skew margin ahead of
            # this one passes what is older than its present less the settle window (as the add
            # path judges its own entry: ``WorkQueue._lands_in_time_ms``).
            if (
                settled_before(LANE_RECOVERED, done + self.queue.skew_margin_ms, self.queue.dispatcher.settle_ms)
                <= seq_ms
            ):
                break
            ahead_ms = done - written
            self._warn_exposed_late.warning(
                "task %s re-exposed late (a slow store): written again ahead", entry.task_id
            )
        # Redriven and not claimed since: its claim moves it from ready to in flight (counts).
        redriven = lease.base_epoch == lease.epoch
        hint = Hint(entry.task_id, LANE_RECOVERED, seq, entry.epoch, entry.has_token, redriven=redriven)
        await self.queue.announce(q, hint)
        where = {"task_id": str(entry.task_id), "epoch": entry.epoch, "owner": q.owner, "service": q.service}
        if lease.worker and lease.uncounted_epoch != lease.epoch:
            # A lease that ran out: its worker was lost (or too slow). Given back (``fail``) or put
            # back (a redrive), a task's lease names no worker: counted as failed or redriven where
            # that happened, not as a lost worker here (an alert on this rate means workers dying).
            # Nor one whose worker was never handed the task (its key missing: uncounted, and in
            # ``deliveries_failed``): a key outage read as a storm of dead workers.
            self.state.recovered += 1
            self.queue.metrics.inc("tasks_recovered")
            log.info("lease expired: task re-exposed", extra=where)
        else:
            log.debug("task given back or redriven: back in the queue", extra=where)
        return True

    async def _watch_if_renewed(self, entry: ExpiryEntry, now: int, bucket: int) -> bool:
        """A park refused: completed, re-claimed or cancelled meanwhile (final for this entry), or
        renewed at the last moment (an extend or a resend after the deadline, which the contract
        allows). Extends file no deadline of their own: the later one is watched here, or nobody
        would take the task back if that worker died (it stayed leased until its TTL)."""
        margin = self.queue.skew_margin_ms
        lease = (await self.store.leases_of(entry.queue, [entry.task_id])).get(entry.task_id)
        if lease is None or not lease.is_leased or lease.epoch != entry.epoch or lease.lease_until_ms is None:
            return True
        if not lease.not_claimable_before(now, margin):
            # Still expired, not parked (the park may land late, or failed otherwise): tried again
            # from a bucket still to come. Left to "the next pass", the second pass had none: the
            # task stayed leased to nobody until its TTL, never parked, the engine never told.
            again = expiry_bucket(now) + 1
            await self.store.watch_expiry(again, entry, backstop=not self.holder)
            return again != bucket
        until = lease.lease_until_ms
        again = expiry_bucket(until + margin)
        await self.store.watch_expiry(
            again,
            ExpiryEntry(until, entry.queue, entry.task_id, lease.epoch, entry.has_token),
            backstop=not self.holder,
        )
        return again != bucket

    def handle_soon(self, entry: ExpiryEntry, handled: set[EntryKey] | None = None) -> None:
        """Handle one timer-wheel entry at its time, on this bridge (``WorkQueue.soon``). Best
        effort: cancelled at shutdown (the wheel entry stays the guarantee). ``handled``: the
        scheduler's set for the entry's bucket, which its passes then skip."""
        # One timer per deadline of a lease (the claim's own and the look-ahead's may both ask).
        # The deadline is part of the key: keyed by task and epoch alone, a fail's earlier deadline
        # on the bridge that granted a short lease was taken for the claim's, and its task came
        # back at the lease's old deadline, 1-2 s late, not at once (found by review).
        key = (*entry_key(entry), entry.lease_until_ms)
        if len(self._timers) >= MAX_TIMERS or key in self._timer_keys:
            return
        timer = asyncio.create_task(self._soon(entry, handled), name="due soon")
        self._timers.add(timer)
        self._timer_keys.add(key)

        def done(t: asyncio.Task[None]) -> None:
            self._timers.discard(t)
            self._timer_keys.discard(key)

        timer.add_done_callback(done)

    def cancel_timers(self) -> None:
        for timer in list(self._timers):
            timer.cancel()

    async def _soon(self, entry: ExpiryEntry, handled: set[EntryKey] | None = None) -> None:
        due = self._due_ms(entry)
        clock = self.queue.clock
        try:
            # Not a millisecond early: the event loop's timers may fire a little before their time,
            # and a lease met before its deadline + margin is only watched again.
            for _ in range(3):  # a timer, not a wait for a condition: at most a remainder more
                wait_ms = due - clock.now_ms()
                if wait_ms <= 0:
                    break
                await asyncio.sleep(max(wait_ms, 1) / 1000)
            if not self.queue.ctx.gate.ok:
                return  # this bridge's clock is beyond the skew limit: the wheel entry is met elsewhere
            if entry.epoch != DUE_EPOCH and self.queue.completed_here(entry.task_id, entry.epoch):
                return  # acked through this bridge: nothing to read
            # Not told the passes' outcomes (nor they its own, but through ``handled`` for the
            # look-ahead's timers): their marks are per task and epoch, not per deadline, and a mark
            # left by another deadline of the lease (a claim's, met before a fail's just after it; a
            # look-ahead that read the lease before the claim landed) made a timer skip its own and
            # every pass skip it after: a task leased to nobody until its TTL. Met by both before
            # any claim, a deadline re-exposes its task twice (docs/reliability.md, known limits).
            lease = await self.store.lease(entry.queue, entry.task_id, serial=False)
            now = clock.now_ms()
            settled = await self._handle(entry, lease, now, expiry_bucket(due))
            # Watched again (extended meanwhile) is not settled: the later deadline is a new entry,
            # but the same entry re-filed in the same bucket must still be met by the passes.
            rewatched = (
                lease is not None
                and lease.epoch == entry.epoch
                and lease.not_claimable_before(now, self.queue.skew_margin_ms)
            )
            if settled and handled is not None and not rewatched:
                handled.add(entry_key(entry))
        except Exception as exc:  # the wheel entry is met by the scheduler anyway
            log.debug("timer for task %s failed: %s", entry.task_id, type(exc).__name__)

    async def _announce_due(self, entry: ExpiryEntry, lease: Lease | None, now: int, stored: bool | None) -> bool:
        """A delayed task's time has come: a hint for it, as for a task just added (nothing if it was
        cancelled or already claimed, by a reconciliation scan)."""
        if lease is None:
            q = entry.queue
            if stored is None:
                stored = bool(await self.store.stored_of(q, [entry.task_id]))
            if not stored:
                # The due entry is written ahead of the task's row, which is not there yet (a slow
                # write): announced now, a waiting worker's claim leased a task it could not be
                # handed, and the delivery counted. Looked at again by the next pass, until late:
                # then the add died before its write, and there is nothing to announce.
                return now - entry.lease_until_ms >= self.late_ms
            hint = Hint(entry.task_id, LANE_FRESH, entry.task_id, None, entry.has_token, priority=entry.priority)
            await self.queue.announce(q, hint)
            self.queue.metrics.inc("tasks_due")
        return True

    # -- result relay ------------------------------------------------------------------------
    async def _relay(self, now: int) -> None:
        if self._outbox_next is not None and self._too_far_ahead(self._outbox_next * OUTBOX_BUCKET_MS, now):
            # This holder's own position, its clock set back (an NTP step): as for a saved one.
            self._outbox_next = self._rewind_relay(now, self._outbox_next, "its")
        if self._outbox_next is None:
            saved = await self.store.scheduler_cursor(self._outbox_cursor, now)
            recorded = await self.store.owed_positions(self._outbox_owed, now)
            self._outbox_next = saved if saved is not None else outbox_bucket(now) - 1
            if saved is not None and self._too_far_ahead(saved * OUTBOX_BUCKET_MS, now):
                self._outbox_next = self._rewind_relay(now, saved, "the saved")
            for bucket in sorted(b for b in recorded if b < self._outbox_next):
                self._outbox_retry.setdefault(bucket, _Retry(now, RELAY_RETRY_FIRST_MS, 0))  # at once
                self._owed_recorded.add(bucket)
        self._keys_left = RELAY_KEYS_KEPT_MAX - sum(len(r.owed or ()) for r in self._outbox_retry.values())
        # Only buckets old enough that their normal publish must have happened are swept.
        limit = min(outbox_bucket(now - self.republish_after_ms), self._outbox_next + RELAY_CATCH_UP_BATCH)
        # New buckets and second reads first, then the buckets owing results: a tenant whose
        # results are never confirmed (its queue without a majority holds the confirms: 15 s a
        # page) made each retry of its buckets wait, one after the other, and the results of every
        # other tenant behind them waited for the whole pass (16 minutes for 64 such buckets).
        for bucket, again_at in sorted(self._outbox_second.items()):
            if now < again_at:
                continue
            if (retry := self._outbox_retry.get(bucket)) is not None:
                # Owing already: its next retry reads it whole once more, for what landed late.
                self._outbox_retry[bucket] = replace(retry, owed=None)
            elif owed := await self._relay_bucket_or_owe(bucket, now):
                self._outbox_retry[bucket] = _Retry.first(now, owed, self._remember(owed))
                await self._record_owed(bucket)
            # Only once read: taken off before, a read that failed (a timeout, likely while results
            # land late) lost the bucket, and a result in it stayed owed for good.
            del self._outbox_second[bucket]
        while self._outbox_next < limit:
            if owed := await self._relay_bucket_or_owe(self._outbox_next, now):
                self._outbox_retry[self._outbox_next] = _Retry.first(now, owed, self._remember(owed))
                await self._record_owed(self._outbox_next)
            self._outbox_second[self._outbox_next] = now + RELAY_SECOND_PASS_MS
            self._outbox_next += 1
        await self._retry_owed(now)
        await self._record_owed_again()
        self.state.results_stuck = sum(r.stuck for r in self._outbox_retry.values())
        # Persist only up to the first bucket still owing its second read, or a publish it could not
        # record apart (``_record_owed``), so a restart (or the next duty holder) reads it again.
        unrecorded = [b for b in self._outbox_retry if b not in self._owed_recorded]
        safe = min([*unrecorded, *self._outbox_second, self._outbox_next])
        if safe != self._outbox_persisted:
            await self.store.advance_scheduler_cursor(self._outbox_cursor, safe, safe * OUTBOX_BUCKET_MS)
            self._outbox_persisted = safe

    def _remember(self, owed: _Owed) -> tuple[OutboxKey, ...] | None:
        """The owed keys a bucket's retry reads alone, within what the relay keeps in all."""
        keys = owed.remembered()
        if keys is None or len(keys) > self._keys_left:
            return None
        self._keys_left -= len(keys)
        return keys

    async def _retry_owed(self, now: int) -> None:
        """Buckets with a result that could not be published are retried, but they do not hold up
        the buckets after them (one unroutable result must not delay all others). Each is retried
        later and later (1 s, doubling, up to a minute): every sweep, a few hundred results nobody
        can take (an engine with no queue bound) cost 3 requests each a second. Those that failed
        fewer times first (the longest due first among them), and for ``RELAY_RETRY_BUDGET_S`` a
        sweep: the rest wait for the next sweep, after its new buckets (the sweep is one loop: a
        pass over every owed bucket held them all). So a tenant whose results keep failing (its
        confirms never come: 15 s a bucket) takes a bucket's time a sweep, and another tenant's
        result that failed once goes before its buckets."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + RELAY_RETRY_BUDGET_S
        due = sorted(
            (retry.backoff_ms, retry.not_before_ms, bucket)
            for bucket, retry in self._outbox_retry.items()
            if retry.not_before_ms <= now
        )
        for _, _, bucket in due:
            if loop.time() >= ends:
                break
            retry = self._outbox_retry[bucket]
            owed = await self._relay_bucket_or_owe(bucket, now, retry.owed)
            if owed:
                self._keys_left += len(retry.owed or ())  # replaced by what this read left
                self._outbox_retry[bucket] = retry.again(now, owed, self._remember(owed))
            else:
                del self._outbox_retry[bucket]
                await self._settled(bucket)

    async def _record_owed_again(self) -> None:
        """Buckets owing results whose record failed (``_record_owed``) are recorded again, a few a
        sweep: recorded once only, one failure left the position waiting at that bucket for as long
        as it owed (the result's life), and the next duty holder read every bucket from there."""
        for bucket in [b for b in self._outbox_retry if b not in self._owed_recorded][:RELAY_RECORD_AGAIN_MAX]:
            await self._record_owed(bucket)

    async def _relay_bucket_or_owe(self, bucket: int, now: int, keys: Sequence[OutboxKey] | None = None) -> _Owed:
        """``_relay_bucket``, with a bucket that could not be read owed whole (retried at the
        backoff) instead of stopping the sweep: raised, one bucket whose partition had lost its
        quorum stopped the relay of every tenant's results (the new buckets after it, the owed
        buckets sorted after it) until it could be read."""
        try:
            return await self._relay_bucket(bucket, now, keys)
        except Exception as exc:
            self._warn_unread.warning("result relay: outbox bucket %s not read (%s): retried later", bucket, exc)
            return _Owed(unread=True)

    async def _record_owed(self, bucket: int) -> None:
        """Record a bucket owing a publish apart from the position, which may then move past it."""
        try:
            await self.store.remember_owed(self._outbox_owed, bucket, bucket * OUTBOX_BUCKET_MS)
        except Exception as exc:  # kept in the position instead, as before
            log.warning("result relay: an owed bucket not recorded (%s); the position waits at it", exc)
            return
        self._owed_recorded.add(bucket)

    async def _settled(self, bucket: int) -> None:
        if bucket not in self._owed_recorded:
            return
        self._owed_recorded.discard(bucket)
        try:
            await self.store.forget_owed(self._outbox_owed, bucket, bucket * OUTBOX_BUCKET_MS)
        except Exception as exc:  # the next holder reads the bucket once more, finds nothing owed
            log.info("result relay: a settled bucket's record not removed (%s)", type(exc).__name__)

    async def _relay_bucket(self, bucket: int, now: int, keys: Sequence[OutboxKey] | None = None) -> _Owed:
        """Publish the bucket's owed results (those at ``keys`` only, when given); what is still
        owed (not published, or undecided), and where."""
        stuck = undecided = unmarked = 0
        owed_at: list[OutboxKey] = []
        seen: set[tuple[QueueKey, uuid.UUID, uuid.UUID]] = set()
        pages = self.store.outbox_pages(bucket) if keys is None else self.store.outbox_pages_of(bucket, keys)
        async for page in pages:  # one page of results in memory at a time
            seen.update((e.queue, e.task_id, e.completion_id) for e in page)
            # A page's entries side by side (a lease read at SERIAL and a publish each): one after
            # the other, the results owed after an hour's broker outage (180,000 at 50 a second)
            # took minutes a sweep, and those owed since waited behind them.
            outcomes = await asyncio.gather(*(self._relay_entry(e, now) for e in page), return_exceptions=True)
            for entry, owed in zip(page, outcomes, strict=True):
                if isinstance(owed, asyncio.CancelledError) or not isinstance(owed, Exception | str | None):
                    raise owed
                if isinstance(owed, Exception):
                    # Its lease or its decisions could not be read (their partition without a
                    # quorum): owed still, retried at the backoff; the bucket's others go on.
                    self._warn_unread.warning("result relay: result of task %s not relayed (%s)", entry.task_id, owed)
                    owed = "undecided"
                stuck, undecided = stuck + (owed == "stuck"), undecided + (owed == "undecided")
                unmarked += owed == "unmarked"
                if owed is not None and len(owed_at) <= RELAY_RETRY_KEYS_MAX:
                    owed_at.append(OutboxKey.of(entry))
        for key in keys or ():
            if (key.queue, key.task_id, key.completion_id) not in seen:
                self._ended_owed(key)
        return _Owed(stuck, undecided, tuple(owed_at), unmarked=unmarked)

    def _ended_owed(self, key: OutboxKey) -> None:
        """A result this holder still owed, whose row has ended (its task's life plus
        ``RESULT_OWED_MS``) before it could go out: said and counted, once (the key is not
        remembered again). Settled in silence, ``results_pending`` fell as if it had been sent."""
        decided = (key.task_id, key.completion_id)
        if decided in self._owed_marks:
            del self._owed_marks[decided]
            return  # published: only its mark was owed
        log.error(
            "result of task %s (%s/%s) not published: it was owed until its row's end (the task's life plus a "
            "day) and could not go out (no queue bound for its results, its key missing?)",
            key.task_id,
            key.queue.owner,
            key.queue.service,
        )
        self.queue.metrics.inc("results_dropped", reason="expired")

    def _remember_decided(self, decided: tuple[uuid.UUID, uuid.UUID]) -> None:
        self._owed_decided[decided] = None
        if len(self._owed_decided) > OWED_DECIDED_KEPT:
            self._owed_decided.popitem(last=False)

    async def _relay_entry(self, entry: OutboxEntry, now: int) -> str | None:
        """Publish one owed result: None once done (published, or void), else why it is still
        owed ("undecided": its decision may still land; "stuck": the publish failed; "unmarked":
        published, its mark failed)."""
        decided = (entry.task_id, entry.completion_id)
        if entry.published:
            self._owed_marks.pop(decided, None)
            return None
        if decided in self._owed_marks:
            # Published by this holder, its mark failed: marked now, not published again (a blip
            # of Cassandra under the holder's mark sent the engine the result again a second later).
            try:
                await self.queue.relay.mark(entry)
            except Exception:
                return "unmarked"
            self._owed_marks.pop(decided, None)
            return None
        if decided not in self._owed_decided:
            lease = await self.store.lease(entry.queue, entry.task_id, serial=True)
            if lease is None and entry.completion_id in await self.store.decisions(entry.queue, entry.task_id):
                # The task's life ended (its lease reads as none) with its result still owed: the
                # decision's id outlives it as the result does (RESULT_OWED_MS). Sent, not voided.
                pass
            elif not names_entry(lease, entry):
                if may_still_land(lease, entry, now):
                    log.debug("result of task %s kept: its decision may still land", entry.task_id)
                    return "undecided"
                await self.store.mark_published(entry)  # void: the decision never applied, and can no longer
                return None
            # Decided, and a decision that applied stays applied: the next sweeps publish it without
            # a Paxos read each (results nobody can take, thousands owed, were each read at SERIAL
            # every minute for their whole life).
            self._remember_decided(decided)
        log.debug("re-publishing the pending result of task %s", entry.task_id)
        try:
            with stray_as_failure():
                await self.queue.publish(entry)
        except PublishedUnmarked:
            self._owed_decided.pop(decided, None)
            self._owed_marks[decided] = None
            if len(self._owed_marks) > OWED_DECIDED_KEPT:  # marks failing by the 100,000: sent again
                self._owed_marks.popitem(last=False)
            self.state.republished += 1
            self.queue.metrics.inc("results_republished")
            return "unmarked"
        except Exception as exc:  # broker down, no queue bound, a stuck connection, ...: keep it pending
            # One line for them all, not one per result and sweep: a backlog of results nobody can
            # take wrote thousands a second (counted in the results-stuck gauge).
            self._warn_stuck.warning(
                "results still not published (the latest: task %s, %s)", entry.task_id, type(exc).__name__
            )
            return "stuck"
        self._owed_decided.pop(decided, None)
        self.state.republished += 1
        self.queue.metrics.inc("results_republished")
        return None


__all__ = ["OUTBOX_BUCKET_MS", "RecoveryScheduler"]
