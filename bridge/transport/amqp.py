"""AMQP 0-9-1 transport: topology, the add/fetch/ack consumers, replies, dead-lettering.

Every request delivery is acknowledged only after its outcome is settled:
- success: reply (when ``reply_to`` is set), then ``basic.ack``;
- bad input: error reply (when possible), then ``basic.reject(requeue=False)`` so RabbitMQ
  dead-letters the original message to ``<exchange>.dead`` (nothing is silently dropped);
- Cassandra or the key provider down: RPCs get an ``unavailable`` reply; an add is retried with
  backoff while the delivery is held, then requeued, never dead-lettered and never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.common import FieldTable

from bridge.config import Settings
from bridge.domain import jsonvalue
from bridge.domain.errors import BadRequest, BridgeError, PayloadTooLarge, Unauthorized
from bridge.domain.models import AckRequest, AddCommand, FetchRequest, parse
from bridge.domain.queue import ResultMessage, WorkQueue
from bridge.observability.tracing import child_traceparent, extract_traceparent
from bridge.transport.permissions import amqp_user
from bridge.transport.replies import BadReplyTo, ReplyPublisher, reply_node

log = logging.getLogger("bridge.amqp")

METHODS = ("add", "fetch", "ack")
JSON = "application/json"
ADD_RETRY_BUDGET_S = 30.0
DEADLINE_HEADER = "x-deadline"
OWNER_PATTERN = re.compile(r"[^\x00-\x1f\x7f]{1,255}")


class Identity:
    """Who sent a message: the broker-validated ``user_id``, or the owner a trusted engine names."""

    def __init__(self, trusted_users: list[str]) -> None:
        self.trusted = frozenset(trusted_users)

    def owner_of(self, message: AbstractIncomingMessage) -> str:
        user = message.user_id
        if not user:
            raise Unauthorized("the message has no user_id property; set it to your AMQP user name")
        named = self._named_owner((message.headers or {}).get("x-owner"))
        if user in self.trusted:
            return named or user
        if named is not None and named != user:
            raise Unauthorized(f"user {user!r} may not act for owner {named!r}")
        return user

    @staticmethod
    def _named_owner(header: Any) -> str | None:
        """The x-owner header, checked like any other caller input (any user can send it)."""
        if header is None:
            return None
        if isinstance(header, bytes):
            try:
                header = header.decode()
            except UnicodeDecodeError:
                raise BadRequest("the x-owner header is not valid UTF-8") from None
        if not isinstance(header, str):
            raise BadRequest("the x-owner header must be a string")
        if not OWNER_PATTERN.fullmatch(header):
            raise BadRequest("the x-owner header must be 1 to 255 printable characters")
        return header


def _deadline_of(message: AbstractIncomingMessage) -> int | None:
    """The caller's deadline (``x-deadline`` header, milliseconds since the epoch), if it set one."""
    value = (message.headers or {}).get(DEADLINE_HEADER)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"the {DEADLINE_HEADER} header must be an integer (milliseconds since the epoch)")
    return value


def _check_reply_to(message: AbstractIncomingMessage) -> None:
    """A reply_to the broker could not have made is refused before the request runs (issue 13.3)."""
    if message.reply_to:
        try:
            reply_node(message.reply_to)
        except BadReplyTo as exc:
            raise BadRequest(str(exc)) from None


def _sent_before_ms(message: AbstractIncomingMessage) -> int | None:
    """An upper bound of when the request was sent, from the AMQP ``timestamp`` property (whole
    seconds): the request was sent before the end of that second."""
    ts = message.timestamp
    if ts is None:
        return None
    return (int(ts.timestamp()) + 1) * 1000


def _reply_body(result: Any = None, *, error: BridgeError | None = None, extra: dict[str, Any] | None = None) -> bytes:
    if error is not None:
        return orjson.dumps({"error": {"code": error.code, "message": error.message}})
    body: dict[str, Any] = {"result": result}
    if extra:
        body.update(extra)
    return orjson.dumps(body)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


Observer = Callable[[str, str, float], None]  # (method, outcome, seconds)


