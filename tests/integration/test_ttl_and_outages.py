"""Task lifetime (TTL) and behaviour while Cassandra or the key server is unreachable."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.client import Engine, UnavailableError, Worker
from bridge.serving import ALL as ALL_QUEUES  # every queue a bridge consumes when serving
from tests.conftest import ENGINE_USER, OWNERS, messages_ready, service_id, settings_from, wait_for
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
    assert await w.ack("too late", held=True) is False


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
            before_id = await engine.add(svc, "before")
            w = await workers(svc, timeout=30)
            cassandra_proxy.cut()
            # The bridge notices and stops consuming: requests wait in RabbitMQ for a bridge that
            # can serve them (here, this one once Cassandra is back).
            await wait_for(lambda: not b.transport.consuming(), 10, what="consumers paused")
            assert b.metrics.paused.labels("fetch")._value.get() == 1
            # An add during the outage is kept, not lost.
            pending = asyncio.create_task(engine.add(svc, "during"))
            add_queue = f"{names['queue_prefix']}.add"
            await wait_for(
                lambda: messages_ready(servers.amqp_url("guest"), add_queue), 10, what="the add waiting in RabbitMQ"
            )
            assert not pending.done()
            cassandra_proxy.restore()
            during_id = await asyncio.wait_for(pending, 45)
            got = []
            while True:
                task = await wait_for(w.fetch, 30, interval=0.2, what="fetch after restore")
                got.append((task.id, task.value))
                assert await task.ack(None)
                if len(got) == 2:
                    break
            assert got == [(before_id, "before"), (during_id, "during")]
    finally:
        await b.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("driver", ["acsylla", "datastax"])
async def test_a_dropped_keyspace_is_an_outage_and_dead_letters_no_add(
    make_bridge, cql, servers, names, workers, driver
):
    """`DROP KEYSPACE` run by mistake: every statement was refused as invalid CQL (``internal``), so
    every add was dead-lettered (a bounded queue: past 100,000, lost) until the schema was back.
    A missing keyspace or table is an outage now: adds wait and are stored once it is restored
    (found by review, 2026-12-07; cassandra-driver's adapter dead-lettered them, acsylla's C++
    driver reports the keyspace's loss as no host available)."""
    from tests.conftest import create_schema_now

    ks = f"qb_drop_{uuid.uuid4().hex[:8]}"
    b = await make_bridge(cassandra_keyspace=ks, cassandra_driver=driver)
    svc = service_id()
    async with Engine(
        servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=120
    ) as engine:
        before = await engine.add(svc, "before")
        cql.execute(f"DROP KEYSPACE {ks}", timeout=120)
        pending = asyncio.gather(*(engine.add(svc, i) for i in range(5)))
        try:
            # A negative check, so a fixed wait: adds tried against the missing keyspace meanwhile.
            await asyncio.sleep(3.0)
            dead_letter = f"{names['queue_prefix']}.dead-letter"
            assert await messages_ready(servers.amqp_url("guest"), dead_letter) == 0, "adds dead-lettered"
            assert not pending.done()
            create_schema_now(b.settings)  # restored (without its rows: the task added before is gone)
            ids = await asyncio.wait_for(pending, 120)
        finally:
            pending.cancel()
    assert before not in ids and len(set(ids)) == 5
    w = await workers(svc, timeout=30)
    values = []
    for _ in range(6):  # the five, and the one added before if its hint still carries it
        got = await w.fetch()
        if got is None:
            break
        values.append(got.value)
        assert await got.ack(None)
    assert set(range(5)) <= set(values), values
    cql.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=120)


