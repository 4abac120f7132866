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
import functools
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from aiormq.abc import DeliveredMessage

from bridge.config import Settings
from bridge.domain.queue import WorkQueue
from bridge.transport import tolerant_decoding
from bridge.transport.duty import Duty
from bridge.transport.handlers import ADD_RETRY_BUDGET_S, RequestHandlers
from bridge.transport.hints import AmqpHints
from bridge.transport.liveness import RequesterProbe
from bridge.transport.permissions import amqp_user
from bridge.transport.replies import ReplyPublisher
from bridge.transport.request import Delivery, RequestMessage
from bridge.transport.results import ResultPublisher
from bridge.transport.timing import Consumer, Observer, timed
from bridge.transport.topology import CONSUMED, LIFECYCLE_METHODS, LIFECYCLE_QUEUE, METHODS, Names, declare_topology

__all__ = ["ADD_RETRY_BUDGET_S", "METHODS", "AmqpTransport", "Observer"]

log = logging.getLogger("bridge.amqp")

CANCEL_TIMEOUT_S = 3.0  # a consumer cancel the broker does not answer within it is given up


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
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.names = Names(settings.exchange, settings.queue_prefix)
        self.results = results or ResultPublisher(settings)
        self.hints = hints
        self.duty = duty
        self.replies = ReplyPublisher(self._connect_probation, user=amqp_user(settings.amqp_url.get_secret_value()))
        self.probe = RequesterProbe()
        self.handlers = RequestHandlers(
            settings,
            queue,
            self.replies,
            consuming=lambda: bool(self._consumer_tags),
            requester_alive=self.probe.alive,
        )
        self._observer = observe or (lambda method, outcome, seconds: None)
        self.connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractRobustChannel | None = None
        # Adds are consumed on a connection of their own: a window of large values (64 x 1 MiB)
        # queued on the one socket delayed every other tenant's fetch and ack behind it by seconds.
        self._add_connection: AbstractRobustConnection | None = None
        self._add_channel: AbstractRobustChannel | None = None
        self._publish_channel: AbstractChannel | None = None  # results: confirms + mandatory
        self._reply_channel: AbstractChannel | None = None  # replies: no confirms
        self._queues: dict[str, AbstractQueue] = {}
        self._add_retry_lane = False  # declared: adds of a broken owner key may wait there
        self._consumer_tags: dict[str, str] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        # The consumer callbacks, each timed by one wrapper (queue name -> callback).
        self._on_add = timed("add", self.handlers.add, self.observe)
        self._on_fetch = timed("fetch", self.handlers.fetch, self.observe)
        self._on_ack = timed("ack", self.handlers.ack, self.observe)
        self._on_unrouted = timed("unknown", self.handlers.unrouted, self.observe)
        # One queue, one consumer for the lifecycle methods: each timed under its own name.
        self._lifecycle = {
            method: timed(method, self.handlers.lifecycle_handler(method), self.observe) for method in LIFECYCLE_METHODS
        }
        self._on_lifecycle_unknown = timed("unknown", self.handlers.unrouted, self.observe)

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
        # Before the first frame is read: a content header pamqp cannot decode would otherwise
        # close the whole connection, for ever (the request is redelivered at every reconnection).
        tolerant_decoding.install()
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(), client_properties={"connection_name": "queue-bridge"}
        )
        self._consume_channel = await self.connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self.settings.prefetch)
        # The request consumers are aiormq's (bridge.transport.request), which aio-pika does not
        # restore: they are registered again once the channel is back.
        self._consume_channel.reopen_callbacks.add(self._consume_again)
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
        self.connection.reconnect_callbacks.add(self._reconnected)
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
        self._add_connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(), client_properties={"connection_name": "queue-bridge adds"}
        )
        self._add_channel = await self._add_connection.channel(publisher_confirms=False)
        await self._add_channel.set_qos(prefetch_count=self.settings.prefetch)
        self._add_channel.reopen_callbacks.add(self._consume_again)
        self._add_channel.close_callbacks.add(functools.partial(self._channel_lost, "adds"))
        self._add_connection.reconnect_callbacks.add(self._reconnected)

    def _channel_of(self, method: str) -> AbstractRobustChannel:
        channel = self._add_channel if method == "add" else self._consume_channel
        assert channel is not None
        return channel

    def _channel_lost(self, name: str, _channel: object, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        # The robust connection reopens the channel and its consumers; in-flight requests finish
        # (their reply or ack may fail; the broker then redelivers them).
        log.warning("AMQP %s channel lost (%s); restored on reconnect", name, type(exc).__name__ if exc else "closed")
        self.queue.metrics.inc("amqp_channels_lost", channel=name)

    def _reconnected(self, *_: object) -> None:
        log.warning("AMQP connection restored: channels and consumers are back")

    async def resume(self, methods: Iterable[str] | None = None) -> None:
        """Consume requests (all queues, or only ``methods``)."""
        consumers: dict[str, Consumer] = {
            "add": self._on_add,
            "fetch": self._on_fetch,
            "ack": self._on_ack,
            LIFECYCLE_QUEUE: self._on_lifecycle,
            "unrouted": self._on_unrouted,
        }
        for method, consumer in consumers.items():
            if (methods is None or method in methods) and method not in self._consumer_tags:
                frames = await self._channel_of(method).get_underlay_channel()
                ok = await frames.basic_consume(self._queues[method].name, self._tracked(consumer))
                assert ok.consumer_tag is not None
                self._consumer_tags[method] = ok.consumer_tag

    async def _consume_again(self, channel: object) -> None:
        """A consuming channel was reopened (a reconnection): its consumers died with the old one."""
        methods = [method for method in self._consumer_tags if self._channel_of(method) is channel]
        for method in methods:
            del self._consumer_tags[method]
        if methods and not self._closing:
            await self.resume(methods)

    async def pause(self, methods: Iterable[str] | None = None) -> None:
        """Stop taking new requests (all queues, or only ``methods``); in-flight ones go on. What is
        not taken stays in RabbitMQ for the other bridges."""
        for method, tag in list(self._consumer_tags.items()):
            if methods is not None and method not in methods:
                continue
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
            del self._consumer_tags[method]

    def consuming(self) -> frozenset[str]:
        return frozenset(self._consumer_tags)

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=timeout)
            return True
        except TimeoutError:
            return False

    async def _connect_probation(self) -> AbstractConnection:
        return await aio_pika.connect(
            self.settings.amqp_url.get_secret_value(),
            client_properties={"connection_name": "queue-bridge replies (probation)"},
        )

    async def close(self) -> None:
        self._closing = True
        await self.replies.close_probation()
        if self._add_connection is not None:
            await self._add_connection.close()
            self._add_connection = None
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    def is_ready(self) -> bool:
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
            except Exception:
                log.exception("request handler failed unexpectedly")
                await self.handlers.last_resort(message)

        return handle

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
