"""Load-generator building blocks: a pipelined add publisher and closed-loop drivers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from benchmarks.progress import Progress
from benchmarks.stats import Sample
from bridge.client.rpc import REPLY_TO, user_of


class AddPublisher:
    """The engine side of W-add: persistent ``add`` messages with a message_id, publisher confirms
    (each publish waits for the broker's ack) and a reply on direct reply-to once the task is stored.

    It sends exactly what ``bridge.client.Engine.add`` sends; only the channel is in confirm mode.
    """

    def __init__(self, url: str, *, exchange: str, owner: str, timeout: float = 30.0) -> None:
        self.url = url
        self.exchange_name = exchange
        self.owner = owner
        self.user = user_of(url)
        self.timeout = timeout
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def open(self) -> AddPublisher:
        self._connection = await aio_pika.connect_robust(self.url)
        channel = await self._connection.channel(publisher_confirms=True)
        replies = await channel.get_queue(REPLY_TO, ensure=False)
        await replies.consume(self._on_reply, no_ack=True)
        self._exchange = await channel.get_exchange(self.exchange_name, ensure=False)
        return self

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._pending.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result(orjson.loads(message.body))

    async def add(self, service: str, value: Any, *, message_id: str | None = None) -> str:
        """Publish one add, wait for its confirm and its reply; return the task id."""
        assert self._exchange is not None, "open() first"
        correlation_id = uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = fut
        message = aio_pika.Message(
            orjson.dumps({"serviceId": service, "value": value}),
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=REPLY_TO,
            user_id=self.user,
            message_id=message_id or uuid.uuid4().hex,
            headers={"x-owner": self.owner},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            await self._exchange.publish(message, routing_key="add")  # returns once confirmed
            async with asyncio.timeout(self.timeout):
                reply = await fut
        finally:
            self._pending.pop(correlation_id, None)
        if "error" in reply:
            raise RuntimeError(f"add failed: {reply['error']}")
        return str(reply["task"]["id"])


def task_value(i: int) -> dict[str, Any]:
    """A small, typical task value (about 80 bytes of JSON)."""
    return {"i": i, "invoice": 100_000 + i, "customer": f"c-{i % 977}", "note": "benchmark task"}


async def closed_loop(
    op: Callable[[int, int], Awaitable[Any]],
    *,
    concurrency: int,
    count: int,
    progress: Progress | None = None,
    deadline: float | None = None,
) -> Sample:
    """Run ``op(slot, i)`` for i in 0..count-1 on ``concurrency`` loops (``slot`` = the loop's number);
    each loop waits for its op's result before starting the next, so ``concurrency`` are in flight.
    Stops early at ``deadline`` (a time.monotonic() value)."""
    sample = Sample()
    counter = iter(range(count))
    started = time.perf_counter()
    last_done = started

    async def loop(slot: int) -> None:
        nonlocal last_done
        for i in counter:
            if deadline is not None and time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            try:
                await op(slot, i)
            except Exception:
                sample.errors += 1
                if progress:
                    progress.error()
                continue
            t1 = time.perf_counter()
            sample.add(t1 - t0)
            last_done = t1
            if progress:
                progress.advance()

    await asyncio.gather(*(loop(slot) for slot in range(concurrency)))
    sample.elapsed = last_done - started
    return sample


async def pipelined_adds(
    pub: AddPublisher,
    service: str,
    count: int,
    *,
    window: int,
    progress: Progress | None = None,
    deadline: float | None = None,
    first: int = 0,
) -> Sample:
    return await closed_loop(
        lambda _slot, i: pub.add(service, task_value(first + i)),
        concurrency=window,
        count=count,
        progress=progress,
        deadline=deadline,
    )