async def test_an_unready_bridge_stops_consuming_so_the_others_serve(
    bridge, bridge_env, cassandra_proxy, engine, workers
):
    """Issue 13.10: a bridge cut off from Cassandra kept taking requests and answering `unavailable`
    (508 errors) while healthy bridges sat idle; and came back only 16 s after a 10 s cut."""
    import time

    from bridge.app import Bridge

    cut_off = Bridge(settings_from(bridge_env, cassandra_port=cassandra_proxy.port, cassandra_timeout=1.0))
    await cut_off.start()
    try:
        svc = service_id()
        for i in range(40):
            await engine.add(svc, i)
        cassandra_proxy.cut()
        await wait_for(lambda: not cut_off.transport.consuming(), 10, what="the cut-off bridge paused")
        w = await workers(svc)
        for _ in range(40):  # every request served by the healthy bridge: no `unavailable`
            task = await w.fetch()
            assert await task.ack("ok") is True
        restored = time.monotonic()
        cassandra_proxy.restore()
        await wait_for(lambda: cut_off.transport.consuming() == ALL_QUEUES, 10, what="consuming again")
        assert time.monotonic() - restored < 5.0, "reconnects within a few seconds"
    finally:
        await cut_off.stop()


@contextlib.asynccontextmanager
async def _on_a_key_server(
    bridge_env: dict[str, str], servers: Any, names: dict[str, str], owners: tuple[str, ...], **settings: Any
) -> AsyncIterator[tuple[Any, KeyServer, Engine]]:
    """A bridge whose keys come from a test key server knowing ``owners``, and an engine of the
    first owner: (the bridge, the key server, the engine)."""
    from bridge.app import Bridge

    async with KeyServer() as keys:
        for owner in owners:
            keys.add_owner(owner)
        env = {k: v for k, v in bridge_env.items() if k != "BRIDGE_KEYRING"}
        b = Bridge(settings_from(env, key_server_url=keys.url, **settings))
        await b.start()
        try:
            async with Engine(
                servers.amqp_url(ENGINE_USER), owner=owners[0], exchange=names["exchange"], timeout=60
            ) as engine:
                yield b, keys, engine
        finally:
            await b.stop()


async def test_key_server_outage(bridge_env, servers, names, workers):
    async with _on_a_key_server(bridge_env, servers, names, (OWNERS[0],), key_cache_seconds=0.2) as (b, keys, engine):
        svc = service_id()
        await engine.add(svc, "sealed with the key server's key")
        w: Worker = await workers(svc)
        b.keys.invalidate()  # what the cache's 0.2 s max age does, without waiting for it
        keys.fail = True
        with pytest.raises(UnavailableError):
            await w.fetch()
        pending = asyncio.create_task(engine.add(svc, "added while keys are down"))
        # A negative check, so a fixed wait: nothing to observe but the add not answered.
        await asyncio.sleep(1.0)
        assert not pending.done()
        keys.fail = False
        await asyncio.wait_for(pending, 30)
        first = await w.fetch()
        assert first.value == "sealed with the key server's key"
        await first.ack(None)
        assert (await w.fetch()).value == "added while keys are down"


async def test_a_key_server_away_longer_than_the_key_cache_leaves_known_owners_working(
    bridge_env, servers, names, workers
):
    """A key server away longer than the cache's age refused every request naming an owner, those
    that seal nothing too: a worker's extends and acks were `unavailable`, its lease ran out and the
    finished work was done again. The cached keys are served past their age while the server cannot
    answer (BRIDGE_KEY_STALE_IF_ERROR_SECONDS) (found by review, 2026-12-07)."""
    async with _on_a_key_server(bridge_env, servers, names, (OWNERS[0],), key_cache_seconds=0.3) as (b, keys, engine):
        svc = service_id()
        await engine.add(svc, "held through the outage")
        await engine.add(svc, "next")
        w: Worker = await workers(svc)
        held = await w.fetch()
        assert held.value == "held through the outage"
        keys.fail = True
        # The cache's age (0.3 s) running out is the condition under test: nothing to wait on.
        await asyncio.sleep(0.5)
        assert await held.extend(30_000) is True
        assert await held.ack("done") is True
        await engine.add(svc, "added during the outage")
        nxt = await w.fetch()
        assert nxt.value == "next"
        assert await nxt.ack(None) is True
        last = await w.fetch()
        assert last.value == "added during the outage"
        assert b.keys.stale >= 3


