"""The worker lifecycle (contract 1.4): extend, fail and retry, delivery limits and parking,
redrive and discard, cancel and purge.

Every change of a task here is a compare-and-set on its lease, fenced by state and epoch, exactly
like claims and acks: a worker that lost its lease can neither extend, fail nor complete it, and a
cancelled or parked task is never handed out (``claim_new`` finds a lease; ``claim_expired``
wants ``state = 'leased'``). What a crash could lose is written ahead:
- ``fail`` files the deadline of the backoff in the timer wheel before giving the lease back, so
  the recovery scheduler re-exposes the task when the backoff ends;
- a park writes its parked-index row, and for a task with a token the engine's
  ``delivery_limit`` error in the outbox, before the park; the result relay publishes it if the
  bridge dies between the two (once: the outbox entry names the park, see ``ResultRelay``);
- a redrive files a deadline before it unparks, so the scheduler re-exposes it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bridge.crypto import OwnerKey, Sealed
from bridge.domain import jsonvalue
from bridge.domain.context import QueueContext, clock_slack_ms, require_clock_for_filing
from bridge.domain.counting import landed_later, was_delayed
from bridge.domain.dispatch import first_live_bucket, settled_before
from bridge.domain.errors import MaybeApplied, Unavailable
from bridge.domain.hints import TaskHints
from bridge.domain.models import ExtendRequest, FailRequest
from bridge.domain.records import (
    FINAL_STATES,
    LANE_FRESH,
    LANE_RECOVERED,
    CasResult,
    ExpiryEntry,
    Lease,
    LeaseState,
    OutboxEntry,
    ParkedEntry,
    QueueKey,
    ReadyEntry,
)
from bridge.domain.relay import ResultRelay, decided_by_itself
from bridge.domain.sealing import encode, open_error, seal_error, seal_outcome
from bridge.domain.stats import walk_lane
from bridge.domain.store import TaskStore
from bridge.domain.timeline import (
    EXPIRY_BUCKET_MS,
    bucket_of_task,
    expiry_bucket,
    ms_of,
    outbox_bucket,
    timeuuid_from_ms,
)

log = logging.getLogger("bridge.queue")

PARK_DELIVERY_LIMIT = "delivery_limit"  # its leases ran out this many times
PARK_FAILED = "failed"  # its worker failed it at the limit
PARK_KEY_MISSING = "key_missing"  # claimed this often and never opened: its key gone for good, most likely
CANCEL_ATTEMPTS = 4
PURGE_MAX = 20_000  # ready tasks one purge request looks at (the reply says if there may be more)
PURGE_PAGE = 2_000  # entries read at a time
PURGE_SCAN_MAX = 100_000  # entries one purge request reads at most (taken ones included)
LEASES_PER_READ = 50
# The parked listing's errors: each may be as large as a value and the listing holds up to 1,000
# tasks, so errors fill a reply up to this budget (or one largest value, if more), in task order,
# read a few at a time so that one read holds at most ERRORS_READ_BYTES of them.
PARKED_ERRORS_BUDGET_BYTES = 4 * 1024 * 1024
ERRORS_READ_BYTES = 8 * 1024 * 1024
# Index rows one listing (or one ``redrive all`` round) reads at most. Rows whose park is over
# are skipped and removed on the way, so a later request gets further; a ``redrive all`` round
# that stops here also says where to go on (rows parked after its bound stay, and are passed).
PARKED_SCAN_ROWS = 10_000
REDRIVE_ALL_MAX = 1_000  # parked tasks one ``redrive all`` request puts back at most
# Index rows a ``redrive all`` reads at a time at least: rows parked after its bound are passed,
# and reading one row at a time past many of them would take a request each.
REDRIVE_SCAN_PAGE = 100
REDRIVE_PACES_MAX = 1_000  # queues whose redrive pace a bridge remembers (idle ones forgotten past it)
# A task is redriven this many times at most: each park and each unpark adds an id to the lease's
# ``park_ids`` (nothing can remove one: a park's result may still be owed), read with the lease by
# every claim, extend, ack and scheduler pass. A task failed and redriven in a loop (a cron's
# ``redrive all`` beside a poison task of maxDeliveries 1, or a tenant's loop) grew it by two ids
# a cycle, without bound, for its TTL (found by review, 2026-12-07). Past it, the task stays
# parked (listed, counted): discard or cancel it.
REDRIVES_PER_TASK_MAX = 500


@dataclass(frozen=True, slots=True)
class Extended:
    task_id: uuid.UUID
    epoch: int
    lease_until_ms: int


@dataclass(frozen=True, slots=True)
class Failed:
    task_id: uuid.UUID
    deliveries: int
    parked: bool
    retry_at_ms: int | None


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """What an operator may see of one task: ids, times, deliveries, worker; never its value."""

    task_id: uuid.UUID
    state: str  # delayed, ready, leased, done, parked, cancelled, discarded, dead
    deliveries: int
    worker: str | None
    added_at_ms: int | None
    due_at_ms: int  # its place in the queue: the add's time, or a delayed task's notBefore
    lease_expires_at_ms: int | None
    completed_at_ms: int | None
    parked_at_ms: int | None
    park_reason: str | None
    has_token: bool
    priority: int
    max_deliveries: int | None


@dataclass(frozen=True, slots=True)
class ParkedTask:
    task_id: uuid.UUID
    deliveries: int
    reason: str
    parked_at_ms: int
    has_token: bool
    last_error_json: bytes | None  # the last fail's error, opened with the owner's key
    # Its error (if it has one) was left out: the errors listed before it filled the budget.
    last_error_omitted: bool = False


@dataclass(frozen=True, slots=True)
class ParkedPage:
    """One ``parked`` request's tasks, and the index row to go on after when it stopped short of
    the index's end (``limit`` found, or ``PARKED_SCAN_ROWS`` rows read): more may be parked
    there. None: it read to the end."""

    tasks: list[ParkedTask]
    after: uuid.UUID | None


# An extend on a bridge whose clock is off is served while its error is within 1/EXTEND_SKEW_SHARE
# of the lease it grants (see ``Lifecycle._extend_allowed``).
EXTEND_SKEW_SHARE = 4


# Lookups of a park whose outcome stayed unknown, after these pauses (s): as a completion's are
# (``acking.UNCERTAIN_COMPLETION_LOOKUPS_S``).
UNCERTAIN_PARK_LOOKUPS_S = (0.5, 2.0, 8.0)


def _cancel_id(q: QueueKey, task_id: uuid.UUID, request_id: str | None) -> uuid.UUID | None:
    """A cancel's completion id, the same for every copy of one request (None without an id)."""
    if not request_id:
        return None
    return uuid.uuid5(uuid.NAMESPACE_URL, f"queue-bridge:cancel:{q.owner}\0{q.service}\0{task_id}\0{request_id}")