class AmqpTransport:
    def __init__(self, settings: Settings, queue: WorkQueue, observe: Observer | None = None) -> None:
        self.settings = settings
        self.queue = queue
        self.identity = Identity(settings.trusted_users)
        # RabbitMQ checks that user_id is the connection's user: on results and replies it proves
        # they come from the bridge (engines and workers should check it).
        self.user = amqp_user(settings.amqp_url.get_secret_value())
        self.replies = ReplyPublisher(self._connect_probation)
        self._observer = observe or (lambda method, outcome, seconds: None)
        self.connection: AbstractRobustConnection | None = None
        self._consume_channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None  # results: confirms + mandatory
        self._reply_channel: AbstractChannel | None = None  # replies: no confirms
        self._results_exchange: AbstractExchange | None = None
        self._queues: dict[str, AbstractQueue] = {}
        self._consumer_tags: dict[str, str] = {}
        self._inflight: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False

    def observe(self, method: str, outcome: str, seconds: float) -> None:
        """Metrics, plus one canonical log line per request (DEBUG: it is one per message)."""
        self._observer(method, outcome, seconds)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request done", extra={"outcome": outcome, "duration_ms": round(seconds * 1000, 2)})

    # -- names -------------------------------------------------------------------------------
    def queue_name(self, method: str) -> str:
        return f"{self.settings.queue_prefix}.{method}"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.settings.exchange}.dead"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.settings.queue_prefix}.dead-letter"

    @property
    def unrouted_exchange(self) -> str:
        return f"{self.settings.exchange}.unrouted"

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.connection = await aio_pika.connect_robust(
            self.settings.amqp_url.get_secret_value(), client_properties={"connection_name": "queue-bridge"}
        )
        self._consume_channel = await self.connection.channel(publisher_confirms=False)
        await self._consume_channel.set_qos(prefetch_count=self.settings.prefetch)
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
        await self.resume()

    def _channel_lost(self, name: str, _channel: object, exc: BaseException | None = None) -> None:
        if self._closing:
            return
        # The robust connection reopens the channel and its consumers; in-flight requests finish
        # (their reply or ack may fail; the broker then redelivers them).
        log.warning("AMQP %s channel lost (%s); restored on reconnect", name, type(exc).__name__ if exc else "closed")
        self.queue.metrics.inc("amqp_channels_lost", channel=name)

    def _reconnected(self, *_: object) -> None:
        log.warning("AMQP connection restored: channels and consumers are back")

    async def _declare_topology(self) -> None:
        ch = self._consume_channel
        assert ch is not None
        s = self.settings
        dlx = await ch.declare_exchange(self.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        dlq = await self._declare_dead_letter_queue()
        await dlq.bind(dlx)
        unrouted = await ch.declare_exchange(self.unrouted_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        main = await ch.declare_exchange(
            s.exchange,
            aio_pika.ExchangeType.DIRECT,
            durable=True,
            arguments={"alternate-exchange": self.unrouted_exchange},
        )
        args: FieldTable = {"x-dead-letter-exchange": self.dead_letter_exchange}
        for method in METHODS:
            q = await ch.declare_queue(self.queue_name(method), durable=True, arguments=args)
            await q.bind(main, routing_key=method)
            self._queues[method] = q
        unrouted_q = await ch.declare_queue(self.queue_name("unrouted"), durable=True, arguments=args)
        await unrouted_q.bind(unrouted)
        self._queues["unrouted"] = unrouted_q
        assert self._publish_channel is not None
        self._results_exchange = await self._publish_channel.declare_exchange(
            s.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        if s.results_queue:
            # A durable queue for the engine, so results published while it is down wait for it.
            results_q = await ch.declare_queue(s.results_queue, durable=True)
            await results_q.bind(s.results_exchange, routing_key="#")

    async def _declare_dead_letter_queue(self) -> AbstractQueue:
        """Bounded (issue 13.6): a flood of bad messages must not fill RabbitMQ's disk and block
        every publisher on the broker. Beyond the limits the oldest dead letters are dropped."""
        assert self.connection is not None and self._consume_channel is not None
        s = self.settings
        args: FieldTable = {
            "x-max-length": s.dead_letter_max_length,
            "x-max-length-bytes": s.dead_letter_max_bytes,
            "x-overflow": "drop-head",
        }
        probe = await self.connection.channel(publisher_confirms=False)
        try:
            await probe.declare_queue(self.dead_letter_queue, durable=True, arguments=args)
        except aio_pika.exceptions.ChannelPreconditionFailed:
            # Declared by an older bridge without limits: queue arguments cannot change in place.
            policy = {"max-length": s.dead_letter_max_length, "max-length-bytes": s.dead_letter_max_bytes}
            log.warning(
                "dead-letter queue %s exists without the configured limits; bound it with a policy: "
                "rabbitmqctl set_policy qb-dead-letter '^%s$' '%s' --apply-to queues",
                self.dead_letter_queue,
                re.escape(self.dead_letter_queue),
                orjson.dumps({**policy, "overflow": "drop-head"}).decode(),
            )
        finally:
            if not probe.is_closed:
                await probe.close()
        return await self._consume_channel.declare_queue(self.dead_letter_queue, passive=True)

    async def resume(self, methods: Iterable[str] | None = None) -> None:
        """Consume requests (all queues, or only ``methods``)."""
        handlers: dict[str, Callable[[AbstractIncomingMessage], Awaitable[None]]] = {
            "add": self._on_add,
            "fetch": self._on_fetch,
            "ack": self._on_ack,
            "unrouted": self._on_unrouted,
        }
        for method, handler in handlers.items():
            if (methods is None or method in methods) and method not in self._consumer_tags:
                self._consumer_tags[method] = await self._queues[method].consume(self._tracked(handler))

    async def pause(self, methods: Iterable[str] | None = None) -> None:
        """Stop taking new requests (all queues, or only ``methods``); in-flight ones go on. What is
        not taken stays in RabbitMQ for the other bridges."""
        for method, tag in list(self._consumer_tags.items()):
            if methods is not None and method not in methods:
                continue
            try:
                await self._queues[method].cancel(tag)
            except Exception as exc:  # channel already gone: nothing to cancel
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
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    def is_ready(self) -> bool:
        conn = self.connection
        ch = self._consume_channel
        return bool(
            conn is not None
            and not conn.is_closed
            and ch is not None
            and not ch.is_closed
            and len(self._consumer_tags) == len(METHODS) + 1
        )

    def _tracked(
        self, handler: Callable[[AbstractIncomingMessage], Awaitable[None]]
    ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
        async def handle(message: AbstractIncomingMessage) -> None:
            # Every log line of this request carries these fields (never the body: values stay secret).
            structlog.contextvars.clear_contextvars()
            structlog.contextvars.bind_contextvars(
                method=message.routing_key, correlation_id=message.correlation_id, user=message.user_id
            )
            try:
                await handler(message)
            except Exception:
                log.exception("request handler failed unexpectedly")
                await self._settle_failed(message)

        async def run(message: AbstractIncomingMessage) -> None:
            # The work runs as a task of its own: when a channel closes (a broker restart) aio-pika
            # cancels its consumer callbacks, and a request cut in the middle of a claim would be
            # neither answered nor finished. Shielded, it finishes; its reply and ack may fail on the
            # dead channel, and then the broker redelivers the request, which is safe to repeat.
            work = asyncio.get_running_loop().create_task(handle(message))
            self._inflight.add(work)
            self._idle.clear()
            work.add_done_callback(self._finished)
            await asyncio.shield(work)

        return run

    def _finished(self, work: asyncio.Task[None]) -> None:
        self._inflight.discard(work)
        if not self._inflight:
            self._idle.set()

    async def _settle_failed(self, message: AbstractIncomingMessage) -> None:
        """Last resort, whatever raised: answer ``internal`` and dead-letter, so that one bad
        message can never sit unacknowledged and stall the queue for every tenant."""
        method = message.routing_key or "unknown"
        self.observe(method if method in METHODS else "unknown", "internal", 0.0)
        if message.processed:
            return
        err = BridgeError("internal error; the message was dead-lettered, see the bridge log")
        with contextlib.suppress(Exception):
            await self._reply(message, _reply_body(error=err), is_error=True)
        try:
            await message.reject(requeue=False)
        except Exception as exc:  # the channel is gone: the broker requeues it for another try
            log.warning("could not dead-letter a failed request: %s", type(exc).__name__)

    # -- replies -----------------------------------------------------------------------------
    async def _reply(
        self,
        request: AbstractIncomingMessage,
        body: bytes,
        *,
        is_error: bool,
        headers: dict[str, Any] | None = None,
    ) -> None:
        if not request.reply_to or self._reply_channel is None:
            return
        message = aio_pika.Message(
            body,
            content_type=JSON,
            correlation_id=request.correlation_id,
            type="error" if is_error else "result",
            user_id=self.user,
            headers=headers or {},
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        try:
            await self.replies.publish(message, request.reply_to)
        except BadReplyTo:
            return  # checked before the request ran: nobody to answer
        except Exception as exc:
            # The requester is gone (or its reply queue is). It will retry; the state is in Cassandra.
            log.warning("reply to %s not delivered: %s", request.reply_to, type(exc).__name__)

    async def _reject(self, message: AbstractIncomingMessage, error: BridgeError, method: str) -> None:
        log.warning(
            "rejected %s request: %s (%s)",
            method,
            error.code,
            error.message,
            extra={"correlation_id": message.correlation_id},
        )
        await self._reply(message, _reply_body(error=error), is_error=True)
        await message.reject(requeue=False)  # -> dead-letter exchange, with x-death headers

    def _body(self, message: AbstractIncomingMessage) -> Any:
        limit = self.settings.max_value_bytes + 65_536
        if len(message.body) > limit:
            raise PayloadTooLarge(f"the message body is {len(message.body)} bytes; the limit is {limit}")
        try:
            return jsonvalue.loads(message.body)
        except jsonvalue.JsonError as exc:
            raise BadRequest(f"the body is {exc}") from None

    # -- handlers ----------------------------------------------------------------------------
    async def _on_add(self, message: AbstractIncomingMessage) -> None:
        started = time.perf_counter()
        try:
            _check_reply_to(message)
            owner = self.identity.owner_of(message)
            cmd: AddCommand = parse(AddCommand, self._body(message))
            structlog.contextvars.bind_contextvars(owner=owner, service=cmd.service_id)
        except BridgeError as exc:
            self.observe("add", exc.code, time.perf_counter() - started)
            await self._reject(message, exc, "add")
            return
        # W3C trace context of the engine's span: kept with the task (a malformed one is dropped).
        tp = extract_traceparent(message.headers)
        delay = 0.1
        deadline = time.monotonic() + ADD_RETRY_BUDGET_S
        while True:
            try:
                task_id = await self.queue.add(owner, cmd, message_id=message.message_id, traceparent=tp)
                break
            except BridgeError as exc:
                if not exc.transient:
                    self.observe("add", exc.code, time.perf_counter() - started)
                    await self._reject(message, exc, "add")
                    return
                if time.monotonic() + delay > deadline or not self._consumer_tags:
                    # Give it back to RabbitMQ for later (or for another instance); never lose it.
                    # No reply now: the add is not over, and its one reply comes when it is.
                    self.observe("add", exc.code, time.perf_counter() - started)
                    log.warning("add still failing (%s): requeued", exc.message)
                    await message.nack(requeue=True)
                    return
                log.warning("add failed (%s), retrying in %.1fs", exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                # A bug, not bad input: keep the message (dead-letter queue) and say so.
                log.exception("add failed unexpectedly")
                err = BridgeError("internal error; the message was dead-lettered, see the bridge log")
                self.observe("add", err.code, time.perf_counter() - started)
                await self._reject(message, err, "add")
                return
        await self._reply(message, _reply_body(True, extra={"task": {"id": task_id}}), is_error=False)
        await message.ack()
        self.observe("add", "ok", time.perf_counter() - started)

    async def _rpc(
        self,
        message: AbstractIncomingMessage,
        method: str,
        call: Callable[[str, Any, AbstractIncomingMessage], Awaitable[tuple[bytes, dict[str, Any] | None]]],
        model: type[Any],
    ) -> None:
        started = time.perf_counter()
        try:
            if not message.reply_to:
                raise BadRequest(f"{method} is an RPC: set reply_to (and correlation_id)")
            _check_reply_to(message)
            owner = self.identity.owner_of(message)
            deadline = _deadline_of(message)
            request = parse(model, self._body(message))
            structlog.contextvars.bind_contextvars(owner=owner, service=request.service_id, worker=request.worker_id)
        except BridgeError as exc:
            self.observe(method, exc.code, time.perf_counter() - started)
            await self._reject(message, exc, method)
            return
        if deadline is not None and self.queue.clock.now_ms() > deadline:
            # The caller gave up (and may have retried elsewhere): executing it now could only act
            # on state that has moved on. Dropped before touching Cassandra, and counted.
            self.queue.metrics.inc("requests_expired", method=method)
            self.observe(method, "expired", time.perf_counter() - started)
            log.info("request past its deadline dropped", extra={"late_ms": self.queue.clock.now_ms() - deadline})
            await message.ack()
            return
        try:
            body, headers = await call(owner, request, message)
        except BridgeError as exc:
            self.observe(method, exc.code, time.perf_counter() - started)
            await self._reply(message, _reply_body(error=exc), is_error=True)
            await message.ack()  # the error was answered; the request itself was well formed
            return
        except Exception:
            log.exception("%s failed unexpectedly", method)
            err = BridgeError("internal error; see the bridge log")
            self.observe(method, err.code, time.perf_counter() - started)
            await self._reply(message, _reply_body(error=err), is_error=True)
            await message.ack()
            return
        await self._reply(message, body, is_error=False, headers=headers)
        await message.ack()
        self.observe(method, "ok", time.perf_counter() - started)

    async def _fetch(
        self, owner: str, req: FetchRequest, message: AbstractIncomingMessage
    ) -> tuple[bytes, dict[str, Any] | None]:
        delivery = await self.queue.fetch(owner, req)
        if delivery is None:
            return _reply_body(None), None
        task = {
            "id": delivery.task_id,
            "epoch": delivery.epoch,
            "deliveries": delivery.deliveries,
            "leaseExpiresAt": _iso(delivery.lease_expires_at_ms),
        }
        # The worker's span continues the engine's trace: same trace id, a new parent span id.
        child = child_traceparent(delivery.traceparent)
        headers = {"traceparent": child} if child else None
        return _reply_body(jsonvalue.fragment(delivery.value_json), extra={"task": task}), headers

    async def _ack(
        self, owner: str, req: AckRequest, message: AbstractIncomingMessage
    ) -> tuple[bytes, dict[str, Any] | None]:
        done = await self.queue.ack(owner, req, sent_before_ms=_sent_before_ms(message))
        return _reply_body(done), None

    async def _on_fetch(self, message: AbstractIncomingMessage) -> None:
        await self._rpc(message, "fetch", self._fetch, FetchRequest)

    async def _on_ack(self, message: AbstractIncomingMessage) -> None:
        await self._rpc(message, "ack", self._ack, AckRequest)

    async def _on_unrouted(self, message: AbstractIncomingMessage) -> None:
        err = BadRequest(f"unknown method {message.routing_key!r}; use one of {', '.join(METHODS)}")
        self.observe("unknown", err.code, 0.0)
        await self._reject(message, err, "unknown")

    # -- results -----------------------------------------------------------------------------
    async def publish_result(self, result: ResultMessage) -> None:
        if self._results_exchange is None:
            raise RuntimeError("transport not started")
        # Token and outcome are JSON already (decrypted): spliced in, never parsed and re-written.
        body: dict[str, Any] = {
            "token": jsonvalue.fragment(result.token_json),
            "serviceId": result.service,
            "taskId": result.task_id,
            result.kind: jsonvalue.fragment(result.value_json),
        }
        headers: dict[str, Any] = {"x-owner": result.owner}
        child = child_traceparent(result.traceparent)
        if child:
            headers["traceparent"] = child
        message = aio_pika.Message(
            orjson.dumps(body),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{result.task_id}:{result.completion_id}",  # consumers may de-duplicate on it
            headers=headers,
            type="result",
            user_id=self.user,
        )
        # Publisher confirm: raises unless the broker took responsibility for the message.
        await self._results_exchange.publish(message, routing_key=result.service, mandatory=True)