async def test_a_key_server_that_hangs_costs_known_owners_one_wait_not_one_per_retry(
    bridge_env, servers, names, workers
):
    """A key server that accepts connections and never answers (a hung KMS behind it): once a
    cached key had been served stale, every retry of the lookup (as each backoff ended, every
    0.2-5 s) made the request that started it, and every request of that owner joining it, wait
    the lookup's timeout (2 s) before the stale key was served. Now the key is served stale at once
    while the lookup is retried in the background; the first request of the outage still waits
    once (found by review, 2026-12-07; fixed 2026-12-07)."""
    timeout = 2.0
    async with _on_a_key_server(
        bridge_env, servers, names, (OWNERS[0],), key_cache_seconds=0.3, key_server_timeout=timeout
    ) as (b, keys, _):
        w: Worker = await workers(service_id())
        assert await w.fetch() is None  # its owner's key cached
        keys.slow_owners[OWNERS[0]] = 10.0
        try:
            await asyncio.sleep(0.5)  # past the cache's age (0.3 s): the condition under test
            assert await w.fetch() is None  # the outage's first request: waits the timeout once
            assert b.keys.stale == 1
            slowest, until = 0.0, time.monotonic() + 3 * timeout
            while time.monotonic() < until:  # several backoff windows end in this span
                started = time.monotonic()
                assert await w.fetch() is None
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < timeout / 2, f"a request waited {slowest:.2f} s on the hung key server"
            assert b.keys.stale > 2
        finally:
            keys.slow_owners.clear()

        # Back: the background lookup stores a fresh key, and requests stop being served stale.
        async def served_fresh() -> bool:
            before = b.keys.stale
            assert await w.fetch() is None
            return b.keys.stale == before

        await wait_for(served_fresh, 15, what="the key refreshed once the server answers")


async def test_an_owner_the_key_server_refuses_is_not_served_a_cached_key(bridge_env, servers, names, workers):
    """A tenant suspended by disabling its key: the key server answers 403 for that owner only.
    A refusal is an answer, and a cached key must not mask it past the cache's age (found by the
    re-review of the stale-if-error fix, 2026-12-07)."""
    everyone = (*OWNERS, ENGINE_USER, "guest")
    async with _on_a_key_server(bridge_env, servers, names, everyone, key_cache_seconds=0.3) as (b, keys, _):
        suspended = await workers(service_id(), "suspended", user=OWNERS[1])
        assert await suspended.fetch() is None  # its key cached
        keys.failing_owners[OWNERS[1]] = 403
        await asyncio.sleep(0.5)  # past the cache's age (0.3 s): the condition under test
        with pytest.raises(UnavailableError):
            await suspended.fetch()
        assert b.keys.stale == 0


async def test_an_owner_a_restarting_key_server_does_not_know_yet_is_an_outage_not_an_unknown_owner(
    bridge_env, servers, names, workers
):
    """A key server restarting answers 404 unknown_owner until its store is loaded: an owner it
    served within the stale window is `unavailable` (retried), not `unknown_owner` (an add
    dead-lettered, a worker's run ended) (found by review, 2026-12-07)."""
    async with _on_a_key_server(bridge_env, servers, names, (OWNERS[0],), key_cache_seconds=0.3) as (_, keys, engine):
        svc = service_id()
        await engine.add(svc, "before the restart")
        w: Worker = await workers(svc)
        assert await (await w.fetch()).ack(None) is True
        keys.forgotten.add(OWNERS[0])
        await asyncio.sleep(0.5)  # past the cache's age (0.3 s): the condition under test
        with pytest.raises(UnavailableError):
            await w.fetch()
        pending = asyncio.create_task(engine.add(svc, "added while it restarts"))
        # A negative check, so a fixed wait: nothing to observe but the add not answered.
        await asyncio.sleep(1.0)
        assert not pending.done()
        keys.forgotten.clear()
        await asyncio.wait_for(pending, 30)
        assert (await w.fetch()).value == "added while it restarts"


