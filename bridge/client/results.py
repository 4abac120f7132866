"""Consuming result messages (the engine side of ``queue-bridge.results``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bridge.domain import jsonvalue
from bridge.transport import failover
from bridge.transport.addresses import node_urls

__all__ = ["results_consumer"]

log = logging.getLogger("bridge.client")


@contextlib.asynccontextmanager
async def results_consumer(
    url: str,
    *,
    exchange: str = "queue-bridge.results",
    routing_key: str = "#",
    hosts: Sequence[str] = (),
    bridge_user: str | None = "queue-bridge",
    connect_timeout: float = 10.0,
) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    """Consume result messages into an asyncio queue (an exclusive, auto-deleted queue).

    The queue lives as long as the connection: results published while it is being reconnected
    are not kept for it (a demo's and a test's helper). An engine that needs every result consumes
    the durable results queue (``BRIDGE_RESULTS_QUEUE``) instead.

    Only messages whose broker-validated ``user_id`` is ``bridge_user`` (the bridge's AMQP user)
    are taken as results, as docs/security.md asks of every engine; others are dropped (acked,
    not queued): anyone allowed to publish to the exchange could otherwise forge a result.
    ``None`` takes every message (each carries ``_user_id`` to check).

    ``hosts``: a RabbitMQ cluster's nodes, as ``RpcClient``'s (a reconnection tries the next).
    ``connect_timeout`` bounds each node's attempt: a node that accepts TCP and never answers
    held the connect for ever (and the next node was never tried)."""
    connection = await failover.connect_robust(node_urls(url, hosts), timeout=connect_timeout)
    try:
        channel = await connection.channel()
        try:
            # Passive: an engine granted as docs/asyncapi.yaml says (read on the exchange, no
            # configure) was refused a declare of it (ACCESS_REFUSED) before any result came.
            ex = await channel.get_exchange(exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            # No bridge declared it yet: declared here, for a user allowed to (as before).
            channel = await connection.channel()
            ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(ex, routing_key=routing_key)
        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            if bridge_user is not None and message.user_id != bridge_user:
                log.warning(
                    "a message on the results exchange not from the bridge (user_id %r): dropped", message.user_id
                )
                await message.ack()
                return
            body = jsonvalue.loads(message.body)
            body["_user_id"] = message.user_id
            body["_message_id"] = message.message_id
            body["_headers"] = dict(message.headers or {})
            await out.put(body)
            await message.ack()

        await queue.consume(on_message)
        yield out
    finally:
        await connection.close()
