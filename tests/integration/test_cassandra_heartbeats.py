"""The CQL drivers' heartbeats (docs/storage.md, "The CQL driver"): a quiet connection sends a
heartbeat once it wrote nothing for ``BRIDGE_CASSANDRA_HEARTBEAT_INTERVAL`` and is kept; one that
reads nothing for ``BRIDGE_CASSANDRA_IDLE_TIMEOUT`` (a node gone silent: a network black hole, a
frozen process) is given up and opened again. The interval is what an idle fleet pays (two
connections a bridge), so detection must rest on the idle timeout, not on a short interval.

Short settings here (1 s and 3 s) keep the test quick; the defaults are 20 s and 30 s. The black
hole is a proxy that forwards the driver's bytes and drops Cassandra's (``TcpProxy.mute``)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.storage.session import open_session
from tests.conftest import settings_from, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

INTERVAL_S, IDLE_S = 1, 3


class _Counted:
    """A reader that counts the chunks it gives."""

    def __init__(self, inner: asyncio.StreamReader, proxy: CountingProxy) -> None:
        self.inner, self.proxy = inner, proxy

    async def read(self, n: int) -> bytes:
        data = await self.inner.read(n)
        if data:
            self.proxy.sent += 1
        return data


class CountingProxy(TcpProxy):
    """Counts the chunks the clients send (a quiet driver sends nothing but its heartbeats)."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.sent = 0

    async def _pipe(self, reader, writer, *, replies: bool) -> None:  # type: ignore[no-untyped-def]
        counted = reader if replies else _Counted(reader, self)
        await super()._pipe(counted, writer, replies=replies)


@pytest.mark.parametrize("driver", ["acsylla", "datastax"])
async def test_a_quiet_connection_is_kept_and_a_silent_one_given_up(driver, bridge_env, servers):
    proxy = await CountingProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    settings = settings_from(
        bridge_env,
        cassandra_hosts=["127.0.0.1"],
        cassandra_port=proxy.port,
        cassandra_driver=driver,
        cassandra_heartbeat_interval=INTERVAL_S,
        cassandra_idle_timeout=IDLE_S,
    )
    session = open_session(settings)
    await session.connect()
    try:
        await wait_for(session.any_host_up, 10, what="the session connected")
        accepted, sent = proxy.accepted, proxy.sent
        # Quiet for three idle timeouts: the heartbeats' answers keep every connection open.
        await asyncio.sleep(3 * IDLE_S)
        assert proxy.accepted == accepted, "a quiet, healthy connection was given up"
        heartbeats = proxy.sent - sent
        # At least one heartbeat per connection (two: control and node) per 2 intervals.
        assert heartbeats >= 2 * (3 * IDLE_S) // (2 * INTERVAL_S), f"{heartbeats} chunks sent in {3 * IDLE_S} s"

        # Silent from now on: the bytes the driver sends arrive, nothing comes back.
        proxy.mute()
        muted_at = time.monotonic()
        await wait_for(lambda: proxy.accepted > accepted, 15, interval=0.05, what="a silent connection given up")
        took = time.monotonic() - muted_at
        # acsylla: the idle timeout after the last read; cassandra-driver: a round of the interval
        # to see the connection idle, another to send, the rest of the idle timeout for the answer.
        assert took <= IDLE_S + INTERVAL_S + 2, f"a silent connection was given up after {took:.1f} s"
    finally:
        proxy.restore()
        await session.close()
        await proxy.stop()
