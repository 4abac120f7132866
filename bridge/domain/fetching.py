"""fetch: hand a worker the task it holds again, or claim the next one.

- A task is claimed only by a compare-and-set on its own lease; every claim increments ``epoch``
  (the fencing token), and ack/extend are conditional on it, so a worker that lost its lease can
  never complete or extend the task.
- The lease deadline is filed in the recovery timer wheel and the worker's pointer is written
  *before* the claim, so a crash between the claim and the reply never strands a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from bridge.domain.clock import next_stamp, pointer_stamp
from bridge.domain.condemn import condemn
from bridge.domain.context import QueueContext
from bridge.domain.counting import landed_later, was_delayed
from bridge.domain.dispatch import Dispatcher
from bridge.domain.errors import IntegrityError, KeyMissing, KeysUnavailable, MaybeApplied, Unavailable
from bridge.domain.hints import HintsUnavailable, Taken, TaskHints
from bridge.domain.lifecycle import PARK_KEY_MISSING, Lifecycle, renew
from bridge.domain.models import Delivery, FetchRequest
from bridge.domain.reconcile import Reconciliation
from bridge.domain.records import (
    LANE_FRESH,
    LANE_RECOVERED,
    ExpiryEntry,
    KeyMissingRun,
    Lease,
    LeaseState,
    Payload,
    QueueKey,
    ReadyEntry,
    WorkerPointer,
    WorkerRow,
)
from bridge.domain.relay import ResultRelay
from bridge.domain.sealing import open_value
from bridge.domain.timeline import EXPIRY_BUCKET_MS, expiry_bucket, ms_of, ready_bucket
from bridge.errors import BridgeError
from bridge.observability.throttled import ThrottledWarning

log = logging.getLogger("bridge.queue")
_T = TypeVar("_T")

MAX_CLAIM_ATTEMPTS = 8  # claims a fetch may lose to other fetches before it tries a scan
# Hints of tasks that had finished (cancelled, done, parked, discarded, dead: the failed claim's
# row says so, nothing more is read) are no lost races, and do not use up the attempts above:
# eight cancelled tasks' hints (cancel cannot take a hint back from the broker) sent a fetch to
# the scan, which ignores priorities, or had it answer null with a task ready. Each still costs
# a write-ahead and a failed claim, so a fetch behind a long run of them (a mass cancel) stops
# after this many and goes on as after its lost races; the next fetch takes the rest.
MAX_STALE_HINTS = 64
# Second entries of late adds (``WorkQueue._enter_again_if_late``) whose tasks were taken through
# their first entries, passed over by a scan after one plain read each (``_spent_second_entry``):
# no lost races either. A store stall makes many adds late at once, and eight of them in a row
# made a fetch answer null with a task ready behind them.
MAX_SPENT_ENTRIES = 64
# Tasks one fetch may claim and find it cannot open (their key missing: removed, or not loaded
# here yet) before it answers so: each is let go (its lease runs out, it comes back later), and the
# fetch goes on to the next task. Answered at the first, a worker backed off at each and never
# reached the healthy tasks behind a run of them (a removed key's tasks, served first once they
# come back in the recovered lane). Not a lookup that failed (``KeysUnavailable``): a blip of the
# key server would lease a backlog away four tasks a fetch, each for its whole timeToRecover; that
# fetch answers ``unavailable`` at once, and its worker backs off.
MAX_UNOPENED = 4
# A task let go that way comes back within this long (or at its lease's end, if sooner; doubling
# from there): held for its worker's whole timeToRecover (hours, for long jobs), a key server away
# for a minute, or a key not loaded on one bridge yet, kept the tasks it met leased to nobody for
# that long (found by review, 2026-12-07). A minute, the default timeToRecover: a key missing for
# good costs no more claims than a default worker's lost tasks do.
LET_GO_BACK_MS = 60_000
# ... doubling with each let-go of the task since its last redrive (its ``uncounted``), up to 64
# minutes: a key gone for good came back every minute for the TTL, claimed, read and let go each
# time, its tasks' hints ahead of the healthy ones (found by re-review, 2026-12-07).
LET_GO_DOUBLINGS_MAX = 6
# A task whose key was missing at every claim for BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS is parked
# at the next such claim if there were at least this many (``_gone_for_good``).
KEY_MISSING_PARK_MIN_CLAIMS = 3
TTL_GRANULARITY_MS = 1_000  # Cassandra expires rows on whole seconds
# Workers with fetches in flight on one bridge that are made to take turns (``_Flight``). An entry
# lives only while a fetch of its worker is in flight, so this bounds the memory of a burst of
# fetches of distinct worker ids (a long-poll's delivery is acknowledged at once: the prefetch
# window does not bound them); the fetches of a worker arriving while it is full run unordered, as
# they did before the turns.
MAX_FLIGHTS = 100_000
# When a claim's outcome is unknown, its lease is read again after these pauses (seconds), as a
# completion's is (``acking.UNCERTAIN_COMPLETION_LOOKUPS_S``).
UNCERTAIN_CLAIM_LOOKUPS_S = (0.5, 2.0, 8.0)
# Writes of an uncertain claim's deadline filed again, each retried after 1, 2 s on failure.
REFILE_ATTEMPTS = 3
# A waiting fetch whose queue's hints cannot be used (``HintsUnavailable``: the node of its hint
# queue is down) scans the store this often for the rest of its wait.
HINTLESS_POLL_MS = 1_000
MAX_HINTLESS_QUEUES = 10_000  # queues whose last hintless poll is remembered (any caller names new ones)


class _Claim(NamedTuple):
    """One claim tried: the delivery (None if the task is not ours) and the stamp of the pointer
    write, which the next write of the pointer must exceed."""

    delivery: Delivery | None
    stamp: int
    # Not ours because the task has finished (or outlived its TTL), not because another fetch
    # won it: a stale hint or index entry.
    finished: bool = False
    # When the claimed task's life ends, if known (``Payload.expires_at_ms``): its ready entry's
    # claimed mark lives as long.
    expires_at_ms: int | None = None
    # A recovered-lane entry whose task was claimed at a later epoch since (through another entry
    # of the same re-exposure, written again ahead of a slow store): no claim through it can ever
    # apply again.
    superseded: bool = False


class RequestAbandoned(BridgeError):
    """Nobody waits for this request's reply any more (its caller's deadline passed, or a waiting
    fetch's worker is gone): it ends without a reply. Never on the wire: there is nobody to tell."""

    code = "abandoned"


class Requester:
    """A ``still_wanted`` that can also say at once that its caller is gone (``hang_up``): a
    waiting fetch then stops waiting (``RequestAbandoned``) instead of holding its place in the
    queue's waiters, the oldest of them, until a task comes or its waitMs ends. Only the wait is
    cut short: a claim under way is finished (a compare-and-set that may apply whatever the caller
    does), with its bookkeeping, and one not begun is not made (asked before it, as any
    ``still_wanted``). The HTTP gateway's (the AMQP transport's probe asks the broker instead)."""

    def __init__(self, alive: Callable[[], bool]) -> None:
        self._alive = alive
        self.gone = asyncio.Event()

    def hang_up(self) -> None:
        self.gone.set()

    async def __call__(self) -> bool:
        return not self.gone.is_set() and self._alive()


async def _unless_gone(
    wait: Awaitable[_T],
    still_wanted: Callable[[], Awaitable[bool]] | None,
    give_back: Callable[[_T], Awaitable[None]] | None = None,
) -> _T:
    """``wait``, cut short (``RequestAbandoned``) when ``still_wanted`` is a :class:`Requester`
    whose caller hangs up meanwhile. A hint taken as the wait was cut goes back, for another fetch.
    Cut short, ``wait`` is cancelled and waited for: a broker call under way in it (a hint take's
    ``basic.get``, its consumer's start) ends first, uncut (``transport.hints._to_its_end``: a
    cancelled call closes the channel that all the bridge's hints share)."""
    if not isinstance(still_wanted, Requester):
        return await wait
    if still_wanted.gone.is_set():
        if asyncio.iscoroutine(wait):
            wait.close()
        raise RequestAbandoned("its caller hung up")
    waiting = asyncio.ensure_future(wait)
    gone = asyncio.ensure_future(still_wanted.gone.wait())
    try:
        await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        waiting.cancel()
        raise
    finally:
        gone.cancel()
    if not waiting.done():
        waiting.cancel()
        with suppress(asyncio.CancelledError):
            got = await waiting
            if give_back is not None:  # it came as the wait was cut: not decided, another gets it
                await asyncio.shield(give_back(got))
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            # Cancelled itself while it waited for the cut wait's end (a broker call runs to its
            # end, up to 3 s): a stop's cancel, swallowed above, let the fetch go on writing to a
            # store being closed (found by the re-review, 2026-12-07).
            raise asyncio.CancelledError
        raise RequestAbandoned("its caller hung up while it waited")
    return waiting.result()


