"""The add, fetch and ack requests: read the envelope, run the queue, then settle the delivery by
the fate table (:mod:`bridge.transport.fate`), the same way for every method.

Each handler returns the request's outcome (``ok``, ``expired`` or an error code), which the
timing wrapper (:mod:`bridge.transport.timing`) observes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from typing import Any, TypeVar

import structlog
from pydantic import BaseModel

from bridge.config import Settings
from bridge.domain import jsonvalue
from bridge.domain.cancellation import ConnectionCancelled, is_stray, stray_as_failure
from bridge.domain.deadlines import request_deadline_ms
from bridge.domain.errors import BadRequest, ClockOff, NotSent, OwnerKeyUnusable, Unavailable
from bridge.domain.fetching import RequestAbandoned
from bridge.domain.models import AckWithNextRequest, AddCommand, FetchRequest, parse
from bridge.domain.queue import PendingAdd, WorkQueue
from bridge.domain.sealing import encode
from bridge.domain.timeline import ms_of
from bridge.errors import BridgeError, ErrorCode, wire_code
from bridge.observability.throttled import ThrottledWarning
from bridge.observability.tracing import child_traceparent, extract_traceparent
from bridge.transport import wire
from bridge.transport.add_retry import AddRetryLane
from bridge.transport.capacity import LONG_METHODS, PACED_METHOD, Capacity
from bridge.transport.envelope import (
    AddKey,
    Identity,
    check_reply_to,
    check_text,
    deadline_of,
    idempotency_of,
    read_body,
    reply_body,
    sent_before_ms,
    usable_reply_to,
)
from bridge.transport.errors import Busy, observed_outcome
from bridge.transport.fate import EXPIRED, OK, RETRY_BUDGET_S, Settle, dead_letters, fate_of, settle
from bridge.transport.replies import ReplyPublisher
from bridge.transport.request import DeliveryGone, RequestMessage, channel_gone
from bridge.transport.topology import ROUTING_KEYS

log = logging.getLogger("bridge.amqp")

ADD_RETRY_BUDGET_S = RETRY_BUDGET_S
# An add retried in place keeps its task id only while that id is this fresh: the dispatchers move
# their cursors past entries older than their settle window (the skew margin + 1 s), and a row
# landing behind a cursor is never scanned again.
ADD_ID_FRESH_MS = 500
DEFERRED = "deferred"  # an add moved to the retry lane (bridge.transport.add_retry): no reply yet
LEFT_TO_BROKER = "left_to_broker"  # its channel closed before it was stored: the broker delivers it again
INTERNAL_MESSAGE = "internal error; the request was dead-lettered, see the bridge log"
# The same for a request whose delivery was acknowledged before it failed (acknowledged early: a
# long-poll fetch, a redrive, a long lifecycle request): nothing dead-lettered it.
INTERNAL_ANSWERED_MESSAGE = "internal error; see the bridge log"

R = TypeVar("R", bound=BaseModel)
Reply = tuple[bytes | None, dict[str, Any] | None]  # body, headers


async def ack_early(message: RequestMessage) -> None:
    """Acknowledge a request before it is answered; :class:`DeliveryGone` if its channel closed
    meanwhile (the ack did not reach the broker, which delivers the request again)."""
    try:
        await message.ack()
    except Exception as exc:
        if channel_gone(message):
            raise DeliveryGone from exc
        raise


def _connection_cut(exc: BaseException) -> BaseException:
    """A call of the request cut short by its broker connection's close (a stray
    ``CancelledError``, or :class:`ConnectionCancelled` made of one): ``unavailable``, as any
    broker or store outage, not a bug. aiormq closes a connection it finds stuck (a black hole)
    that way, and a request waits on connections other than its delivery's own (the probation
    reply connection, the retry lane's confirm and the hint queues on the main connection)."""
    if isinstance(exc, asyncio.CancelledError | ConnectionCancelled):
        return Unavailable("a broker connection this request used was closed under it: send it again")
    return exc


def _answerable(exc: BaseException, what: str, internal_message: str) -> BridgeError:
    """The error to answer for ``exc``: itself, or (a bug: ``internal``) a generic one, logged."""
    if wire_code(exc) is ErrorCode.INTERNAL or not isinstance(exc, BridgeError):
        log.error("%s failed unexpectedly", what, exc_info=exc)
        return BridgeError(internal_message, ErrorCode.INTERNAL)
    return exc


