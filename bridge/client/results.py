"""Consuming result messages (the engine side of ``queue-bridge.results``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bridge.domain import jsonvalue
from bridge.transport import failover
from bridge.transport.addresses import node_urls

__all__ = ["results_consumer"]


@contextlib.asynccontextmanager
async def results_consumer(
    url: str, *, exchange: str = "queue-bridge.results", routing_key: str = "#", hosts: Sequence[str] = ()
) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
    """Consume result messages into an asyncio queue (an exclusive, auto-deleted queue).

    The queue lives as long as the connection: results published while it is being reconnected
    are not kept for it (a demo's and a test's helper). An engine that needs every result consumes
    the durable results queue (``BRIDGE_RESULTS_QUEUE``) instead.

    ``hosts``: a RabbitMQ cluster's nodes, as ``RpcClient``'s (a reconnection tries the next)."""
    connection = await failover.connect_robust(node_urls(url, hosts))
    try:
        channel = await connection.channel()
        ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(ex, routing_key=routing_key)
        out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            body = jsonvalue.loads(message.body)
            body["_message_id"] = message.message_id
            body["_headers"] = dict(message.headers or {})
            await out.put(body)
            await message.ack()

        await queue.consume(on_message)
        yield out
    finally:
        await connection.close()