async def test_a_missing_key_is_an_outage_and_destroys_nothing(make_bridge, engine, workers, tmp_path, cql, servers):
    """Issue 13.5: a key lookup failure (key server 404 while restarting, a key-ring edit that drops
    a key) used to mark the task dead for good. Now: `unavailable`, and delivered once the key is back."""
    import json

    from bridge.client import UnavailableError
    from bridge.client.errors import UnknownOwnerError
    from bridge.crypto import generate_keyring, write_keyring

    path = tmp_path / "keyring.json"
    doc = generate_keyring([*OWNERS, ENGINE_USER])
    write_keyring(path, doc)
    b = await make_bridge(keyring=str(path))
    svc = service_id()
    task_id = await engine.add(svc, "sealed with worker-a's key")
    ring = b.keys.upstream
    # The owner loses its whole key-ring entry: fetch says so (unknown_owner, issue 10) before it
    # touches anything; the task is not even leased.
    without_owner = json.loads(path.read_text())
    del without_owner["owners"][OWNERS[0]]
    write_keyring(path, without_owner)
    assert ring.maybe_reload(force=True)
    b.keys.invalidate()  # what the cache's max age does, without waiting for it
    w = await workers(svc)
    with pytest.raises(UnknownOwnerError):
        await w.fetch(time_to_recover_ms=300)
    lease = cql.execute(
        f"SELECT state FROM {servers.keyspace}.leases WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()
    assert lease is None, "nothing was claimed for an owner without a key"
    # A key-ring edit that drops the key the task was sealed with (the owner has another one now).
    without_key = json.loads(path.read_text())
    without_key["owners"][OWNERS[0]] = generate_keyring([OWNERS[0]])["owners"][OWNERS[0]]
    write_keyring(path, without_key)
    assert ring.maybe_reload(force=True)
    b.keys.invalidate()
    with pytest.raises(UnavailableError, match="key"):
        await w.fetch(time_to_recover_ms=300)
    assert await w.fetch() is None  # the worker is not stuck on it: it moves on (nothing else here)
    row = cql.execute(
        f"SELECT state FROM {servers.keyspace}.leases WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()
    assert row["state"] == "leased", "the task was destroyed"
    write_keyring(path, doc)  # the key is back
    assert ring.maybe_reload(force=True)
    task = await wait_for(lambda: w.fetch(time_to_recover_ms=5000), 10, what="the task delivered again")
    assert task.id == task_id and task.value == "sealed with worker-a's key"
    assert await task.ack("ok") is True


async def test_a_key_ring_file_replaced_by_a_broken_one_is_reported_until_it_is_fixed(
    make_bridge, workers, tmp_path, servers
):
    """A key-ring edit with a syntax error: the bridge keeps the keys it has (one warning), and
    nothing else said so, until a restart failed hours later (a crash loop). The gauge
    `queue_bridge_keyring_file_rejected` is 1 while the file on disk is not the one in use (found
    by review, 2026-12-07)."""
    from bridge.crypto import generate_keyring, write_keyring
    from tests.conftest import free_port, metric

    path = tmp_path / "keyring.json"
    doc = generate_keyring([*OWNERS, ENGINE_USER])
    write_keyring(path, doc)
    port = free_port()
    await make_bridge(keyring=str(path), http_port=port)
    rejected = "queue_bridge_keyring_file_rejected"
    assert await metric(port, rejected) == 0
    w: Worker = await workers(service_id())
    path.write_text(path.read_text() + ",")  # a trailing comma: not JSON any more

    async def reported(value: int) -> bool:
        assert await w.fetch() is None  # a lookup: the file is checked (once a second) on use
        return await metric(port, rejected) == value

    await wait_for(lambda: reported(1), 10, interval=0.3, what="the broken file reported")
    write_keyring(path, doc)
    await wait_for(lambda: reported(0), 10, interval=0.3, what="the fixed file loaded")
