"""AMQP 0-9-1 transport: the connection, its channels, the consumers and their lifecycle.

Every request delivery is acknowledged only after its outcome is settled, by one table
(:mod:`bridge.transport.fate`): success is answered and acked; an error is answered (when there is
a ``reply_to``) and the message dead-lettered to ``<exchange>.dead``, except ``unavailable``
(Cassandra or the key provider down), which an RPC answers and acks and an add retries with
backoff while the delivery is held, then requeues: never dead-lettered and never lost.

The pieces: :mod:`~bridge.transport.topology` (names, declarations),
:mod:`~bridge.transport.envelope` (reading requests), :mod:`~bridge.transport.handlers` (add,
fetch, ack), :mod:`~bridge.transport.timing` (one timing wrapper), :mod:`~bridge.transport.replies`
and :mod:`~bridge.transport.results` (publishing), :mod:`~bridge.transport.tolerant_decoding`
(decoding any content header a client sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import aiormq
import structlog
from aio_pika.abc import (
    AbstractConnection,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from bridge.config import Settings
from bridge.domain.cancellation import is_stray, stray_as_failure
from bridge.domain.queue import WorkQueue
from bridge.transport import failover, frame_decoding, replies
from bridge.transport.capacity import Capacity
from bridge.transport.duty import Duty
from bridge.transport.handlers import ADD_RETRY_BUDGET_S, RequestHandlers
from bridge.transport.hints import AmqpHints
from bridge.transport.liveness import RequesterProbe
from bridge.transport.permissions import amqp_user
from bridge.transport.renewal import ChannelRenewal
from bridge.transport.replies import ReplyPublisher
from bridge.transport.request import Delivery, RequestMessage, channel_gone
from bridge.transport.results import ResultPublisher
from bridge.transport.timing import Consumer, Observer, timed
from bridge.transport.topology import (
    CONSUMED,
    LIFECYCLE_METHODS,
    LIFECYCLE_QUEUE,
    METHODS,
    Names,
    declare_add_retry_lane,
    declare_consumed_queue,
    declare_dead_letter,
    declare_topology,
    durable_queue_arguments,
)

__all__ = ["ADD_RETRY_BUDGET_S", "METHODS", "AmqpTransport", "Observer"]

log = logging.getLogger("bridge.amqp")

CANCEL_TIMEOUT_S = 3.0  # a consumer cancel the broker does not answer within it is given up
# Retrying what the broker refused (a channel to reopen, a queue to declare again): soon at first
# (most refusals are a blip, or a race with an operator's change), then no more than every 10 s
# (a refusal that lasts is a permission or a policy to fix: one log line per attempt is enough).
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 10.0
# The results queue declared again after results were returned unroutable: at most this often.
RESULTS_QUEUE_REDECLARE_S = 5.0
UNROUTED_AFTER_RESTORE_S = 60.0  # a method's unrouted requests are "unavailable" this long after its queue is back
LANE_DESTINATION = (
    "add retry lane"  # the retry lane's publishes, apart from results (routing keys "results <serviceId>")
)
RESULTS_DECLARE_TIMEOUT_S = 5.0  # a channel or a declare the broker does not answer is given up
REOPEN_TIMEOUT_S = 10.0  # one attempt to reopen a channel the broker does not answer is given up
# The channels the bridge consumes requests on (the adds have a connection of their own) and those
# it publishes on (results and the add retry lane; replies). aio-pika restores a robust channel the
# broker closed once, right away, and never again before the next reconnection when that restore is
# refused too: the transport reopens each of them with backoff (_reopen).
CONSUMING = ("consume", "adds")
PUBLISHING = ("results", "replies")
CHANNELS = (*CONSUMING, *PUBLISHING)

# Told the name of a channel (one of CHANNELS) as it goes down (True) and once it is back (False).
ChannelReporter = Callable[[str, bool], None]


def _report_nothing(channel: str, down: bool) -> None:
    """The default :data:`ChannelReporter`: no metrics."""


def _refusal(exc: BaseException | None) -> str:
    """The broker's words when it refused something (``ACCESS_REFUSED - ...``), else the type."""
    if exc is None:
        return "closed"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class AmqpTransport:
    def __init__(
        self,
        settings: Settings,
        queue: WorkQueue,
        observe: Observer | None = None,
        *,
        results: ResultPublisher | None = None,
        hints: AmqpHints | None = None,
        duty: Duty | None = None,
        on_channel_down: ChannelReporter = _report_nothing,
        capacity: Capacity | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.names = Names(settings.exchange, settings.queue_prefix)
        self.results = results or ResultPublisher(settings)
        self.hints = hints
        self.duty = duty
        self._amqp_urls = settings.amqp_urls  # one order of BRIDGE_AMQP_HOSTS for all its connections
        self.replies = ReplyPublisher(self._connect_probation, user=amqp_user(settings.amqp_url.get_secret_value()))
        self.probe = RequesterProbe()
        self.handlers = RequestHandlers(
            settings,
            queue,
            self.replies,
            consuming=lambda: bool(self._consumer_tags or self._orphans),
            requester_alive=self.probe.alive,
            queue_restoring=self.queue_restoring,
            capacity=capacity,
        )
        # The results channel also carries the add retry lane; both publish to quorum queues on a
        # cluster (BRIDGE_QUEUE_TYPE): a channel RabbitMQ keeps nacking is opened afresh.
        self.results_renewal = ChannelRenewal("results", lambda: self._publish_channel, self._spawn)
        self.results.on_failure = self._result_publish_failed
        self.handlers.lane.on_failure = self._lane_publish_failed
        self._observer = observe or (lambda method, outcome, seconds: None)
        self._on_channel_down = on_channel_down
        self.connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        # Adds are consumed on a connection of their own: a window of large values (64 x 1 MiB)
        # queued on the one socket delayed every other tenant's fetch and ack behind it by seconds.
        self._add_connection: AbstractRobustConnection | None = None
        self._add_channel: AbstractRobustChannel | None = None
        self._publish_channel: AbstractRobustChannel | None = None  # results: confirms + mandatory
        self._reply_channel: AbstractRobustChannel | None = None  # replies: no confirms
        self._queues: dict[str, AbstractQueue] = {}
        self._add_retry_lane = False  # declared: adds of a broken owner key may wait there
        self._consumer_tags: dict[str, str] = {}
        # Request queues whose consumer the broker cancelled (an operator deleted the queue): they
        # are declared again before they are consumed again, by one task each (_restore_consumer).
        self._lost: set[str] = set()
        self._restores: dict[str, asyncio.Task[None]] = {}
        self._registering: set[str] = set()  # restores whose basic.consume is on the wire
        # Request queues whose consumer died with its channel (closed by the broker, or a lost
        # connection): consumed again once the channel is back (_consume_again, _reopen).
        self._orphans: set[str] = set()
        self._paused: set[str] = set()  # methods whose consumer a pause cancelled (resume declares their queue first)
        # Methods the last pause() stopped and no resume() has asked to consume since. Not
        # ``_paused``, which a method resumed while its channel was down keeps after its reopen
        # consumed it (queue_restoring answered its unrouted requests "unavailable" for ever).
        self._gated: set[str] = set()
        # When each method's queue was last declared again (monotonic): requests unrouted while it
        # was missing may reach ``.unrouted``'s consumer after it is back (see queue_restoring).
        self._restored_at: dict[str, float] = {}
        # One orphan registration at a time per channel: aio-pika's restore (_consume_again) and the
        # reopen task (_reopen_once) both consume a reopened channel's orphans, and two loops at once
        # registered one method twice; the second took the first's registration for a pause and
        # cancelled one tag, leaving a consumer the bridge could not pause and itself unready.
        self._consuming_orphans = {name: asyncio.Lock() for name in CONSUMING}
        # Consuming channels where the broker refused a consume since they were lost: only _reopen
        # consumes there (with backoff), not each reopen (see _consume_again).
        self._refused: set[str] = set()
        self._reopening: dict[str, asyncio.Task[None]] = {}  # channel name (CHANNELS) -> its reopen task
        # Set by a reconnection: a reopen task waiting out its backoff tries at once (see _reconnected).
        self._reconnect_seen = asyncio.Event()
        self._dead_letter_task: asyncio.Task[None] | None = None
        self._lane_task: asyncio.Task[None] | None = None
        self._results_queue_task: asyncio.Task[None] | None = None
        self._results_queue_next = 0.0  # loop time before which the results queue is not declared again
        self._background: set[asyncio.Task[None]] = set()  # the tasks above, cancelled by close()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        # The consumer callbacks, each timed by one wrapper (queue name -> callback).
        self._on_add = timed("add", self.handlers.add, self.observe)
        self._on_fetch = timed("fetch", self.handlers.fetch, self.observe)
        self._on_ack = timed("ack", self.handlers.ack, self.observe)
        # An add taken from the unrouted queue (its own queue being declared again) is an add.
        self._on_unrouted = timed(_unrouted_method, self.handlers.unrouted, self.observe)
        # One queue, one consumer for the lifecycle methods: each timed under its own name.
        self._lifecycle = {
            method: timed(method, self.handlers.lifecycle_handler(method), self.observe) for method in LIFECYCLE_METHODS
        }
        self._on_lifecycle_unknown = timed("unknown", self.handlers.unrouted, self.observe)
        self._consumers: dict[str, Consumer] = {
            "add": self._on_add,
            "fetch": self._on_fetch,
            "ack": self._on_ack,
            LIFECYCLE_QUEUE: self._on_lifecycle,
            "unrouted": self._on_unrouted,
        }

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        """Metrics, plus one canonical log line per request (DEBUG: it is one per message)."""
        self._observer(method, outcome, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request done", extra={"outcome": outcome, "duration_ms": round(seconds * 1000, 2)})

    # -- names -------------------------------------------------------------------------------
    def queue_name(self, method: str) -> str:
        return self.names.queue(method)

    @property
    def dead_letter_exchange(self) -> str:
        return self.names.dead_letter_exchange

    @property
    def dead_letter_queue(self) -> str:
        return self.names.dead_letter_queue

    @property
    def unrouted_exchange(self) -> str:
        return self.names.unrouted_exchange

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        # A start after a failed one (BRIDGE_START_TIMEOUT: the bridge tries again) follows the
        # close() that failure ran: left closing, every channel reopen and consumer registration
        # after the next connection loss was skipped, and the bridge never consumed again.
        self._closing = False
        self._consumer_tags.clear()
        self._orphans.clear()
        self._refused.clear()
        self._lost.clear()
        self._restores.clear()
        self._reopening.clear()
        # Before the first frame is read: a content header pamqp cannot decode would otherwise
        # close the whole connection, for ever (the request is redelivered at every reconnection).
        # The hot path's frames are then decoded in one pass, the rest by pamqp made tolerant.
        frame_decoding.install()
        # Each node's attempt bounded, at start and at every reconnection (BRIDGE_AMQP_CONNECT_TIMEOUT).
        self.connection = await failover.connect_robust(
            self._amqp_urls,
            client_properties={"connection_name": "queue-bridge"},
            timeout=self.settings.amqp_connect_timeout,
        )
        self._consume_channel = await self.connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self.settings.prefetch)
        # The request consumers are aiormq's (bridge.transport.request), which aio-pika does not
        # restore: they are registered again once the channel is back.
        self._consume_channel.reopen_callbacks.add(functools.partial(self._consume_again, "consume"))
        # Confirms + mandatory: a result that no queue takes comes back as an error, so it stays
        # pending in the outbox instead of being confirmed into the void.
        self._publish_channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
        # Replies are transient and at-most-once by nature (the requester retries): waiting for a
        # broker confirm would only add a round trip to every request.
        self._reply_channel = await self.connection.channel(publisher_confirms=False)
        self.replies.main = self._reply_channel
        channels = {"consume": self._consume_channel, "results": self._publish_channel, "replies": self._reply_channel}
        for name, channel in channels.items():
            channel.close_callbacks.add(functools.partial(self._channel_lost, name))
            self._report_channel(name, False)  # a series from the start, not from the first loss
        self.connection.reconnect_callbacks.add(self._reconnected)
        self.connection.reconnect_callbacks.add(self._declare_dead_letter_again)
        self.connection.reconnect_callbacks.add(self._declare_lane_again)
        await self._declare_topology()
        if self._add_retry_lane:
            self.handlers.lane.attach(self._publish_channel.default_exchange)
        await self._open_add_connection()
        self.probe.attach(self.connection)
        if self.hints is not None:
            await self.hints.attach(self.connection)
        if self.duty is not None:
            await self.duty.attach(self.connection)
        await self.resume()

    async def _declare_topology(self) -> None:
        assert self.connection is not None and self._consume_channel is not None and self._publish_channel is not None
        topology = await declare_topology(self.settings, self.connection, self._consume_channel, self._publish_channel)
        self._queues = topology.queues
        self.results.attach(topology.results_exchange)
        self._add_retry_lane = topology.add_retry_lane

    async def _open_add_connection(self) -> None:
        self._add_connection = await failover.connect_robust(
            self._amqp_urls,
            client_properties={"connection_name": "queue-bridge adds"},
            timeout=self.settings.amqp_connect_timeout,
        )
        self._add_channel = await self._add_connection.channel(publisher_confirms=False)
        await self._add_channel.set_qos(prefetch_count=self.settings.prefetch)
        self._add_channel.reopen_callbacks.add(functools.partial(self._consume_again, "adds"))
        self._add_channel.close_callbacks.add(functools.partial(self._channel_lost, "adds"))
        self._report_channel("adds", False)
        self._add_connection.reconnect_callbacks.add(self._reconnected)

    @staticmethod
    def _channel_name_of(method: str) -> str:
        """The name (one of CONSUMING) of the channel that consumes ``method``'s queue."""
        return "adds" if method == "add" else "consume"

    def _channel_of(self, method: str) -> AbstractRobustChannel:
        return self._channel_named(self._channel_name_of(method))

    def _channel_named(self, name: str) -> AbstractRobustChannel:
        channel = {
            "consume": self._consume_channel,
            "adds": self._add_channel,
            "results": self._publish_channel,
            "replies": self._reply_channel,
        }[name]
        assert channel is not None
        return channel

    def amqp_nodes(self) -> dict[str, tuple[str, int]]:
        """Connection name -> (the RabbitMQ node it is on, connections it opened): for /metrics."""
        nodes = {}
        for name, connection in (("main", self.connection), ("adds", self._add_connection)):
            if isinstance(connection, failover.FailoverConnection):
                nodes[name] = (connection.node, connection.opened)
        return nodes

    def _connection_of(self, name: str) -> AbstractRobustConnection | None:
        return self._add_connection if name == "adds" else self.connection

    def _orphans_on(self, name: str) -> list[str]:
        """The orphaned request queues of channel ``name``, in the order they are consumed."""
        return [
            method for method in self._consumers if method in self._orphans and self._channel_name_of(method) == name
        ]

    def _back(self, name: str) -> bool:
        """Channel ``name`` is open and, if it consumes, every consumer it lost is registered again."""
        return not self._channel_named(name).is_closed and not self._orphans_on(name)

    def _channel_lost(self, name: str, _channel: object, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        if name == "replies":
            # Its connection closed (a 541 for a reply to a node gone from the cluster, among
            # others): proven again from now. Forgotten only at the reconnection, a request
            # redelivered on the reopened consume channel before it was answered to that node on
            # the main connection once more.
            self.replies.forget_proven()
        if name in self._reopening:
            return  # a refused attempt to reopen it (aio-pika's or the reopen task's): logged by the task
        # In-flight requests finish (their reply or ack may fail; the broker then redelivers them).
        log.warning("AMQP %s channel lost (%s); reopening it", name, _refusal(exc))
        self.queue.metrics.inc("amqp_channels_lost", channel=name)
        self._report_channel(name, True)
        self._reopening[name] = self._spawn(self._reopen(name))

    async def _reopen(self, name: str) -> None:
        """Reopen channel ``name`` (and consume again what it consumed) until it is back or the
        transport closes.

        aio-pika restores a robust channel the broker closed once, right away; when that restore
        is refused too, it never tries again before the next reconnection. A publish refused with a
        403 closed the results channel, and the results queue's bind was refused by the same missing
        permission: no result was published any more, even after the permission came back, while
        the bridge said it was ready. A consuming channel whose restore was refused (a consume or a
        declaration refused) left the bridge unready, serving none of its methods, until the next
        reconnection."""
        channel = self._channel_named(name)
        delay = RETRY_FIRST_DELAY_S
        try:
            while not self._closing:
                # Waits first: aio-pika's own restore runs right after the loss, and a reconnection
                # restores every channel; most losses end there. A reconnection ends the wait: it
                # restored the channel but left a refused one's consumers to this task.
                if await self._reconnected_within(delay):
                    delay = RETRY_FIRST_DELAY_S
                else:
                    delay = min(delay * 2, RETRY_MAX_DELAY_S)
                if self._back(name):
                    log.info("AMQP %s channel open again", name)
                    return
                connection = self._connection_of(name)
                if connection is None or not connection.connected.is_set():
                    continue  # the connection is being restored: it reopens its channels itself
                try:
                    async with asyncio.timeout(REOPEN_TIMEOUT_S):
                        await self._reopen_once(name, channel)
                except Exception as exc:
                    log.warning(
                        "AMQP %s channel still down: the broker refused to reopen it or to consume on it (%s); "
                        "retrying in %.1f s",
                        name,
                        _refusal(exc),
                        delay,
                    )
                    continue
                if self._back(name):
                    log.warning("AMQP %s channel reopened", name)
                    return
        finally:
            if self._reopening.get(name) is asyncio.current_task():
                del self._reopening[name]
            if self._back(name):
                self._refused.discard(name)
                self._report_channel(name, False)

    async def _reconnected_within(self, seconds: float) -> bool:
        """Wait ``seconds``, less if a connection is restored meanwhile (True then)."""
        self._reconnect_seen.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._reconnect_seen.wait()
        except TimeoutError:
            return False
        return True

    async def _reopen_once(self, name: str, channel: AbstractRobustChannel) -> None:
        if channel.is_closed:
            await channel.restore()  # aio-pika's restore: serialised with its own, replays declarations
            if channel.is_closed:
                # restore() did nothing: aio-pika still has it marked restored (its restore marks it
                # after the reopen callbacks, where a refused consume had closed it again). reopen()
                # is what restore() would have done.
                await channel.reopen()
        if name in CONSUMING:
            await self._consume_orphans(name)

    def _report_channel(self, name: str, down: bool) -> None:
        # A gauge. For a publishing channel it is not readiness: a closed results channel must not
        # take requests away from this bridge's workers while fetch and ack still work. Results
        # stay pending in the outbox (queue_bridge_results_pending) and are published once the
        # channel is back; an unready bridge would stop consuming (the serving gate) and every
        # worker on it would wait for nothing. A consuming channel down is unready (is_ready).
        self._on_channel_down(name, down)

    def _reconnected(self, *_: object) -> None:
        log.warning("AMQP connection restored: channels and consumers are back")
        # A channel whose consume was refused is restored without its consumers (_consume_again
        # leaves them to its reopen task): that task consumes them now, not when its backoff ends
        # (up to RETRY_MAX_DELAY_S later, the bridge unready meanwhile if they are requests').
        self._reconnect_seen.set()
        self.replies.forget_proven()  # a node may have left the cluster: see forget_proven
        # The reconnection restored every channel: say so now, not when a reopen task next wakes.
        for name in CHANNELS:
            if self._back(name):
                self._report_channel(name, False)

    def _declare_dead_letter_again(self, *_: object) -> None:
        """After a reconnection: the dead-letter queue is declared on short-lived channels only
        (topology.declare_dead_letter), so the robust channels do not restore it: an operator may
        have deleted it (to drop what piled up there). Runs off the reconnection: it retries."""
        if self._closing or (self._dead_letter_task is not None and not self._dead_letter_task.done()):
            return
        self._dead_letter_task = self._spawn(self._redeclare_dead_letter())

    async def _redeclare_dead_letter(self) -> None:
        delay = RETRY_FIRST_DELAY_S
        while not self._closing and self.connection is not None:
            try:
                await declare_dead_letter(self.settings, self.connection)
                return
            except Exception as exc:
                log.warning(
                    "could not declare the dead-letter queue %s again (%s); retrying in %.1f s",
                    self.dead_letter_queue,
                    _refusal(exc),
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    def _lane_publish_failed(self, exc: BaseException) -> None:
        """A deferral to the add retry lane failed: nacked (the channel is renewed), or returned
        as unroutable (the lane was deleted: declared again)."""
        self.results_renewal.refused(exc, LANE_DESTINATION)
        if isinstance(exc, aiormq.exceptions.PublishError):
            self._declare_lane_again()

    def _declare_lane_again(self, *_: object) -> None:
        """After a reconnection, or a deferral returned: the add retry lane is declared on a
        short-lived channel (``declare_add_retry_lane``), and an operator may have deleted it or
        granted the bridge's user a permission on it since. Once declared, deferrals use it."""
        if self._closing or (self._lane_task is not None and not self._lane_task.done()):
            return
        self._lane_task = self._spawn(self._redeclare_lane())

    async def _redeclare_lane(self) -> None:
        if self.connection is None or self._publish_channel is None:
            return
        try:
            declared = await declare_add_retry_lane(self.settings, self.connection)
        except Exception as exc:  # the broker away again: the next reconnection tries again
            log.warning("could not declare the add retry lane again (%s)", _refusal(exc))
            return
        if declared and not self.handlers.lane.available:
            self.handlers.lane.attach(self._publish_channel.default_exchange)
            log.info("the add retry lane is declared: adds of an owner with an unusable key wait there again")

    def _result_publish_failed(self, exc: BaseException, key: str) -> None:
        """A result publish failed: nacked (the channel is renewed), or returned as unroutable. With
        ``BRIDGE_RESULTS_QUEUE`` set, a return means that queue is gone (an operator deleted it): it
        is declared and bound again. Before, only a restart or a reconnection did, results stayed
        owed until they were dropped past the task's life, and the engine's user, which may not
        declare queues, could do nothing (found by review)."""
        self.results_renewal.refused(exc, f"results {key}")
        if not isinstance(exc, aiormq.exceptions.PublishError) or not self.settings.results_queue:
            return
        now = asyncio.get_running_loop().time()
        running = self._results_queue_task is not None and not self._results_queue_task.done()
        if self._closing or running or now < self._results_queue_next:
            return
        self._results_queue_next = now + RESULTS_QUEUE_REDECLARE_S  # once per interval, whatever the returns
        self._results_queue_task = self._spawn(self._redeclare_results_queue())

    async def _redeclare_results_queue(self) -> None:
        if self.connection is None:
            return
        s = self.settings
        try:
            # On a short-lived channel: a refusal (406: declared with other arguments) closes it alone.
            channel = await asyncio.wait_for(
                self.connection.channel(publisher_confirms=False), RESULTS_DECLARE_TIMEOUT_S
            )
            try:
                async with asyncio.timeout(RESULTS_DECLARE_TIMEOUT_S):
                    arguments = durable_queue_arguments(s)
                    queue = await channel.declare_queue(s.results_queue, durable=True, arguments=arguments)
                    await queue.bind(s.results_exchange, routing_key="#")
            finally:
                with contextlib.suppress(Exception):
                    await channel.close()
        except Exception as exc:
            log.warning("could not declare the results queue %s again (%s)", s.results_queue, _refusal(exc))
            return
        log.warning(
            "results were returned unroutable: the results queue %s is declared and bound again", s.results_queue
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def resume(self, methods: Iterable[str] | None = None) -> None:
        """Consume requests (all queues, or only ``methods``)."""
        for method in self._consumers:
            if (methods is None or method in methods) and method in self._consumer_tags:
                self._gated.discard(method)
            if (methods is None or method in methods) and method not in self._consumer_tags:
                if method in self._lost or method in self._restores:
                    # Its queue was deleted under the bridge: consuming it before it is declared
                    # again would get a 404, which closes the channel of every other consumer.
                    self._start_restore(method)
                    self._gated.discard(method)  # restoring: queue_restoring says so on its own
                    continue
                if method in self._orphans or self._channel_of(method).is_closed:
                    # Its channel is down: consumed once the channel is back (_reopen, spawned by
                    # the loss, runs until then).
                    self._orphans.add(method)
                    self._gated.discard(method)
                    continue
                try:
                    if method in self._paused:
                        # Paused, its consumer got no basic.cancel if its queue was deleted meanwhile
                        # (nothing marked it lost): consumed as it was, the 404 closed the shared
                        # consume channel, every other request consumer with it. Declared again
                        # first, on a short-lived channel (idempotent; a deleted queue comes back).
                        assert self.connection is not None
                        await declare_consumed_queue(self.settings, self.connection, method)
                        self._restored_at[method] = time.monotonic()
                    await self._consume(method)
                    self._paused.discard(method)
                    # Only now: a resume whose declaration failed left the method neither consumed
                    # nor gated, its unrouted requests "bad_request" (found by the re-review).
                    self._gated.discard(method)
                except BaseException:
                    if self._channel_of(method).is_closed:
                        # Cut by its channel's close (its connection ended as stuck): consumed with
                        # the channel again (_reopen), as a method found orphaned above. Left out,
                        # it was consumed by nothing once the connection was back.
                        self._orphans.add(method)
                    raise

    async def _consume(self, method: str) -> None:
        frames = await self._channel_of(method).get_underlay_channel()
        # A set: adding it again to the same aiormq channel is a no-op; a reopened robust channel
        # has a new aiormq channel, which gets it with its first consumer.
        frames.on_consumer_cancel_callbacks.add(self._consumer_cancelled)
        ok = await frames.basic_consume(self._queues[method].name, self._tracked(self._consumers[method]))
        assert ok.consumer_tag is not None
        self._consumer_tags[method] = ok.consumer_tag

    def queue_restoring(self, routing_key: str) -> bool:
        """Whether the queue that takes ``routing_key`` may be missing, or was a moment ago, so that
        its requests went to ``.unrouted`` for a cause that passes: it lost its consumer here and
        is being declared again; or its consumer is paused (a paused consumer gets no basic.cancel
        when its queue is deleted, and while paused requests to a queue that exists wait in it);
        or it was declared again within :data:`UNROUTED_AFTER_RESTORE_S` (a request unrouted
        meanwhile, handled after: a backlog in ``.unrouted``, a requeue). Answered ``bad_request``,
        these ended every bundled worker's loop of the fleet (found by review, 2026-12-07)."""
        method = LIFECYCLE_QUEUE if routing_key in LIFECYCLE_METHODS else routing_key
        if method in self._lost or method in self._restores or method in self._gated:
            return True
        restored = self._restored_at.get(method)
        return restored is not None and time.monotonic() - restored < UNROUTED_AFTER_RESTORE_S

    def _consumer_cancelled(self, frame: Basic.Cancel) -> None:
        """The broker cancelled a request consumer (basic.cancel): its queue was deleted (or its
        node lost). aiormq has dropped the consumer; without this the bridge still counted it, said
        it was ready, and the method's requests, no longer routed to a queue, went through the
        alternate exchange to ``.unrouted``, answered ``bad_request: unknown method`` (adds lost as
        the caller's errors; RPCs answered ``unavailable`` now while it is declared again, see
        ``RequestHandlers.unrouted``). Runs on aiormq's frame reader: only bookkeeping here."""
        method = next((m for m, tag in self._consumer_tags.items() if tag == frame.consumer_tag), None)
        if method is None:
            return  # no longer ours (a pause cancelled it meanwhile)
        del self._consumer_tags[method]  # is_ready() is honest at once
        self._lost.add(method)
        if self._closing:
            return
        log.warning(
            "the broker cancelled the bridge's consumer of %s (the queue was deleted?): declaring it again "
            "with its bindings and consuming it; until then its RPCs are answered unavailable "
            "(adds are taken from .unrouted)",
            self.queue_name(method),
        )
        self._start_restore(method)

    def _start_restore(self, method: str) -> None:
        if method not in self._restores and not self._closing:
            task = self._spawn(self._restore_consumer(method))
            self._restores[method] = task
            task.add_done_callback(functools.partial(self._restore_done, method))

    def _restore_done(self, method: str, task: asyncio.Task[None]) -> None:
        if self._restores.get(method) is task:
            del self._restores[method]

    async def _restore_consumer(self, method: str) -> None:
        """Declare the queue of ``method`` again (exact arguments, bindings) and consume it; retried
        with backoff while the broker refuses. Stopped by pause() and close()."""
        queue = self.queue_name(method)
        delay = RETRY_FIRST_DELAY_S
        while not self._closing and method not in self._consumer_tags:
            try:
                # A stuck connection's close cuts these with a CancelledError nobody asked for:
                # retried as any failure (it ended this task, and the queue was never consumed).
                with stray_as_failure():
                    if method in self._lost:
                        assert self.connection is not None
                        await declare_consumed_queue(self.settings, self.connection, method)
                        self._restored_at[method] = time.monotonic()
                        self._lost.discard(method)
                    self._registering.add(method)
                    try:
                        await self._consume(method)
                    finally:
                        self._registering.discard(method)
                log.warning("declared %s again: consuming it again", queue)
                return
            except Exception as exc:
                log.warning(
                    "could not declare %s again or consume it (%s); retrying in %.1f s", queue, _refusal(exc), delay
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)

    async def _consume_again(self, name: str, _channel: object) -> None:
        """Consuming channel ``name`` was reopened (aio-pika's restore after the broker closed it,
        a reconnection, or _reopen): its consumers died with the old one."""
        for method in [m for m in self._consumer_tags if self._channel_name_of(m) == name]:
            del self._consumer_tags[method]
            self._orphans.add(method)
        if self._closing or name in self._refused:
            # A refused consume closes the channel, and aio-pika reopens a channel closed after its
            # restore right away: consuming at each reopen would go round as fast as the broker
            # answers. The reopen task consumes them, with backoff.
            return
        try:
            await self._consume_orphans(name)
        except Exception as exc:  # aio-pika would drop it silently: the reopen task goes on
            log.warning("could not consume again on the reopened %s channel (%s); retrying", name, _refusal(exc))

    async def _consume_orphans(self, name: str) -> None:
        async with self._consuming_orphans[name]:
            await self._consume_orphans_now(name)

    async def _consume_orphans_now(self, name: str) -> None:
        for method in self._orphans_on(name):
            if method not in self._orphans:
                continue  # paused meanwhile (pause() clears the orphans it is asked to stop)
            try:
                await self._consume(method)
            except aiormq.exceptions.ChannelNotFoundEntity:
                # Its queue was deleted while the channel was down (no basic.cancel came): declared
                # again and consumed by _restore_consumer, with its own backoff.
                self._orphans.discard(method)
                self._lost.add(method)
                self._start_restore(method)
                raise
            except Exception:
                self._refused.add(name)
                raise
            if method not in self._orphans:
                # pause() ran while its basic.consume was on its way, and found no tag to cancel:
                # left, the bridge consumed while paused, and the gate never paused it again.
                await self.pause([method])
                continue
            self._orphans.discard(method)
        self._refused.discard(name)

    async def pause(self, methods: Iterable[str] | None = None) -> None:
        """Stop taking new requests (all queues, or only ``methods``); in-flight ones go on. What is
        not taken stays in RabbitMQ for the other bridges."""
        wanted = None if methods is None else frozenset(methods)
        self._gated |= set(self._consumers) if wanted is None else (wanted & set(self._consumers))
        for method, task in list(self._restores.items()):
            if wanted is not None and method not in wanted:
                continue
            del self._restores[method]
            if method in self._registering:
                # Its basic.consume is on the wire, and aiormq closes a channel whose RPC is
                # cancelled (every other consumer on it with it): let it land, cancelled below.
                await asyncio.wait([task], timeout=CANCEL_TIMEOUT_S)
            task.cancel()
        # Orphans too (their channel reopened, their consume refused or waiting): paused now, their
        # queue may be deleted before the resume as well (``_paused``: declared first).
        self._paused |= self._orphans if wanted is None else (self._orphans & wanted)
        if wanted is None:
            self._orphans.clear()
        else:
            self._orphans -= wanted
        for method, tag in list(self._consumer_tags.items()):
            if wanted is not None and method not in wanted:
                continue
            self._paused.add(method)
            channel = self._channel_of(method)
            try:
                # A channel that is closed (the connection is being restored) took its consumer
                # with it; waiting for it to come back would hold a shutdown for as long as the
                # broker is away or refuses the bridge (get_underlay_channel waits for the restore).
                if not channel.is_closed:
                    async with asyncio.timeout(CANCEL_TIMEOUT_S):
                        frames = await channel.get_underlay_channel()
                        await frames.basic_cancel(tag)
            except Exception as exc:  # channel gone meanwhile, or no answer: nothing to cancel
                log.debug("cancel %s: %s", method, exc)
            # pop: the broker may have cancelled it meanwhile (_consumer_cancelled dropped it).
            self._consumer_tags.pop(method, None)

    def consuming(self) -> frozenset[str]:
        return frozenset(self._consumer_tags)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
            return True
        except TimeoutError:
            return False

    async def _connect_probation(self) -> AbstractConnection:
        # Each node's attempt bounded (a node that accepts TCP and never answers held the rest),
        # and the node the bridge's connection is on first: it is up, and in the same order as
        # the connections' a hung node first in it took the whole budget at every reply, and no
        # reply was ever sent (the bridge ready all the same).
        urls = list(self._amqp_urls)
        if isinstance(self.connection, failover.FailoverConnection):
            on = self.connection.node_index
            urls = urls[on:] + urls[:on]
        connection, _ = await failover.connect_first(
            urls,
            client_properties={"connection_name": "queue-bridge replies (probation)"},
            timeout=replies.PROBATION_CONNECT_S,
        )
        return connection

    async def close(self) -> None:
        self._closing = True
        background = list(self._background)
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await self.replies.close_probation()
        if self._add_connection is not None:
            await self._add_connection.close()
            self._add_connection = None
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    def is_ready(self) -> bool:
        # The publishing channels (results, replies) are not part of it: see _report_channel.
        return bool(
            all(conn is not None and not conn.is_closed for conn in (self.connection, self._add_connection))
            and all(ch is not None and not ch.is_closed for ch in (self._consume_channel, self._add_channel))
            and len(self._consumer_tags) == len(CONSUMED)
        )

    async def _on_lifecycle(self, message: RequestMessage) -> None:
        consumer = self._lifecycle.get(message.routing_key or "", self._on_lifecycle_unknown)
        await consumer(message)

    # -- consumer callbacks -------------------------------------------------------------------
    def _guarded(self, consumer: Consumer) -> Callable[[RequestMessage], Coroutine[Any, Any, None]]:
        """``consumer`` with the request's log fields bound and a last resort: whatever it raises,
        the delivery is settled."""

        async def handle(message: RequestMessage) -> None:
            # Every log line of this request carries these fields (never the body: values stay secret).
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(
                method=message.routing_key, correlation_id=message.correlation_id, user=message.user_id
            )
            try:
                await consumer(message)
            except Exception as exc:
                await self._unsettled(message, exc)
            except asyncio.CancelledError as exc:
                if not is_stray(exc):
                    raise  # the bridge's stop: the delivery is left to the broker, which delivers it again
                # Not this task's cancellation: a call on a connection aiormq closed as stuck (the
                # handlers settle those themselves; this is the net under them). Raised on, it
                # ended the task with the delivery unsettled, a prefetch slot lost, nothing logged.
                await self._unsettled(message, exc)

        return handle

    async def _unsettled(self, message: RequestMessage, exc: BaseException) -> None:
        """A request whose handler raised ``exc``: settled by the last resort, if it still can be."""
        if channel_gone(message):
            # A lost connection or a channel error: it cannot be answered or settled here,
            # and the broker delivers it again (every request is safe to repeat).
            log.warning(
                "a request's channel closed before it was settled (%s): the broker delivers it again",
                type(exc).__name__,
            )
            return
        log.error("request handler failed unexpectedly", exc_info=exc)
        await self.handlers.last_resort(message)

    def _tracked(self, consumer: Consumer) -> Callable[[DeliveredMessage], Coroutine[Any, Any, None]]:
        """The aiormq consumer callback: each delivery handled by ``consumer`` in a task of its own."""
        handle = self._guarded(consumer)

        async def run(delivered: DeliveredMessage) -> None:
            # The work runs as a task of its own, not in the task aiormq runs this callback in: a
            # channel that closes (a broker restart) cancels those, and a request cut in the middle
            # of a claim would be neither answered nor finished. Its reply and ack may fail on the
            # dead channel; then the broker redelivers the request, which is safe to repeat.
            work = asyncio.get_running_loop().create_task(handle(Delivery(delivered)))
            self._inflight.add(work)
            self._idle.clear()
            work.add_done_callback(self._finished)

        return run

    def _finished(self, work: asyncio.Task[None]) -> None:
        self._inflight.discard(work)
        if not self._inflight:
            self._idle.set()


def _unrouted_method(message: RequestMessage) -> str:
    return "add" if message.routing_key == "add" else "unknown"
