"""Review 11: the test proxy's ``stall`` (tests/faults.py) lets nothing through until ``resume``.

The client-to-server pipe checked its gate only before ``reader.read()``; it is nearly always
already inside that read when a test calls ``stall()``, so the next chunk the client sent went
through anyway (an AMQP ``channel.open`` of a "stalled" broker was answered). A local TCP echo
server stands in for the server: no broker needed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.faults import TcpProxy
from tests.history import Acked, Held, History

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def _proxied_echo() -> AsyncIterator[tuple[TcpProxy, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connected through a TcpProxy to an echo server; every socket closed after."""
    served: list[asyncio.StreamWriter] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.append(writer)
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    proxy = await TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1]).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        yield proxy, reader, writer
    finally:
        writer.close()
        proxy.resume()  # a pipe still waiting at its gate (a failed test) ends with its socket
        await proxy.stop()
        for w in [writer, *served]:
            w.close()
            with contextlib.suppress(ConnectionError, OSError):
                await w.wait_closed()
        server.close()
        await server.wait_closed()
        if proxy._tasks:  # the proxy's pipes end once their sockets are gone
            await asyncio.wait(set(proxy._tasks), timeout=5.0)


async def _echoed(reader: asyncio.StreamReader, n: int, timeout: float) -> bytes:
    return await asyncio.wait_for(reader.readexactly(n), timeout)


@pytest.mark.parametrize("connection", [None, 0])
async def test_a_write_after_stall_is_not_received_until_resume(connection: int | None) -> None:
    async with _proxied_echo() as (proxy, reader, writer):
        writer.write(b"ping")
        assert await _echoed(reader, 4, 5.0) == b"ping"  # the path works; the proxy now waits in read()
        proxy.stall(connection)
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(TimeoutError):  # a negative check needs a window: 0.5 s on a local socket
            await _echoed(reader, 4, 0.5)
        proxy.resume()
        assert await _echoed(reader, 4, 5.0) == b"held"


async def test_a_stall_before_any_traffic_holds_the_first_write() -> None:
    async with _proxied_echo() as (proxy, reader, writer):
        proxy.stall()
        writer.write(b"first")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await _echoed(reader, 5, 0.5)
        proxy.resume()
        assert await _echoed(reader, 5, 5.0) == b"first"


# -- the history checker's "one result per completion" (tests/history.py) ------------------------------


def _history_of_one_completion() -> tuple[History, dict[str, dict[str, Any]], dict[str, Any]]:
    history = History()
    history.values["t1"] = 7
    history.held.append(Held("t1", 1, "w", 0.0, 1.0))
    history.acks.append(Acked("t1", 1, "w", True, 0.5))
    rows = {"t1": {"state": "done", "worker": "w", "epoch": 1}}
    return history, rows, {"taskId": "t1", "result": {"task": 7}}


def test_the_history_check_fails_on_a_result_published_twice() -> None:
    """The drills without a crash (a bridge paused, cut off from Cassandra, clocks skewed) passed
    with every result published twice: the checker never counted results per task."""
    history, rows, result = _history_of_one_completion()
    history.check(rows, [result])
    with pytest.raises(AssertionError, match="more than one result message"):
        history.check(rows, [result, dict(result)])
    history.check(rows, [result, dict(result)], allow_duplicates=True)  # after a crash: at least once


def test_the_history_check_still_wants_each_result_to_carry_its_tasks_value() -> None:
    history, rows, result = _history_of_one_completion()
    with pytest.raises(AssertionError, match="carries 8"):
        history.check(rows, [result, {"taskId": "t1", "result": {"task": 8}}], allow_duplicates=True)