# A long request holds its delivery this long at most, then it is acknowledged and answered when
# it ends. The quick ones (one queue's stats, a short listing: milliseconds) end within it and are
# settled as every request is; an extend waits behind long ones this long at most.
LONG_HOLD_S = 0.02


class _LaneOnce:
    """The add retry lane, asked at most once for one delivery: a try on a stuck connection waits
    up to LANE_CONFIRM_TIMEOUT_S with the add's slot of the adds window held, and once the lane
    failed it the add is retried in place (asked again, it would hold the slot that long again)."""

    def __init__(self, defer: Callable[[], Awaitable[bool]], full: Callable[[], bool]) -> None:
        self._defer = defer
        self._full = full
        self._failed = False

    @property
    def copy_may_exist(self) -> bool:
        """A publish to the lane failed: its copy may be in the lane all the same (a confirm that
        came after the bound, a connection cut after the frames went out), and come back as another
        delivery of this add. The original's write then claims its key with the LWT, as a retry's
        does: recorded unguarded, it overwrote the copy's record when the copy was stored first,
        and the add became two tasks."""
        return self._failed

    async def moved(self) -> bool:
        """Whether the add was moved to the lane: its owner holds its share of the window, and the
        broker confirmed the copy."""
        if self._failed or not self._full():
            return False
        if await self._defer():
            return True
        self._failed = True
        return False


