"""RPC over RabbitMQ direct reply-to, and the Engine / Worker façades."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Self
from urllib.parse import unquote, urlparse

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge.client.errors import ConnectionLost, RequestTimeout, TransportError, error_from_reply
from bridge.client.results import results_consumer
from bridge.domain import jsonvalue

__all__ = ["DEADLINE_HEADER", "REPLY_TO", "Engine", "RpcClient", "Task", "Worker", "results_consumer", "user_of"]

REPLY_TO = "amq.rabbitmq.reply-to"
DEADLINE_HEADER = "x-deadline"


def user_of(url: str) -> str:
    parsed = urlparse(url)
    return unquote(parsed.username or "guest")


class RpcClient:
    """Publishes requests to the bridge's exchange and awaits replies on direct reply-to.

    Direct reply-to is at-most-once: a reply can be lost if the connection drops. Every bridge
    RPC is safe to repeat (fetch returns the held task again, a repeated ack of a completed task
    is answered true), so callers retry on :class:`~bridge.client.errors.TransportError`
    (:class:`RequestTimeout`, :class:`ConnectionLost`).
    """

    def __init__(self, url: str, *, exchange: str = "queue-bridge", timeout: float = 10.0) -> None:
        self.url = url
        self.exchange_name = exchange
        self.timeout = timeout
        self.user = user_of(url)
        self.connection: AbstractConnection | None = None
        self.channel: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._connecting = asyncio.Lock()
        self._closed = False

    async def open(self) -> None:
        self._closed = False
        await self._ensure_open()

    async def _ensure_open(self) -> AbstractChannel:
        """(Re)connect on demand. Replies are bound to a connection, so instead of the robust
        connection's automatic restore (which re-declares what it saw), a lost connection fails
        what was pending and the next call connects afresh."""
        async with self._connecting:
            if self.channel is not None and not self.channel.is_closed:
                return self.channel
            if self.connection is not None and not self.connection.is_closed:
                await self.connection.close()
            self.connection = await aio_pika.connect(self.url, timeout=self.timeout)
            self.connection.close_callbacks.add(self._on_lost)
            channel = await self.connection.channel(publisher_confirms=False)
            channel.close_callbacks.add(self._on_lost)
            # Direct reply-to: consume the pseudo-queue (no-ack) on the channel we publish on.
            reply_queue = await channel.get_queue(REPLY_TO, ensure=False)
            await reply_queue.consume(self._on_reply, no_ack=True)
            self.channel = channel
            return channel

    def _on_lost(self, *_: Any) -> None:
        # Replies to the old connection are gone: fail what was waiting so callers retry.
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ConnectionLost("connection to RabbitMQ was lost before the reply; retry the request"))
        self._pending.clear()

    async def close(self) -> None:
        self._closed = True
        if self.connection is not None and not self.connection.is_closed:
            await self.connection.close()
        self.connection = None
        self.channel = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        fut = self._pending.pop(message.correlation_id or "", None)
        if fut is not None and not fut.done():
            fut.set_result((jsonvalue.loads(message.body), dict(message.headers or {})))

    async def publish(
        self,
        method: str,
        body: Any,
        *,
        reply: bool = True,
        owner: str | None = None,
        message_id: str | None = None,
        headers: dict[str, Any] | None = None,
        raw: bytes | None = None,
        wait_s: float = 0.0,
    ) -> asyncio.Future[Any] | None:
        if self._closed:
            raise RuntimeError("client is closed")
        try:
            channel = await self._ensure_open()
        except (OSError, aio_pika.exceptions.AMQPError) as exc:
            raise ConnectionLost(f"cannot reach RabbitMQ: {exc}") from None
        hdrs: dict[str, Any] = dict(headers or {})
        if owner is not None:
            hdrs["x-owner"] = owner
        now = time.time()
        if reply:
            # Past this moment we will have given up (and may retry): the bridge drops the request
            # instead of executing it late, when its outcome could only act on state that moved on.
            hdrs.setdefault(DEADLINE_HEADER, int((now + wait_s + self.timeout) * 1000))
        correlation_id = uuid.uuid4().hex
        fut: asyncio.Future[Any] | None = None
        if reply:
            fut = asyncio.get_running_loop().create_future()
            self._pending[correlation_id] = fut
        message = aio_pika.Message(
            raw if raw is not None else jsonvalue.dumps(body),
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=REPLY_TO if reply else None,
            user_id=self.user,
            message_id=message_id,
            headers=hdrs,
            timestamp=datetime.fromtimestamp(now, tz=UTC),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        exchange = await channel.get_exchange(self.exchange_name, ensure=False)
        try:
            await exchange.publish(message, routing_key=method)
        except (aio_pika.exceptions.AMQPError, RuntimeError, OSError) as exc:
            self._pending.pop(correlation_id, None)
            raise ConnectionLost(f"request not sent ({type(exc).__name__}); retry it") from None
        return fut

    async def call_raw(self, method: str, body: Any, **kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Send a request and return (reply body, reply headers) without interpreting errors."""
        fut = await self.publish(method, body, **kw)
        assert fut is not None
        limit = self.timeout + kw.get("wait_s", 0.0)  # a long-poll fetch is answered after its wait
        try:
            async with asyncio.timeout(limit):
                reply: tuple[dict[str, Any], dict[str, Any]] = await fut
                return reply
        except TimeoutError:
            raise RequestTimeout(f"no reply to {method} within {limit}s") from None
        finally:
            for cid, pending in list(self._pending.items()):
                if pending is fut:
                    del self._pending[cid]

    async def call(self, method: str, body: Any, **kw: Any) -> dict[str, Any]:
        reply, headers = await self.call_raw(method, body, **kw)
        if "error" in reply:
            raise error_from_reply(reply["error"])
        reply["_headers"] = headers
        return reply


