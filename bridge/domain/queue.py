"""The work queue: add, fetch and ack with at-least-once delivery across bridge instances.

``WorkQueue`` is the domain's face to the transport; the rules live in small modules:
``fetching`` (claims and leases), ``acking`` (completions), ``relay`` (results to the engine),
``scheduler`` (recovery of expired leases), all on the store port (``store.TaskStore``). Each
invariant is argued in docs/storage.md and tested against both the real Cassandra and the
in-memory store (tests/behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from bridge.crypto import KeyProvider
from bridge.domain.acking import Acker
from bridge.domain.clock import Clock
from bridge.domain.context import (
    AlwaysGrant,
    Background,
    LeaseGate,
    Limits,
    Metrics,
    NoMetrics,
    QueueContext,
    clock_slack_ms,
    require_clock_for_filing,
)
from bridge.domain.counting import DAY_MS, QueueCounts, landed_later
from bridge.domain.dispatch import Dispatcher
from bridge.domain.errors import BadRequest, NotSent, Unavailable
from bridge.domain.fetching import Fetcher
from bridge.domain.hints import Hint, NoHints, TaskHints, carried
from bridge.domain.lifecycle import Extended, Failed, Lifecycle, ParkedPage, ParkedTask, RedriveRound, TaskInfo
from bridge.domain.models import AckRequest, AddCommand, Delivery, ExtendRequest, FailRequest, FetchRequest
from bridge.domain.reconcile import Reconciliation
from bridge.domain.records import DUE_EPOCH, LANE_FRESH, ExpiryEntry, OutboxEntry, Payload, QueueKey
from bridge.domain.relay import ResultMessage, ResultRelay, ResultSink
from bridge.domain.sealing import OwnerKeys, encode, seal_task
from bridge.domain.stats import ServiceStats, StatsFound, service_stats
from bridge.domain.store import TaskStore
from bridge.domain.timeline import expiry_bucket, ms_of, new_task_id
from bridge.observability.throttled import ThrottledWarning

log = logging.getLogger("bridge.queue")

# A freshly recorded message_id whose task is not visible yet is assumed to be mid-write by
# another consumer; only after this long is it treated as a crashed first attempt and replaced.
IDEMPOTENCY_SETTLE_MS = 30_000
# The first pause of a redelivered add's wait for its first delivery's write (doubling to 1 s).
FIRST_COPY_POLL_S = 0.05
MAX_STATS_SERVICES = 1_000
# Services whose counts one `stats` of every queue reads at once: each is about ten reads, and up
# to 1,000 at once was ten thousand requests from one call on the fleet's shared Cassandra.
STATS_CONCURRENCY = 16
# Timer-wheel entries due sooner than this are also handled by a timer of the bridge that filed
# them: the scheduler reads the wheel's marks once a second (``MARKS_REFRESH_MS``).
SOON_MS = 2_000
# When an add's task write timed out, whether it was stored is read after these pauses (seconds):
# the first once the write's own timeouts have passed (a coordinator gives up on a write after
# 2 s by default), the later ones for a write held up longer on its way.
UNCERTAIN_ADD_LOOKUPS_S = (2.0, 8.0, 30.0)
ADDS_IN_DOUBT_MAX = 100_000  # bounded: the oldest forgotten first (each is an add whose write timed out)
# Writes of a late add's second entry: the first at now, then (off the add's reply path) placed
# ahead by as long as the last write took, while each lands later than the scans wait for.
ENTER_AGAIN_ATTEMPTS = 3
# Failed writes of an entry written again ahead, each tried again after 1, 2, 4, 8 s: about the
# span of the lookups of an add whose outcome is unknown (``UNCERTAIN_ADD_LOOKUPS_S``).
ENTER_AHEAD_FAILURES = 4


@dataclass(frozen=True)
class PendingAdd:
    """An add checked and sealed, with its task id: stored by :meth:`WorkQueue.store_add`."""

    q: QueueKey
    task_id: uuid.UUID
    payload: Payload
    due_ms: int | None
    has_token: bool
    priority: int

    def hint(self, stored: asyncio.Future[bool] | None = None) -> Hint:
        """The hint that announces the task once stored (``stored``: handed before its write is
        acknowledged, ``Hint.stored``)."""
        payload = carried(self.payload)
        return Hint(self.task_id, LANE_FRESH, self.task_id, None, self.has_token, payload, self.priority, stored=stored)


class WorkQueue:
    def __init__(
        self,
        store: TaskStore,
        keys: KeyProvider,
        clock: Clock,
        *,
        limits: Limits,
        settle_ms: int,
        results: ResultSink | None = None,
        metrics: Metrics | None = None,
        may_grant_leases: LeaseGate | None = None,
        max_lanes: int = 10_000,
        hints: TaskHints | None = None,
        reconcile: Reconciliation | None = None,
        counts: QueueCounts | None = None,
    ) -> None:
        self.ctx = QueueContext(
            store=store,
            keys=OwnerKeys(keys),
            clock=clock,
            limits=limits,
            metrics=metrics or NoMetrics(),
            gate=may_grant_leases or AlwaysGrant(),
            background=Background(),
            counts=counts,
        )
        self.dispatcher = Dispatcher(store, clock.now_ms, settle_ms, max_lanes, ttl_ms=limits.task_ttl_ms)
        self.relay = ResultRelay(self.ctx, results)
        # Without hints every fetch scans the ready index (as before 1.2). A bridge that takes no
        # hints may still publish them, for the others (BRIDGE_HINTS=false: ``AmqpHints.takes``).
        self.hints: TaskHints = hints or NoHints()
        reconcile = reconcile or Reconciliation.scan_always()
        self.lifecycle = Lifecycle(self.ctx, self.relay, self.soon, self.hints, settle_ms)
        self._fetcher = Fetcher(self.ctx, self.dispatcher, self.hints, reconcile, self.soon, self.relay, self.lifecycle)
        self._acker = Acker(self.ctx, self.relay)
        # How late after its id's time a task's entry may land and still be met by every scan: a
        # scan moves over entries taken and older than the settle window, on a clock up to the
        # skew margin ahead of this one (``_enter_again_if_late``).
        self._lands_in_time_ms = settle_ms - limits.skew_margin_ms
        # Set by the recovery scheduler: handles a timer-wheel entry due within moments, here.
        self.due_soon: Callable[[ExpiryEntry], None] | None = None
        self._registered: OrderedDict[QueueKey, int] = OrderedDict()
        # Adds whose task write timed out here (task id -> counted yet): see ``_count_add``.
        self._adds_in_doubt: OrderedDict[uuid.UUID, bool] = OrderedDict()
        self._warn_entered_late = ThrottledWarning(log)  # a slow store makes many adds late at once

    # -- what the scheduler and the process use ------------------------------------------------------
    @property
    def store(self) -> TaskStore:
        return self.ctx.store

    @property
    def clock(self) -> Clock:
        return self.ctx.clock

    @property
    def metrics(self) -> Metrics:
        return self.ctx.metrics

    @property
    def skew_margin_ms(self) -> int:
        return self.ctx.limits.skew_margin_ms

    @property
    def results_in_flight(self) -> int:
        return self.relay.publishing

    def completed_here(self, task_id: uuid.UUID, epoch: int) -> bool:
        """This instance completed the task at this epoch lately (a hint: the lease decides)."""
        return self._acker.completed_here(task_id, epoch)

    async def announce(self, q: QueueKey, hint: Hint) -> None:
        """A task may be claimable (re-exposed by recovery): tell the fetches of its queue."""
        await self.hints.offer(q, hint)

    async def publish(self, entry: OutboxEntry) -> None:
        await self.relay.publish(entry)

    async def drain_background(self, timeout: float) -> None:
        await self.ctx.background.drain(timeout)

    async def stop_background(self, timeout: float) -> None:
        await self.ctx.background.stop(timeout)

    # -- the three requests -----------------------------------------------------------------------
    async def add(
        self,
        owner: str,
        cmd: AddCommand,
        *,
        message_id: str | None,
        traceparent: str | None,
        first_copy: bool = False,
    ) -> str:
        """Store a task (see :meth:`prepare_add` and :meth:`store_add`, which a caller that
        retries uses apart, so that every attempt stores the same task id)."""
        pending = await self.prepare_add(owner, cmd, traceparent=traceparent)
        return await self.store_add(pending, message_id=message_id, first_copy=first_copy)

    async def prepare_add(self, owner: str, cmd: AddCommand, *, traceparent: str | None) -> PendingAdd:
        """Check and seal an add and give it its task id; nothing is stored yet.

        Refused (``unavailable``: another bridge takes it) while this bridge's clock is known off
        by more than a second: the id is its present, its place in the queue, and a bridge 1.5-3 s
        behind placed tasks behind what the fleet's scans had passed (with their hints lost, or
        hints off, answered stored and never handed out)."""
        ctx = self.ctx
        require_clock_for_filing(ctx.gate)
        q = QueueKey(owner, cmd.service_id)
        limit = ctx.limits.max_value_bytes
        value_json = encode(cmd.value, "the value", limit)
        token_json = None if cmd.token is None else encode(cmd.token, "the token", limit)
        key = await ctx.keys.current(owner)
        now = ctx.clock.now_ms()
        try:
            due = cmd.due_ms(now)
        except ValueError as exc:
            raise BadRequest(f"notBefore: {exc}") from None
        if due is not None and ctx.limits.task_ttl_ms is not None and due - now >= ctx.limits.task_ttl_ms:
            raise BadRequest("a task cannot be delayed beyond its lifetime (BRIDGE_TASK_TTL)")
        # A delayed task's id is its due time: its place in the queue (FIFO by due time), and the
        # ready index is never scanned past the present, so it cannot be handed out early.
        task_id = new_task_id(due if due is not None else now)
        payload = seal_task(key, q, task_id, value_json, token_json, traceparent, now)
        if cmd.max_deliveries is not None or cmd.priority:
            payload = replace(payload, max_deliveries=cmd.max_deliveries, priority=cmd.priority)
        if ctx.limits.task_ttl_ms is not None:
            # The task's life is fixed here, by this bridge's TTL: its rows and its hint carry it.
            payload = replace(payload, expires_at_ms=ms_of(task_id) + ctx.limits.task_ttl_ms)
        return PendingAdd(q, task_id, payload, due, token_json is not None, cmd.priority)

    async def add_stored(self, add: PendingAdd) -> bool:
        """Whether ``add``'s task row is stored (an attempt reported not sent may have landed: a
        driver sends an idempotent write to the next node after a connection closed under it, and
        reports "no host available" when none is left)."""
        return await self.ctx.store.task_exists(add.q, add.task_id)

    async def store_add(
        self,
        add: PendingAdd,
        *,
        message_id: str | None,
        first_copy: bool = False,
        replaces: uuid.UUID | None = None,
    ) -> str:
        """Store a prepared add; its task id (or, for a repeated ``message_id``, the first copy's).

        ``first_copy``: ``message_id`` only guards against a redelivery of this very message (no
        other copy of it can exist yet), so it is recorded with plain writes beside the task,
        not claimed by an LWT; a redelivered copy (``first_copy`` false) then finds it through
        the LWT path. Storing the same ``add`` again (a retry after an error) writes the same
        rows: it never makes a second task. ``replaces``: the task id of an earlier attempt of
        this very add that certainly stored nothing but may have recorded ``message_id``. A
        redelivery whose first delivery may be storing still waits first (:meth:`first_copy_settled`)."""
        ctx = self.ctx
        q, task_id, due = add.q, add.task_id, add.due_ms
        now = ctx.clock.now_ms()
        if message_id and not first_copy:
            existing = await self._dedupe(q, message_id, task_id, now, replaces)
            if existing is not None:
                # The first copy's bridge enters its task again if its write landed late, but it
                # may have died first (kill -9 while its write was held up): then only this copy
                # can. Unless the task was claimed meanwhile (a lease read: a retried publish of a
                # task still waiting gets a second entry, passed over by a read once its task is
                # taken, ``Fetcher._spent_second_entry``). Its own payload is sealed for its own
                # task id: the stored task's row is read. A delayed task is late only once past
                # its due time (its id), as any.
                await self._enter_again_if_late_or_later(q, existing, None)
                return str(existing)
        self._register(q)
        recorded = message_id if message_id and first_copy else None
        if due is not None:
            # Write-ahead: the scheduler announces it at its time (an entry without a task, from a
            # crash before the write below, finds nothing to claim). Its time is the due time plus
            # the skew margin, as a lease's deadline: a bridge ahead of this one by up to the margin
            # must not announce it before its due time (``Scheduler._due_ms``).
            at = due + ctx.limits.skew_margin_ms
            watch = ExpiryEntry(due, q, task_id, DUE_EPOCH, add.has_token, add.priority)
            await ctx.store.watch_expiry(expiry_bucket(at), watch)
            await self._store_task(add, recorded)
            self.soon(watch, at)
            self._count_add(add)
            # Due already when its write landed (a short delay, a write held up past it): as late as
            # any add, and the due announcement gives up on a row still missing 5 s after its time.
            await self._enter_again_if_late_or_later(add.q, add.task_id, add.payload)
            return str(task_id)
        stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        hint = add.hint(stored)
        # A fetch of this bridge waiting for the queue takes the hint now, and writes its lease's
        # deadline and its worker's pointer while the task is written (one Cassandra round trip
        # less between the add and the worker's reply); it claims only once the write is
        # acknowledged, and a hint is never published before: no other bridge hears of a task that
        # is not stored yet.
        handed = self.hints.hand_here(q, hint)
        try:
            await self._store_task(add, recorded)
        except BaseException:
            if not stored.done():
                stored.set_result(False)
            raise
        if not stored.done():  # (never cancelled by its waiters, who shield it: a guard all the same)
            stored.set_result(True)
        if not handed:
            await self.hints.offer(q, hint)
        self._count_add(add)
        # Handed or not: a fetch of this bridge that took its hint may not decide its claim (its
        # caller's deadline passed while the write was held up, its worker gone) and put the hint
        # back, and a late task whose one hint is then lost stood behind every scan's position.
        await self._enter_again_if_late_or_later(add.q, add.task_id, add.payload)
        log.debug("task added", extra={"task_id": str(task_id)})
        return str(task_id)

    async def _store_task(self, add: PendingAdd, message_id: str | None) -> None:
        """Write the task. A write that may have landed (anything but ``NotSent``) and whose
        caller may give up (its retries run out, or it has none: the gateway's client retries with
        its idempotency key, and the copy that finds the task stored counts nothing) is looked up
        later and counted if it landed (``_count_add_if_stored``)."""
        try:
            await self.ctx.store.store_task(add.q, add.task_id, add.payload, message_id=message_id)
        except Unavailable as exc:
            if not isinstance(exc, NotSent) and add.task_id not in self._adds_in_doubt:
                self._adds_in_doubt[add.task_id] = False
                if len(self._adds_in_doubt) > ADDS_IN_DOUBT_MAX:
                    self._adds_in_doubt.popitem(last=False)
                self.ctx.background.spawn(self._count_add_if_stored(add), "count an uncertain add")
            raise

    def _count_add(self, add: PendingAdd) -> None:
        """Count the task once: ready under its id's day (as every later move of it: a retried add
        may run past midnight), or delayed under its due minute. A task id is stored only by the
        attempts of the add that prepared it, on this bridge (a redelivered copy prepares its own,
        and one that finds this task stored counts nothing): so whichever comes first here, a
        retry that stores it or the lookup of a write that timed out, counts it, and only that one."""
        if self._adds_in_doubt.get(add.task_id) is True:
            return  # counted already, by the lookup
        if add.task_id in self._adds_in_doubt:
            self._adds_in_doubt[add.task_id] = True
        if add.due_ms is not None:
            self.ctx.count_delayed(add.q, add.due_ms, 1)
        else:
            self.ctx.count(add.q, ms_of(add.task_id), ready=1)
        # Here, not beside the reply: an add whose write timed out and landed is counted only by
        # the lookup (its retry finds it stored and counts it deduplicated), and was missing.
        self.ctx.metrics.inc("tasks_added", kind="delayed" if add.due_ms is not None else "ready")

    async def _count_add_if_stored(self, add: PendingAdd) -> None:
        """Whether a task whose write timed out was stored after all, read after the write's own
        timeouts have passed; counted once it is found (unless a retry stored and counted it)."""

        async def stored() -> bool | None:
            if self._adds_in_doubt.get(add.task_id) is not False:
                return False  # counted by a retry (or forgotten, long ago): nothing to look up
            # Not found yet is no answer: a write held up on its way may still land.
            return True if await self.ctx.store.task_exists(add.q, add.task_id) else None

        if await landed_later(stored, UNCERTAIN_ADD_LOOKUPS_S, self.ctx.background.pause):
            # Its bucket's index row went in the same request, which is not atomic: the task row
            # may have landed without it, and an add without a message-id has no redelivered copy
            # to index it again (``_dedupe``): no scan would find it.
            try:
                await self.ctx.store.reindex_task(add.q, add.task_id)
            except Unavailable as exc:
                log.warning("task %s found stored; indexing its bucket again failed: %s", add.task_id, exc)
            self._count_add(add)
            await self._enter_again_if_late_or_later(add.q, add.task_id, add.payload)
            if add.due_ms is None:
                # Nobody has heard of the task: a hint goes out only once its write is acknowledged,
                # and this one timed out. Without one, a waiting fetch met it at the next
                # reconciliation scan (every 30 s), long after it landed.
                await self.hints.offer(add.q, add.hint())
        elif self._adds_in_doubt.get(add.task_id) is False:
            log.warning("add of task %s left uncounted: not found stored (it may land later)", add.task_id)

    async def _enter_again_if_late_or_later(self, q: QueueKey, task_id: uuid.UUID, payload: Payload | None) -> None:
        """:meth:`_enter_again_if_late`, best effort: the task is stored and answered whatever it
        does (failing the add there left a stored task uncounted, its hint never offered); a
        store that fails it (slow, the reason the add was late) is asked again in the background."""
        try:
            await self._enter_again_if_late(q, task_id, payload)
        except Unavailable:

            async def entered() -> bool:
                await self._enter_again_if_late(q, task_id, payload)
                return True

            async def later() -> None:
                if not await landed_later(entered, UNCERTAIN_ADD_LOOKUPS_S, self.ctx.background.pause):
                    log.warning("task %s stored late, and not entered again: the store kept failing", task_id)

            self.ctx.background.spawn(later(), "enter a late task again")

    async def _enter_again_if_late(self, q: QueueKey, task_id: uuid.UUID, payload: Payload | None) -> None:
        """A task stored later after its id's time than the scans wait for (a write held up or
        timed out and retried with the same id, a key's compare-and-set, a paused process) may
        have landed behind where a scan's position moved on (over tasks added after it and taken
        meanwhile), and no scan reads there again: stored and answered, it was never handed out
        with hints off, nor with hints on once its hint was lost. It gets a second entry now, at
        the head of its lane, unless it is claimed already (then it was found). A claim of either
        entry is decided by the lease, as for two entries of a re-exposed task. Rare: nothing is
        read or written for an add that lands in time (the reply waits for this otherwise)."""
        if self.ctx.clock.now_ms() - ms_of(task_id) <= self._lands_in_time_ms - self._clock_slack_ms():
            return  # in time (a delayed task's id is its due time: late only once past it)
        store = self.ctx.store
        if await store.lease(q, task_id, serial=False) is not None:
            return
        if payload is None and (payload := await store.payload(q, task_id)) is None:
            return  # gone (its TTL)
        took = await self._enter_at(q, task_id, payload, ahead_ms=0)
        if took is not None:
            # Its place was taken from the clock before its write, and the write was held up as
            # the add's was (the same slow store): it may have landed behind scans that moved on.
            # Once more, off the add's reply path, placed ahead by as long as that write took, so
            # that a write as slow lands before scans may pass its place (claimable from there).
            self.ctx.background.spawn(self._enter_ahead(q, task_id, payload, took), "enter a late task again, ahead")

    async def _enter_at(self, q: QueueKey, task_id: uuid.UUID, payload: Payload, *, ahead_ms: int) -> int | None:
        """Write a second entry ``ahead_ms`` after now; None if it landed in time for its place,
        else how long its write took (ms)."""
        started = self.ctx.clock.now_ms()
        slack = self._clock_slack_ms()
        seq = new_task_id(started + ahead_ms + slack)
        await self.ctx.store.enter_again(q, task_id, seq, payload)
        self.ctx.metrics.inc("adds_entered_again")
        log.debug("task entered again: stored late", extra={"task_id": str(task_id)})
        done = self.ctx.clock.now_ms()
        return None if done - ms_of(seq) <= self._lands_in_time_ms - slack else done - started

    def _clock_slack_ms(self) -> int:
        """How far behind this bridge's clock may be now, beyond the skew margin: served while it
        is known within a second (``require_clock_for_filing``), it stamps ids up to that much in
        the past, and the time the scans leave a write to land is that much shorter (a bridge
        900 ms behind judged a 200 ms write in time, and it landed behind a busy lane's scans).
        At most that second: a bound grown while the write ran is not this add's."""
        return clock_slack_ms(self.ctx.gate)

    async def _enter_ahead(self, q: QueueKey, task_id: uuid.UUID, payload: Payload, took_ms: int) -> None:
        failures = 0
        attempts = 0
        while attempts < ENTER_AGAIN_ATTEMPTS - 1:
            try:
                took = await self._enter_at(q, task_id, payload, ahead_ms=took_ms)
            except Unavailable as exc:
                # The add was answered already, and both of its entries may lie behind the scans'
                # positions: given up here, it was never handed out with hints off (or its hint
                # lost). Tried again after a pause (a write timeout that did not land, a store
                # away for a moment), further ahead.
                failures += 1
                if failures > ENTER_AHEAD_FAILURES:
                    self._warn_entered_late.warning("task %s not entered again ahead: %s", task_id, exc)
                    return
                await self.ctx.background.pause(float(2 ** (failures - 1)))
                took_ms *= 2
                continue
            if took is None:
                return
            attempts += 1
            took_ms = max(took_ms, took) * 2  # slower than foreseen: further ahead
        self._warn_entered_late.warning(
            "task %s entered again %d times, each landing late: the store is slow", task_id, ENTER_AGAIN_ATTEMPTS
        )

    def soon(self, entry: ExpiryEntry, due_ms: int) -> None:
        """An entry filed in the timer wheel for a moment so near (a short backoff, a redrive, a
        short delay) that the scheduler may have read that bucket's marks already and would meet
        it only on its second pass: this bridge handles it itself at its time as well (best
        effort; the wheel entry stays the guarantee, and handling it twice is idempotent)."""
        if self.due_soon is not None and due_ms - self.ctx.clock.now_ms() < SOON_MS:
            self.due_soon(entry)

    def _register(self, q: QueueKey) -> None:
        """Record the owner's service queue for stats, once a day per bridge (not per task)."""
        now = self.ctx.clock.now_ms()
        if now - self._registered.get(q, -DAY_MS) < DAY_MS:
            self._registered.move_to_end(q)
            return
        self._registered[q] = now
        self._registered.move_to_end(q)
        # The least recently added to are forgotten: cleared whole past the limit, a bridge taking
        # adds to more queues than that registered nearly every add again (a write and a task each).
        while len(self._registered) > self.dispatcher.max_lanes:
            self._registered.popitem(last=False)
        self.ctx.background.spawn(self._registration(q, now), "register service")

    async def _registration(self, q: QueueKey, at_ms: int) -> None:
        """A registration that failed (a Cassandra timeout) is tried again at the queue's next add,
        not a day later: meanwhile a new or quiet queue was missing from the owner's stats, the
        console, the gauges and the counter trim."""
        try:
            await self.ctx.store.register_service(q)
        except BaseException:
            if self._registered.get(q) == at_ms:
                del self._registered[q]
            raise

    async def first_copy_settled(self, add: PendingAdd, message_id: str, since: float) -> None:
        """Wait until a first delivery of this add that may still be storing has stored it, or
        cannot any more. That delivery records ``message_id`` with plain writes beside its task (no
        LWT: it assumed no other copy could exist yet). When its channel closes under it (a lost
        connection, a channel error), the broker delivers the add again at once, possibly to another
        bridge: had this copy claimed the id with the LWT before that write landed, the add would
        have become two tasks. A first delivery starts no attempt once its channel is gone, and a
        write runs at most the store's request timeout; the record goes with an add's last write,
        after at most one more (the ready bucket's index entry) or two for a delayed add (its due
        entry first). So the record is read plainly, at growing intervals, until it is there or
        that many timeouts have passed since the redelivery came (``since``, monotonic). Only a
        redelivery that finds no record pays the wait, once; the caller prepares the add again
        afterwards if its task id has aged (an id far behind the present is found by no scan)."""
        store = self.ctx.store
        writes = 3 if add.due_ms is not None else 2
        deadline = since + writes * self.ctx.limits.store_timeout_ms / 1000
        pause = FIRST_COPY_POLL_S
        while await store.message_id_task(add.q, message_id) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)

    async def _dedupe(
        self, q: QueueKey, message_id: str, task_id: uuid.UUID, now: int, replaces: uuid.UUID | None = None
    ) -> uuid.UUID | None:
        """The task an earlier copy of this add stored, or None if this copy is to store it."""
        store = self.ctx.store
        existing = await store.record_message_id(q, message_id, task_id)
        if existing is None or existing == task_id:
            return None  # ours (an earlier attempt of this very add recorded it): store the task
        if existing == replaces and not await store.task_exists(q, existing):
            # Our own earlier attempt, which stored nothing: the record moves to this attempt's id.
            # (Had it stored its task after all, that task is the add's: answered below.)
            if not await store.replace_message_id(q, message_id, existing, task_id):
                raise NotSent("concurrent add with the same message_id; retry later")
            return None
        if await store.task_exists(q, existing):
            # A redelivery or a retried publish: same task. Index it again in case the first
            # attempt died between its two writes (and entered again if late: ``store_add``).
            await store.reindex_task(q, existing)
            self.ctx.metrics.inc("adds_deduplicated")
            return existing
        # Measured from the record's write, not the task id: a delayed task's id holds its due
        # time, and an attempt that died before storing it blocked every retry until then.
        recorded = await store.message_id_recorded_at(q, message_id)
        # Raised as NotSent: this attempt stored nothing (its compare-and-set did not apply), so
        # its retry may take a fresh task id; kept, the id aged through up to 30 s of retries and
        # was stored behind where the dispatchers' scans had moved on.
        if recorded is None or now - recorded < IDEMPOTENCY_SETTLE_MS:
            raise NotSent("an add with this message_id is still being stored; retry later")
        if not await store.replace_message_id(q, message_id, existing, task_id):
            raise NotSent("concurrent add with the same message_id; retry later")
        return None

    async def fetch(
        self,
        owner: str,
        req: FetchRequest,
        *,
        still_wanted: Callable[[], Awaitable[bool]] | None = None,
        deadline_ms: int | None = None,
    ) -> Delivery | None:
        """``deadline_ms`` and ``still_wanted``: see ``bridge.domain.fetching.Fetcher.fetch``."""
        return await self._fetcher.fetch(owner, req, still_wanted=still_wanted, deadline_ms=deadline_ms)

    async def ack(self, owner: str, req: AckRequest, *, sent_before_ms: int | None = None) -> bool:
        return await self._acker.ack(owner, req, sent_before_ms=sent_before_ms)

    # -- the lifecycle (1.4) --------------------------------------------------------------------------
    async def extend(self, owner: str, req: ExtendRequest) -> Extended | None:
        return await self.lifecycle.extend(owner, req)

    async def fail(self, owner: str, req: FailRequest) -> Failed | None:
        return await self.lifecycle.fail(owner, req)

    async def cancel(self, owner: str, service: str, task_id: uuid.UUID, *, request_id: str | None = None) -> bool:
        return await self.lifecycle.cancel(owner, service, task_id, request_id=request_id)

    async def purge(self, owner: str, service: str) -> tuple[int, bool]:
        return await self.lifecycle.purge(owner, service)

    async def task_info(self, owner: str, service: str, task_id: uuid.UUID) -> TaskInfo | None:
        return await self.lifecycle.task_info(owner, service, task_id)

    async def parked(self, owner: str, service: str, limit: int) -> list[ParkedTask]:
        return await self.lifecycle.parked(owner, service, limit)

    async def parked_page(self, owner: str, service: str, limit: int, after: uuid.UUID | None = None) -> ParkedPage:
        return await self.lifecycle.parked_page(owner, service, limit, after=after)

    async def redrive(self, owner: str, service: str, task_ids: list[uuid.UUID] | None) -> int:
        return await self.lifecycle.redrive(owner, service, task_ids)

    async def redrive_all(
        self, owner: str, service: str, parked_before_ms: int | None = None, after: uuid.UUID | None = None
    ) -> RedriveRound:
        return await self.lifecycle.redrive_all(owner, service, parked_before_ms, after)

    async def discard(self, owner: str, service: str, task_ids: list[uuid.UUID]) -> int:
        return await self.lifecycle.discard(owner, service, task_ids)

    async def stats(self, owner: str, service: str | None, *, partial: bool = False) -> StatsFound:
        """Live counts of one service queue of the owner, or of all of them (up to 1,000).

        Of all of them, a queue whose counts cannot be read now (its partitions without a
        quorum, a parked partition full of tombstones) is named in ``unavailable`` and the others
        are answered: one such queue failed the whole request (every console page and dashboard
        of the owner empty, as long as it lasted), and the reads of the others went on after the
        answer, outside the bridge's bound on long requests (each poll started another batch).
        All of them failing is the store's outage: raised. Only with ``partial`` (contract 1.10,
        which the bundled clients and the console send): without it, any queue failing raises, as
        in 1.9, whose clients retry that and would read a partial answer as queues gone (a
        backlog alert silenced, an autoscaler scaling a queue's workers to zero; found by review)."""
        ctx = self.ctx
        await ctx.keys.current(owner)
        services = [service] if service is not None else await ctx.store.services(owner, MAX_STATS_SERVICES)
        now = ctx.clock.now_ms()
        ttl = ctx.limits.task_ttl_ms or DAY_MS * 7
        margin = ctx.limits.skew_margin_ms
        settle = self.dispatcher.settle_ms
        limit = asyncio.Semaphore(STATS_CONCURRENCY)

        async def one(name: str) -> ServiceStats:
            async with limit:
                # Cursors moved only by a clock within its limit: stats settle the entries they
                # pass by it, and one ahead moved a lane's cursor past an add still in time.
                move = ctx.gate.ok
                return await service_stats(
                    ctx.store, QueueKey(owner, name), now, ttl, margin, settle, move_cursors=move
                )

        if service is not None:
            return StatsFound([await one(service)])
        outcomes = await asyncio.gather(*(one(s) for s in services), return_exceptions=True)
        found = [o for o in outcomes if isinstance(o, ServiceStats)]
        failed = [(name, o) for name, o in zip(services, outcomes, strict=True) if isinstance(o, BaseException)]
        for _, exc in failed:
            if not isinstance(exc, Exception):
                raise exc  # a cancellation (the request cut, the bridge stopping): not a queue's
        if failed and (not found or not partial):
            raise failed[0][1]
        if failed:
            log.warning("stats of %d of %d queues of %s not read: %s", len(failed), len(services), owner, failed[0][1])
        return StatsFound(found, [name for name, _ in failed])


__all__ = ["Limits", "Metrics", "ResultMessage", "ResultSink", "WorkQueue"]
