"""The Python client when a broker connection dies right after its handshake (real servers).

aiormq raises plain ``RuntimeError("<Connection> closed")`` from ``Connection.channel()`` on a
closed connection, ``ChannelInvalidStateError`` (a RuntimeError) from a consume on a closed
channel, ``StopAsyncIteration`` from a handshake that met EOF: ``_send`` turned only OSError and
AMQPError into ``ConnectionLost``, so those escaped as plain exceptions. ``Worker.run`` (which
retries BridgeClientError only) ended, a keep-alive stopped in silence."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest

from bridge.client import ConnectionLost, Task, Worker
from tests.conftest import OWNERS, service_id, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# Connection.OpenOk: a method frame (type 1) on channel 0, class 10, method 41.
_OPEN_OK = struct.pack(">HH", 10, 41)


class _DropAfterOpenOk(TcpProxy):
    """Forwards as usual, but the next ``drops_left`` connections are closed on the client's side
    right after the broker's Connection.OpenOk went through: the client's connect succeeded, and
    its channel's open meets a connection that is gone."""

    drops_left = 0
    dropped = 0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        if not replies or self.drops_left <= 0:
            await super()._pipe(reader, writer, replies=replies)
            return
        self.drops_left -= 1
        buffered = b""
        try:
            while data := await reader.read(65536):
                buffered += data
                at = buffered.find(_OPEN_OK)
                if at >= 7 and buffered[at - 7] == 1:  # a method frame's payload starts there
                    end = at + struct.unpack(">I", buffered[at - 4 : at])[0] + 1  # the frame's end octet
                    if len(buffered) >= end:
                        writer.write(buffered[:end])
                        await writer.drain()
                        self.dropped += 1
                        writer.transport.abort()
                        return
                    continue
                writer.write(buffered)
                buffered = b""
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


async def _worker(proxy: TcpProxy, svc: str, names: dict[str, str], **kw: object) -> Worker:
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    return Worker(url, service=svc, worker_id="r11", exchange=names["exchange"], timeout=3.0, **kw)  # type: ignore[arg-type]


async def test_a_connection_dropped_after_its_handshake_is_a_connection_lost_not_sent(bridge, servers, names):
    proxy = await _DropAfterOpenOk(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    w = await _worker(proxy, svc, names)
    try:
        for _ in range(3):  # the timing varies (the close seen before or during the channel's open)
            proxy.drops_left = 1
            with pytest.raises(ConnectionLost) as lost:
                await w.fetch()
            assert lost.value.sent is False, lost.value
        assert proxy.dropped == 3
        assert await w.fetch() is None  # the next connection is served
    finally:
        await w.close()
        await proxy.stop()


async def test_run_keeps_serving_through_connections_dropped_after_their_handshake(bridge, engine, servers, names):
    proxy = await _DropAfterOpenOk(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    w = await _worker(proxy, svc, names, poll_interval=0.05)
    w.wait_ms = 1_000
    proxy.drops_left = 3  # the worker's first three connections
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task: Task) -> str:
        seen.append(task.id)
        stop.set()
        return "ok"

    try:
        running = asyncio.create_task(w.run(handler, stop=stop))
        await wait_for(lambda: proxy.dropped == 3 or running.done(), 20.0, what="three connections dropped")
        task_id = await engine.add(svc, {"n": 1})
        handled = await asyncio.wait_for(running, 20.0)
    finally:
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    assert handled == 1 and seen == [task_id]
