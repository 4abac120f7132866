"""Task lifetime (TTL) and behaviour while Cassandra or the key server is unreachable."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.client import Engine, UnavailableError, Worker
from tests.conftest import ENGINE_USER, OWNERS, service_id, settings_from, wait_for
from tests.faults import TcpProxy
from tests.keyserver import KeyServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_tasks_expire_after_the_ttl_acked_or_not(make_bridge, engine, workers, cql, servers):
    await make_bridge(task_ttl=3)
    svc = service_id()
    await engine.add(svc, "leased")
    await engine.add(svc, "waiting")
    w = await workers(svc)
    assert (await w.fetch()).value == "leased"
    ks = servers.keyspace

    def rows(table: str) -> list:
        return [
            r
            for r in cql.execute(f"SELECT owner, service FROM {ks}.{table}")
            if r["owner"] == OWNERS[0] and r["service"] == svc
        ]

    assert rows("ready") and rows("leases") and rows("workers")
    await wait_for(
        lambda: not rows("ready") and not rows("leases") and not rows("workers"),
        15,
        interval=0.5,
        what="TTL expiry of every row of the task",
    )
    assert await w.fetch() is None
    assert await w.ack("too late") is False


@pytest.fixture
async def cassandra_proxy(servers):
    proxy = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    yield proxy
    await proxy.stop()


async def test_cassandra_outage_rpcs_get_unavailable_and_adds_are_not_lost(
    bridge_env, cassandra_proxy, servers, names, workers
):
    from bridge.app import Bridge

    settings = settings_from(bridge_env, cassandra_port=cassandra_proxy.port, cassandra_timeout=1.0)
    b = Bridge(settings)
    await b.start()
    try:
        svc = service_id()
        async with Engine(
            servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60
        ) as engine:
            await engine.add(svc, "before")
            w = await workers(svc, timeout=30)
            cassandra_proxy.cut()
            with pytest.raises(UnavailableError):
                await w.fetch()
            # An add during the outage is held and retried by the bridge, not lost.
            pending = asyncio.create_task(engine.add(svc, "during"))
            await asyncio.sleep(1.5)
            assert not pending.done()
            cassandra_proxy.restore()
            during_id = await asyncio.wait_for(pending, 45)
            got = []
            while True:
                task = await wait_for(w.fetch, 30, interval=0.2, what="fetch after restore")
                got.append(task.value)
                assert await task.ack(None)
                if len(got) == 2:
                    break
            assert got == ["before", "during"]
            assert uuid.UUID(during_id)
    finally:
        await b.stop()


async def test_key_server_outage(bridge_env, servers, names, workers):
    from bridge.app import Bridge

    async with KeyServer() as keys:
        keys.add_owner(OWNERS[0])
        env = {k: v for k, v in bridge_env.items() if k != "BRIDGE_KEYRING"}
        settings = settings_from(env, key_server_url=keys.url, key_cache_seconds=0.2)
        b = Bridge(settings)
        await b.start()
        try:
            svc = service_id()
            async with Engine(
                servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=60
            ) as engine:
                await engine.add(svc, "sealed with the key server's key")
                w: Worker = await workers(svc)
                await asyncio.sleep(0.3)  # let the cached key age out
                keys.fail = True
                with pytest.raises(UnavailableError):
                    await w.fetch()
                pending = asyncio.create_task(engine.add(svc, "added while keys are down"))
                await asyncio.sleep(1.0)
                assert not pending.done()
                keys.fail = False
                await asyncio.wait_for(pending, 30)
                first = await w.fetch()
                assert first.value == "sealed with the key server's key"
                await first.ack(None)
                assert (await w.fetch()).value == "added while keys are down"
        finally:
            await b.stop()
