"""Publishing results to the engine: persistent, confirmed, routed by serviceId.

:class:`ResultPublisher` exists before any AMQP connection does, so the queue can be given it at
construction; the transport attaches the results exchange when it starts (and not before: a
publish before then raises, and the outbox keeps the result pending)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractExchange

from bridge.config import Settings
from bridge.domain import jsonvalue
from bridge.domain.cancellation import stray_as_failure
from bridge.domain.queue import ResultMessage
from bridge.observability.tracing import child_traceparent
from bridge.transport.permissions import amqp_user
from bridge.transport.wire import iso

JSON = "application/json"
# A result's publisher confirm is awaited this long at most; past it the result stays owed and the
# relay publishes it again (at least once: the engine de-duplicates on message_id). Unbounded, one
# publish on a connection that went stuck (a black-holed network: no frame back, no close) held
# the relay, the fleet's only one, for as long as the connection lived.
CONFIRM_TIMEOUT_S = 15.0


class ResultPublisher:
    """The queue's result sink (``publish_result``), backed by the transport's confirmed channel."""

    def __init__(self, settings: Settings) -> None:
        # RabbitMQ checks that user_id is the connection's user: it proves the result is the bridge's.
        self.user = amqp_user(settings.amqp_url.get_secret_value())
        self._exchange: AbstractExchange | None = None
        # Told of a failed publish, with its routing key (the transport renews the channel when
        # RabbitMQ nacks).
        self.on_failure: Callable[[BaseException, str], None] = lambda exc, key: None
        # Publishes under way, by message id. aiormq maps a basic.return to its publish by message
        # id alone: with two copies of one result in flight (a confirm slower than the relay's
        # republish, e.g. a memory alarm), the first's return failed the second, and the first's
        # ack confirmed a result no queue took (marked published, never sent again). A copy asked
        # for while one is under way waits for that one's outcome instead.
        self._in_flight: dict[str, asyncio.Task[None]] = {}

    def attach(self, exchange: AbstractExchange) -> None:
        """The results exchange on a channel with publisher confirms (the transport, at start)."""
        self._exchange = exchange

    async def publish_result(self, message: ResultMessage) -> None:
        """Publish durably (persistent + publisher confirm + mandatory); raise if not confirmed."""
        if self._exchange is None:
            raise RuntimeError("transport not started")
        # Token and outcome are JSON already (decrypted): spliced in, never parsed and re-written.
        body: dict[str, Any] = {
            "token": jsonvalue.fragment(message.token_json),
            "serviceId": message.service,
            "taskId": message.task_id,
            message.kind: jsonvalue.fragment(message.value_json),
        }
        if message.completed_at_ms is not None:
            # When the ack (or park) was decided, from stored data: the same on a re-publication.
            body["completedAt"] = iso(message.completed_at_ms)
        headers: dict[str, Any] = {"x-owner": message.owner}
        child = child_traceparent(message.traceparent)
        if child:
            headers["traceparent"] = child
        amqp_message = aio_pika.Message(
            orjson.dumps(body),
            content_type=JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{message.task_id}:{message.completion_id}",  # consumers may de-duplicate on it
            headers=headers,
            type="result",
            user_id=self.user,
        )
        mid = amqp_message.message_id
        assert mid is not None
        running = self._in_flight.get(mid)
        if running is None:
            running = asyncio.ensure_future(self._publish(self._exchange, amqp_message, message.service))
            self._in_flight[mid] = running
            running.add_done_callback(functools.partial(self._ended, mid))
        # Shielded: a caller cut short (the relay's sweep cancelled) leaves the other's wait whole.
        await asyncio.shield(running)

    def _ended(self, mid: str, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(mid, None)
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have been cut short (each raised its own)

    async def _publish(self, exchange: AbstractExchange, amqp_message: aio_pika.Message, service: str) -> None:
        # Publisher confirm: raises unless the broker took responsibility for the message.
        try:
            with stray_as_failure():  # a stuck connection's close cancels the confirm's wait
                async with asyncio.timeout(CONFIRM_TIMEOUT_S):
                    await exchange.publish(amqp_message, routing_key=service, mandatory=True)
        except Exception as exc:
            self.on_failure(exc, service)
            raise