async def _give_back(taken: Taken | None) -> None:
    if taken is not None:
        await taken.retry()


@dataclass
class _Flight:
    """The fetches of one worker (owner, service, workerId) in flight on this bridge.

    Two fetches of one worker at once (a retry taken by the same bridge while the first copy still
    runs, two coroutines of one worker) each read the pointer (nothing held), each claimed a task
    of its own: the worker held two leases, its pointer named one, and the other waited out its
    lease (a contract 1.0 ack, naming no task, then completed the pointer's task with the other
    one's result). So they take turns: a fetch looks at the pointer and claims only while it holds
    ``lock``. A fetch that had to wait for its turn, when a lease was granted to the worker
    meanwhile (``granted`` moved), reads the pointer the other wrote and resends that task: both
    replies name the same task. Uncontended, nothing more is read or written than before.

    Fetches of one worker on *different* bridges are not ordered (ordering them would cost a
    statement per fetch): see docs/reliability.md, "Known limits"."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # fetches of the worker in flight here; the entry goes when none is left
    granted: int = 0  # leases granted (claims) or renewed (resends) to the worker by them
    # The latest pointer stamp they read or wrote: a write-ahead of any of them orders after it.
    # (A long-poll read the pointer seconds ago; a fresh fetch beside it writes 25 ms ahead.)
    stamp: int | None = None


def _latest(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class _Attempt:
    """One fetch's claiming: the pointer's write stamp moves with every claim tried."""

    q: QueueKey
    worker: str
    ttr: int
    stamp: int | None
    stale_pointer: bool
    flight: _Flight = field(default_factory=_Flight)
    holding: bool = False  # this fetch holds its worker's turn (``flight.lock``)
    attempted: bool = False
    # The caller's deadline (x-deadline): no claim is made for it later (it stopped listening).
    deadline_ms: int | None = None
    # A waiting fetch's question "is my worker still there?", asked beside the write-ahead.
    requester: asyncio.Future[bool] | None = None
    # Set when the caller hangs up (the HTTP gateway's ``Requester``): checked again just before
    # the claim, since the question above may have been answered before the hang-up.
    hung_up: asyncio.Event | None = None
    # The claim under way is the one the worker's pointer announced (``_claim_announced``): the
    # task and epoch another fetch of this worker may be claiming too.
    announced: tuple[uuid.UUID, int] | None = None
    # Tasks claimed that could not be opened (``MAX_UNOPENED``), and why the last could not: the
    # fetch's answer if it finds nothing else.
    unopened: int = 0
    unopenable: Exception | None = None
    # The claim under way applied (a lease granted to the worker, by the claim or a resend of it):
    # an error after it, its task not handed out, leaves the hint that led to it nothing to do.
    applied: bool = False

    def passed_over(self, exc: Exception) -> None:
        """A task claimed and let go, its key not usable now: the next one, up to ``MAX_UNOPENED``."""
        if self.unopened >= MAX_UNOPENED:
            raise exc
        self.unopened += 1
        self.unopenable = exc


def _claim_not_landed(held: WorkerPointer, current: Lease | None) -> bool:
    """The pointer announces a claim (written ahead of it) that the lease does not show: the claim
    may still be on its way, or never came. A fresh claim (epoch 1) finds no lease; a re-claim finds
    the lease still at the epoch before it, and leased."""
    if held.done:
        return False
    if held.epoch == 1:
        return current is None
    return current is not None and current.is_leased and current.epoch == held.epoch - 1


async def _outcome_of(read: asyncio.Future[Payload | None]) -> tuple[Payload | None, Exception | None]:
    """The payload read beside a claim's write-ahead, or how it failed (then no claim is made: the
    claim records the end of life the read tells)."""
    try:
        return await read, None
    except Exception as exc:
        return None, exc


def _drop(read: asyncio.Future[Payload | None] | None) -> None:
    """A task read whose claim is not made: cancelled, and its outcome retrieved if it failed."""
    if read is not None:
        read.cancel()
        read.add_done_callback(lambda f: None if f.cancelled() else f.exception())


def _after(stamp: int | None, now_ms: int) -> int:
    """The stamp of a write that undoes the pointer write stamped ``stamp``, and nothing later."""
    return stamp + 1 if stamp is not None else next_stamp(now_ms, None)


class Fetcher:
    def __init__(
        self,
        ctx: QueueContext,
        dispatcher: Dispatcher,
        hints: TaskHints,
        reconcile: Reconciliation,
        soon: Callable[[ExpiryEntry, int], None],
        relay: ResultRelay,
        lifecycle: Lifecycle,
    ) -> None:
        self.ctx = ctx
        self.relay = relay  # a dead-lettered task's engine is told (``condemn``)
        self.lifecycle = lifecycle  # a task whose key is gone for good is parked (``_let_go``)
        self.dispatcher = dispatcher
        self.hints = hints
        self.reconcile = reconcile
        self.soon = soon  # ``WorkQueue.soon``: a timer of this bridge for a deadline moments away
        self._flights: dict[tuple[str, str, str], _Flight] = {}
        # A key outage meets every fetch that claims a task sealed with it: a line each flooded a
        # fleet's logs for as long as it lasted (deliveries_failed counts them all).
        self._error_undelivered = ThrottledWarning(log, level=logging.ERROR)
        # When a waiting fetch of a queue whose hints cannot be used last scanned it and found
        # nothing (loop time): the other waiters of that queue skip their scans until a poll
        # interval has passed. Each scanned every second: store reads grew with the waiting workers
        # (100 waiters, 133 a second) for as long as the node holding the hint queue was down.
        self._hintless_polls: OrderedDict[QueueKey, float] = OrderedDict()

    async def fetch(
        self,
        owner: str,
        req: FetchRequest,
        *,
        still_wanted: Callable[[], Awaitable[bool]] | None = None,
        deadline_ms: int | None = None,
    ) -> Delivery | None:
        """``deadline_ms``: the caller stops listening then; no task is claimed for it after
        (``RequestAbandoned``). ``still_wanted``: asked before a fetch that waited claims."""
        ctx = self.ctx
        q = QueueKey(owner, req.service_id)
        ttr = min(req.time_to_recover or ctx.limits.default_ttr_ms, ctx.limits.max_ttr_ms)
        if not ctx.gate.ok:
            ctx.metrics.inc("leases_refused", reason="clock_skew")
            raise Unavailable(f"this bridge does not grant leases now: {ctx.gate.describe()}; retry on another bridge")
        # An owner without a key can have no task: say so (unknown_owner, as add does) instead of
        # answering null forever to a misconfigured worker. The key is cached: no I/O here.
        await ctx.keys.current(owner)
        key = (owner, req.service_id, req.worker_id)
        flight = self._flights.get(key)
        if flight is None:
            flight = _Flight()
            if len(self._flights) < MAX_FLIGHTS:
                self._flights[key] = flight
        flight.users += 1
        a = _Attempt(q, req.worker_id, ttr, None, stale_pointer=False, deadline_ms=deadline_ms, flight=flight)
        if isinstance(still_wanted, Requester):
            a.hung_up = still_wanted.gone
        try:
            return await self._fetch(a, req, still_wanted)
        finally:
            self._leave_turn(a)
            flight.users -= 1
            if flight.users == 0 and self._flights.get(key) is flight:
                del self._flights[key]

    async def _fetch(
        self, a: _Attempt, req: FetchRequest, still_wanted: Callable[[], Awaitable[bool]] | None
    ) -> Delivery | None:
        ctx = self.ctx
        granted = a.flight.granted
        await self._take_turn(a)
        # A fetch that says it holds nothing (``fresh``: the worker acked its last task and this is
        # no retry) skips the pointer read, unless another fetch of this worker was granted a
        # lease while this one waited for its turn: then both hand out that task.
        delivery = await self._look(a, fresh=req.fresh and a.flight.granted == granted)
        if delivery is not None:
            return delivery
        try:
            delivery = await self._claim_next(a)
            # (Not after tasks it could not open: the worker hears why at once, as before.)
            if delivery is None and req.wait_ms > 0 and a.unopenable is None:
                delivery = await self._wait_for_hint(a, req.wait_ms, still_wanted)
        except RequestAbandoned:
            delivery = None
            abandoned = True
        else:
            abandoned = False
        finally:
            if a.requester is not None:
                a.requester.cancel()
        if delivery is None and (a.stale_pointer or a.attempted):
            if not a.holding:
                await self._take_turn(a, bounded=False)  # a long-poll waited without it
            # Our write-ahead pointer names a task we did not get: drop it. Stamped just after the
            # write it undoes (ours, or the stale one read), not at the present: a pointer another
            # fetch of this worker wrote meanwhile (an orphaned long-poll that claimed a task for
            # it) must survive, or that task stays leased to the worker and no fetch returns it.
            stamp = _after(a.stamp, ctx.clock.now_ms())
            a.flight.stamp = _latest(a.flight.stamp, stamp)
            await ctx.store.clear_worker(a.q, a.worker, stamp)
        if abandoned:
            raise RequestAbandoned("nobody waits for this fetch's reply any more")
        if delivery is None and a.unopenable is not None:
            # Nothing else to hand out: the worker hears why (``unavailable``), once the pointers
            # this fetch wrote ahead of claims it lost after it are undone (above). Raised before
            # them, the pointer of such a lost claim named the task let go, and the worker's next
            # fetch resent it and failed on it again.
            raise a.unopenable
        return delivery

    async def _take_turn(self, a: _Attempt, *, bounded: bool = True) -> None:
        """Wait until no other fetch of this worker looks at its pointer or claims on this bridge
        (``_Flight``); no longer than the caller's deadline (``bounded``): past it, nobody reads
        the reply."""
        lock = a.flight.lock
        if not bounded or a.deadline_ms is None or not lock.locked():
            await lock.acquire()
        else:
            try:
                async with asyncio.timeout(max(0, a.deadline_ms - self.ctx.clock.now_ms()) / 1000):
                    await lock.acquire()
            except TimeoutError:
                self.ctx.metrics.inc("requests_expired", method="fetch")
                raise RequestAbandoned("past the caller's deadline, behind another fetch of its worker") from None
        a.holding = True

    def _leave_turn(self, a: _Attempt) -> None:
        if a.holding:
            a.holding = False
            a.flight.lock.release()

    async def _look(self, a: _Attempt, *, fresh: bool) -> Delivery | None:
        """The task the worker's pointer names, resent with a fresh lease; else None, with the
        stamp to order the next pointer write after."""
        ctx = self.ctx
        # With nothing read (``fresh``) there is no stamp to order after, and this worker's last
        # pointer write may come from a bridge whose clock is ahead by up to the skew margin:
        # ordered after that (stamped at the present, a retry of this fetch found the pointer it
        # replaced).
        row = (
            WorkerRow(None, (ctx.clock.now_ms() + ctx.limits.skew_margin_ms) * 1000)
            if fresh
            else await ctx.store.worker(a.q, a.worker)
        )
        a.flight.stamp = _latest(a.flight.stamp, row.stamp)
        held = row.pointer
        if a.stamp is None:
            a.stamp = row.stamp
        if held is None or held.done:
            return None
        delivery, current = await self._resend(a, held, row.stamp)
        if delivery is None and _claim_not_landed(held, current):
            a.stamp = _latest(a.stamp, row.stamp)
            delivery = await self._claim_announced(a, held)
        if delivery is None:
            # It names a task that is not the worker's any more: undone if nothing replaces it.
            a.stamp = _latest(a.stamp, row.stamp)
            a.stale_pointer = True
        return delivery

    async def _resend(
        self, a: _Attempt, held: WorkerPointer, stamp: int | None
    ) -> tuple[Delivery | None, Lease | None]:
        """The worker has not acked its task: give it the same task again, with a fresh lease.
        Refused: None, and the lease as the refusal saw it.

        The extension is conditional on the epoch only, not on the deadline: if nobody re-claimed
        the task since the lease ran out, it was nobody else's in between. A shorter lease than the
        one held (this fetch's timeToRecover) has its deadline filed first (``renew``)."""

        async def has_token(_seen: Lease) -> bool:
            return held.has_token  # the pointer's, written ahead of the claim with its deadline

        q, worker = a.q, a.worker
        # Opened before the lease is renewed: a task this bridge cannot open (its key not here, the
        # key server away) changes nothing, neither deadline nor pointer, and is not passed over
        # for another task (the worker would hold two). Renewed first and then let go, the lease
        # of a task its worker held went to nobody (another worker took it while the first worked
        # on it); renewed and kept, the first copy of the fetch that claimed it, failing to open it
        # too, no longer found its own deadline to let go from: the task stayed leased for the
        # whole timeToRecover to a worker that never saw it, counted as a delivery (found by
        # re-reviews, 2026-12-07). Its key back, or on a bridge that has it, the resend succeeds.
        try:
            payload, opened = await self._opened_for_resend(q, held.task_id)
        except (KeyMissing, KeysUnavailable) as exc:
            # Refused as a key outage only while the worker holds the task (a read, on this path
            # only): a pointer naming a task done (a one-statement ack leaves it), re-claimed,
            # ended or let go (never handed out) is stale, and the fetch goes on to the next task.
            # Refused whatever the lease, a worker whose pointer named a task sealed with a removed
            # key got no task until that task's row expired (found by re-review, 2026-12-07).
            lease = await self.ctx.store.lease(q, held.task_id, serial=True)
            if lease is None or not lease.held_by(worker, held.epoch) or lease.uncounted_epoch == held.epoch:
                return None, lease
            missing = isinstance(exc, KeyMissing)
            self.ctx.metrics.inc("deliveries_failed", reason="key_missing" if missing else "key_unavailable")
            raise KeysUnavailable(f"the task this worker holds cannot be opened here now: {exc.message}") from None
        res, until = await renew(self.ctx, self.soon, q, held.task_id, held.epoch, worker, a.ttr, has_token)
        if not res.applied:
            return None, res.current
        a.applied = True
        a.flight.granted += 1
        # The scheduler will meet the old deadline, see the later one, and re-arm itself (a shorter
        # lease's earlier deadline was filed by ``renew``).
        delivery = await self._deliver(q, worker, held.task_id, held.epoch, until, payload, stamp=stamp, opened=opened)
        self.ctx.metrics.inc("tasks_redelivered", kind="resend")  # handed out (``_claim``)
        return delivery, None

    async def _opened_for_resend(
        self, q: QueueKey, task_id: uuid.UUID
    ) -> tuple[Payload | None, tuple[bytes, Payload] | None]:
        """The task's row and its value in clear (None: gone, or it did not authenticate: left to
        ``_deliver``, which says so or condemns it); KeyMissing or KeysUnavailable if it cannot
        be opened here."""
        payload = await self.ctx.store.payload(q, task_id)
        if payload is None:
            return None, None
        try:
            return payload, await self._open(q, task_id, payload, from_hint=False)
        except IntegrityError:
            return payload, None

    async def _claim_announced(self, a: _Attempt, held: WorkerPointer) -> Delivery | None:
        """Claim, for the worker, the task its pointer announces and no lease shows yet. That claim
        may still be on its way: another fetch of this worker (the first copy of a request retried
        here after its caller gave up, on a bridge whose store was slow) wrote the pointer ahead
        of it. Claiming another task, this fetch left the worker two leases once the slow claim
        landed, and the one it was not handed waited out its timeToRecover (up to 12 h). Now
        whichever claim lands first, the other finds the task leased to the worker at the epoch
        it announced and hands it out too (``_try_claim``). No statement more on the common path:
        this runs only when the pointer names a claim that never showed."""
        fresh = held.epoch == 1
        entry = ReadyEntry(
            LANE_FRESH if fresh else LANE_RECOVERED,
            ready_bucket(ms_of(held.task_id)),
            held.task_id,
            held.task_id,
            None if fresh else held.epoch - 1,
            held.has_token,
            False,
        )
        a.attempted = True
        # Only a task that is stored: a pointer can announce one that never will be. A fetch handed
        # an add's hint in the process writes its pointer ahead of the add's write; a bridge killed
        # -9 in between never stores the task (the broker redelivers the add, stored under another
        # id). Claimed, that id was leased to the worker for its TTL, re-exposed and claimed at
        # every lease's end (each a delivery that failed) and parked, a phantom in every listing.
        a.announced = (held.task_id, held.epoch)
        try:
            claim = await self._try_claim(a, entry, only_if_stored=True)
        finally:
            a.announced = None
        a.stamp = claim.stamp
        self.ctx.metrics.inc("claims", source="pointer", outcome="won" if claim.delivery else "lost")
        if claim.delivery is not None and fresh:
            # The recovered lane's entry is keyed by when the task was re-exposed, unknown here:
            # its scans find the lease taken, as for any claim made through a hint.
            marking = self.ctx.store.mark_claimed(a.q, entry, expires_at_ms=claim.expires_at_ms)
            self.ctx.background.spawn(marking, "mark claimed")
        return claim.delivery

    async def _claim_next(self, a: _Attempt) -> Delivery | None:
        """Claim by hints first; scan the ready index when there are none (reconciliation), or
        when claims kept being lost. Hints of finished tasks count apart (``MAX_STALE_HINTS``).

        Once an interval (and after an alarm) a queue is also swept before its hints are taken
        (``Reconciliation.sweep_due``): scanned only when a fetch found no hint, a queue whose
        hint queue never ran dry (adds keeping pace with its workers) left a task whose hint was
        lost (a bridge killed between its write and its hint; after a broker restart, the whole
        backlog from before it) unserved until the backlog drained, up to its TTL. The sweep takes
        only what is older than the grace (younger entries' hints are on their way); it costs a
        busy queue what an idle one costs, a small scan per bridge per interval. One task a sweep
        outside an alarm: a scan takes the oldest first, whatever its priority, and kept on while
        it found tasks it would serve a whole backlog older than the grace by age, not priority."""
        now = self.ctx.clock.now_ms()
        if self.reconcile.sweep_due(a.q, now):
            scanned = await self._claim_scanned(a)
            self.reconcile.swept(a.q, now, found=scanned is not None)
            if scanned is not None:
                return scanned
        lost = stale = 0
        while lost < MAX_CLAIM_ATTEMPTS and stale < MAX_STALE_HINTS:
            try:
                taken = await self.hints.take(a.q, 0)
            except HintsUnavailable:
                # The hints published to it meanwhile are lost: scan, without the grace for what
                # is in the store already (its hints are not on their way).
                self.reconcile.alarm_queue(a.q, self.ctx.clock.now_ms())
                break
            if taken is None:
                break
            try:
                claim = await self._claim_hinted(a, taken)
            except KeyMissing as exc:
                a.passed_over(exc)
                continue
            if claim.delivery is not None:
                return claim.delivery
            if claim.finished:
                stale += 1
            else:
                lost += 1
        if self.reconcile.due(a.q, self.ctx.clock.now_ms()):
            return await self._claim_scanned(a)
        return None

    async def _wait_for_hint(
        self, a: _Attempt, wait_ms: int, still_wanted: Callable[[], Awaitable[bool]] | None
    ) -> Delivery | None:
        """Long-poll: wait for a hint of this queue (no store traffic while waiting).

        A fetch that waited asks ``still_wanted`` before it claims: its worker may be gone
        (crashed, killed), and, as the queue's oldest waiter, it takes the hint first. Claimed
        for it, the task would wait out its whole lease while live workers waited beside it.

        The wait is not part of the worker's turn (``_Flight``), only each claim is. A second
        long-poll of the same worker is most often a client's retry after its request timed out,
        its first long-poll still waiting here with a reply nobody reads. Queued behind that one
        it would wait out the orphan's waitMs and answer null while tasks came; superseding the
        first would answer null to a worker that polls from two coroutines. So both wait, each
        hint goes to the oldest waiter, and whichever claims first, the other, at its next hint,
        finds the worker was granted a lease meanwhile and resends that task rather than claim a
        second one (the hint goes back for another worker). An orphan whose connection is gone
        gives its hint up (``still_wanted``); one on a live connection claims for the worker, and
        the worker's next fetch (not ``fresh``: it got no answer) is handed that task again."""
        loop = asyncio.get_running_loop()
        until = loop.time() + wait_ms / 1000
        # Taken once, when the wait begins (a grant of this fetch's own returns it): taken afresh
        # at each round, a grant to another fetch of the worker during a round that looked at
        # nothing (a poll of the store skipped: another waiter had just looked) was missed, and
        # the next round claimed the worker a second task.
        granted = a.flight.granted
        while (left_ms := int((until - loop.time()) * 1000)) > 0:
            self._leave_turn(a)
            try:
                taken = await _unless_gone(self.hints.take(a.q, left_ms), still_wanted, _give_back)
            except HintsUnavailable:
                # A poll of the store every HINTLESS_POLL_MS, the sleep cut short by a stop (the
                # hints close): answered null now, as the fetches waiting for a hint are (it slept
                # out the rest of its second, then scanned and claimed once more).
                if await _unless_gone(self.hints.pause(min(left_ms, HINTLESS_POLL_MS) / 1000), still_wanted):
                    return None
                delivery = await self._poll_store(a, left_ms, granted, still_wanted)
                if delivery is not None:
                    return delivery
                if a.holding:  # it looked and claimed with the turn: as after a hint's claim
                    granted = a.flight.granted
                continue
            if taken is None:
                return None
            if still_wanted is not None:
                # Asked beside the write-ahead (a broker round trip against a Cassandra one): it
                # costs the claim no time. Its answer is awaited before the claim (``_may_claim``).
                a.requester = asyncio.ensure_future(still_wanted())
            try:
                await self._take_turn(a)
                # Another fetch of this worker was granted a lease while this one waited: hand
                # out that task (a read, only then), unless it is not the worker's any more.
                resent = await self._look(a, fresh=False) if a.flight.granted != granted else None
            except BaseException:
                await asyncio.shield(taken.retry())  # not decided: another fetch gets the hint
                raise
            if resent is not None:
                await asyncio.shield(taken.retry())
                return resent
            try:
                claim = await self._claim_hinted(a, taken)
            except KeyMissing as exc:
                # Claimed and let go (its key not usable here): wait on for the next hint, as a
                # short fetch goes on to the next task (up to MAX_UNOPENED); the worker hears why
                # if the wait ends with nothing (``_fetch``). Answered at once, a removed key's
                # tasks coming back one by one turned every idle long-poll into an ``unavailable``
                # and a backoff, while healthy tasks waited (found by re-review, 2026-12-07).
                a.passed_over(exc)
                granted = a.flight.granted  # this fetch's own claim, which handed nothing out
                continue
            if claim.delivery is not None:
                return claim.delivery
            # This fetch holds the turn: every grant since the wait began was looked at (above) or
            # is this fetch's own claim, which handed nothing out (its task's life ended as it was
            # claimed). Counted as another fetch's grant, the next round resent that task, found
            # nothing to hand out and answered ``unavailable``.
            granted = a.flight.granted
        return None

    async def _poll_store(
        self, a: _Attempt, left_ms: int, granted: int, still_wanted: Callable[[], Awaitable[bool]] | None
    ) -> Delivery | None:
        """A waiting fetch whose queue's hints cannot be used (``HintsUnavailable``: the node that
        holds its hint queue is down, the broker is away): it scans the store every
        ``HINTLESS_POLL_MS`` for the rest of its wait (the caller pauses before each poll; the
        hints of the tasks added meanwhile are lost). Answered null at once, it was sent again at
        once by its worker: a spin of the worker, the bridge and the broker (about 50 fetches a
        second per worker) for as long as the hint queue was gone."""
        self.reconcile.alarm_queue(a.q, self.ctx.clock.now_ms())  # what is stored by now has no hint coming
        loop_now = asyncio.get_running_loop().time()
        if loop_now - self._hintless_polls.get(a.q, -1e9) < HINTLESS_POLL_MS / 1000:
            return None  # another waiter of this queue looks, or looked a moment ago and found nothing
        # Taken before the scan, so that the waiters waking with this one do not all scan at once.
        self._hintless_polls[a.q] = loop_now
        self._hintless_polls.move_to_end(a.q)
        while len(self._hintless_polls) > MAX_HINTLESS_QUEUES:
            self._hintless_polls.popitem(last=False)
        if still_wanted is not None:
            if a.requester is not None:
                a.requester.cancel()
            a.requester = asyncio.ensure_future(still_wanted())
        await self._take_turn(a)
        if a.flight.granted != granted:  # another fetch of this worker was granted a lease meanwhile
            resent = await self._look(a, fresh=False)
            if resent is not None:
                return resent
        found = await self._claim_scanned(a)
        if found is not None:
            self._hintless_polls.pop(a.q, None)  # there may be more: the next waiter looks at once
        return found

    async def _claim_hinted(self, a: _Attempt, taken: Taken) -> _Claim:
        entry = taken.hint.entry()
        a.attempted = True
        a.applied = False
        try:
            claim = await self._try_claim(a, entry, taken.hint.payload, stored=taken.hint.stored)
        except BaseException:
            if a.applied:
                # Claimed, and not handed out (``_deliver``: its key missing or not to be looked
                # up, the task dead-lettered; a read after the claim failed): decided, the task
                # comes back with a hint of its own once its lease runs out (a dead one never).
                # Put back, the hint sent another fetch to a write-ahead and a claim the lease
                # refuses.
                await asyncio.shield(taken.done())
            else:
                await asyncio.shield(taken.retry())  # not decided: another fetch gets the hint
            raise
        a.stamp = claim.stamp
        await taken.done()
        self.ctx.metrics.inc("claims", source="hint", outcome="won" if claim.delivery else "lost")
        if claim.delivery is not None:
            marking = self.ctx.store.mark_claimed(a.q, entry, expires_at_ms=claim.expires_at_ms)
            self.ctx.background.spawn(marking, "mark claimed")
        return claim

    async def _claim_scanned(self, a: _Attempt) -> Delivery | None:
        """Scan the ready index (the only path with hints off). With hints on, only entries older
        than the grace period are taken: younger ones have a hint on its way."""
        spread = False
        now = self.ctx.clock.now_ms()
        # Never past the present: a delayed task's entry sits at its due time (``WorkQueue.add``).
        # With hints on the cutoff is older than the present by the grace (seconds), far more than
        # the skew margin the scheduler waits before it announces a due task.
        cutoff = min(self.reconcile.cutoff_ms(now, a.q), now)
        oldest = False  # the head of each lane, not a spread pick (after a young pick)
        attempts = spent = 0
        while attempts < MAX_CLAIM_ATTEMPTS:
            attempts += 1
            entry = await self.dispatcher.next_candidate(a.q, LANE_RECOVERED, spread=spread, oldest=oldest)
            if entry is None or ms_of(entry.seq) > cutoff:
                if entry is not None:
                    self.dispatcher.release(a.q, entry)
                entry = await self.dispatcher.next_candidate(a.q, LANE_FRESH, spread=spread, oldest=oldest)
            if entry is None or ms_of(entry.seq) > cutoff:
                if entry is not None:
                    self.dispatcher.release(a.q, entry)
                if entry is not None and not oldest:
                    # A pick spread at random (after lost races) says nothing of the entries before
                    # it: the head may hold older ones. Ended here, the queue went quiet for an
                    # interval while older hintless tasks waited in the buffer.
                    oldest = True
                    continue
                break
            second = _second_entry(entry)
            if second and spent < MAX_SPENT_ENTRIES and await self._spent_second_entry(a.q, entry):
                spent, attempts = spent + 1, attempts - 1  # a read, not a lost race
                continue
            a.attempted = True
            claim = await self._claim_entry(a, entry)
            if claim is None:
                continue
            delivery, a.stamp = claim.delivery, claim.stamp
            # Claimed by us, or it was not claimable (another worker or instance got it first).
            self.dispatcher.taken(a.q, entry, lost_race=delivery is None)
            self.ctx.metrics.inc("claims", source="scan", outcome="won" if delivery else "lost")
            if delivery is not None:
                marking = self.ctx.store.mark_claimed(a.q, entry, expires_at_ms=claim.expires_at_ms)
                self.ctx.background.spawn(marking, "mark claimed")
                self.reconcile.found(a.q)
                return delivery
            if second or claim.superseded:
                # Its task was taken through its other entry (a late add's first, a re-exposure's
                # entry written again ahead): marked claimed, so that no other bridge's scan pays a
                # write-ahead and a refused claim for it (a run of them answered a fetch null with
                # tasks ready behind them, found by review, 2026-12-06).
                self.ctx.background.spawn(self.ctx.store.mark_claimed(a.q, entry), "mark claimed")
            spread = True  # lost a race: another worker or instance reads the same head
        if not (self.dispatcher.more(a.q, LANE_RECOVERED) or self.dispatcher.more(a.q, LANE_FRESH)):
            # Quiet only after a scan that read to the end: one stopped on its page budget (a long
            # run of entries claimed through hints) goes on at the queue's next fetch, or a lost
            # hint behind that run waited an interval per 4,096 entries.
            self.reconcile.found_nothing(a.q, self.ctx.clock.now_ms())
        return None

    async def _claim_entry(self, a: _Attempt, entry: ReadyEntry) -> _Claim | None:
        """A scan's claim of ``entry``; None once it was claimed and let go unopened (its key not
        usable now: ``_Attempt.passed_over``)."""
        try:
            return await self._try_claim(a, entry)
        except KeyMissing as exc:
            self.dispatcher.taken(a.q, entry)  # claimed (and let go): its lease decides
            a.passed_over(exc)
            return None
        except BaseException:
            self.dispatcher.release(a.q, entry)
            raise

    async def _spent_second_entry(self, q: QueueKey, entry: ReadyEntry) -> bool:
        """Whether a second entry's task is leased already (taken through its first entry, as
        nearly all are): then nobody can claim it through this one (a fresh claim is an insert if
        not exists), so it is passed over, marked claimed for every other bridge's scan (nobody
        else marks it: its task's claimant marked the entry it claimed through). A plain read, not
        a write-ahead and a failed claim; one that fails or finds no lease leaves it to the claim."""
        try:
            lease = await self.ctx.store.lease(q, entry.task_id, serial=False)
        except Unavailable:
            return False
        if lease is None:
            return False
        self.dispatcher.taken(q, entry)
        self.ctx.metrics.inc("claims", source="scan", outcome="passed")
        self.ctx.background.spawn(self.ctx.store.mark_claimed(q, entry), "mark claimed")
        return True

    async def _may_claim(self, a: _Attempt) -> None:
        """The last check before a claim: is anybody still waiting for this fetch's reply?"""
        if a.deadline_ms is not None and self.ctx.clock.now_ms() > a.deadline_ms:
            # This bridge stalled (a pause, slow store calls) past the caller's deadline: the
            # caller gave up and asks afresh, so a task claimed now would wait out its lease.
            self.ctx.metrics.inc("requests_expired", method="fetch")
            raise RequestAbandoned("past the caller's deadline")
        probe, a.requester = a.requester, None
        # The probe was asked before the turn wait, the write-ahead and the wait for the add's
        # write, and a fetch that never waited has none: a caller that hung up meanwhile (the
        # HTTP gateway says so at once) was claimed for all the same, the task leased to it for
        # its whole timeToRecover. So the hang-up is looked at first, then the probe's answer.
        gone = a.hung_up is not None and a.hung_up.is_set()
        if gone and probe is not None:
            probe.cancel()
        if gone or (probe is not None and not await probe):
            if probe is not None:  # it waited
                self.ctx.metrics.inc("long_polls_abandoned")
            log.info("a fetch's worker is gone: its task goes to another", extra={"worker": a.worker})
            raise RequestAbandoned("the worker is gone")

    async def _try_claim(
        self,
        a: _Attempt,
        entry: ReadyEntry,
        carried: Payload | None = None,
        *,
        stored: asyncio.Future[bool] | None = None,
        only_if_stored: bool = False,
    ) -> _Claim:
        """Claim one candidate: the delivery (None if the task is not ours), the stamp of the
        pointer write, and whether the task had finished. ``stored``: the hint was handed in the
        process while its task was being written (``Hint.stored``); the claim waits for the write.
        ``only_if_stored``: no claim when the payload read finds no task (see ``_claim_announced``)."""
        q, worker, ttr, stamp = a.q, a.worker, a.ttr, a.stamp
        store, margin = self.ctx.store, self.ctx.limits.skew_margin_ms
        if stored is not None and carried is None and not await asyncio.shield(stored):
            # Its payload is read from the store, so not before the write: nothing was stored.
            return _Claim(None, stamp if stamp is not None else self.ctx.clock.now_ms() * 1000, finished=True)
        now = self.ctx.clock.now_ms()
        task_id = entry.task_id
        recovered = entry.lane == LANE_RECOVERED
        epoch = (entry.epoch or 0) + 1 if recovered else 1
        until = now + ttr
        began = now
        claim_id = uuid.uuid4()
        if carried is not None and self._outlived(carried, now):
            self.ctx.metrics.inc("deliveries_failed", reason="expired")
            return _Claim(None, stamp if stamp is not None else now * 1000, finished=True)
        # After every pointer write this claim could follow: the row it read (or its own last
        # write-ahead), and what the worker's other fetches on this bridge read or wrote.
        stamp = pointer_stamp(now, _latest(stamp, a.flight.stamp))
        a.flight.stamp = _latest(a.flight.stamp, stamp)
        # The payload is read beside the write-ahead (unless the hint carried it: no read at all,
        # it is checked when opened), not after it: as many round trips, and the claim knows when
        # the task's life ends (``Payload.expires_at_ms``, fixed by the bridge that added it), so
        # the lease lives as long as the task, whatever this bridge's own BRIDGE_TASK_TTL.
        read = None if carried is not None else asyncio.ensure_future(store.payload(q, task_id))
        try:
            # Write-ahead: the deadline and the worker's pointer exist before the claim can.
            await store.write_ahead(
                *(q, worker, WorkerPointer(task_id, epoch, entry.has_token, granted_at_ms=now), stamp),
                # Filed under the time it may be taken back: its deadline plus the skew margin.
                expiry_bucket(until + margin),
                ExpiryEntry(until, q, task_id, epoch, entry.has_token),
                expires_at_ms=None if carried is None else carried.expires_at_ms,
            )
            # The pointer this fetch undoes if it gives up from here on (``_fetch``): recorded now,
            # not when the claim returns. Abandoned before it returned (``_may_claim``), the fetch
            # undid the pointer it had read, stamped before this one, which survived the undo.
            a.stamp = stamp
            # Written ahead while the add's write was on its way: the claim waits for that write
            # (an LWT on a task that may never be stored would hand out a value nobody keeps).
            after = await self._when_the_add_is_written(a, stored, stamp, now, read)
            if isinstance(after, _Claim):
                return after
            began, now, until = now, now + after, until + after
            await self._may_claim(a)
        except BaseException:
            _drop(read)
            raise
        payload, read_failed = (carried, None) if read is None else await _outcome_of(read)
        if read_failed is not None:
            # Not claimed: the claim records the task's end of life, which the read tells; without
            # it, this bridge's own BRIDGE_TASK_TTL went into the lease, and every later write of
            # the lease followed it (a fleet changing its TTL: a lease that ended before its task,
            # or after; found by review, 2026-12-07). The worker's retry reads its pointer, which
            # announces this task, and claims it then (step 4 on, docs/storage.md).
            raise read_failed
        if read is not None and payload is None and only_if_stored:
            return _Claim(None, stamp, finished=True)
        if payload is not None and self._outlived(payload, max(now, self.ctx.clock.now_ms())):
            # In its last second: Cassandra ends each row at whole seconds, so the completed lease
            # of a task done long ago may already be gone while its row is not, and the claim (``IF
            # NOT EXISTS``) would hand a completed task out again. Judged now, as the claim goes:
            # a carried copy checked before a write-ahead that took a second (a slow Cassandra)
            # went into its last second unchecked, and was claimed (found by review).
            self.ctx.metrics.inc("deliveries_failed", reason="expired")
            return _Claim(None, stamp, finished=True)
        ends = None if payload is None else payload.expires_at_ms
        try:
            if recovered:
                assert entry.epoch is not None
                # Only a lease whose deadline passed more than the skew margin ago on OUR clock.
                res = await store.claim_expired(
                    *(q, task_id, entry.epoch, worker, until, now - margin, claim_id),
                    has_token=entry.has_token,
                    expires_at_ms=ends,
                )
            else:
                res = await store.claim_new(
                    q, task_id, worker, until, claim_id, has_token=entry.has_token, expires_at_ms=ends
                )
        except MaybeApplied:
            # The fetch is answered ``unavailable``; if the claim applied, the worker's retry gets
            # the task through its pointer, which counts nothing: this claim is counted if it landed.
            self.ctx.background.spawn(
                self._count_if_claimed(q, entry, claim_id, payload, epoch, until), "count an uncertain claim"
            )
            raise
        if not res.applied:
            return await self._refused(a, entry, res.current, epoch, stamp, now, ends)
        a.applied = True
        a.flight.granted += 1
        # Both before a failed read is raised: the claim applied, and its lease must be taken back
        # if its worker never gets the task. From before a wait for the add's write: its deadline
        # entry was filed under the earlier deadline, which the scheduler may have met and let go.
        await self._refile_if_slow(q, entry, epoch, began, until)
        # A short lease: this bridge takes it back itself the moment it may (deadline + margin),
        # instead of waiting for the scheduler's pass over its bucket (the wheel entry written
        # ahead stays the guarantee if this bridge dies).
        self.soon(ExpiryEntry(until, q, task_id, epoch, entry.has_token), until + margin)
        await self._count_claim_now_or_later(q, entry, payload)
        if payload is None:
            # The task's lifetime (TTL) ended: a hint or an index entry outlived it. Nothing to hand out.
            self.ctx.metrics.inc("deliveries_failed", reason="expired")
            return _Claim(None, stamp)
        log.debug("task claimed", extra={"task_id": str(task_id), "epoch": epoch, "lease_ms": ttr})
        delivery = await self._deliver(q, worker, task_id, epoch, until, payload, stamp=stamp, carried=carried)
        # Counted once the task can be handed out: a claim whose key is missing (or whose task is
        # dead-lettered) never reaches a worker, and counted, a key outage read as a storm of
        # deliveries and redeliveries.
        self.ctx.metrics.inc("tasks_delivered" if not recovered or epoch == 1 else "tasks_redelivered", kind="claim")
        return _Claim(delivery, stamp, expires_at_ms=ends)

    async def _refused(
        self, a: _Attempt, entry: ReadyEntry, cur: Lease | None, epoch: int, stamp: int, now: int, ends: int | None
    ) -> _Claim:
        """A claim refused, as its own row says (no read to tell a stale hint from a lost race)."""
        if (
            cur is not None
            and cur.is_leased
            and cur.epoch == epoch
            and cur.worker is None
            and a.announced == (entry.task_id, epoch)
        ):
            # A refused re-claim (an UPDATE) reports only its condition's columns: leased at the
            # very epoch this one announced, by whom? Another fetch of this worker, which wrote the
            # same pointer ahead (a retry's slow first copy), or another worker's claim. Read, for
            # a claim of the task the worker's pointer announced only (an ordinary lost race on a
            # re-exposed task reads nothing): taken for a lost race, the worker was handed another
            # task and this one stayed leased to it, to nobody, for its whole lease. A read that
            # fails leaves it a lost race, as before.
            with contextlib.suppress(Unavailable):
                cur = await self.ctx.store.lease(a.q, entry.task_id)
        if cur is not None and cur.held_by(a.worker, epoch) and cur.uncounted_epoch != epoch:
            # Leased to this worker at this very epoch by another fetch of it, which claimed the
            # task this one announced (``_claim_announced``): both hand it out. Not a lease whose
            # task the worker could not be handed (its key missing, ``_deliver``: uncounted): the
            # worker moves on to other tasks, and that lease runs out.
            delivery, _ = await self._resend(a, WorkerPointer(entry.task_id, epoch, entry.has_token), stamp)
            if delivery is not None:
                return _Claim(delivery, stamp, expires_at_ms=ends)
        margin = self.ctx.limits.skew_margin_ms
        recovered = entry.lane == LANE_RECOVERED
        if recovered and cur is not None and cur.epoch == entry.epoch and cur.not_claimable_before(now, margin):
            await self._rearm(a.q, entry, cur.lease_until_ms or now, now)
        finished = cur is not None and cur.state is not LeaseState.LEASED
        self.ctx.metrics.inc("claims_stale" if finished else "claim_conflicts")
        superseded = recovered and cur is not None and entry.epoch is not None and cur.epoch > entry.epoch
        return _Claim(None, stamp, finished=finished, superseded=superseded)

    async def _count_claim(self, q: QueueKey, entry: ReadyEntry, payload: Payload | None) -> None:
        """Count a claim that applied: a fresh task (or a redriven one) leaves ``ready`` for in flight."""
        task_id = entry.task_id
        recovered = entry.lane == LANE_RECOVERED
        if not recovered and payload is not None and was_delayed(task_id, payload.created_at_ms):
            # Taken off the due minute its add counted it under: within that minute stats count
            # it delayed, and a -1 from ready would have hidden a ready task until the minute ended.
            self.ctx.count_delayed(q, ms_of(task_id), -1)
            self.ctx.count(q, ms_of(task_id), in_flight=1)
        elif not recovered or await self._was_redriven(q, entry):  # a re-claim stays in flight (counting)
            self.ctx.count(q, ms_of(task_id), ready=-1, in_flight=1)

    async def _count_claim_now_or_later(self, q: QueueKey, entry: ReadyEntry, payload: Payload | None) -> None:
        """Count a claim that applied; if its lease read fails (was a scanned entry redriven?),
        off the request path. Raised, the claim was answered `unavailable`, never counted (the
        retry gets the task through the pointer, which counts nothing) and, before its timer was
        set first, never watched by this bridge (found by review)."""
        try:
            await self._count_claim(q, entry, payload)
        except Unavailable:
            self.ctx.background.spawn(self._count_claim_later(q, entry, payload), "count a claim")

    async def _count_claim_later(self, q: QueueKey, entry: ReadyEntry, payload: Payload | None) -> None:
        """:meth:`_count_claim` of a claim that applied, tried again (after 1 and 2 s) when its read
        fails; left uncounted (logged) if it keeps failing."""
        for attempt in range(REFILE_ATTEMPTS):
            await self.ctx.background.pause(2**attempt)
            try:
                await self._count_claim(q, entry, payload)
                return
            except Unavailable as exc:
                if attempt + 1 == REFILE_ATTEMPTS or self.ctx.background.stopping:
                    log.warning("claim of task %s left uncounted: %s", entry.task_id, exc)
                    return

    async def _count_if_claimed(
        self, q: QueueKey, entry: ReadyEntry, claim_id: uuid.UUID, payload: Payload | None, epoch: int, until: int
    ) -> None:
        """A claim whose outcome stayed unknown: counted as any claim if the lease names its claim id
        (a SERIAL read settles the compare-and-set). Missed if the lease was claimed again before
        the read (a lease shorter than the lookups): logged.

        Landed (or still unknown), its deadline is filed again in a bucket still to come: it may
        have landed after the scheduler's second pass over the deadline written ahead, which,
        finding no lease, let the entry go; if its worker is gone (its retry never came), nobody
        would take the task back before its TTL (found by review: a claim counted, never watched)."""
        base = entry.epoch if entry.lane == LANE_RECOVERED else None
        # Filed at once too, for past the lookups' end: they take seconds, and a bridge killed (or
        # stopped) before their end left a claim that landed after the scheduler's passes over its
        # deadline unwatched until its TTL (found by review).
        # Beside the lookups, not before them: its retries (Cassandra is struggling: that is why
        # the outcome was unknown) delayed the first lookup by seconds, past a short lease.
        lookups_end = self.ctx.clock.now_ms() + int(sum(UNCERTAIN_CLAIM_LOOKUPS_S) * 1000)
        self.ctx.background.spawn(
            self._refile_logged(q, entry, epoch, until, lookups_end), "file an uncertain claim's deadline"
        )

        async def ours() -> bool | None:
            lease = await self.ctx.store.lease(q, entry.task_id, serial=True)
            if lease is not None and lease.claim_id == claim_id:
                return True
            # Nobody claimed the task past what this claim was conditional on (no lease yet, or
            # the expired lease's epoch): no answer yet. The claim may still be on its way (held
            # in a coordinator's queue or the network) and apply later; read as "did not land",
            # a claim that applied after the first lookup was never counted (a CI run).
            if lease is None or (base is not None and lease.epoch == base):
                return None
            return False  # claimed by another (or past it): this compare-and-set can no longer apply

        landed = await landed_later(ours, UNCERTAIN_CLAIM_LOOKUPS_S, self.ctx.background.pause)
        try:
            if landed:
                # A delivery (the worker's retry gets the task through its pointer, counted there as
                # a resend): not counted, first deliveries went missing from tasks_delivered in an
                # LWT-timeout storm (found by review, 2026-12-07).
                if payload is None and entry.lane == LANE_FRESH:
                    payload = await self.ctx.store.payload(q, entry.task_id)  # was it delayed? (its read failed)
                if payload is not None:  # (none: the task's life ended, nothing to hand out)
                    recovered = entry.lane == LANE_RECOVERED
                    self.ctx.metrics.inc(
                        "tasks_delivered" if not recovered or epoch == 1 else "tasks_redelivered", kind="claim"
                    )
                await self._count_claim(q, entry, payload)
            elif landed is None:
                log.warning("claim of task %s left uncounted: its outcome stayed unknown", entry.task_id)
        finally:
            # Whatever the count's reads did (the store is struggling: that is why the outcome was
            # unknown), the deadline is filed again: the count is a figure, this is the task.
            if landed is not False:
                await self._refile_logged(q, entry, epoch, until)

    async def _refile_logged(self, q: QueueKey, entry: ReadyEntry, epoch: int, until: int, not_before: int = 0) -> None:
        """:meth:`_refile`, tried again (after 1 and 2 s) when Cassandra does not take it."""
        for attempt in range(REFILE_ATTEMPTS):
            try:
                await self._refile(q, entry, epoch, until, not_before)
                return
            except Exception as exc:
                if attempt + 1 == REFILE_ATTEMPTS or self.ctx.background.stopping:
                    log.warning("deadline of task %s not filed again after its uncertain claim: %s", entry.task_id, exc)
                    return
            await self.ctx.background.pause(2**attempt)

    async def _was_redriven(self, q: QueueKey, entry: ReadyEntry) -> bool:
        """Whether the recovered entry we just claimed was a redriven lease nobody had claimed since
        (counted ready, not in flight). A hint says so; an entry found by a scan (hints off, or
        reconciliation) does not, so the lease is read: a claim keeps the lease's base epoch, which
        redrive set to the epoch it put back."""
        if entry.redriven is not None:
            return entry.redriven
        lease = (await self.ctx.store.leases_of(q, [entry.task_id])).get(entry.task_id)  # without its error
        return lease is not None and lease.base_epoch == entry.epoch

    def _outlived(self, carried: Payload, now: int) -> bool:
        """The task's stored rows are gone (or about to go): its carried copy is not handed out.
        Cassandra computes a row's expiry in whole seconds (the write's second + TTL), so a row may
        go up to a second before its end: the copy stops a second early, never late. The end is the
        task's own (fixed by the bridge that added it); a copy on an older bridge's hint says none:
        created + this bridge's TTL."""
        if carried.expires_at_ms is not None:
            return carried.expires_at_ms - TTL_GRANULARITY_MS <= now
        ttl, created = self.ctx.limits.task_ttl_ms, carried.created_at_ms
        return ttl is not None and created is not None and created + ttl - TTL_GRANULARITY_MS <= now

    async def _when_the_add_is_written(
        self,
        a: _Attempt,
        stored: asyncio.Future[bool] | None,
        stamp: int,
        now: int,
        read: asyncio.Future[Payload | None] | None,
    ) -> _Claim | int:
        """Wait for the write of the task whose hint this fetch was handed while it was written:
        how much later than ``now`` the lease is to start, or the claim that is not to be made.

        Its write failed: there is no task. The pointer written ahead names it, and this fetch
        waits on: cleared now, not when the fetch ends, or another fetch of the worker reading it
        claimed a task never stored (a lease re-exposed every timeToRecover until its TTL).

        A slow write: the lease runs from now, or it was short by the write's time (a 1 s lease
        behind a 1.5 s write was handed out expired). The deadline written ahead is earlier: met,
        it finds the later one and watches that (as after an extend). A fast write keeps it: met a
        little early, the lease would only be watched again, a bucket later. (No ``stored``: the
        task was stored before its hint came; nothing to wait for.)"""
        if stored is None:
            return 0
        if not await asyncio.shield(stored):
            _drop(read)
            cleared = _after(stamp, self.ctx.clock.now_ms())
            a.flight.stamp = _latest(a.flight.stamp, cleared)
            await self.ctx.store.clear_worker(a.q, a.worker, cleared)
            return _Claim(None, cleared, finished=True)
        waited = self.ctx.clock.now_ms() - now
        return waited if waited > self.ctx.limits.skew_margin_ms else 0

    async def _refile_if_slow(self, q: QueueKey, entry: ReadyEntry, epoch: int, started: int, until: int) -> None:
        """A claim that took long (this process paused, a slow Paxos round) may have landed after the
        scheduler met its deadline and, finding no lease yet, let it go: then nobody would ever take
        the task back. File the deadline again, in a bucket still to come."""
        margin = self.ctx.limits.skew_margin_ms
        after = self.ctx.clock.now_ms()
        if after - started < (until - started + margin // 2) // 2:
            return  # far from the deadline: the scheduler has not read its bucket yet
        try:
            await self._refile(q, entry, epoch, until)
        except Unavailable:
            # Filed off the request path: the claim applied, and raised, it was answered
            # `unavailable`, never counted and never given its timer (a re-review).
            self.ctx.background.spawn(self._refile_logged(q, entry, epoch, until), "file a slow claim's deadline")

    async def _refile(self, q: QueueKey, entry: ReadyEntry, epoch: int, until: int, not_before: int = 0) -> None:
        """File a claim's deadline again, in a bucket the scheduler has not read yet (and not
        before ``not_before``)."""
        after = max(self.ctx.clock.now_ms(), not_before)
        watch = ExpiryEntry(until, q, entry.task_id, epoch, entry.has_token)
        margin = self.ctx.limits.skew_margin_ms
        await self.ctx.store.watch_expiry(expiry_bucket(max(until + margin, after) + 4 * EXPIRY_BUCKET_MS), watch)
        self.ctx.metrics.inc("claims_refiled")  # filed (an uncertain claim's: twice)

    async def _rearm(self, q: QueueKey, entry: ReadyEntry, lease_until_ms: int, now: int) -> None:
        """Not ours to take yet: the holder extended its lease after the scheduler re-exposed the
        task, or the scheduler's clock is ahead of ours and the deadline + margin has not passed
        here. Watch it again at a bucket still to come on our clock (the original bucket is already
        behind the scheduler), or the task would be stranded."""
        assert entry.epoch is not None
        # At least one bucket after the one it was filed under (deadline + margin): that bucket may
        # be the very one whose processing re-exposed the task, and the scheduler does not handle
        # the same deadline twice in one bucket (a claimer 800 ms behind the scheduler's bridge
        # re-filed it there and the task waited for the 30 s reconciliation: the skew drill).
        rearm = max(lease_until_ms + self.ctx.limits.skew_margin_ms, now) + EXPIRY_BUCKET_MS
        watch = ExpiryEntry(lease_until_ms, q, entry.task_id, entry.epoch, entry.has_token)
        await self.ctx.store.watch_expiry(expiry_bucket(rearm), watch)
        # Moments ahead, maybe after the duty holder last read the marks: this bridge meets it at
        # its time itself (the holder's second pass, should this bridge die first).
        self.soon(watch, rearm)

    async def _let_go(
        self, q: QueueKey, task_id: uuid.UUID, epoch: int, worker: str, until: int, *, has_token: bool, missing: bool
    ) -> None:
        """A claim whose task could not be opened: not a delivery (uncounted), and back within
        LET_GO_BACK_MS (doubling with each let-go) rather than at its worker's deadline ``until``.
        Only while the lease is still at the deadline this claim wrote: another copy of the fetch
        that resent the task to its worker since (its bridge had the key) made it a delivery, and
        given back then, the task went to a second worker while the first worked on it."""
        # A store fault here is raised (Unavailable): the fetch ends, its loop does not pass over to
        # more tasks it would lease away to its deadline, each (found by re-review, 2026-12-07).
        ctx = self.ctx
        lease = await ctx.store.lease(q, task_id, serial=True)
        if lease is None or not lease.held_by(worker, epoch) or lease.lease_until_ms != until:
            return
        now = ctx.clock.now_ms()
        run = KeyMissingRun.after(lease, now) if missing else None
        if run is not None and self._gone_for_good(run, now):
            # Its key missing at every claim for hours (waits doubling in between), none of them
            # handed it out: gone for good, most likely (rotated out and removed too soon). Parked,
            # listed and counted instead of offered again until its TTL and then gone without a
            # word. Restored, the key opens it again after a redrive. (Parked or refused: the lease
            # moved since the read, as a let-go would have been.)
            await self._park_unopened(q, task_id, lease, worker, until, has_token=has_token, run=run)
            return
        # Doubling only while its key is missing (gone for good, maybe; each claim in a row that
        # found it missing counts, not one whose lookup failed: the key server away for minutes,
        # after which the task comes back at the base wait, soon after the server does).
        # From the lease it had, up to a minute: a worker of short leases (a test's 200 ms) saw a
        # task whose key came and went wait minutes (the CI's key-outage drill).
        doublings = min(run.claims - 1, LET_GO_DOUBLINGS_MAX) if run is not None else 0
        back = now + min(LET_GO_BACK_MS, max(until - now, 1)) * 2**doublings
        if doublings == 0 and until <= back:
            await ctx.store.uncount(q, task_id, lease, worker, missing=run)  # its deadline is as soon
            return
        # Sooner than its deadline, or later (a lease named nobody's, lengthened: the claim's own
        # entry finds the later deadline and passes).
        # Write-ahead, as a ``fail``'s return: the scheduler re-exposes it then even if this
        # bridge dies now (the claim's own entry, at ``until``, finds it moved and passes).
        watch = ExpiryEntry(back, q, task_id, epoch, has_token)
        at = back + ctx.limits.skew_margin_ms
        try:
            await ctx.store.watch_expiry(expiry_bucket(at), watch)
        except Unavailable:
            # Not filed: kept to its deadline (filed by the claim), but still not a delivery.
            await ctx.store.uncount(q, task_id, lease, worker, missing=run)
            raise
        if await ctx.store.uncount(q, task_id, lease, worker, until_ms=back, missing=run):
            self.soon(watch, at)

    def _gone_for_good(self, run: KeyMissingRun, now: int) -> bool:
        """Whether a run of claims that found a task's key missing has gone on long enough to park
        it: BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS since its first, and at least a few claims (of
        several bridges, likely). Time, not claims alone: a lease's length sets the waits between
        claims, and a count parked a short-lease worker's tasks within minutes of a key-ring edit
        undone (found by review, 2026-12-07)."""
        after_ms = self.ctx.limits.key_missing_park_after_ms
        return after_ms > 0 and run.claims >= KEY_MISSING_PARK_MIN_CLAIMS and now - run.since_ms >= after_ms

    async def _park_unopened(
        self,
        q: QueueKey,
        task_id: uuid.UUID,
        lease: Lease,
        worker: str,
        until: int,
        *,
        has_token: bool,
        run: KeyMissingRun,
    ) -> bool:
        """Park a claimed task whose key is missing (``lease``: the claim's SERIAL read, held at
        ``until``). Whether it was parked (refused: the lease moved since the read)."""
        try:
            return await self.lifecycle.park(
                q,
                task_id,
                lease.epoch,
                has_token,  # listed as having one; its engine cannot be told (``Lifecycle.park``)
                PARK_KEY_MISSING,
                max(0, lease.deliveries_counted - 1),  # this claim never handed it out
                worker=worker,
                earlier_park_id=lease.park_id,
                # As a let-go: only at this claim's deadline (a resend by another copy of the fetch
                # since, on a bridge with the key, made it a delivery its worker is working on).
                until_ms=until,
            )
        except Unavailable:
            # Not parked, or not known to be: still not a delivery (left counted, it held the task
            # from the others to its worker's deadline and used up its delivery limit). Refused
            # if the park applied (the lease no longer held); kept to its deadline.
            with suppress(Unavailable):
                await self.ctx.store.uncount(q, task_id, lease, worker, missing=run)
            raise

    async def _deliver(
        self,
        q: QueueKey,
        worker: str,
        task_id: uuid.UUID,
        epoch: int,
        until: int,
        payload: Payload | None = None,
        *,
        stamp: int | None,
        carried: Payload | None = None,
        opened: tuple[bytes, Payload] | None = None,
    ) -> Delivery:
        ctx = self.ctx
        if payload is None:
            payload = await ctx.store.payload(q, task_id)
        if payload is None:
            # Expired between claim and read (TTL): nothing to hand out.
            raise Unavailable("the task expired while being fetched; fetch again")
        try:
            plain, payload = opened or await self._open(q, task_id, payload, from_hint=payload is carried)
        except (KeyMissing, KeysUnavailable) as exc:
            # Let the worker move on to other tasks; this lease runs out and the task is offered
            # again later (by then, perhaps, with its key back). The worker never saw it: this
            # claim is not a delivery, or a long key outage would park healthy tasks at their limit.
            # A lookup that failed (the key server slow or away for this key) is let go alike: kept,
            # the worker's retries re-sent this task and failed again, never reaching the tasks
            # sealed with the current key behind it.
            missing = isinstance(exc, KeyMissing)
            ctx.metrics.inc("deliveries_failed", reason="key_missing" if missing else "key_unavailable")
            let_go = self._let_go(
                q, task_id, epoch, worker, until, has_token=payload.token is not None, missing=missing
            )
            await asyncio.gather(ctx.store.clear_worker(q, worker, _after(stamp, ctx.clock.now_ms())), let_go)
            self._error_undelivered.warning(
                "task %s not delivered: its key is %s", task_id, "missing" if missing else "unavailable"
            )
            raise
        except IntegrityError as exc:
            # It can never be delivered: dead-letter it (kept until its TTL for inspection) so the
            # worker, and the queue, move on instead of being handed the same broken task forever.
            log.error("task dead-lettered: %s", exc.message, extra={"task_id": str(task_id), "epoch": epoch})
            if await condemn(ctx, self.relay, q, task_id, epoch, worker, has_token=payload.token is not None):
                ctx.count(q, ms_of(task_id), in_flight=-1)
            # No clear of the pointer: a dead task is never resent (the extension fails), and the
            # worker's next fetch replaces the pointer.
            ctx.metrics.inc("tasks_dead_lettered", reason="integrity")
            raise
        return Delivery(
            task_id=str(task_id),
            value_json=plain,  # JSON already: spliced into the reply, never parsed again
            deliveries=epoch,
            epoch=epoch,
            lease_expires_at_ms=until,
            traceparent=payload.traceparent,
            has_token=payload.token is not None,
        )

    async def _open(
        self, q: QueueKey, task_id: uuid.UUID, payload: Payload, *, from_hint: bool
    ) -> tuple[bytes, Payload]:
        """The value in clear, and the payload it came from."""
        key = await self.ctx.keys.by_id(q.owner, payload.key_id)
        try:
            return open_value(key, q, task_id, payload), payload
        except IntegrityError:
            if not from_hint:
                raise
        # The copy a hint carried did not open: only the stored row can condemn the task.
        self.ctx.metrics.inc("hint_payloads_refused")
        stored = await self.ctx.store.payload(q, task_id)
        if stored is None:
            raise Unavailable("the task expired while being fetched; fetch again")
        return await self._open(q, task_id, stored, from_hint=False)


def _second_entry(entry: ReadyEntry) -> bool:
    """A fresh-lane entry at another place than its task id's: a late add's second entry."""
    return entry.lane == LANE_FRESH and entry.seq != entry.task_id