class Engine(RpcClient):
    """The workflow-engine side: add tasks (optionally for another owner, if the bridge trusts us)."""

    def __init__(self, url: str, *, owner: str | None = None, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.owner = owner

    @classmethod
    def connect(cls, url: str, *, owner: str | None = None, **kw: Any) -> Self:
        return cls(url, owner=owner, **kw)

    async def add(
        self,
        service: str,
        value: Any,
        *,
        token: Any = None,
        message_id: str | None = None,
        traceparent: str | None = None,
        wait: bool = True,
    ) -> str | None:
        """Add a task. ``message_id`` (default: a fresh uuid) makes retries idempotent."""
        body: dict[str, Any] = {"serviceId": service, "value": value}
        if token is not None:
            body["token"] = token
        headers = {"traceparent": traceparent} if traceparent else None
        mid = message_id or uuid.uuid4().hex
        if not wait:
            await self.publish("add", body, reply=False, owner=self.owner, message_id=mid, headers=headers)
            return None
        reply = await self.call("add", body, owner=self.owner, message_id=mid, headers=headers)
        return str(reply["task"]["id"])


@dataclass
class Task:
    worker: Worker
    id: str
    value: Any
    deliveries: int
    lease_expires_at: str
    headers: dict[str, Any] = field(default_factory=dict)
    epoch: int | None = None  # the lease's fencing token (bridges before 1.1 do not send it)
    has_token: bool | None = None  # its result goes to the engine (bridges before 1.3 do not say)

    async def ack(self, result: Any = None) -> bool:
        """Complete this task (never another one): true if this lease completed it."""
        return await self.worker.ack(result=result, task_id=self.id, epoch=self.epoch, has_token=self.has_token)

    async def fail(self, error: Any) -> bool:
        """Complete this task with a business error for the engine."""
        return await self.worker.ack(error=error, task_id=self.id, epoch=self.epoch, has_token=self.has_token)


class Worker(RpcClient):
    """An external worker: ``async for task in worker`` fetches until the loop is left."""

    def __init__(
        self,
        url: str,
        *,
        service: str,
        worker_id: str,
        time_to_recover_ms: int | None = None,
        poll_interval: float = 0.2,
        wait_ms: int = 30_000,
        **kw: Any,
    ) -> None:
        super().__init__(url, **kw)
        self.wait_ms = wait_ms  # the long-poll of ``async for task in worker`` (0: poll every poll_interval)
        self.service = service
        self.worker_id = worker_id
        self.time_to_recover_ms = time_to_recover_ms
        self.poll_interval = poll_interval
        self.current: Task | None = None  # what the last fetch returned
        # Whether this worker knows it holds no task (its last fetch found none, or it got an answer
        # to the ack of what it was handed): its next fetch says ``fresh`` and the bridge reads
        # less. Unknown at start (a previous life may hold one) and after any failed request.
        self._holds_nothing = False

    @classmethod
    def connect(cls, url: str, *, service: str, worker_id: str, **kw: Any) -> Self:
        return cls(url, service=service, worker_id=worker_id, **kw)

    async def fetch(self, time_to_recover_ms: int | None = None, *, wait_ms: int = 0) -> Task | None:
        """One fetch: the task, or None if none is ready (within ``wait_ms``, up to 30,000: long-poll)."""
        body: dict[str, Any] = {"serviceId": self.service, "workerId": self.worker_id}
        ttr = time_to_recover_ms or self.time_to_recover_ms
        if ttr is not None:
            body["timeToRecover"] = ttr
        if wait_ms:
            body["waitMs"] = wait_ms
        if self._holds_nothing:
            body["fresh"] = True
        self._holds_nothing = False  # until this fetch is answered
        reply = await self.call("fetch", body, wait_s=wait_ms / 1000)
        if reply.get("result") is None and "task" not in reply:
            self.current = None
            self._holds_nothing = True
            return None
        t = reply["task"]
        self.current = Task(
            self,
            t["id"],
            reply["result"],
            t["deliveries"],
            t["leaseExpiresAt"],
            reply["_headers"],
            t.get("epoch"),
            t.get("hasToken"),
        )
        return self.current

    async def ack(
        self,
        result: Any = None,
        *,
        error: Any = None,
        task_id: str | None = None,
        epoch: int | None = None,
        has_token: bool | None = None,
    ) -> bool:
        """Ack a task: the one named (``task_id``, ``epoch`` from the fetch reply), by default the
        one the last fetch returned. The ack always names its task, so a late or repeated copy of
        it can never complete another one."""
        current = self.current
        if task_id is None and current is not None:
            task_id, epoch, has_token = current.id, current.epoch, current.has_token
        body: dict[str, Any] = {"serviceId": self.service, "workerId": self.worker_id}
        if task_id is not None:
            body["taskId"] = task_id
        if epoch is not None:
            body["epoch"] = epoch
        if has_token is not None:
            body["hasToken"] = has_token
        if error is not None:
            body["error"] = error
        else:
            body["result"] = result
        reply = await self.call("ack", body)
        if current is not None and task_id == current.id:
            # Answered (true, or false: it is someone else's now): this worker holds nothing.
            self._holds_nothing = True
        return bool(reply["result"])

    async def __aiter__(self) -> AsyncIterator[Task]:
        while True:
            try:
                task = await self.fetch(wait_ms=self.wait_ms)
            except TransportError:
                continue
            if task is None:
                if not self.wait_ms:
                    await asyncio.sleep(self.poll_interval)
                continue
            yield task
