"""The RPC client's connection edges (pure logic: fakes stand in for aio-pika).

A channel given up while it opened must not fail the requests of the connection after it.

``RpcClient._ensure_open`` registers its close callback on a new channel before consuming the
direct reply-to; a call's deadline that cut the consume (a stalled node) left that channel
unstored, so replacing the connection did not remove its callback, and when the old connection
finally closed, the abandoned channel's callback failed every request waiting on the new one
(``ConnectionLost``: real replies dropped, an add without a message id retried into a second task).
Fakes stand in for aio-pika (pure logic: which callbacks count). Found by review, 2026-12-07."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import bridge.client.rpc as rpc

pytestmark = pytest.mark.anyio


class _Callbacks(set[Any]):
    def add(self, f: Any, weak: bool = False) -> None:
        set.add(self, f)


class _Queue:
    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def consume(self, callback: Any, no_ack: bool = True) -> str:
        if self.hang:
            await asyncio.Event().wait()  # a stalled node: never answers
        return "ctag"


class _Exchange:
    def __init__(self) -> None:
        self.published: list[Any] = []

    async def publish(self, message: Any, routing_key: str, **kw: Any) -> None:
        self.published.append(message)


class _Channel:
    def __init__(self, hang: bool) -> None:
        self.close_callbacks = _Callbacks()
        self.is_closed = False
        self.hang = hang
        self.exchange = _Exchange()

    async def get_queue(self, name: str, ensure: bool = False) -> _Queue:
        return _Queue(self.hang)

    async def get_exchange(self, name: str, ensure: bool = False) -> _Exchange:
        return self.exchange

    def closed(self, exc: BaseException | None) -> None:
        self.is_closed = True
        for callback in list(self.close_callbacks):
            callback(self, exc)


class _Connection:
    def __init__(self, stalled: bool) -> None:
        self.close_callbacks = _Callbacks()
        self.is_closed = False
        self.stalled = stalled
        self.channels: list[_Channel] = []
        self.closing = asyncio.Event()

    async def channel(self, publisher_confirms: bool = False, **kw: Any) -> _Channel:
        channel = _Channel(hang=self.stalled)
        self.channels.append(channel)
        return channel

    async def close(self) -> None:
        await self.closing.wait()  # a stalled node's close ends when the test says
        self.is_closed = True
        for channel in self.channels:
            channel.closed(ConnectionResetError("closed"))
        for callback in list(self.close_callbacks):
            callback(self, None)


async def test_a_channel_abandoned_while_opening_fails_nothing_sent_on_the_next_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connections: list[_Connection] = []

    async def connect_first(order: Any, timeout: Any = None) -> tuple[_Connection, int]:
        connection = _Connection(stalled=not connections)
        connections.append(connection)
        return connection, 0

    monkeypatch.setattr(rpc, "connect_first", connect_first)
    client = rpc.RpcClient("amqp://u:p@127.0.0.1/", timeout=1.0)
    with pytest.raises(Exception):  # noqa: B017, PT011 (cut by its deadline: whatever it is said as)
        await client.call_raw("extend", {}, within=0.2)
    waiting = asyncio.ensure_future(client.call_raw("ack", {}))
    for _ in range(100):
        if len(connections) == 2 and client._pending:
            break
        await asyncio.sleep(0.01)
    assert len(connections) == 2 and client._pending, "the second request waits on the second connection"
    connections[0].closing.set()  # the first connection's close ends at last
    for _ in range(20):
        await asyncio.sleep(0)
    assert not waiting.done(), f"failed by the first connection's abandoned channel: {waiting.exception()!r}"
    waiting.cancel()
    connections[1].closing.set()
    await client.close()


def test_a_worker_polling_without_pause_still_backs_off_after_failures() -> None:
    """``poll_interval=0`` made every backoff 0 (full jitter up to 0 doubled): a fleet of workers
    retried a restarting broker by the hundreds a second each. The doubling starts from at least
    ``BACKOFF_BASE_S``; a negative interval is refused. Found by review, 2026-12-07."""
    from bridge.client import Worker

    worker = Worker("amqp://u:p@127.0.0.1:1/", service="s", worker_id="w", poll_interval=0)
    pauses = [worker._backoff_s(5) for _ in range(200)]
    assert max(pauses) > rpc.BACKOFF_BASE_S, max(pauses)
    assert all(0 <= p <= rpc.POLL_PAUSE_MAX_S for p in pauses)
    with pytest.raises(ValueError, match="poll_interval"):
        Worker("amqp://u:p@127.0.0.1:1/", service="s", worker_id="w", poll_interval=-1)


async def test_a_worker_polling_without_pause_pauses_after_an_empty_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bridge that does not long-poll (BRIDGE_HINTS=false) answers an empty queue at once: with
    ``poll_interval=0`` one idle worker sent some 450 fetches a second, each a scan of the ready
    index (a re-review, 2026-12-07). The pause after such an answer is at least
    ``BACKOFF_BASE_S``."""
    from bridge.client import Worker

    worker = Worker("amqp://u:p@127.0.0.1:1/", service="s", worker_id="w", poll_interval=0)
    paused: list[float] = []

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        return {"result": None, "_headers": {}}

    async def pause(seconds: float, stop: Any) -> None:
        paused.append(seconds)

    monkeypatch.setattr(worker, "call", call)
    monkeypatch.setattr(worker, "_pause", pause)
    assert await worker._poll() is None
    assert paused and min(paused) >= rpc.BACKOFF_BASE_S, paused