def _park_over(e: ParkedEntry, lease: Lease | None) -> bool:
    """Whether the park of an index row can never hold again: its lease is gone, final, or at a
    later epoch; or, for a row of ``parks``, the lease is parked by another park (a park in
    progress needs its lease leased, and once another park has held it, its worker is gone or its
    ``base_epoch`` moved: ``TaskStore.park`` refuses it). A row whose lease is leased at its own
    epoch may be a park in progress (its row is written before its compare-and-set): not over."""
    if lease is None:
        return True
    if not e.in_parks:
        # A row of ``parked`` may list a later park of its task (parks share that row, and a later
        # one's insert can lose to an earlier one's stamps): kept while the task is parked, for the
        # bridges before ``parks``, which list the task by it alone.
        return lease.state is not LeaseState.PARKED and (lease.epoch > e.epoch or lease.state in FINAL_STATES)
    if lease.epoch > e.epoch or lease.state in FINAL_STATES:
        return True
    return lease.state is LeaseState.PARKED and lease.park_id not in (None, e.park_id)


def _listed_now(e: ParkedEntry, lease: Lease, parked_before_ms: int | None) -> bool:
    """Whether a listing (with ``parked_before_ms``: parked before it) shows the row's task."""
    if lease.state is not LeaseState.PARKED:
        return False
    return parked_before_ms is None or _parked_at(e, lease) < parked_before_ms


def _parked_at(e: ParkedEntry, lease: Lease) -> int:
    """When the park the lease is in happened (the index row's time for leases that lack one)."""
    return lease.parked_at_ms or e.parked_at_ms


@dataclass(frozen=True, slots=True)
class RedriveRound:
    """What one ``redrive all`` request did: how many it put back, the bound it used (tasks
    parked at or after it were left parked), and the index row to go on after when it stopped
    short of the end (None: nothing parked before the bound is left beyond where it began)."""

    redriven: int
    parked_before_ms: int
    after: uuid.UUID | None


@dataclass
class _PurgeWalk:
    """One purge request's progress over the lanes."""

    purged: int = 0
    looked: int = 0  # ready candidates whose lease was read
    read: int = 0  # index entries read
    truncated: bool = False


async def renew(
    ctx: QueueContext,
    soon: Callable[[ExpiryEntry, int], None],
    q: QueueKey,
    task_id: uuid.UUID,
    epoch: int,
    worker: str,
    ttr: int,
    has_token: Callable[[Lease], Awaitable[bool]],
) -> tuple[CasResult, int]:
    """Move the deadline of the lease ``worker`` holds at ``epoch`` to ``ttr`` from now: an
    extend, or a fetch that hands the worker its task again (``Fetcher._resend``). The outcome and
    the deadline set (or tried).

    To a later deadline (the usual heartbeat): one compare-and-set, nothing else. The old deadline
    stays in the timer wheel; the scheduler meets it, finds the later one and files that. To an
    earlier one (a shorter ``timeToRecover`` than the lease had left), the wheel held only the later
    deadline, and a worker that died after shortening its lease was taken back then (up to 12 h
    late). That compare-and-set refuses an earlier deadline (reporting the lease's), so the rare
    shortening files its own deadline first (as a claim does, written ahead), then shortens the
    lease (``shorten_from_ms``: only from the deadline read). ``has_token``: whether the task
    carries a token, from the refused row (for the filed deadline: a claim of the re-exposed task
    records it).

    A refusal may also be a late copy of this very request: its deadline measured before a stall
    (a paused process, a slow coordinator), while the worker's retry through another bridge was
    told a later one. Taken for a shortening, it set the lease to its older deadline, and another
    worker took the task while the first still held it, as told. So the deadline is measured again
    once refused: a late copy then extends the lease further (after a later one it lands later);
    only a real shortening shortens."""
    store = ctx.store
    until = ctx.clock.now_ms() + ttr
    res = await store.extend(q, task_id, epoch, worker, until)
    seen = res.current
    if res.applied or seen is None or not seen.held_by(worker, epoch):
        return res, until  # renewed, or not the worker's lease any more
    until = ctx.clock.now_ms() + ttr
    if seen.lease_until_ms is not None and until >= seen.lease_until_ms:
        # A late copy: measured now, its deadline extends the lease.
        res = await store.extend(q, task_id, epoch, worker, until)
        now_seen = res.current
        if res.applied or now_seen is None or not now_seen.held_by(worker, epoch):
            return res, until
        if now_seen.lease_until_ms is not None and now_seen.lease_until_ms > until:
            # Refused again, the lease ending later still: another copy of the worker's extends
            # landed in between. The worker holds its lease, to the deadline it has.
            return CasResult(True, now_seen), now_seen.lease_until_ms
        return res, until
    due = until + ctx.limits.skew_margin_ms
    watch = ExpiryEntry(until, q, task_id, epoch, await has_token(seen))
    await store.watch_expiry(expiry_bucket(due), watch)
    # Only from the deadline this was decided on: stalled between its read and here (the filing),
    # a shortening overwrote the later deadline a retry through another bridge had set and told
    # the worker, and another worker took the task while the first held it (found by review).
    res = await store.extend(q, task_id, epoch, worker, until, shorten_from_ms=seen.lease_until_ms)
    if res.applied:
        soon(watch, due)  # a deadline moments away: this bridge takes the lease back itself then
        return res, until
    moved = res.current
    if moved is not None and moved.held_by(worker, epoch) and moved.lease_until_ms is not None:
        # Moved by another copy of the worker's requests since: the worker holds it to that end.
        return CasResult(True, moved), moved.lease_until_ms
    return res, until