class RequestHandlers:
    def __init__(
        self,
        settings: Settings,
        queue: WorkQueue,
        replies: ReplyPublisher,
        *,
        consuming: Callable[[], bool],
        requester_alive: Callable[[str], Awaitable[bool]] | None = None,
        lane: AddRetryLane | None = None,
        queue_restoring: Callable[[str], bool] | None = None,
        capacity: Capacity | None = None,
    ) -> None:
        self.settings = settings
        # Whether the queue of a routing key is being declared again here (the broker cancelled
        # its consumer: deleted, or lost with its node): its requests land in ``.unrouted``.
        self.queue_restoring = queue_restoring or (lambda key: False)
        self._warn_unrouted = ThrottledWarning(log)
        # Requests that came past their deadline: a backlog of them (a paused bridge, a slow store,
        # a client whose clock is behind) wrote a line each. Said at most every 10 s, with how
        # many (each is at DEBUG, and counted in requests_expired).
        self._warn_late = ThrottledWarning(log)
        # An outage (a key server down, Cassandra refusing writes) meets every add, each retried
        # ten times over 30 s and then requeued, at once again: a line per attempt was ~27 lines a
        # second a bridge, thousands a second across a fleet. Said at most every 10 s each (the
        # counters, requests_total and adds_deferred_total, count them all).
        self._warn_add_retry = ThrottledWarning(log)
        self._warn_requeued = ThrottledWarning(log)
        self._warn_deferred = ThrottledWarning(log)
        self.queue = queue
        self.replies = replies
        # Long-poll fetches waiting with their deliveries already acknowledged: outside the prefetch
        # window, so bounded here (BRIDGE_MAX_WAITING_FETCHES). Unbounded, a flood of long-polls
        # (each acked at once, so the broker kept delivering) grew memory and store polling without
        # limit, for every tenant of the bridge.
        self.waiting_unbounded = 0
        # The bridge's long lifecycle requests and paced redrives, shared with the HTTP gateway.
        self.capacity = capacity or Capacity()
        self.requester_alive = requester_alive  # asked before a long-poll that waited claims a task
        self.lane = lane or AddRetryLane(settings)
        # The bridge's own user names the owner of the adds it moved to its retry lane: trusted for
        # adds alone. Trusted for every method, anyone with the bridge's credentials (the default
        # guest, a user shared with another component) fetched and acked any tenant's tasks.
        self.identity = Identity([*settings.trusted_users, self.lane.user])
        self.rpc_identity = Identity(list(settings.trusted_users))
        self._consuming = consuming  # false once the bridge stops taking requests (shutdown)
        # Every reply says this bridge's time (x-now): a client whose host clock is off sets its
        # requests' x-deadline on it.
        replies.now_ms = lambda: self.queue.clock.now_ms()

    # -- one place that settles every request ---------------------------------------------------
    async def conclude(
        self,
        message: RequestMessage,
        method: str,
        outcome: str,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
    ) -> str:
        """Reply (if the fate says so, there is a body and a reply_to the bridge publishes to) and
        settle the delivery by its fate."""
        fate = fate_of(outcome, method)
        # A refused reply_to gets no reply either, not even its bad_request: the refusal is
        # precisely that the bridge does not write there (envelope.usable_reply_to).
        if fate.reply and body is not None and usable_reply_to(message.reply_to):
            await self.replies.answer(message, body, is_error=outcome not in (OK, EXPIRED), headers=headers)
        await settle(message, fate)
        return outcome

    async def fail(self, message: RequestMessage, method: str, exc: BaseException) -> str:
        """Conclude a request that raised: its wire code (``internal`` for a bug) decides its fate.
        A delivery acknowledged early is only answered, and its ``internal`` answer says so."""
        exc = _connection_cut(exc)
        code = wire_code(exc)
        fate = fate_of(code, method)
        dead = dead_letters(message, fate)
        error = _answerable(exc, method, INTERNAL_MESSAGE if dead else INTERNAL_ANSWERED_MESSAGE)
        if dead:
            log.warning(
                "rejected %s request: %s (%s)",
                method,
                code,
                error.message,
                extra={"correlation_id": message.correlation_id},
            )
        elif fate.settle is Settle.DEAD_LETTER:
            log.warning(
                "%s request failed after its delivery was acknowledged: %s (%s), answered, not dead-lettered",
                method,
                code,
                error.message,
                extra={"correlation_id": message.correlation_id},
            )
        elif fate.settle is Settle.REQUEUE:
            self._warn_requeued.warning("%s still failing (%s): requeued", method, error.message)
        outcome = await self.conclude(message, method, code, reply_body(error=error))
        return observed_outcome(exc, outcome)  # settled as its code says; a shed one counted apart

    async def last_resort(self, message: RequestMessage) -> None:
        """Whatever raised past a handler: ``internal``, so that one bad message can never sit
        unacknowledged and stall the queue for every tenant."""
        if message.processed:
            return
        method = message.routing_key if message.routing_key in ROUTING_KEYS else "unknown"
        try:
            with stray_as_failure():  # its reply's probation connection closed as stuck, too
                await self.conclude(
                    message, method, ErrorCode.INTERNAL, reply_body(error=BridgeError(INTERNAL_MESSAGE))
                )
        except Exception as exc:  # the channel is gone: the broker redelivers it for another try
            log.warning("could not settle a failed request: %s", type(exc).__name__)

    # -- add ------------------------------------------------------------------------------------
    async def add(self, message: RequestMessage) -> str:
        try:
            check_text(message)
            check_reply_to(message)
            owner = self.identity.owner_of(message)
            cmd = _as_json(parse(AddCommand, read_body(message, self.settings.max_value_bytes)), self.settings)
            structlog.contextvars.bind_contextvars(owner=owner, service=cmd.service_id)
            # W3C trace context of the engine's span: kept with the task (a malformed one is dropped).
            traceparent = extract_traceparent(message.headers)
            task_id = await self._add_retrying(owner, cmd, idempotency_of(message), traceparent, message)
        except DeliveryGone:
            log.warning("an add's channel closed before it was stored: left to the broker, which delivers it again")
            return LEFT_TO_BROKER
        except Exception as exc:
            return await self.fail(message, "add", exc)
        except asyncio.CancelledError as exc:
            if not is_stray(exc):
                raise  # the bridge's stop: the delivery is left to the broker, which delivers it again
            # A broker call of another connection, cut by its close (``_connection_cut``): settled
            # as the failure it is. Raised on, it ended this task with the delivery never settled.
            return await self.fail(message, "add", exc)
        if task_id is None:  # a copy waits in the retry lane (confirmed): this delivery is done
            await message.ack()
            return DEFERRED
        return await self.conclude(message, "add", OK, wire.encode(wire.added(task_id, cmd)))

    async def _add_retrying(
        self, owner: str, cmd: AddCommand, key: AddKey, traceparent: str | None, message: RequestMessage
    ) -> str | None:
        """Retry an add whose fate is to be retried (``unavailable``) while the delivery is held,
        with backoff, within :data:`ADD_RETRY_BUDGET_S`; then its error is its fate. Every attempt
        stores the same prepared task (one task id), so an attempt that failed but landed later
        rewrites the same rows instead of leaving a second task.

        None: the add was moved to the retry lane instead (its owner's key-server entry is
        unusable and the owner holds its share of the window already)."""
        with ExitStack() as held:
            return await self._add_attempts(owner, cmd, key, traceparent, message, held)

    async def _add_attempts(
        self,
        owner: str,
        cmd: AddCommand,
        key: AddKey,
        traceparent: str | None,
        message: RequestMessage,
        held: ExitStack,
    ) -> str | None:
        delay = 0.1
        give_up = time.monotonic() + ADD_RETRY_BUDGET_S
        pending: PendingAdd | None = None
        replaces: uuid.UUID | None = None
        may_have_landed = False  # an attempt of ``pending`` failed in a way that may have stored it
        in_place = False  # counted in the owner's share of in-place retries for a bad key
        lane = _LaneOnce(functools.partial(self._defer, message, owner), functools.partial(self.lane.full, owner))
        # A redelivery's wait for its first delivery's write runs from now, once for all attempts.
        redelivered_at = time.monotonic() if key.first_copy_may_be_storing else None
        attempts = 0
        while True:
            # Nothing of it can have been stored yet: it may wait in the lane (no key lookup).
            if not in_place and pending is None and await lane.moved():
                return None
            try:
                if pending is None:
                    pending = await self.queue.prepare_add(owner, cmd, traceparent=traceparent)
                if redelivered_at is not None:
                    pending = await self._after_first_copy(pending, key, redelivered_at, cmd, traceparent)
                    redelivered_at = None  # its retries do not wait again
                if channel_gone(message):
                    # No write starts once the broker may have delivered the add again: a copy of it
                    # waits for a write of this one only as long as one can run (``first_copy_settled``).
                    raise DeliveryGone
                attempts += 1
                return await self.queue.store_add(
                    pending,
                    message_id=key.key,
                    # Only its first attempt records the key unguarded: this bridge's view of the
                    # channel may lag the broker's (a connection the broker gave up on first), and a
                    # retry's write started after a redelivered copy's wait ran out made the add two
                    # tasks. A retry claims the key with the LWT (an attempt of its own that landed
                    # recorded this very task id: the retry finds it its own).
                    first_copy=key.first_copy and attempts == 1 and not lane.copy_may_exist,
                    replaces=replaces,
                )
            except BridgeError as exc:
                retry = fate_of(wire_code(exc), "add").retry and not isinstance(exc, ClockOff)
                # (ClockOff: this bridge's clock, for seconds or more: requeued at once for a
                # bridge that can place it, not held here 30 s as its consumer pauses.)
                if not retry or time.monotonic() + delay > give_up or not self._consuming():
                    raise
                if isinstance(exc, OwnerKeyUnusable) and pending is None and not in_place:
                    if await lane.moved():
                        return None
                    held.enter_context(self.lane.retrying_in_place(owner))
                    in_place = True
                may_have_landed = may_have_landed or not isinstance(exc, NotSent)
                if isinstance(exc, NotSent) and not may_have_landed and self._stale(pending):
                    assert pending is not None
                    # Its id (its place in the ready index) would land behind where the dispatchers
                    # have moved on by now, and no scan would find it: no attempt of it reached
                    # Cassandra, so the next attempt gets a new id. Unless it was stored after all
                    # (a driver reports "no host available" for an idempotent write it sent before
                    # its connection closed): kept then, its retry writes the same rows again and
                    # finishes the add; or unless that read failed too (decided at the next try).
                    # A new id then would make the add two tasks. (Once an attempt timed out, it
                    # may still land: it keeps its id for good, for the same reason.)
                    landed = await self._landed_after_all(pending)
                    may_have_landed = bool(landed)
                    if landed is False:
                        replaces, cmd, pending = pending.task_id, _ready_now_if_due(pending, cmd), None
                self._warn_add_retry.warning("add failed (%s), retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _after_first_copy(
        self, pending: PendingAdd, key: AddKey, since: float, cmd: AddCommand, traceparent: str | None
    ) -> PendingAdd:
        """A redelivery: wait until its first delivery's write has landed or cannot any more
        (``WorkQueue.first_copy_settled``). The add prepared again if the wait aged its task id:
        stored with it, the task would land behind where the dispatchers' scans have moved on."""
        if key.key is None:
            return pending
        await self.queue.first_copy_settled(pending, key.key, since)
        if not self._stale(pending):
            return pending
        return await self.queue.prepare_add(pending.q.owner, cmd, traceparent=traceparent)

    async def _defer(self, message: RequestMessage, owner: str) -> bool:
        """Move the add to the retry lane; False if the broker did not take the copy."""
        try:
            await self.lane.defer(message, owner)
        except Exception as exc:  # the original stays held and retried in place, as before
            log.warning("could not move an add to the retry lane (%s): retried in place", type(exc).__name__)
            return False
        self.queue.metrics.inc("adds_deferred")
        self._warn_deferred.warning("owner's key-server entry unusable: add moved to the retry lane %s", self.lane.name)
        return True

    async def _landed_after_all(self, pending: PendingAdd) -> bool | None:
        """Whether an add whose attempts were all reported not sent stored its task after all
        (None: the read failed too)."""
        try:
            return await self.queue.add_stored(pending)
        except Unavailable:
            return None

    def _stale(self, pending: PendingAdd | None) -> bool:
        """The prepared task's id is older than a write may land behind the dispatchers' cursors.
        A delayed task's id is its due time: no scan passes it before then, but one may soon after."""
        if pending is None:
            return False
        at = pending.due_ms if pending.due_ms is not None else ms_of(pending.task_id)
        return self.queue.clock.now_ms() - at > ADD_ID_FRESH_MS

    # -- fetch and ack (RPCs) ---------------------------------------------------------------------
    async def fetch(self, message: RequestMessage) -> str:
        return await self._rpc(message, "fetch", FetchRequest, self._fetch)

    async def ack(self, message: RequestMessage) -> str:
        return await self._rpc(message, "ack", AckWithNextRequest, self._ack)

    async def unrouted(self, message: RequestMessage) -> str:
        key = message.routing_key
        if key == "add":
            # An add whose queue is missing (being declared again, or its binding gone): taken as
            # any add (it is one, and this bridge holds it). Answered as an unknown method, its
            # caller was told a valid add was its own permanent mistake (``bad_request``, not
            # retried), and the copy kept in the dead-letter queue for replay made it a task after
            # the engine was told it failed. (Whenever it comes: one requeued after its retries,
            # or redelivered, after the queue was back, was judged an unknown method then.)
            return await self.add(message)
        if key in ROUTING_KEYS and key != "add" and message.reply_to and self.queue_restoring(key):
            # A method whose queue this bridge is declaring again (the broker cancelled its
            # consumer: deleted by an operator, or lost with its node), for a moment. Answered as
            # an unknown method (``bad_request``, a client's mistake), it ended every worker's loop
            # of the fleet that fetched meanwhile, and a worker's finished result was given back.
            # Its caller retries it. Only then: a queue missing for another cause (a binding
            # removed) stays the caller's ``bad_request``, dead-lettered, not retried for ever.
            self._warn_unrouted.warning(
                "a %s request came while its queue is being declared again: answered unavailable", key
            )
            err: BaseException = Busy(
                f"the bridges' queue for {key!r} is missing (deleted, or its node lost) and is being "
                "declared again: send the request again in a moment"
            )
        else:
            err = BadRequest(f"unknown method {key!r}; use one of {', '.join(ROUTING_KEYS)}")
        return await self.fail(message, "unknown", err)

    async def _rpc(
        self,
        message: RequestMessage,
        method: str,
        model: type[R],
        call: Callable[[str, R, RequestMessage], Awaitable[Reply]],
    ) -> str:
        try:
            check_text(message)
            if not message.reply_to:
                raise BadRequest(f"{method} is an RPC: set reply_to (and correlation_id)")
            check_reply_to(message)
            owner = self.rpc_identity.owner_of(message)
            deadline = deadline_of(message)
            limit = self.settings.max_value_bytes
            parsed = parse(model, read_body(message, limit))
            request = wire.outcome_as_json(parsed, limit, body_bytes=len(message.body))
            structlog.contextvars.bind_contextvars(
                owner=owner,
                service=getattr(request, "service_id", None),
                worker=getattr(request, "worker_id", None),
            )
            if (late_ms := self._expired(method, deadline)) is not None:
                await self._answer_late(message, late_ms)
                outcome, (body, headers) = EXPIRED, (None, None)
            else:
                # The store gives a second try at an unknown outcome only if it ends in time.
                deadline_set = request_deadline_ms.set(deadline)
                try:
                    outcome, (body, headers) = OK, await call(owner, request, message)
                except RequestAbandoned as why:
                    # Nobody reads the reply: settled as an expired request (counted where raised).
                    # A line per request (DEBUG, as README says of them): a worker fleet stopping
                    # abandons every long-poll it had waiting.
                    log.debug("request abandoned: %s", why)
                    outcome, (body, headers) = EXPIRED, (None, None)
                finally:
                    request_deadline_ms.reset(deadline_set)
        except DeliveryGone:
            # Acknowledged early (a waiting fetch, a redrive) on a channel that was closing: the
            # broker delivers the request again, and that copy is answered. Answered here too, the
            # worker got ``internal ... dead-lettered`` (not retried) for a request that was not.
            log.warning("a request's channel closed as it was acknowledged: the broker delivers it again")
            return LEFT_TO_BROKER
        except Exception as exc:
            return await self.fail(message, method, exc)
        except asyncio.CancelledError as exc:
            if not is_stray(exc):
                raise  # the bridge's stop: the delivery is left to the broker, which delivers it again
            return await self.fail(message, method, exc)  # a connection's close, as in ``add``
        return await self.conclude(message, method, outcome, body, headers)

    def _expired(self, method: str, deadline: int | None) -> int | None:
        """How many ms past its deadline the request came (None: in time). The caller gave up (and
        may have retried elsewhere): executing it now could only act on state that has moved on.
        Not executed (nothing touches Cassandra), and counted."""
        if deadline is None or (late_ms := self.queue.clock.now_ms() - deadline) <= 0:
            return None
        self.queue.metrics.inc("requests_expired", method=method)
        log.debug("request past its deadline not executed", extra={"late_ms": late_ms})
        self._warn_late.warning(
            "requests past their x-deadline not executed (a %s %d ms late): their callers gave up, or their "
            "clocks are behind the bridge's; counted in queue_bridge_requests_expired_total",
            method,
            late_ms,
        )
        return late_ms

    async def _answer_late(self, message: RequestMessage, late_ms: int) -> None:
        """Answer a request that came past its deadline ``unavailable`` (its delivery is settled as
        ``expired`` all the same). A deadline reckoned on a client's clock that is behind this
        bridge's by more than its timeout makes every request of it late: unanswered, each looked
        like a lost reply, and nothing said why. A caller still waiting learns it (and the clocks'
        offset, from the reply's x-now) and sends it again; one that gave up drops the reply."""
        if not usable_reply_to(message.reply_to):
            return
        error = Unavailable(
            f"the request arrived past its x-deadline by {late_ms} ms by this bridge's clock, and was not "
            "executed: if it was sent just now, the client's clock is behind the bridge's (Cassandra's "
            "time); send it again with a deadline on the bridge's clock (the x-now header of this reply)"
        )
        await self.replies.answer(message, reply_body(error=error), is_error=True)

    async def _fetch(self, owner: str, req: FetchRequest, message: RequestMessage) -> Reply:
        if message.redelivered and req.fresh:
            # The broker redelivers a request whose bridge died before settling it: a retry of a
            # fetch whose reply may have been lost, which ``fresh`` must not be. The first copy
            # may have claimed a task and written the worker's pointer: this copy hands it out.
            req = req.model_copy(update={"fresh": False})
        early = req.wait_ms > 0 and self.waiting_unbounded < self.settings.max_waiting_fetches
        if early:
            self.waiting_unbounded += 1  # counted at once: the awaits below must not overshoot it
        try:
            if early:
                # A fetch may wait up to 30 s: its delivery must not hold one of the consumer's
                # prefetch slots that long (a bridge with as many waiting fetches as slots would
                # take no request). Acknowledged now, once its owner is known to have a key (an
                # owner without one is refused and dead-lettered, as at waitMs 0); if the bridge
                # dies while it waits, the worker's retry asks again. Past
                # BRIDGE_MAX_WAITING_FETCHES it keeps its slot: the prefetch bounds the rest.
                await self._owner_has_key(owner)
                await ack_early(message)
            if req.wait_ms > 0:
                deadline = deadline_of(message)
                if deadline is not None and (left := deadline - self.queue.clock.now_ms()) < req.wait_ms:
                    # The caller stops listening at its deadline and may have sent another fetch: a
                    # wait past it would only claim a task for a reply nobody reads.
                    req = req.model_copy(update={"wait_ms": max(0, left)})
            delivery = await self.queue.fetch(
                owner, req, still_wanted=self._still_wanted(message), deadline_ms=deadline_of(message)
            )
        finally:
            if early:
                self.waiting_unbounded -= 1
        if delivery is None:
            return wire.encode(wire.fetched(None)), None
        # The worker's span continues the engine's trace: same trace id, a new parent span id.
        child = child_traceparent(delivery.traceparent)
        headers = {"traceparent": child} if child else None
        return wire.encode(wire.fetched(delivery)), headers

    async def _owner_has_key(self, owner: str) -> None:
        """``unknown_owner`` now if the owner has no key: asked before a delivery is acknowledged
        early, while that refusal can still be dead-lettered as the fate table says (after the
        ack it could only be answered). The domain call asks the same first (``Fetcher.fetch``,
        every lifecycle method), from the same cache (``OwnerKeys``): a known owner costs no I/O."""
        ctx = getattr(self.queue, "ctx", None)  # (the unit tests' stand-in queues have no keys)
        if ctx is not None:
            await ctx.keys.current(owner)

    def _still_wanted(self, message: RequestMessage) -> Callable[[], Awaitable[bool]] | None:
        """For a fetch that may wait: whether its requester is still there to take a task."""
        if self.requester_alive is None or not message.reply_to:
            return None
        return functools.partial(self.requester_alive, message.reply_to)

    async def _ack(self, owner: str, req: AckWithNextRequest, message: RequestMessage) -> Reply:
        if message.redelivered and req.next is not None and req.next.fresh:
            req = req.model_copy(update={"next": req.next.model_copy(update={"fresh": False})})  # as in _fetch
        done = await self.queue.ack(owner, req, sent_before_ms=sent_before_ms(message))
        if req.next is None:
            return wire.encode(wire.acked(done)), None
        return await self._ack_then_fetch(owner, req, done, message)

    async def _ack_then_fetch(self, owner: str, req: AckWithNextRequest, done: bool, message: RequestMessage) -> Reply:
        """(1.6) The ack is decided: its answer stands whatever the fetch of the next task does.
        A fetch that fails answers its error as ``next`` (the worker fetches on its own then)."""
        try:
            with stray_as_failure():  # a connection's close cutting the fetch leaves the ack decided
                delivery = await self.queue.fetch(
                    owner,
                    req.next_fetch(done),
                    still_wanted=self._still_wanted(message),
                    deadline_ms=deadline_of(message),
                )
        except RequestAbandoned:
            delivery = None  # nobody reads this reply either; the ack's answer is sent all the same
        except Exception as exc:
            error = _answerable(
                _connection_cut(exc), "fetch after an ack", "internal error fetching the next task; see the bridge log"
            )
            return wire.encode(wire.acked(done, wire.error(error))), None
        child = child_traceparent(delivery.traceparent) if delivery is not None else None
        return wire.encode(wire.acked(done, wire.fetched(delivery))), {"traceparent": child} if child else None

    # -- the lifecycle (1.4): RPCs on one queue, by routing key (the table is shared with the gateway)
    def lifecycle_handler(self, method: str) -> Callable[[RequestMessage], Awaitable[str]]:
        operation = wire.LIFECYCLE[method]

        async def call(owner: str, req: Any, message: RequestMessage) -> Reply:
            work: Callable[[], Awaitable[wire.Body]] = functools.partial(operation.call, self.queue, owner, req)
            if method == "cancel":
                request_id = message.message_id or message.correlation_id
                work = functools.partial(wire.cancel_once, self.queue, owner, req, request_id)
            if method == PACED_METHOD:
                body = await self._paced(owner, message, work)
            elif method in LONG_METHODS:
                body = await self._long(method, owner, message, work)
            else:  # extend, fail, cancel: quick, and held as every request is
                body = await work()
            return wire.encode(body), None

        async def handle(message: RequestMessage) -> str:
            return await self._rpc(message, method, operation.model, call)

        return handle

    async def _paced(self, owner: str, message: RequestMessage, work: Callable[[], Awaitable[wire.Body]]) -> wire.Body:
        """A redrive paces itself (BRIDGE_REDRIVE_RATE a queue): up to 1,000 tasks take many
        seconds. Holding its delivery meanwhile, as many redrives as the prefetch window would stop
        every extend, fail and cancel of every owner on this bridge (leases of healthy work would
        run out). Acknowledged now, as a waiting fetch is (once its owner is known to have a key):
        a redrive is idempotent, and if the bridge dies, the caller's retry asks again. Bounded:
        each one acked early is memory and a waiter on its queue's pace, outside the prefetch."""
        await self._owner_has_key(owner)
        with self.capacity.slot(PACED_METHOD, owner):
            await ack_early(message)
            return await work()

    async def _long(
        self, method: str, owner: str, message: RequestMessage, work: Callable[[], Awaitable[wire.Body]]
    ) -> wire.Body:
        """A purge, stats, parked or discard (LONG_METHODS): run at most MAX_LONG_REQUESTS at once,
        each holding its delivery LONG_HOLD_S at most (:meth:`_held_briefly`)."""
        await self._owner_has_key(owner)
        with self.capacity.slot(method, owner):
            return await _held_briefly(message, work())


