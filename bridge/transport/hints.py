"""Hints on RabbitMQ: one queue per service queue, each hint delivered to one fetch of the fleet.

``<queue_prefix>.hints.<24 hex>`` (a digest of owner and service: any names fit, and the broker
permissions can name the pattern) is a durable classic queue with two priorities (recovered tasks
first) that expires when unused for longer than a task lives. Hints are transient messages
published without confirms: losing one costs latency, never a task (``bridge.domain.reconcile``).

A fetch takes a hint with ``basic.get`` (one broker round trip, no store traffic when there is
none) and acknowledges it once its claim is decided. A fetch that waits (``waitMs``) registers as
a waiter of its queue; while a queue has waiters on this bridge, the bridge consumes it (prefetch
1) and hands each delivery to the oldest waiter, acknowledging it as it hands it over: the
consumer's one slot is then free for the next hint and the next waiter while the first claims.
(Acknowledged after the claim, the broker held the next hint back for a whole claim: a bridge's
waiters took their tasks one claim at a time, about 150 a second however many waited.) A handed
hint whose claim cannot be decided (the store failed, the fetch was cancelled) is published
again. A delivery nobody waits for any more is returned to the queue at once for another bridge.
A hint this bridge makes for a queue one of its own fetches waits for is handed to that fetch
in the process, not published (``AmqpHints.hand_here``), even before the task's write is
acknowledged: that fetch claims only once it is (``Hint.stored``).

A bridge with ``BRIDGE_HINTS=false`` takes no hints (its fetches scan the store) but publishes
them all the same, for the bridges of its fleet that take them (a setting switched pod by pod:
the tasks it adds, re-exposes or finds due as the scheduler bridge reached those only by a
reconciliation scan, up to grace + interval late). It never declares a hint queue: its hints go
only into queues that hint-taking bridges declared (the broker drops those routed to none), so a
fleet with hints off everywhere keeps no hints and renews no hint queue; and they expire untaken
(``UNTAKEN_MS``), so that the hint queues bridges that took hints left behind do not fill with
them (RabbitMQ drops an expired message only at the head of its queue: docs/storage.md).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, cast

import aiormq
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from pamqp.common import Arguments

from bridge.config import Settings
from bridge.crypto import Sealed
from bridge.domain.cancellation import stray_as_failure
from bridge.domain.hints import Hint, HintsUnavailable, Taken, paused_unless_closed
from bridge.domain.records import LANE_FRESH, LANE_RECOVERED, PRIORITY_MAX, Payload, QueueKey
from bridge.domain.timeline import ms_of
from bridge.observability.throttled import ThrottledWarning
from bridge.transport import frames
from bridge.transport.replies import message_ids
from bridge.transport.request import Delivery

log = logging.getLogger("bridge.hints")
_T = TypeVar("_T")

# The queue names after the prefix (broker permissions): ``p`` since 1.4, whose queues have five
# priorities (task priorities 0-3, recovered tasks above them); a queue's arguments cannot change,
# so the 1.3 queues (two priorities) keep their names and 1.4 bridges use new ones.
HINT_PATTERN = r"\.hints\.p?[0-9a-f]{24}"
RECOVERED_PRIORITY = PRIORITY_MAX + 1
# A hint published by a bridge that takes none expires after this long untaken (at least; more
# with a longer BRIDGE_HINT_GRACE + BRIDGE_RECONCILE_INTERVAL): reconciliation finds its task as
# it finds one whose hint was lost, and a fleet that no longer takes hints does not pile them up.
UNTAKEN_MS = 60_000


def hint_queue_name(queue_prefix: str, q: QueueKey) -> str:
    digest = hashlib.blake2b(f"{q.owner}\x00{q.service}".encode(), digest_size=12).hexdigest()
    return f"{queue_prefix}.hints.p{digest}"


def _sealed(s: Sealed) -> list[str]:
    return [s.key_id, base64.b64encode(s.nonce).decode(), base64.b64encode(s.ciphertext).decode()]


def _unsealed(v: list[str]) -> Sealed:
    key_id, nonce, ciphertext = v
    return Sealed(str(key_id), base64.b64decode(nonce), base64.b64decode(ciphertext))


EPOCH_MAX = 2**31 - 1  # a lease's epoch is a Cassandra int; a claim writes the hint's + 1


def encode(hint: Hint) -> bytes:
    d: dict[str, object] = {
        "t": str(hint.task_id),
        "l": hint.lane,
        "s": str(hint.seq),
        "e": hint.epoch,
        "k": hint.has_token,
    }
    if hint.priority:
        d["r"] = hint.priority
    if hint.redriven:
        d["d"] = 1
    p = hint.payload
    if p is not None:
        carried: dict[str, object] = {
            "v": _sealed(p.value),
            "k": None if p.token is None else _sealed(p.token),
            "tp": p.traceparent,
            "c": p.created_at_ms,
        }
        if p.expires_at_ms is not None:
            carried["x"] = p.expires_at_ms  # the task's end of life: its claim gives the lease that life
        d["p"] = carried
    return orjson.dumps(d)


def decode(body: bytes) -> Hint:
    try:
        return _decode(body)
    except (AttributeError, TypeError) as exc:  # a field of another type: {"t": 1}, {"s": [1]}
        raise ValueError(f"a hint with a field of the wrong type: {type(exc).__name__}") from None


def _decoded_or_none(body: bytes) -> Hint | None:
    try:
        return decode(body)
    except Exception:  # malformed: its taker drops it
        return None


def _decode(body: bytes) -> Hint:
    d = orjson.loads(body)
    # JSON that is no object (``[1]``, published by hand into a hint queue) raised AttributeError,
    # which the "malformed hint dropped" guards let through: the fetch answered internal, and the
    # hint, unsettled, came back to the next one.
    if not isinstance(d, dict) or not isinstance(d.get("p", {}), dict | None):
        raise ValueError("a hint is a JSON object")
    payload = None
    if (p := d.get("p")) is not None:
        token = None if p["k"] is None else _unsealed(p["k"])
        created = None if p["c"] is None else int(p["c"])
        expires = None if p.get("x") is None else int(p["x"])  # absent from an older bridge's hints
        payload = Payload(_unsealed(p["v"]), token, p["tp"], created, expires_at_ms=expires)
    priority = min(max(int(d.get("r", 0)), 0), PRIORITY_MAX)
    redriven = bool(d.get("d", 0))
    lane, epoch = d["l"], d["e"]
    # Checked here, not by the claim: an epoch of another type (``"3"``, ``1.5``, past
    # Cassandra's int) failed the claim, and the hint, put back at the top of its queue, answered
    # every fetch of the queue on every bridge ``internal``. A re-exposed task's hint names the
    # epoch of its expired lease; a fresh one's none.
    if type(lane) is not int or lane not in (LANE_RECOVERED, LANE_FRESH):
        raise ValueError(f"a hint's lane is {int(LANE_RECOVERED)} or {int(LANE_FRESH)}")
    if lane == LANE_FRESH and epoch is not None:
        raise ValueError("a fresh task's hint names no epoch")
    if lane == LANE_RECOVERED and (type(epoch) is not int or not 0 <= epoch < EPOCH_MAX):
        raise ValueError(f"a re-exposed task's hint names its epoch: a whole number below {EPOCH_MAX}")
    return Hint(uuid.UUID(d["t"]), lane, uuid.UUID(d["s"]), epoch, bool(d["k"]), payload, priority, redriven)


@dataclass(frozen=True, slots=True)
class LocalHint:
    """A hint handed by this bridge's own add (or announcement) to a fetch of this bridge that
    waits for its queue: it never went through the broker. It carries what a republish needs
    (the hint queue and the priority), should its claim not be decided."""

    hint: Hint
    routing_key: str
    priority: int

    @property
    def body(self) -> bytes:
        return encode(self.hint)


# A hint from the broker: from ``basic.get`` (aiormq's frame, ``Delivery``) or from a waiting
# fetch's consumer (aio-pika's, which restores it after a reconnection).
Received = Delivery | AbstractIncomingMessage
# What a waiting fetch is handed: a delivery of its queue's consumer, or a hint of this bridge's.
Handed = AbstractIncomingMessage | LocalHint


@dataclass
class _Taken:
    """A hint taken with ``basic.get``: acknowledged once its claim is decided, else returned."""

    hint: Hint
    message: Received

    async def done(self) -> None:
        await _settle(self.message, requeue=None)

    async def retry(self) -> None:
        await _settle(self.message, requeue=True)


@dataclass
class _Handed:
    """A hint a waiting fetch was handed by the consumer, acknowledged already: a claim that is
    not decided publishes it again, so that another fetch gets it."""

    hint: Hint
    message: Handed
    hints: AmqpHints

    async def done(self) -> None:
        pass

    async def retry(self) -> None:
        await self.hints.republish(self.message)


# Every broker call here is bounded: a robust channel whose connection is gone waits for the
# reconnection, and a shutdown (or a cancelled fetch) must never wait on that.
BROKER_CALL_S = 3.0
# A hint queue that failed (its node down, the broker refusing it) is not asked for again for this
# long, whatever the number of fetches waiting on it: each asked every second (a declaration, a
# channel the refusal closed), hundreds of waiters a bridge times the fleet's bridges at a broker
# that had just lost a node. The waiters scan the store meanwhile, one look a second for all.
FAILED_QUEUE_HOLD_S = 1.0
TRANSIENT = 1  # delivery mode: hints are not written to disk
# A hint outlives its task by this much (the broker counts its expiration from when it takes the
# hint; the publish may take a moment): gone early, its task is found by a scan all the same.
HINT_LIFE_SLACK_MS = 2_000


async def _settle(message: Received, *, requeue: bool | None) -> None:
    try:
        with stray_as_failure():  # its channel's connection closed as stuck: as gone
            async with asyncio.timeout(BROKER_CALL_S):
                if requeue is None:
                    await message.ack()
                else:
                    await message.nack(requeue=requeue)
    except Exception as exc:  # the channel is gone: the broker requeues the hint itself
        log.debug("hint not settled: %s", type(exc).__name__)


async def _to_its_end(call: Awaitable[_T], give_back: Callable[[_T], Awaitable[None]] | None = None) -> _T:
    """``call``, a broker call, run to its end even when its caller is cancelled meanwhile (a
    waiting fetch whose client hung up: ``fetching._unless_gone`` cancels its take). aiormq closes
    a channel whose RPC is cancelled, and all it carries with it: on the consumers' channel every
    waiting fetch's hint consumer, of every queue (each answered null at the reopen,
    ``_consumers_lost``); on the publish-and-get channel the hints other fetches hold, their claims
    under way (the broker requeues them for a second claim), and the publishes on their way. The
    call is bounded (``BROKER_CALL_S``): its caller waits for its end, then goes on cancelled, and
    what it got is given back (``give_back``), nobody takes it now."""
    running = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        while not running.done():
            # A second cancellation (a shutdown's) waits too: it would close the channel as well.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([running])
        # (Its own cancellation, a stray one from its connection's close: raised as it came.)
        if give_back is not None and not running.cancelled() and running.exception() is None:
            await give_back(running.result())
        raise


async def _bounded(call: Awaitable[_T]) -> _T:
    async with asyncio.timeout(BROKER_CALL_S):
        return await call


async def _requeue_got(got: DeliveredMessage) -> None:
    """A hint ``basic.get`` took for a fetch that left meanwhile: back to its queue, for another."""
    if isinstance(got.delivery, Basic.GetOk):
        await _settle(Delivery(got), requeue=True)


@dataclass
class _Waiting:
    queue: AbstractQueue
    waiters: deque[asyncio.Future[Handed | None]] = field(default_factory=deque)
    consumer_tag: str | None = None
    channel: aiormq.Channel | None = None  # the channel its consumer was registered on

    def consumer_gone(self) -> bool:
        """Its consumer no longer exists: its channel was closed (a reconnection, a channel
        error) or the broker cancelled it (the hint queue was deleted). aiormq drops the tag then;
        the consumer is not restored (aio-pika restores only queues its robust channel keeps)."""
        if self.consumer_tag in (None, "starting"):
            return False
        channel = self.channel
        return channel is None or channel.is_closed or self.consumer_tag not in channel.consumers

    def answer_all(self, keep: asyncio.Future[Handed | None] | None = None) -> None:
        """Every waiting fetch but ``keep`` answered null now (they have no consumer to wake them)."""
        for future in self.waiters:
            if future is not keep and not future.done():
                future.set_result(None)


class AmqpHints:
    def __init__(
        self,
        settings: Settings,
        *,
        on_loss: Callable[[], None] | None = None,
        on_queue_loss: Callable[[QueueKey], None] | None = None,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        # The bridges' clock (Cassandra's, by default), which task ids and lives are on.
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        # Hints may have been lost (a broker reconnect, a failed publish): reconciliation scans again.
        self.on_loss = on_loss or (lambda: None)
        # The hints of one queue alone (its hint queue cannot be declared: the node holding it is
        # down): that queue is scanned again, not every queue of the bridge (fetching.py's
        # alarm_queue, for the same cause met by a fetch).
        self.on_queue_loss = on_queue_loss or (lambda q: self.on_loss())
        self._expires_ms = (settings.task_ttl_seconds + 86_400) * 1000
        self._channel: AbstractRobustChannel | None = None  # publish + get
        self._connection: AbstractRobustConnection | None = None
        self._declaring: aiormq.Channel | None = None  # declarations only (a refusal closes it)
        # One opening at a time: concurrent first declarations (at start, after a refusal closed
        # the channel) each opened a channel and kept the last, the others left open unused.
        self._declaring_lock = asyncio.Lock()
        self._frames: aiormq.Channel | None = None  # its aiormq channel (changes on reconnect)
        self._ids = message_ids()
        self._consume: AbstractChannel | None = None  # waiting fetches' consumers (prefetch 1 each)
        self._declared: OrderedDict[str, AbstractQueue] = OrderedDict()
        # As many as the queues whose state the bridge keeps (a miss is a declaration on the
        # request's path: with more queues in use than a fixed 10,000, about every other one).
        self._max_declared = settings.max_queues_in_memory
        self._failed: OrderedDict[str, float] = OrderedDict()  # hint queue -> when it last failed (monotonic)
        self._waiting: dict[str, _Waiting] = {}
        self._cancelling: set[asyncio.Task[None]] = set()  # consumer cancels under way
        self._republishing: set[asyncio.Task[None]] = set()  # handed hints waiting for their write
        self._closed = False
        self._closing = asyncio.Event()  # set with ``_closed``: ``pause`` wakes on it
        # BRIDGE_HINTS=false: publish only, into queues declared by bridges that take hints.
        self.takes = settings.hints
        untaken_ms = max(UNTAKEN_MS, int((settings.hint_grace + settings.reconcile_interval) * 1000))
        self._expiration = None if self.takes else str(untaken_ms)
        self.published = 0
        self.handed_here = 0  # hints handed to a waiting fetch of this bridge, not published
        self.lost = 0
        # Per request while their cause lasts (a broker alarm, a channel a timed-out call closed):
        # at most a line every 10 s each, with how many were left out.
        self._warn_lost = ThrottledWarning(log)
        self._warn_unavailable = ThrottledWarning(log)
        self._warn_no_wait = ThrottledWarning(log)

    async def attach(self, connection: AbstractRobustConnection) -> None:
        connection.reconnect_callbacks.add(lambda *_: self.on_loss())
        self._connection = connection
        self._channel = await connection.channel(publisher_confirms=False)
        if not self.takes:
            return  # nothing consumed: no fetch of this bridge waits for a hint
        self._consume = await connection.channel(publisher_confirms=False)
        await self._consume.set_qos(prefetch_count=1)
        self._consume.reopen_callbacks.add(lambda *_: self._consumers_lost())

    async def _queue(self, q: QueueKey) -> AbstractQueue:
        name = hint_queue_name(self.settings.queue_prefix, q)
        found = self._declared.get(name)
        if found is not None:
            self._declared.move_to_end(name)
            return found
        assert self._channel is not None, "hints used before the transport started"
        async with asyncio.timeout(BROKER_CALL_S):
            await self._declare(name)
        # The queue object only names the queue for the publish-and-get channel: no broker call.
        declared = await self._channel.get_queue(name, ensure=False)
        self._declared[name] = declared
        while len(self._declared) > self._max_declared:
            self._declared.popitem(last=False)
        return declared

    async def _declare(self, name: str) -> None:
        """Declare a hint queue on a channel of its own. A queue declared by a bridge with another
        ``BRIDGE_TASK_TTL`` has another ``x-expires``: the broker refuses the declaration (406,
        closing the channel), and the queue is used as it is, checked with a passive declare.
        Refused on the publish-and-get channel, the hints of every queue would go with it, and
        every later use of the queue would be refused again (a long-poll answered at once)."""
        # Classic, said: a vhost whose default queue type is quorum (RabbitMQ 3.10+, recommended by 4.x)
        # made a durable queue declared without the argument a quorum queue, which refuses
        # x-max-priority: every hint queue was refused, and every fetch fell back to scanning the
        # store. The argument is equivalent to its absence on a classic queue (3.10): the hint
        # queues of older bridges are declared again as they are.
        args: Arguments = {
            "x-max-priority": RECOVERED_PRIORITY,
            "x-expires": self._expires_ms,
            "x-queue-type": "classic",
        }
        try:
            channel = await self._declaring_channel()
            await channel.queue_declare(name, durable=True, arguments=args)
        except aiormq.exceptions.ChannelPreconditionFailed:
            log.info("hint queue %s exists with other arguments (another BRIDGE_TASK_TTL): used as it is", name)
            channel = await self._declaring_channel()
            await channel.queue_declare(name, passive=True)

    async def _declaring_channel(self) -> aiormq.Channel:
        channel = self._declaring
        if channel is not None and not channel.is_closed:
            return channel
        async with self._declaring_lock:
            channel = self._declaring
            if channel is None or channel.is_closed:
                assert self._connection is not None and self._connection.transport is not None, "hints not attached"
                underlay = cast(aiormq.Connection, self._connection.transport.connection)
                channel = self._declaring = cast(aiormq.Channel, await underlay.channel())
            return channel

    async def _channel_frames(self) -> aiormq.Channel:
        """The publish-and-get channel's aiormq channel: hints are published and taken on its frames
        directly (``bridge.transport.request``); a reconnecting channel is waited for, boundedly."""
        channel = self._frames
        if channel is None or frames.closing(channel):
            assert self._channel is not None, "hints used before the transport started"
            async with asyncio.timeout(BROKER_CALL_S):
                channel = self._frames = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        return channel

    async def offer(self, q: QueueKey, hint: Hint) -> None:
        if self.hand_here(q, hint):
            return
        priority = RECOVERED_PRIORITY if hint.recovered else hint.priority
        if not self.takes:
            # Not declared: to the queue if a bridge that takes hints declared it, else dropped.
            name = hint_queue_name(self.settings.queue_prefix, q)
            await self._publish(encode(hint), priority, name, expiration=self._expiration)
            return
        if self._failed_lately(q) and hint_queue_name(self.settings.queue_prefix, q) not in self._declared:
            # Its queue failed a moment ago and must be declared again (its node down): each add
            # declared it, a channel the refusal closed and a round trip on the add's reply path,
            # at every add. Lost, as below: reconciliation finds the task. (One still declared is
            # published to: a take's failure may have had nothing to do with the queue.)
            self._lost(HintsUnavailable("the hint queue failed a moment ago"), q)
            return
        try:
            # An add's path: a declaration cut by the close of a connection aiormq found stuck
            # ends in a CancelledError nobody sent this task. A hint lost, like any failure here;
            # raised on, it ended the add's task with its delivery never settled.
            with stray_as_failure():
                queue = await self._queue(q)
        except Exception as exc:
            self._note_failure(q)
            # Its queue alone: with the bridge-wide alarm, each add of a queue whose hint queue's
            # node was down cleared every queue's quiet interval and lifted the grace for all of
            # them (claims of tasks whose hints other bridges' waiting fetches were being handed).
            self._lost(exc, q)
            return
        await self._publish(encode(hint), priority, queue.name, expiration=self._life_left(hint))

    def _life_left(self, hint: Hint) -> str:
        """The hint's expiration: as long as its task lives (plus the clocks' margin). Without one,
        the hints of a queue nobody fetched from piled up for ever (publishing does not renew its
        queue's ``x-expires``; any bridge's next add declares it again): a tenant adding with no
        workers grew the broker's memory by a hint a task (kilobytes each) past its tasks' TTL,
        and the workers that came back took the oldest first, each a claim of a task long gone."""
        ends = hint.payload.expires_at_ms if hint.payload is not None else None
        if ends is None:
            ends = ms_of(hint.task_id) + self.settings.task_ttl_seconds * 1000  # a delayed one's: later
        left = ends - self._now_ms() + HINT_LIFE_SLACK_MS
        return str(max(HINT_LIFE_SLACK_MS, left))

    def hand_here(self, q: QueueKey, hint: Hint) -> bool:
        """A fetch of this bridge waits for this queue: the hint is handed to the oldest such fetch
        in this process, not published. A sidecar's own worker waiting on it, or any fleet where
        each bridge has waiters of the queue, then takes a task its bridge just stored without two
        broker hops (the publish, the delivery to the consumer) and their wake-ups, and the broker
        carries nothing for it. Only a hint: the claim still decides, and one whose claim is not
        decided is published then (``_Handed.retry``), as a consumer's is. A fetch waits only
        while its queue had no hint left to take, so an older hint is seldom passed over: one in
        flight to a consumer at that moment goes to the next waiter, or back to the queue."""
        waiting = self._waiting.get(hint_queue_name(self.settings.queue_prefix, q))
        if waiting is None or self._closed:
            return False
        priority = RECOVERED_PRIORITY if hint.recovered else hint.priority
        while waiting.waiters:
            future = waiting.waiters.popleft()
            if not future.done():
                future.set_result(LocalHint(hint, waiting.queue.name, priority))
                self.handed_here += 1
                return True
        return False

    async def republish(self, message: Handed) -> None:
        """Publish a handed (acknowledged) hint again to its queue, for another fetch. A hint of
        this bridge handed before its task's write was acknowledged is published only once it
        is, off the caller's path (a cancelled fetch does not wait for the add's write); not at
        all if the write failed: no other bridge may hear of a task that is not stored."""
        stored = message.hint.stored if isinstance(message, LocalHint) else None
        if stored is not None and not stored.done():
            task = asyncio.get_running_loop().create_task(self._republish_once_stored(message, stored))
            self._republishing.add(task)
            task.add_done_callback(self._republishing.discard)
            return
        if stored is not None and not stored.result():
            return
        assert message.routing_key is not None  # the hint queue's name (default exchange)
        # With its task's life, as when first published: published again without, a hint handed
        # back (its fetch cancelled, its worker gone) outlived its task in a queue nobody fetched.
        hint = message.hint if isinstance(message, LocalHint) else _decoded_or_none(message.body)
        expiration = None if hint is None else self._life_left(hint)
        await self._publish(message.body, message.priority, message.routing_key, expiration=expiration)

    async def _republish_once_stored(self, message: Handed, stored: asyncio.Future[bool]) -> None:
        # Shielded: cancelled (at shutdown), this task must not cancel the add's own future, which
        # its store then could not settle (InvalidStateError in the add).
        if await asyncio.shield(stored):
            await self.republish(message)

    async def _publish(
        self, body: bytes, priority: int | None, queue_name: str, *, expiration: str | None = None
    ) -> None:
        try:
            with stray_as_failure():  # (as in ``offer``)
                channel = await self._channel_frames()
            props = frames.properties(
                priority=priority, delivery_mode=TRANSIENT, expiration=expiration, message_id=next(self._ids)
            )
            # Not waiting for the socket: a hint lost with the connection is found by reconciliation.
            await frames.publish_on(channel, queue_name, body, props)
            self.published += 1
        except Exception as exc:
            self._lost(exc)

    def _lost(self, exc: BaseException, q: QueueKey | None = None) -> None:
        """A hint lost is found again by reconciliation (alarmed here: for its queue, or for every
        queue when the cause is the bridge's channel or connection)."""
        self.lost += 1
        if q is not None:
            self.on_queue_loss(q)
        else:
            self.on_loss()
        self._warn_lost.warning("hint not published (%s): reconciliation will find the task", type(exc).__name__)

    async def take(self, q: QueueKey, wait_ms: int) -> Taken | None:
        if self._closed or not self.takes:
            return None
        name = hint_queue_name(self.settings.queue_prefix, q)
        if self._failed_lately(q):
            raise HintsUnavailable("the hint queue failed a moment ago")
        message: Delivery | None
        try:
            # A fetch's path: a call cut by a stuck connection's close is hints unavailable (the
            # fetch scans the store), not the end of the fetch's task (``offer``).
            with stray_as_failure():
                queue = await self._queue(q)
                channel = await self._channel_frames()
                got = await _to_its_end(_bounded(channel.basic_get(queue.name, no_ack=False)), _requeue_got)
            message = Delivery(got) if isinstance(got.delivery, Basic.GetOk) else None
        except Exception as exc:
            self._forget_if_gone(q, exc)
            self._note_failure(q)
            self._warn_unavailable.warning("hints unavailable (%s): fetches scan the store", type(exc).__name__)
            raise HintsUnavailable(f"the hint queue cannot be used: {type(exc).__name__}") from exc
        self._failed.pop(name, None)
        if message is not None:
            try:
                return _Taken(decode(message.body), message)
            except (ValueError, KeyError, TypeError, binascii.Error):
                log.warning("malformed hint dropped")
                await _settle(message, requeue=None)
                return None
        if wait_ms <= 0:
            return None
        handed = await self._wait(queue, wait_ms)
        if handed is None:
            return None
        if isinstance(handed, LocalHint):
            return _Handed(handed.hint, handed, self)
        try:
            return _Handed(decode(handed.body), handed, self)
        except (ValueError, KeyError, TypeError, binascii.Error):
            log.warning("malformed hint dropped")  # acknowledged as it was handed over
            return None

    # -- waiting fetches --------------------------------------------------------------------------
    async def _wait(self, queue: AbstractQueue, wait_ms: int) -> Handed | None:
        if self._closed:  # closed during this fetch's basic.get: close() answered the waiters before it
            return None
        waiting = self._waiting.get(queue.name)
        if waiting is None:
            waiting = self._waiting[queue.name] = _Waiting(queue)
        future: asyncio.Future[Handed | None] = asyncio.get_running_loop().create_future()
        waiting.waiters.append(future)
        completed = False
        try:
            if waiting.consumer_tag is None or waiting.consumer_gone():
                waiting.consumer_tag = "starting"
                # Named here, not by the broker: a start cut short may have registered its
                # basic.consume all the same, and only its tag can cancel it.
                tag = f"hints.{uuid.uuid4().hex}"
                try:
                    with stray_as_failure():  # (as in ``take``)
                        # Not cut by a fetch that leaves meanwhile (``_to_its_end``): a consumer
                        # started for nobody is cancelled as it leaves (``_stop_consuming_if_idle``).
                        await _to_its_end(_bounded(self._start_consuming(waiting, tag)))
                except Exception as exc:  # the broker is away, or the hint queue's node is down
                    self._warn_no_wait.warning("cannot wait for hints (%s)", type(exc).__name__)
                    raise HintsUnavailable(f"cannot wait for hints: {type(exc).__name__}") from exc
                finally:
                    # Any way out, CancelledError included (wait_for cancels the start when its time
                    # runs out, and the fetch itself may be cancelled): left "starting", no waiting
                    # fetch of this queue would start a consumer again for the life of the process.
                    if waiting.consumer_tag == "starting":
                        waiting.consumer_tag = None
                        self._cancel_later(waiting, tag)
                        # Fetches that joined while it started wait on no consumer: answered too
                        # (left waiting, nobody woke them before their waitMs ran out).
                        waiting.answer_all(keep=future)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), timeout=wait_ms / 1000)
            completed = True
        finally:
            if future in waiting.waiters:
                waiting.waiters.remove(future)
            if not future.done():
                future.set_result(None)
            got = future.result()
            if got is not None and not completed:  # cancelled with a hint in hand: for another fetch
                await self.republish(got)
            self._stop_consuming_if_idle(waiting)
        return got

    async def _start_consuming(self, waiting: _Waiting, tag: str) -> None:
        assert self._consume is not None
        queue = await self._consume.get_queue(waiting.queue.name, ensure=False)
        channel = cast(aiormq.Channel, await self._consume.get_underlay_channel())

        async def delivered(message: AbstractIncomingMessage) -> None:
            await self._delivered(waiting, message)

        # A set: added once per aiormq channel (a reopened channel is a new one).
        channel.on_consumer_cancel_callbacks.add(self._consumer_cancelled)
        waiting.consumer_tag = await queue.consume(delivered, consumer_tag=tag)
        waiting.channel = channel

    def _consumer_cancelled(self, frame: Basic.Cancel) -> None:
        """The broker cancelled a hint consumer: its queue was deleted, or the node holding it went
        down. Its waiting fetches are answered null now, and the queue declared again at its next
        use: left, they slept until their waitMs ran out (up to 30 s) and no task reached them,
        since nothing else answers a fetch whose consumer is gone while its channel stays open."""
        for waiting in list(self._waiting.values()):
            if waiting.consumer_tag == frame.consumer_tag:
                self._declared.pop(waiting.queue.name, None)
                waiting.consumer_tag = None
                waiting.answer_all()

    def _consumers_lost(self) -> None:
        """The consumers' channel was opened again (a reconnection, a channel error): every hint
        consumer went with the old one. The fetches waiting on them are answered null now (their
        workers fetch again, which starts a consumer), not left until their waitMs runs out."""
        for waiting in list(self._waiting.values()):
            if waiting.consumer_tag != "starting":
                waiting.answer_all()

    def _failed_lately(self, q: QueueKey) -> bool:
        """The queue's hint queue failed less than FAILED_QUEUE_HOLD_S ago: not asked for again yet."""
        if not self._failed:
            return False  # the usual case: no name to compute on an add's or a take's path
        failed_at = self._failed.get(hint_queue_name(self.settings.queue_prefix, q))
        return failed_at is not None and time.monotonic() - failed_at < FAILED_QUEUE_HOLD_S

    def _note_failure(self, q: QueueKey) -> None:
        name = hint_queue_name(self.settings.queue_prefix, q)
        self._failed[name] = time.monotonic()
        self._failed.move_to_end(name)
        while len(self._failed) > self._max_declared:
            self._failed.popitem(last=False)

    def _forget_if_gone(self, q: QueueKey, exc: BaseException) -> None:
        """The hint queue does not exist (deleted by an operator, or expired): declared again on
        its next use instead of failing every call until the process restarts."""
        if isinstance(exc, aiormq.exceptions.ChannelNotFoundEntity):
            self._declared.pop(hint_queue_name(self.settings.queue_prefix, q), None)

    async def _delivered(self, waiting: _Waiting, message: AbstractIncomingMessage) -> None:
        while waiting.waiters:
            future = waiting.waiters.popleft()
            if not future.done():
                future.set_result(message)
                # Acknowledged as it is handed over: the broker sends the next hint to the next
                # waiter now, not once this claim is decided (the consumer has one slot).
                await _settle(message, requeue=None)
                return
        await _settle(message, requeue=True)  # nobody waits here any more: for another bridge

    def _stop_consuming_if_idle(self, waiting: _Waiting) -> None:
        """The last waiter of a queue left: cancel its consumer, off the waiter's path (the fetch
        that got a hint goes on to its claim without waiting for the broker's cancel-ok). A hint
        delivered to the consumer meanwhile finds no waiter and goes back to the queue."""
        if waiting.waiters or waiting.consumer_tag == "starting":
            return
        tag, waiting.consumer_tag = waiting.consumer_tag, None
        # Dropped without a consumer too (its start failed): the next waiting fetch starts afresh.
        self._waiting.pop(waiting.queue.name, None)
        if tag is not None:
            self._cancel_later(waiting, tag)

    def _cancel_later(self, waiting: _Waiting, tag: str) -> None:
        """Cancel a consumer of the queue off the caller's path. A start that was cut short cancels
        its tag too: the broker may have registered the consumer before the cancellation (it
        answers cancel-ok for a tag it does not know), and that consumer would hold hints for no
        waiter. One cut short in its basic.consume call closes its channel instead (aiormq), and
        the consumer goes with it. Shutting down too: the connection closes only at the end of the
        stop, up to its grace later, and a consumer left meanwhile took each hint published to its
        queue and gave it back at once, round and round, while other bridges' fetches of that
        queue found it empty."""
        task = asyncio.get_running_loop().create_task(self._cancel_consumer(waiting, tag))
        self._cancelling.add(task)
        task.add_done_callback(self._cancelling.discard)

    async def _cancel_consumer(self, waiting: _Waiting, tag: str) -> None:
        assert self._consume is not None
        try:
            queue = await self._consume.get_queue(waiting.queue.name, ensure=False)
            await asyncio.wait_for(queue.cancel(tag), BROKER_CALL_S)
        except Exception as exc:
            log.debug("hint consumer not cancelled: %s", type(exc).__name__)

    async def discard(self, q: QueueKey) -> int:
        """``queue.purge``: the ready hints go; those handed to a consumer stay (their fetch claims)."""
        if not self.takes:
            return await self._purge_existing(q)
        queue = await self._queue(q)
        try:
            async with asyncio.timeout(BROKER_CALL_S):
                purged = await queue.purge()
        except Exception as exc:
            self._forget_if_gone(q, exc)
            raise
        return int(getattr(purged, "message_count", 0) or 0)

    async def _purge_existing(self, q: QueueKey) -> int:
        """A purge on a bridge that takes no hints: the hint queue is emptied if it exists (bridges
        that take hints declared it), on the declaring channel (a 404 closes that one only); a
        missing one is not declared."""
        name = hint_queue_name(self.settings.queue_prefix, q)
        try:
            channel = await self._declaring_channel()
            async with asyncio.timeout(BROKER_CALL_S):
                purged = await channel.queue_purge(name)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        return int(getattr(purged, "message_count", 0) or 0)

    async def pause(self, seconds: float) -> bool:
        return await paused_unless_closed(seconds, self._closing)

    def close(self) -> None:
        """Shutdown: every waiting fetch is answered now (null)."""
        self._closed = True
        self._closing.set()
        for waiting in self._waiting.values():
            for future in waiting.waiters:
                if not future.done():
                    future.set_result(None)
