"""Queue counts stay exact when a counter update's connection dies after the update was applied.

A counter increment is not idempotent. Before, the driver's default retry policy re-sent it on
another connection when its connection failed under it, and a flush that failed kept its deltas
for the next flush: either way an update that Cassandra had applied was applied a second time,
and ``stats`` drifted up after every node failure. Reproduced on the real server with a proxy
that forwards the update and swallows its reply, then drops the connection.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from bridge.config import Settings
from bridge.domain.counting import DAY_MS, QueueCounts
from bridge.domain.records import QueueKey
from bridge.storage.repository import CassandraTaskStore
from bridge.storage.schema import create_schema
from bridge.storage.session import open_session
from tests.conftest import wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TTL_S = 7 * 86_400


async def test_a_counter_update_applied_but_unanswered_is_not_applied_again(servers: Any) -> None:
    proxy = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    settings = Settings(
        cassandra_hosts=["127.0.0.1"],
        cassandra_port=proxy.port,
        cassandra_keyspace=servers.keyspace,
        cassandra_timeout=20.0,  # the cut below, not a client timeout, must end the request
        keyring=None,
        key_server_url=None,
    )
    # The configured driver (BRIDGE_CASSANDRA_DRIVER): each must leave a non-idempotent statement alone.
    via_proxy, direct = (
        open_session(settings),
        open_session(
            settings.model_copy(
                update={"cassandra_hosts": servers.cassandra_hosts, "cassandra_port": servers.cassandra_port}
            )
        ),
    )
    await direct.connect()
    await create_schema(direct, settings)  # the run's keyspace (a bridge creates it; none runs here)
    await via_proxy.connect()
    try:
        store = CassandraTaskStore(via_proxy, lambda: 0, TTL_S)
        truth = CassandraTaskStore(direct, lambda: 0, TTL_S)
        await store.prepare()
        await truth.prepare()
        q = QueueKey("worker-a", f"svc-{uuid.uuid4().hex[:10]}")
        day = 20_000
        counts = QueueCounts()
        counts.move(q, day * DAY_MS, ready=1)

        proxy.mute()  # the update reaches Cassandra; its reply does not come back
        flushing = asyncio.create_task(counts.flush(store))

        async def applied() -> bool:
            return await truth.counts(q, day) == (1, 0)

        await wait_for(applied, 10, what="the counter update applied by Cassandra")
        proxy.cut()  # the connection dies with the update in flight (and nothing else to try)
        await wait_for(lambda: flushing.done(), 15, what="the flush to give up on the update")
        assert flushing.result() == 1, "reported as an update that may or may not have applied"
        proxy.restore()

        async def flushed_again() -> bool:
            try:
                await counts.flush(store)  # whatever it kept, written now that Cassandra answers
            except Exception:
                return False
            return counts.pending == 0

        await wait_for(flushed_again, 20, interval=0.5, what="a flush through the restored connection")
        assert await truth.counts(q, day) == (1, 0), "the increment was applied once, and only once"
    finally:
        await proxy.stop()
        await via_proxy.close()
        await direct.close()