async def _held_briefly(message: RequestMessage, work: Awaitable[wire.Body]) -> wire.Body:
    """``work``'s reply, its delivery held LONG_HOLD_S at most: one that ends within it is settled
    by its fate as every request is; one that goes on is acknowledged then (off the prefetch
    window), and answered when it ends (an error after that is answered only: ``fate.dead_letters``).
    Every request is safe to repeat: if the bridge dies meanwhile, the caller's retry asks again."""
    running = asyncio.ensure_future(work)
    try:
        await asyncio.wait({running}, timeout=LONG_HOLD_S)
        if not running.done():
            await ack_early(message)
    except asyncio.CancelledError:
        running.cancel()  # as awaiting it would: the request is being cut (the bridge's stop)
        raise
    except Exception:
        # The ack failed (DeliveryGone: its channel is closing, the broker delivers the request
        # again, and that copy is answered): this run is finished, not cut, unanswered.
        with contextlib.suppress(Exception):
            await running
        raise
    return await running


def _ready_now_if_due(pending: PendingAdd, cmd: AddCommand) -> AddCommand:
    """A delayed add whose time came while it was retried is added ready now (a new delay from
    now would hand it out later than asked)."""
    if pending.due_ms is None:
        return cmd
    return cmd.model_copy(update={"delay_ms": None, "not_before": None})


def _as_json(cmd: AddCommand, settings: Settings) -> AddCommand:
    """The add with its value and token as their JSON bytes (written once, checked as an add's
    are), not the parsed trees: an add is held through its retries (up to 30 s in a Cassandra
    brownout, a window of 64 at once), and a 1 MiB value of small JSON objects is some 24 MiB of
    Python objects, 1.5 GiB for one tenant's window (a sidecar's limit is 1 GiB; found by
    review, 2026-12-07). The gateway lets go of its trees the same way (``_prepare_add``)."""
    limit = settings.max_value_bytes
    value = jsonvalue.fragment(encode(cmd.value, "the value", limit))
    token = None if cmd.token is None else jsonvalue.fragment(encode(cmd.token, "the token", limit))
    return cmd.model_copy(update={"value": value, "token": token})