class Lifecycle:
    def __init__(
        self,
        ctx: QueueContext,
        relay: ResultRelay,
        soon: Callable[[ExpiryEntry, int], None],
        hints: TaskHints,
        settle_ms: int,
    ) -> None:
        self.ctx = ctx
        self.relay = relay
        self.soon = soon  # ``WorkQueue.soon``: a timer of this bridge for a deadline moments away
        self.hints = hints  # purge drops its queue's hints
        self.settle_ms = settle_ms  # the dispatcher's: how late an index write may land (cursor)
        # Redrive's pace per queue, shared by every redrive request this bridge serves side by side
        # (the pause was per request: two requests at once went twice as fast).
        self._redrive_pace: dict[QueueKey, tuple[asyncio.Lock, list[float]]] = {}

    @property
    def store(self) -> TaskStore:
        return self.ctx.store

    async def _target(
        self, q: QueueKey, worker: str, task_id: uuid.UUID | None, epoch: int | None
    ) -> tuple[uuid.UUID, int] | None:
        """The lease a worker's request is about: exactly the one named, else the one it holds."""
        if task_id is not None and epoch is not None:
            return task_id, epoch  # nothing to read: the compare-and-set checks it
        if task_id is not None:
            lease = await self.store.lease(q, task_id, serial=False)
            return (task_id, lease.epoch) if lease is not None and lease.worker == worker else None
        held = (await self.store.worker(q, worker)).pointer
        if held is None or held.done:
            return None
        if epoch is not None and epoch != held.epoch:
            # As an ack's: with an epoch the request is for that lease, with or without its taskId.
            # Ignored, a late extend renewed (a late fail failed) the worker's later lease of the
            # task (found by review, 2026-12-07).
            return None
        return held.task_id, held.epoch

    # -- extend -----------------------------------------------------------------------------------
    async def extend(self, owner: str, req: ExtendRequest) -> Extended | None:
        """Renew the worker's lease (no payload read); None once it is not the worker's any more.
        A later deadline: the old one stays in the timer wheel, and the scheduler meets it, finds
        the later one and watches that instead. An earlier one is filed first (``renew``)."""
        ctx = self.ctx
        q = QueueKey(owner, req.service_id)
        ttr = min(req.time_to_recover or ctx.limits.default_ttr_ms, ctx.limits.max_ttr_ms)
        self._extend_allowed(ttr)
        await ctx.keys.current(owner)
        target = await self._target(q, req.worker_id, req.task_id, req.epoch)
        if target is None:
            return None
        task_id, epoch = target
        res, until = await renew(ctx, self.soon, q, task_id, epoch, req.worker_id, ttr, self._token_of(q, task_id))
        ctx.metrics.inc("leases_extended", outcome="ok" if res.applied else "refused")
        return Extended(task_id, epoch, until) if res.applied else None

    # -- fail -------------------------------------------------------------------------------------
    async def fail(self, owner: str, req: FailRequest) -> Failed | None:
        ctx = self.ctx
        q = QueueKey(owner, req.service_id)
        self._filing_allowed()
        key = await ctx.keys.current(owner)
        error = None
        error_json = None
        if req.error is not None:
            error_json = encode(req.error, "the error", ctx.limits.max_value_bytes)
        target = await self._target(q, req.worker_id, req.task_id, req.epoch)
        if target is None:
            return None
        task_id, epoch = target
        lease, options = await asyncio.gather(
            self.store.lease(q, task_id, serial=False), self.store.task_options(q, task_id)
        )
        if lease is None or not lease.held_by(req.worker_id, epoch):
            return None
        if error_json is not None:
            error = seal_error(key, q, task_id, error_json)
        has_token = await self._has_token(q, task_id, lease)
        now = ctx.clock.now_ms()
        limit = ctx.limits.delivery_limit(q, options.max_deliveries)
        if lease.deliveries_counted >= limit:
            parked = await self.park(
                q,
                task_id,
                epoch,
                has_token,
                PARK_FAILED,
                lease.deliveries_counted,
                worker=req.worker_id,
                error=error,
                earlier_park_id=lease.park_id,
            )
            if not parked:
                return None
            await self._forget(q, req.worker_id, task_id, epoch)
            return Failed(task_id, epoch, True, None)
        backoff = req.retry_in_ms if req.retry_in_ms is not None else ctx.limits.backoff_ms(lease.deliveries_counted)
        due = now + backoff
        # ``due`` is on this bridge's clock, and the bridge that takes the task back may be up to the
        # skew margin ahead of it: like a lease's deadline, the backoff's end is claimable only once
        # ``lease_until <= now - margin`` on the claimer's clock, so never before ``due`` in true time
        # (filed as ``due - margin``, a claimer ahead handed the task out up to a margin early).
        until = due
        # Write-ahead: the scheduler re-exposes the task then even if this bridge dies now.
        watch = ExpiryEntry(until, q, task_id, epoch, has_token)
        await self.store.watch_expiry(expiry_bucket(due + ctx.limits.skew_margin_ms), watch)
        res = await self.store.release(q, task_id, epoch, req.worker_id, until, error)
        if not res.applied:
            return None
        self.soon(watch, due + ctx.limits.skew_margin_ms)
        ctx.metrics.inc("tasks_failed")
        log.debug("task failed by its worker", extra={"task_id": str(task_id), "epoch": epoch, "retry_in_ms": backoff})
        await self._forget(q, req.worker_id, task_id, epoch)
        return Failed(task_id, epoch, False, due)

    def _filing_allowed(self) -> None:
        """A fail and a redrive file the task's return in the timer wheel at a time on this bridge's
        clock (the backoff's end, now), and a purge judges what is due by it. With that clock known
        off by more than CLOCK_OFF_FOR_FILING_MS, refused as a fetch is: 10 s behind, a fail's
        return was filed in buckets the duty holder had read twice, and the task, released, was
        never handed out again before its TTL; ahead, a purge cancelled delayed tasks not yet due.
        Within it (a Cassandra merely slow for the whole fleet: milliseconds), served: the
        scheduler's later pass over a bucket still meets it."""
        require_clock_for_filing(self.ctx.gate)

    def _extend_allowed(self, ttr_ms: int) -> None:
        """An extend sets the lease's end on this bridge's clock; the worker is told it has
        ``ttr_ms`` (by this clock's ``x-now``), while the other bridges take the task back by
        theirs. With this clock known off by more than a quarter of the lease (its worker beats
        every third of it), refused as a fetch is: a bridge 3 s behind renewed a 2 s lease to an
        end already past on every other bridge, and the task went to a second worker while the
        first kept working. Within it, served: refusing every extend while the clock is merely
        less certain than half the margin (a Cassandra slow for the whole fleet) lost the leases
        of every long task of the fleet."""
        gate = self.ctx.gate
        if gate.ok:
            return
        bound = gate.error_bound_ms()
        if bound is not None and bound * EXTEND_SKEW_SHARE <= ttr_ms:
            return
        self.ctx.metrics.inc("leases_refused", reason="clock_skew")
        raise Unavailable(f"this bridge does not grant leases now: {gate.describe()}; retry on another bridge")

    async def _forget(self, q: QueueKey, worker: str, task_id: uuid.UUID, epoch: int) -> None:
        """The worker gave its task back: its next fetch claims another one.

        Only a pointer that still names the task given back is cleared, and just after the write
        that put it there (its stamp + 1), never at the present: the worker's next fetch may be
        running on another bridge (the client stopped waiting for this reply and moved on), and
        the pointer it writes ahead for its new task must survive. Cleared blindly at the present,
        it was wiped when this read already saw it; and when both read the same row, the clear
        and the write-ahead were stamped alike and the clear won the tie (the write-ahead is now
        stamped 2 past what it read: ``pointer_stamp``). Either way the task stayed leased to
        the worker and its next fetch claimed yet another one."""
        row = await self.store.worker(q, worker)
        held = row.pointer
        if held is None or held.task_id != task_id or held.epoch != epoch or row.stamp is None:
            return  # already cleared, or it names the worker's next task
        await self.store.clear_worker(q, worker, row.stamp + 1)

    def _token_of(self, q: QueueKey, task_id: uuid.UUID) -> Callable[[Lease], Awaitable[bool]]:
        """Whether the task carries a token, for a lease seen without it (a refused compare-and-set
        reports only its condition's columns): the lease row says (claims record it since 1.3),
        else the task row."""

        async def has_token(seen: Lease) -> bool:
            if seen.has_token is None:
                seen = (await self.store.leases_of(q, [task_id])).get(task_id, seen)
            return await self._has_token(q, task_id, seen)

        return has_token

    async def _has_token(self, q: QueueKey, task_id: uuid.UUID, lease: Lease) -> bool:
        if lease.has_token is not None:
            return lease.has_token
        payload = await self.store.payload(q, task_id)  # a lease written before 1.3
        return payload is not None and payload.token is not None

    # -- parking ----------------------------------------------------------------------------------
    async def park(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        epoch: int,
        has_token: bool,
        reason: str,
        deliveries: int,
        *,
        worker: str | None = None,
        expired_before_ms: int | None = None,
        base_epoch: int | None = None,
        error: Any = None,
        earlier_park_id: uuid.UUID | None = None,
        until_ms: int | None = None,
    ) -> bool:
        """Hold the task aside for an operator; tell the engine (tasks with a token) exactly once.
        ``earlier_park_id``: the lease's ``park_id`` as the caller read it; ``base_epoch`` (with
        ``expired_before_ms``): its ``base_epoch`` as read; ``until_ms`` (with ``worker``): the
        deadline the lease must still have (see ``TaskStore.park``)."""
        ctx = self.ctx
        now = ctx.clock.now_ms()
        park_id = timeuuid_from_ms(now)  # time-based: the engine's result says when (completedAt)
        intent: OutboxEntry | None = None
        # Not for a task whose key is missing: its token is sealed with that key, and nothing can go
        # to the engine without it (owed, the relay would try it at every sweep until a day past
        # the task's end). Its key restored, a redrive delivers it and its result goes as any.
        if has_token and reason != PARK_KEY_MISSING:
            # Sealed before anything is written: a key lookup that fails (the owner's keys are
            # gone, the key server is away) left the parked row written ahead behind, counted
            # parked by stats for the task's TTL whatever became of the task.
            key = await ctx.keys.current(q.owner)
            message = f"parked after {deliveries} deliveries without an ack ({reason})"
            outcome = {"error": {"code": PARK_DELIVERY_LIMIT, "message": message, "deliveries": deliveries}}
            sealed = seal_outcome(key, q, task_id, jsonvalue.dumps(outcome))
            # The bucket it is written in, after the key lookup (see ``Acking._complete``).
            intent = OutboxEntry(outbox_bucket(ctx.clock.now_ms()), q, task_id, park_id, sealed, False)
        await self.store.add_parked(q, ParkedEntry(task_id, epoch, now, reason, has_token, park_id))
        if intent is not None:
            await self.store.insert_outbox(intent)
        try:
            res = await self.store.park(
                q,
                task_id,
                epoch,
                now,
                reason,
                park_id,
                worker=worker,
                expired_before_ms=expired_before_ms,
                base_epoch=base_epoch,
                error=error,
                earlier_park_id=earlier_park_id,
                until_ms=until_ms,
            )
        except MaybeApplied:
            self._count_if_parked_later(q, task_id, epoch, park_id, reason)
            raise
        if not res.applied and intent is not None and await decided_by_itself(ctx, intent):
            res = CasResult(applied=True, current=None)  # refused by its own first copy
        if not res.applied:
            current = res.current
            if res.may_land_late and current is not None and current.is_leased and current.epoch == epoch:
                # Judged by a read, and its first copy may still land (queued at a stalled
                # coordinator): voided, the engine never heard of a park that happened, and
                # the next pass's park, refused by it, voided its own. The result stays owed:
                # the relay publishes it once the lease lists this park, or drops it once it
                # can no longer land. The row written ahead stays too (a listing cleans it).
                self._count_if_parked_later(q, task_id, epoch, park_id, reason)
                return False
            if intent is not None:
                await self.store.mark_published(intent)  # void: this park did not happen
            if current is None or current.state is not LeaseState.PARKED:
                # Refused (a late ack completed it, it was re-claimed or cancelled): the row written
                # ahead would count a parked task that is not one (stats) and take a slot of the
                # listing. Taken back only while it is this park's: a later park keeps its own, even
                # at the same epoch (this park refused by a late extend, then the worker's fail
                # parking it at that epoch: by epoch, the fail's row went, and a parked task was
                # missing from listings, stats and ``redrive all``).
                # Its own row of ``parks`` too, by its key: no other park's row can be touched
                # there, whatever the bridges' clocks (in ``parked`` they can: its known limit).
                await asyncio.gather(
                    self.store.remove_parked(q, task_id, park_id=park_id),
                    self.store.remove_park(q, task_id, park_id, now),
                )
            return False
        self._parked(q, task_id, epoch, reason, intent)
        log.warning(
            "task parked: %s", reason, extra={"task_id": str(task_id), "epoch": epoch, "deliveries": deliveries}
        )
        return True

    def _parked(self, q: QueueKey, task_id: uuid.UUID, epoch: int, reason: str, intent: OutboxEntry | None) -> None:
        ctx = self.ctx
        ctx.count(q, ms_of(task_id), in_flight=-1)
        ctx.metrics.inc("tasks_parked", reason=reason)
        if intent is not None:
            ctx.background.spawn(self.relay.publish_soon(intent), "publish delivery_limit")

    def _count_if_parked_later(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, park_id: uuid.UUID, reason: str
    ) -> None:
        """A park whose outcome is unknown (its LWT timed out, and so did the read that resolves it;
        or it was judged by a read while its first copy may still land) is looked up again later,
        off the request's path, and counted (in flight -1, tasks_parked) if it landed: nothing else
        counts it (a retry finds the task parked and is refused), and stats said one task too many
        in flight for the task's TTL."""

        async def ours() -> bool | None:
            lease = await self.store.lease(q, task_id, serial=True)
            if lease is None:
                return False  # gone (its TTL): nothing can land on it
            if lease.completion_id == park_id or park_id in lease.park_ids:
                return True  # parked by this very park (listed even after a redrive since)
            # Still leased at this epoch: no answer yet, its first copy may still be on its way.
            return None if lease.is_leased and lease.epoch == epoch else False

        async def settle() -> None:
            landed = await landed_later(ours, UNCERTAIN_PARK_LOOKUPS_S, self.ctx.background.pause)
            if landed:
                # Counted, not published: by now (seconds after the park) the relay's sweep may
                # be publishing the owed result, which it sends once the lease lists this park;
                # published here as well, the engine got it twice (found by review).
                self._parked(q, task_id, epoch, reason, None)
                log.warning("task parked: %s (its outcome known later)", reason, extra={"task_id": str(task_id)})
            elif landed is None:
                log.warning("park of task %s left uncounted: its outcome stayed unknown", task_id)

        self.ctx.background.spawn(settle(), "count an uncertain park")

    async def _scan_parked(
        self,
        q: QueueKey,
        want: int,
        *,
        after: uuid.UUID | None = None,
        parked_before_ms: int | None = None,
    ) -> tuple[list[tuple[ParkedEntry, Lease]], uuid.UUID | None]:
        """Up to ``want`` parked tasks after the row ``after``, in the index's order, each with its
        lease; with ``parked_before_ms``, only those parked before it. And the last row looked at,
        if the scan stopped short of the rows that could hold more (``want`` found, or
        PARKED_SCAN_ROWS read): None when it read them all.

        The index can hold rows whose park is over: a bridge that died between a redrive's
        unpark (or a discard's compare-and-set) and the row's delete leaves one. Such rows are
        passed, so that they hide no parked task behind them, and removed when their park can
        never apply again (the lease is gone, final, or at a later epoch); a row whose lease is
        leased at its own epoch may be a park in progress (the row is written before the
        park's compare-and-set) and is left. Rows parked at or after ``parked_before_ms`` are
        passed too (and kept)."""
        found: list[tuple[ParkedEntry, Lease]] = []
        listed: set[uuid.UUID] = set()
        over: list[ParkedEntry] = []
        last_id_ms = None if parked_before_ms is None else self._last_id_parked_before(parked_before_ms)
        page_min = 1 if parked_before_ms is None else REDRIVE_SCAN_PAGE
        scanned = 0
        while scanned < PARKED_SCAN_ROWS:
            size = min(max(want - len(found), page_min), PARKED_SCAN_ROWS - scanned)
            entries = await self.store.parked(q, size, after)
            scanned += len(entries)
            leases = await self._leases_of(q, entries)
            ended = len(entries) < size  # the index's end
            for e in entries:
                if last_id_ms is not None and ms_of(e.task_id) > last_id_ms:
                    ended = True  # the rest of the index was added after the bound
                    break
                lease = leases.get(e.task_id)
                if _park_over(e, lease):
                    over.append(e)
                # A task is judged by its lease at the first of its rows read (a task has one in
                # each index, one per park in ``parks``; a page can end between them) and listed
                # once, even through a row of another park that is over (removed as well).
                if lease is not None and e.task_id not in listed and _listed_now(e, lease, parked_before_ms):
                    if len(found) == want:
                        return self._scanned(q, found, over, after)  # the next request goes on here
                    found.append((e, lease))
                    listed.add(e.task_id)
                after = e.task_id
            if ended:
                return self._scanned(q, found, over, None)
            if len(found) == want:
                return self._scanned(q, found, over, after)
        return self._scanned(q, found, over, after)  # PARKED_SCAN_ROWS read: the rest is a later request's

    def _scanned(
        self, q: QueueKey, found: list[tuple[ParkedEntry, Lease]], over: list[ParkedEntry], after: uuid.UUID | None
    ) -> tuple[list[tuple[ParkedEntry, Lease]], uuid.UUID | None]:
        if over:
            self.ctx.background.spawn(self._remove_over(q, over), "remove stale parked rows")
        return found, after

    async def _leases_of(self, q: QueueKey, entries: list[ParkedEntry]) -> dict[uuid.UUID, Lease]:
        leases: dict[uuid.UUID, Lease] = {}
        ids = list(dict.fromkeys(e.task_id for e in entries))  # a task has several rows: read once
        for i in range(0, len(ids), LEASES_PER_READ):
            leases.update(await self.store.leases_of(q, ids[i : i + LEASES_PER_READ]))
        return leases

    def _last_id_parked_before(self, parked_before_ms: int) -> int:
        """The latest task id time (ms) whose task could have been parked before the bound.

        A task's id is the time it was added, or a delayed task's due time: it was not handed
        out, so not parked, before then, by the clocks of bridges that are within the skew margin
        of one another. Tasks added after the bound need no look."""
        return parked_before_ms + self.ctx.limits.skew_margin_ms

    async def _remove_over(self, q: QueueKey, rows: list[ParkedEntry]) -> None:
        # One at a time, each only if still that park's row (a later park of the task keeps its).
        for e in rows:
            if e.in_parks and e.park_id is not None:
                await self.store.remove_park(q, e.task_id, e.park_id, e.parked_at_ms)
            else:
                await self.store.remove_parked(q, e.task_id, epoch=e.epoch)

    async def parked(self, owner: str, service: str, limit: int, *, with_errors: bool = True) -> list[ParkedTask]:
        """The first ``limit`` parked tasks of the queue (see :meth:`parked_page`)."""
        return (await self.parked_page(owner, service, limit, with_errors=with_errors)).tasks

    async def parked_page(
        self, owner: str, service: str, limit: int, *, after: uuid.UUID | None = None, with_errors: bool = True
    ) -> ParkedPage:
        """Up to ``limit`` parked tasks after the index row ``after`` (an earlier page's ``after``;
        None: from the start), in the index's order, and where the next page starts. Without it,
        a listing could not go past its first 1,000 tasks (the contract's most a request).
        ``with_errors=False``: no error read or opened, none listed (the operator console polls
        this list and never shows an error: it may carry task data)."""
        q = QueueKey(owner, service)
        key = await self.ctx.keys.current(owner)
        listed, next_after = await self._scan_parked(q, limit, after=after)
        return ParkedPage(await self._parked_tasks(q, key, listed, with_errors), next_after)

    async def _parked_tasks(
        self, q: QueueKey, key: OwnerKey, listed: list[tuple[ParkedEntry, Lease]], with_errors: bool
    ) -> list[ParkedTask]:
        if not with_errors:
            return [
                ParkedTask(
                    e.task_id, lease.epoch, lease.park_reason or e.reason, _parked_at(e, lease), e.has_token, None
                )
                for e, lease in listed
            ]
        errors, read = await self._errors_within_budget(q, [e.task_id for e, _ in listed])
        found = []
        for n, (e, lease) in enumerate(listed):
            error_json = None
            sealed = errors.get(e.task_id)
            if sealed is not None:
                try:
                    owner_key = (
                        key if sealed.key_id == key.key_id else await self.ctx.keys.by_id(q.owner, sealed.key_id)
                    )
                    error_json = open_error(owner_key, q, e.task_id, sealed)
                except Exception:  # a rotated-out key or a tampered row: the listing still works
                    error_json = None
            found.append(
                ParkedTask(
                    e.task_id,
                    lease.epoch,
                    lease.park_reason or e.reason,
                    lease.parked_at_ms or e.parked_at_ms,
                    e.has_token,
                    error_json,
                    last_error_omitted=n >= read,
                )
            )
        return found

    async def _errors_within_budget(
        self, q: QueueKey, task_ids: list[uuid.UUID]
    ) -> tuple[dict[uuid.UUID, Sealed], int]:
        """The last errors of ``task_ids``, in order, while they fit the listing's budget; and how
        many of the tasks were looked at (the errors of the rest, if any, are left out)."""
        largest = self.ctx.limits.max_value_bytes
        budget = max(PARKED_ERRORS_BUDGET_BYTES, largest)
        per_read = max(1, min(LEASES_PER_READ, ERRORS_READ_BYTES // max(largest, 1)))
        kept: dict[uuid.UUID, Sealed] = {}
        spent = 0
        for start in range(0, len(task_ids), per_read):
            batch = task_ids[start : start + per_read]
            sealed = await self.store.errors_of(q, batch)
            for n, task_id in enumerate(batch):
                error = sealed.get(task_id)
                if error is None:
                    continue
                if spent + len(error.ciphertext) > budget:
                    return kept, start + n
                spent += len(error.ciphertext)
                kept[task_id] = error
        return kept, len(task_ids)

    async def redrive(self, owner: str, service: str, task_ids: list[uuid.UUID] | None) -> int:
        """Back to the queue, at most ``redrive_rate`` a second (a flood of redriven poison tasks
        must not take every worker at once); their delivery count starts again. ``None``: a
        ``redrive all`` round bounded by this bridge's now (see :meth:`redrive_all`)."""
        if task_ids is None:
            return (await self.redrive_all(owner, service)).redriven
        q = QueueKey(owner, service)
        self._filing_allowed()
        await self.ctx.keys.current(owner)
        return await self._put_back(q, [(task_id, None) for task_id in task_ids])

    async def redrive_all(
        self, owner: str, service: str, parked_before_ms: int | None = None, after: uuid.UUID | None = None
    ) -> RedriveRound:
        """Put back up to REDRIVE_ALL_MAX tasks parked before ``parked_before_ms`` (None: this
        bridge's now), from the index row after ``after`` on.

        A caller that sends the bound (and the row) of each reply in its next request ends: tasks
        that workers park again meanwhile are parked at or after the bound, and are left; the
        rows it goes on after only move forward, and the index rows that could hold a task parked
        before the bound are those of tasks added before it (``_last_id_parked_before``), which
        later adds do not grow. Without a bound each request takes its own now, as in 1.4: a
        caller that sends it again until it answers 0 goes on while tasks are parked again."""
        q = QueueKey(owner, service)
        self._filing_allowed()
        await self.ctx.keys.current(owner)
        bound = self.ctx.clock.now_ms() if parked_before_ms is None else parked_before_ms
        listed, stopped_at = await self._scan_parked(q, REDRIVE_ALL_MAX, after=after, parked_before_ms=bound)
        done = await self._put_back(q, [(e.task_id, lease.epoch) for e, lease in listed])
        return RedriveRound(done, bound, stopped_at)

    async def _put_back(self, q: QueueKey, tasks: list[tuple[uuid.UUID, int | None]]) -> int:
        """Unpark ``tasks`` (each still parked at the epoch given, if one is: the park a listing
        found, not one after it), paced; how many went back."""
        ctx = self.ctx
        interval = 1.0 / ctx.limits.redrive_rate
        done = 0
        for task_id, listed_epoch in tasks:
            # Again at each task: a paced round runs for seconds (minutes behind other redrives),
            # and a clock found off meanwhile would file the rest where nobody reads.
            self._filing_allowed()
            lease = await self.store.lease(q, task_id, serial=False)
            if lease is None or lease.state is not LeaseState.PARKED:
                continue
            if listed_epoch is not None and lease.epoch != listed_epoch:
                continue  # redriven and parked again since it was listed: after the bound
            if len(lease.park_ids) >= 2 * REDRIVES_PER_TASK_MAX:
                log.warning(
                    "task %s of %s/%s redriven %d times already: left parked (discard or cancel it)",
                    task_id,
                    q.owner,
                    q.service,
                    REDRIVES_PER_TASK_MAX,
                )
                continue
            await self._paced(q, interval)
            ctx.background.check_cut("redrive", done)
            now = ctx.clock.now_ms()
            until = now - ctx.limits.skew_margin_ms  # claimable at once
            # A lease last claimed before 1.3 does not say: the task row does (as for ``fail``);
            # taken for "no token", the redriven task's result never reached the engine.
            has_token = await self._has_token(q, task_id, lease)
            watch = ExpiryEntry(until, q, task_id, lease.epoch, has_token)
            # One bucket ahead: the scheduler may have parked it in a pass over the running bucket
            # and marked this task and epoch handled there, and that bucket's later passes skip
            # an entry of the same task and epoch (seen in a trace; the redriving bridge's own
            # timer below is best effort).
            await self.store.watch_expiry(expiry_bucket(now) + 1, watch)
            try:
                res = await self.store.unpark(q, task_id, lease.epoch, until)
            except Unavailable:
                # Its outcome unknown: it may land after both passes over that bucket read the
                # task parked, and a retry then finds it not parked (skipped): leased to nobody,
                # listed nowhere, until its TTL. Watched again later (refused: read parked, let go).
                self._watch_later(watch)
                raise
            if not res.applied:
                continue
            if ctx.clock.now_ms() - now >= EXPIRY_BUCKET_MS:
                # Slow (a Paxos round resolved by a resend or a SERIAL read): the bucket's passes
                # may have read it parked and let the watch go (found by review, 2026-12-07).
                self._watch_later(watch)
            self.soon(watch, now)
            # Ready again (waiting for a worker); its claim moves it to in flight (the hint says
            # so). Counted before the index row's delete: if that fails, the task is ready anyway.
            ctx.count(q, ms_of(task_id), ready=1)
            ctx.metrics.inc("tasks_redriven")
            done += 1
            # Only this park's row: the task may be claimed and parked again (at a later epoch)
            # before this delete lands, and that park's row must stay.
            await self._drop_parked_row(q, task_id, lease.epoch, lease)
        return done

    def _watch_later(self, watch: ExpiryEntry) -> None:
        """File an unpark's deadline again, in a bucket still to come (off the request path)."""

        async def file() -> None:
            at = expiry_bucket(self.ctx.clock.now_ms() + 4 * EXPIRY_BUCKET_MS)
            try:
                await self.store.watch_expiry(at, watch)
            except Unavailable as exc:
                log.warning("a redriven task's deadline not filed again (%s): the scheduler's second pass decides", exc)

        self.ctx.background.spawn(file(), "file a slow unpark's deadline")

    async def _drop_parked_row(self, q: QueueKey, task_id: uuid.UUID, epoch: int | None, lease: Lease) -> None:
        """The parked-index rows of a park an applied decision (redrive, discard, cancel) ended:
        the task's in ``parked`` and the park's own in ``parks`` (``lease`` as the decision read
        it names the park). A delete that fails leaves a row listings pass (and remove) and stats
        do not count: the decision stands. Raised, the caller was answered ``unavailable`` for a
        decision that had applied, and its retry found the task no longer parked (a cancel
        answered false)."""

        async def drop(removal: Awaitable[None]) -> None:
            try:
                await removal
            except Unavailable as exc:  # a storage error (a timeout, an unknown outcome)
                log.warning("parked-index row of task %s left behind: %s", task_id, type(exc).__name__)

        removals = [drop(self.store.remove_parked(q, task_id, epoch=epoch))]
        if lease.park_id is not None:  # none: parked by a bridge before parks had ids (no row in ``parks``)
            removals.append(drop(self.store.remove_park(q, task_id, lease.park_id, lease.parked_at_ms)))
        await asyncio.gather(*removals)

    async def _paced(self, q: QueueKey, interval: float) -> None:
        """Wait for this queue's next redrive slot on this bridge (``interval`` apart)."""
        loop = asyncio.get_running_loop()
        if q not in self._redrive_pace:
            if len(self._redrive_pace) >= REDRIVE_PACES_MAX:
                # Only queues whose pace is idle (unlocked, their next slot passed) are forgotten:
                # cleared whole, a redrive still pacing lost its lock, and a second redrive of its
                # queue ran beside it at twice the rate (found by review, 2026-12-06).
                now = loop.time()
                for idle in [k for k, (lk, at) in self._redrive_pace.items() if not lk.locked() and at[0] <= now]:
                    del self._redrive_pace[idle]
            self._redrive_pace[q] = (asyncio.Lock(), [0.0])
        lock, next_at = self._redrive_pace[q]
        async with lock:
            if (wait := next_at[0] - loop.time()) > 0:
                await self.ctx.background.pause_unless_cut(wait)
            next_at[0] = loop.time() + interval

    async def discard(self, owner: str, service: str, task_ids: list[uuid.UUID]) -> int:
        q = QueueKey(owner, service)
        await self.ctx.keys.current(owner)
        done = 0
        for task_id in task_ids:
            self.ctx.background.check_cut("discard", done)
            lease = await self.store.lease(q, task_id, serial=False)
            if lease is None or lease.state is not LeaseState.PARKED:
                continue
            res = await self.store.cancel(
                q, task_id, LeaseState.PARKED, lease.epoch, to=LeaseState.DISCARDED, base_epoch=lease.base_epoch
            )
            if res.applied:
                await self._drop_parked_row(q, task_id, None, lease)
                self.ctx.metrics.inc("tasks_discarded")
                done += 1
        return done

    async def task_info(self, owner: str, service: str, task_id: uuid.UUID) -> TaskInfo | None:
        """One task's state for operators (the console): None if this owner has no such task."""
        q = QueueKey(owner, service)
        await self.ctx.keys.current(owner)
        about, lease = await asyncio.gather(
            self.store.task_about(q, task_id), self.store.lease(q, task_id, serial=False)
        )
        if about is None:
            return None
        now = self.ctx.clock.now_ms()
        due = ms_of(task_id)
        if lease is None:
            state = "delayed" if due > now else "ready"
        elif lease.is_leased and lease.worker == "":
            state = "ready" if (lease.lease_until_ms or 0) + self.ctx.limits.skew_margin_ms <= now else "delayed"
        else:
            state = str(lease.state)
        return TaskInfo(
            task_id=task_id,
            state=state,
            deliveries=0 if lease is None else lease.epoch,
            worker=None if lease is None or not lease.worker else lease.worker,
            added_at_ms=about.created_at_ms,
            due_at_ms=due,
            lease_expires_at_ms=None if lease is None or not lease.is_leased else lease.lease_until_ms,
            completed_at_ms=None if lease is None else lease.completed_at_ms,
            parked_at_ms=None if lease is None else lease.parked_at_ms,
            park_reason=None if lease is None else lease.park_reason,
            has_token=about.has_token,
            priority=about.priority,
            max_deliveries=about.max_deliveries,
        )

    # -- cancel and purge ---------------------------------------------------------------------------
    async def cancel(self, owner: str, service: str, task_id: uuid.UUID, *, request_id: str | None = None) -> bool:
        """Cancel a task wherever it is (ready, delayed, in flight, parked); false if it had finished
        or does not exist. A worker holding it is refused on ack, extend and fail.

        ``request_id`` (the AMQP message-id, else the correlation-id): the cancel's completion id
        is derived from it, so that a copy of the request (redelivered to another bridge after this
        one applied it and died before its reply, or resent by a caller that lost the reply) finds
        its own cancel and answers true again. Answered false, the engine read "it had finished"
        and waited for a result that never came."""
        ctx = self.ctx
        q = QueueKey(owner, service)
        await ctx.keys.current(owner)
        done_id = _cancel_id(q, task_id, request_id)
        for _ in range(CANCEL_ATTEMPTS):
            lease = await self.store.lease(q, task_id, serial=True)
            now = ctx.clock.now_ms()
            if lease is None:
                payload = await self.store.payload(q, task_id)
                if payload is None:
                    return False
                res = await self.store.cancel(q, task_id, None, 0, done_id=done_id)
                if res.applied:
                    # Marked taken, as a claim or a purge marks its entry: scans, purges and stats
                    # pass it without a claim or a lease read, and the cursor may move past it. Its
                    # hint cannot be taken back from the broker: a fetch that takes it learns from
                    # its refused claim that the task finished (``fetching.MAX_STALE_HINTS``).
                    entry = ReadyEntry(LANE_FRESH, bucket_of_task(task_id), task_id, task_id, None, False, False)
                    ctx.background.spawn(self.store.mark_claimed(q, entry), "mark cancelled")
                    due = ms_of(task_id)
                    if due > now or was_delayed(task_id, payload.created_at_ms):
                        ctx.count_delayed(q, due, -1)  # under the due minute its add counted it
                    else:
                        ctx.count(q, due, ready=-1)
                    return self._cancelled(task_id)
                continue  # claimed meanwhile: look again
            if lease.state in FINAL_STATES:
                # This very request's cancel (its first copy): true again, counted once.
                return done_id is not None and lease.state is LeaseState.CANCELLED and lease.completion_id == done_id
            # Only the lease as read: a park and a redrive since (leased at the same epoch again,
            # but counted ready, not in flight) refuse it, and the next attempt reads it again.
            res = await self.store.cancel(
                q, task_id, lease.state, lease.epoch, base_epoch=lease.base_epoch, done_id=done_id
            )
            if res.applied:
                if lease.state is LeaseState.PARKED:
                    await self._drop_parked_row(q, task_id, lease.epoch, lease)
                elif lease.base_epoch == lease.epoch:
                    ctx.count(q, ms_of(task_id), ready=-1)  # redriven, not claimed since
                else:
                    ctx.count(q, ms_of(task_id), in_flight=-1)
                return self._cancelled(task_id)
        raise Unavailable("the task kept changing while being cancelled; retry")

    def _cancelled(self, task_id: uuid.UUID) -> bool:
        self.ctx.metrics.inc("tasks_cancelled")
        log.info("task cancelled", extra={"task_id": str(task_id)})
        return True

    async def purge(self, owner: str, service: str) -> tuple[int, bool]:
        """Cancel the queue's ready tasks: never claimed and due, or whose lease ran out. In-flight,
        delayed and parked tasks are left alone. Returns (purged, more may remain)."""
        self._filing_allowed()
        ctx = self.ctx
        q = QueueKey(owner, service)
        await ctx.keys.current(owner)
        # The hints first: left behind, they name cancelled tasks, and fetches would spend their
        # claim attempts on them (8 a fetch) and answer null while a task added since is ready.
        # A task added meanwhile whose hint goes too is ready, so either the walk below cancels it
        # or reconciliation finds it. Best effort: the purge itself does not depend on it.
        try:
            await self.hints.discard(q)
        except Exception as exc:  # the broker is away: stale hints cost claims, never a task
            log.warning("hints of a purged queue not discarded: %s", exc)
        now = ctx.clock.now_ms()
        margin = ctx.limits.skew_margin_ms
        walk = _PurgeWalk()
        for lane in (LANE_FRESH, LANE_RECOVERED):
            await self._purge_lane(q, lane, walk, now, margin)
            if walk.truncated:
                break
        purged, truncated = walk.purged, walk.truncated
        if purged:
            ctx.metrics.inc("tasks_purged", purged)
            log.warning("queue purged", extra={"owner": owner, "service": service, "purged": purged})
        return purged, truncated

    async def _purge_lane(self, q: QueueKey, lane: int, walk: _PurgeWalk, now: int, margin: int) -> None:
        """Page by page, each resuming after the last: entries already taken (claimed, or cancelled
        by an earlier request of this purge and marked so) cost a read, not a lease read, and do
        not count against the budget. Before, every request walked the same first 20,000 entries
        from the cursor, found them cancelled, and answered {purged: 0, more: true}: a queue
        longer than that was never purged past them."""
        after: tuple[int, uuid.UUID] | None = None
        lead: tuple[int, uuid.UUID] | None = None  # the cursor may move past the entries up to here
        leading = True
        # Settled by this bridge's clock, less what it may be off by (a purge is served within a
        # second): ahead, a purge moved the cursor past an add still in time by its adder's rule;
        # not moved at all, the next requests walked the entries it had cancelled again, 100,000
        # a request, and answered {purged: 0, more: true} until a sound bridge took one.
        settled = settled_before(lane, now - clock_slack_ms(self.ctx.gate), self.settle_ms)
        # A lane with no cursor is walked from the first bucket a live task can be in, not bucket 0.
        first = first_live_bucket(now, self.ctx.limits.task_ttl_ms)
        while True:
            entries, cut = await walk_lane(
                self.store, q, lane, PURGE_PAGE, resume=after, first_bucket=first, until_ms=now
            )
            walk.read += len(entries)
            # Claimed entries have a lease that is not ready (or a re-exposure of it, in lane 0).
            candidates = [e for e in entries if not e.claimed and ms_of(e.seq) <= now]
            walk.looked += len(candidates)
            cancelled: set[uuid.UUID] = set()
            for i in range(0, len(candidates), LEASES_PER_READ):
                if self.ctx.background.requests_cut:
                    # The bridge's stop: answered as a purge cut by its bounds ("more"), between
                    # two batches; its caller goes on through another bridge.
                    walk.truncated = True
                    break
                batch = candidates[i : i + LEASES_PER_READ]
                leases = await self.store.leases_of(q, [e.task_id for e in batch])
                done = [e for e in batch if await self._purge_one(q, e, leases.get(e.task_id), now, margin)]
                # Marked taken (side by side): the next request of this purge skips them unread.
                await asyncio.gather(*(self.store.mark_claimed(q, e) for e in done))
                walk.purged += len(done)
                cancelled.update(e.seq for e in done)
            for e in entries:
                leading = leading and (e.claimed or e.seq in cancelled) and ms_of(e.seq) < settled
                if leading:
                    lead = (e.bucket, e.seq)
            if not cut or walk.truncated:
                break
            after = (entries[-1].bucket, entries[-1].seq)
            if walk.looked >= PURGE_MAX or walk.read >= PURGE_SCAN_MAX:
                walk.truncated = True
                break
        if lead is not None:
            # The dispatcher's rule: past a leading run of taken entries, settled (no write can
            # land before them any more), later walks and scans start after it.
            await self.store.advance_cursor(q, lane, *lead)

    async def _purge_one(self, q: QueueKey, e: ReadyEntry, lease: Lease | None, now: int, margin: int) -> bool:
        if e.lane == LANE_FRESH:
            if lease is not None:
                return False
            res = await self.store.cancel(q, e.task_id, None, 0)
        else:
            expired = lease is not None and lease.is_leased and lease.epoch == e.epoch
            if not expired or lease is None or lease.lease_until_ms is None or lease.lease_until_ms + margin > now:
                return False
            res = await self.store.cancel(
                q,
                e.task_id,
                LeaseState.LEASED,
                lease.epoch,
                expired_before_ms=now - margin,
                base_epoch=lease.base_epoch,
            )
        if not res.applied:
            return False
        if e.lane == LANE_FRESH and was_delayed(e.task_id, e.created_at_ms):
            # A delayed task that came due: its add counted it under its due minute, as cancel and
            # the first claim know. Taken off ready instead, it hid a ready task until that minute
            # ended (stats count the minute's tasks ready once it has passed).
            self.ctx.count_delayed(q, ms_of(e.task_id), -1)
            return True
        # Never claimed (or redriven since): counted ready; else in flight (``counting``).
        ready = e.lane == LANE_FRESH or (lease is not None and lease.base_epoch == lease.epoch)
        self.ctx.count(q, ms_of(e.task_id), ready=-1 if ready else 0, in_flight=0 if ready else -1)
        return True


__all__ = [
    "PARK_DELIVERY_LIMIT",
    "PARK_FAILED",
    "PARK_KEY_MISSING",
    "Extended",
    "Failed",
    "Lifecycle",
    "ParkedTask",
    "RedriveRound",
    "TaskInfo",
]
