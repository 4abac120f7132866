"""Operating the bridge: health and metrics over HTTP, graceful shutdown, surviving a broker restart."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
import uuid
from typing import Any

import aiohttp
import pytest

from bridge.client import Engine, RequestTimeout, TransportError, UnavailableError, Worker
from tests.conftest import ENGINE_USER, OWNERS, free_port, next_result, service_id, wait_bridges, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def http_get(port: int, path: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status, await resp.text()


async def test_health_and_metrics_of_a_running_bridge(make_bridge, engine, workers):
    b = await make_bridge(http_port=free_port(), http_host="127.0.0.1")
    port = b.http_port
    assert (await http_get(port, "/health/live"))[0] == 200
    status, body = await wait_for(lambda: _ready(port), 10, what="readiness")
    assert '"amqp": true' in body.replace('":true', '": true') or '"amqp":true' in body
    svc = service_id()
    await engine.add(svc, 1, token={"p": 1})
    w = await workers(svc)
    await (await w.fetch()).ack(2)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    status, text = await http_get(port, "/metrics")
    assert status == 200
    # A fleet with no duty holder runs no scheduler and no relay, and reports no lag: alerted on this.
    assert "queue_bridge_duty_held 1.0" in text
    for needle in (
        'queue_bridge_requests_total{method="add",outcome="ok"}',
        'queue_bridge_requests_total{method="fetch",outcome="ok"}',
        "queue_bridge_request_duration_seconds_bucket",
        "queue_bridge_tasks_added_total",
        "queue_bridge_tasks_completed_total",
        "queue_bridge_scheduler_lag_seconds",
    ):
        assert needle in text, needle
    # Readiness follows the AMQP consumers: paused (shutdown step one) means not ready.
    await b.transport.pause()
    status, body = await http_get(port, "/health/ready")
    assert status == 503
    assert (await http_get(port, "/health/live"))[0] == 200
    # Started stays said (the startup probe's): unready is not "restart me".
    assert (await http_get(port, "/health/started"))[0] == 200


async def _ready(port: int):
    status, body = await http_get(port, "/health/ready")
    return (status, body) if status == 200 else None


async def test_sigterm_finishes_in_flight_requests_and_loses_none(bridge_processes, servers, names):
    doomed = bridge_processes()
    survivor = bridge_processes()
    await wait_bridges(servers, names, 2)
    svc = service_id()
    total = 300
    timeouts = 0
    async with (
        Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"]) as engine,
        Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="w", exchange=names["exchange"], timeout=8) as w,
    ):
        adds = [asyncio.create_task(engine.add(svc, i, message_id=f"m{i}")) for i in range(total)]
        # SIGTERM once the bridges are answering, with most adds still in flight.
        await wait_for(lambda: any(a.done() for a in adds), 10, interval=0.01, what="the first add answered")
        assert sum(a.done() for a in adds) < total // 2, "the load finished before the SIGTERM"
        doomed.proc.send_signal(signal.SIGTERM)
        ids = await asyncio.gather(*adds)  # every add was answered: none lost in the shutdown
        rc = await asyncio.get_running_loop().run_in_executor(None, doomed.proc.wait, 30)
        assert rc == 0, "graceful shutdown exits 0"
        got = []
        while True:
            try:
                task = await w.fetch()
            except (RequestTimeout, UnavailableError):
                timeouts += 1
                continue
            if task is None:
                break
            got.append(task.value)
            assert await task.ack(None)
    assert len(set(ids)) == total
    assert sorted(got) == list(range(total))
    assert timeouts == 0
    assert survivor.alive()


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


async def _ack_until_answered(task: Any, stop: asyncio.Event, outage: dict[str, int]) -> bool:
    """An ack whose reply a broker restart lost may have completed the task: a worker sends it
    again (a retried ack of a completion answers true). Counted lost after one try, a task
    completed in Cassandra failed the restart test (1 run in 3)."""
    while not stop.is_set():
        try:
            return bool(await task.ack(None))
        except (TransportError, UnavailableError):
            outage["worker_errors"] += 1
            await asyncio.sleep(0.2)  # a worker's back-off while the broker is away
    return False


@pytest.mark.slow
@pytest.mark.exclusive
async def test_rabbitmq_restart_under_load_nothing_lost(bridge_processes, servers, names):
    """A broker restart with work in flight: adds being sent (the second half paced across the
    restart) and a worker fetching and acking throughout. Every task added is handed out and
    acked. (Before, the first half was confirmed before stop_app and the second started after
    await_startup: nothing was in flight, and the worker only fetched once the broker was back.)"""
    port = free_port()
    bridge_processes(BRIDGE_HTTP_PORT=str(port), BRIDGE_HTTP_HOST="127.0.0.1")
    await wait_bridges(servers, names, 1)
    await wait_for(lambda: _ready(port), 20, what="bridge ready")
    svc = service_id()
    half = 100
    restarted = asyncio.Event()
    outage = {"adds_retried": 0, "worker_errors": 0}
    done: set[int] = set()
    stop_fetching = asyncio.Event()
    loop = asyncio.get_running_loop()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=5) as engine:

        async def add(i: int) -> str:
            while True:  # an engine retries with the same message_id until the add is confirmed
                try:
                    task_id = await engine.add(svc, i, message_id=f"r-{i}")
                except (TransportError, UnavailableError):  # broker gone (ConnectionLost) or no reply (RequestTimeout)
                    outage["adds_retried"] += 1
                    await asyncio.sleep(0.5)  # the engine's retry back-off, not a wait for a result
                    continue
                assert task_id is not None
                return task_id

        async def add_across_the_restart() -> list[str]:
            """One add after the other, at a pace, until the restart is over and ``half`` are in."""
            ids, i = [], half
            while not restarted.is_set() or i < 2 * half:
                ids.append(await add(i))
                i += 1
                await asyncio.sleep(0.02)  # the engine's pace: the adds span the restart
            return ids

        async def fetch_throughout() -> None:
            async with Worker(
                servers.amqp_url(OWNERS[0]),
                service=svc,
                worker_id=str(uuid.uuid4()),
                exchange=names["exchange"],
                timeout=5,
            ) as w:
                while not stop_fetching.is_set():
                    try:
                        task = await w.fetch(time_to_recover_ms=5_000)
                    except (TransportError, UnavailableError):  # its lease, if it held one, comes back
                        outage["worker_errors"] += 1
                        await asyncio.sleep(0.2)  # a worker's back-off while the broker is away
                        continue
                    if task is None:
                        await asyncio.sleep(0.05)  # a worker's polling pace on an empty queue
                        continue
                    if await _ack_until_answered(task, stop_fetching, outage):
                        done.add(task.value)

        first = await asyncio.gather(*(add(i) for i in range(half)))
        fetching = asyncio.create_task(fetch_throughout())
        second = asyncio.create_task(add_across_the_restart())  # under way before the broker stops
        try:
            await wait_for(lambda: done or None, 20, what="the worker acking before the restart")
            # rabbitmqctl in a thread: run in the loop, it held the adds and the worker still.
            await loop.run_in_executor(None, rabbitmqctl, "stop_app")
            await asyncio.sleep(1)  # the fault itself: the broker stays down for a second
            await loop.run_in_executor(None, rabbitmqctl, "start_app")
            await loop.run_in_executor(None, rabbitmqctl, "await_startup")
            restarted.set()
            ids = first + await asyncio.wait_for(second, 90)
            await wait_for(lambda: _ready(port), 60, what="bridge ready again after the broker restart")
            added = half + len(ids) - len(first)
            assert len(set(ids)) == added, "an add retried across the restart stored a second task"
            await wait_for(lambda: done >= set(range(added)), 45, what="every task added acked")
        finally:
            restarted.set()
            stop_fetching.set()
            await asyncio.wait_for(fetching, 30)
            second.cancel()
    assert done == set(range(added)), f"lost: {sorted(set(range(added)) - done)[:10]}"
    assert outage["adds_retried"] + outage["worker_errors"] > 0, f"nothing was in flight during the restart: {outage}"


async def test_result_nobody_can_take_stays_pending_until_a_queue_is_bound(
    make_bridge, engine, workers, servers, names
):
    """Publishing is mandatory + confirmed: with no queue bound, the result is not confirmed into the
    void; it stays in the outbox (and in the results_pending gauge) until someone can take it."""
    from bridge.client.rpc import results_consumer

    b = await make_bridge(results_queue="", result_republish_after=1.0, http_port=free_port(), http_host="127.0.0.1")
    svc = service_id()
    await engine.add(svc, "v", token={"p": "waiting"})
    w = await workers(svc)
    assert await (await w.fetch()).ack("the result")

    async def pending() -> bool:
        _, text = await http_get(b.http_port, "/metrics")
        line = next(ln for ln in text.splitlines() if ln.startswith("queue_bridge_results_pending "))
        return float(line.split()[1]) >= 1

    await wait_for(pending, 30, interval=0.5, what="the result to be reported pending")
    async with results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"]) as results:

        def ours() -> dict[str, object] | None:
            # The session's keyspace is shared: as the relay, this bridge also sends results that
            # earlier tests' bridges left owed, to this test's exchange. Ours carries our token.
            while not results.empty():
                if (msg := results.get_nowait()).get("token") == {"p": "waiting"}:
                    return msg
            return None

        msg = await wait_for(ours, 30, interval=0.2, what="the re-published result")
        assert msg["result"] == "the result"


# Alone, after the parallel pass: a new keyspace's DDL (created, altered, dropped) reaches every
# session of the node (each driver refreshes its schema metadata) and slows the suite's other tests,
# and under the suite these took 33-50 s of the 60 s per-test timeout (one ran out, locally).
@pytest.mark.exclusive
async def test_bridges_starting_together_migrate_the_schema_once(servers):
    """A fleet starts together: bridges racing to add the same new column must all start (one of
    two processes in a CI fault drill died of "Column ... already exists")."""
    import uuid as _uuid

    from bridge.config import Settings
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.schema import ADDED_COLUMNS, create_schema

    keyspace = f"qb_race_{_uuid.uuid4().hex[:8]}"
    settings = Settings(
        cassandra_hosts=servers.cassandra_hosts, cassandra_port=servers.cassandra_port, cassandra_keyspace=keyspace
    )
    db = CassandraSession(settings)
    await db.connect()
    try:
        await create_schema(db, settings)
        # Back to a release without the added columns, then several bridges upgrade it at once.
        for table, column, _ in ADDED_COLUMNS:
            await db.execute_raw(f"ALTER TABLE {{ks}}.{table} DROP {column}")
        await asyncio.gather(*(create_schema(db, settings) for _ in range(4)))
        for table, column, _ in ADDED_COLUMNS:
            rows = await db.execute_raw(
                f"SELECT column_name FROM system_schema.columns WHERE keyspace_name = '{keyspace}' "
                f"AND table_name = '{table}' AND column_name = '{column}'"
            )
            assert rows, f"{table}.{column} missing"
    finally:
        await db.execute_raw(f"DROP KEYSPACE IF EXISTS {keyspace}")
        await db.close()


# Alone, after the parallel pass: a new keyspace's DDL (created, altered, dropped) reaches every
# session of the node (each driver refreshes its schema metadata) and slows the suite's other tests,
# and under the suite these took 33-50 s of the 60 s per-test timeout (one ran out, locally).
@pytest.mark.exclusive
async def test_bridges_starting_together_on_a_new_keyspace_can_all_prepare(servers):
    """Each bridge's statements are prepared right after its own migration: one of two bridges
    started together on a new keyspace died preparing them ("Undefined column name error_ct"):
    the other bridge's ALTER was listed, or refused its own as existing, before the node served
    the column. Separate driver sessions, as separate processes have."""
    import uuid as _uuid

    from bridge.config import Settings
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.repository import CassandraTaskStore
    from bridge.storage.schema import ADDED_COLUMNS, create_schema

    settings = Settings(
        cassandra_hosts=servers.cassandra_hosts,
        cassandra_port=servers.cassandra_port,
        cassandra_keyspace=f"qb_race_{_uuid.uuid4().hex[:8]}",
    )
    dbs = [CassandraSession(settings) for _ in range(3)]
    await asyncio.gather(*(db.connect() for db in dbs))
    try:
        await create_schema(dbs[0], settings)
        for _ in range(3):  # the window is narrow: a few upgrades, each from scratch
            for table, column, _ in ADDED_COLUMNS:
                await dbs[0].execute_raw(f"ALTER TABLE {{ks}}.{table} DROP {column}")

            async def start(db: CassandraSession) -> None:
                await create_schema(db, settings)
                await CassandraTaskStore(db, lambda: 0, 3600).prepare()

            await asyncio.gather(*(start(db) for db in dbs))
    finally:
        await dbs[0].execute_raw(f"DROP KEYSPACE IF EXISTS {settings.cassandra_keyspace}")
        await asyncio.gather(*(db.close() for db in dbs))


async def test_a_park_by_a_bridge_without_park_ids_still_has_its_result_sent(
    make_bridge, engine, workers, servers, names, cql
):
    """A rolling upgrade: a task parked by a bridge of the release before ``leases.park_ids``
    (which writes ``park_id`` alone) whose delivery_limit result is still owed when an operator
    discards it (the discard's completion id replaces the park's). The relay of a bridge that
    knows ``park_ids`` still finds the park by ``park_id`` and sends its result."""
    from bridge.client.rpc import results_consumer
    from bridge.domain.records import QueueKey

    b = await make_bridge(results_queue="", result_republish_after=1.0)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    svc = service_id()
    reply = await engine.call(
        "add", {"serviceId": svc, "value": "poison", "token": {"wf": 3}, "maxDeliveries": 1}, owner=OWNERS[0]
    )
    task_id = str(reply["task"]["id"])
    w = await workers(svc, "w")
    task = await w.fetch()
    assert task is not None and task.id == task_id
    failed = await w.call("fail", {"serviceId": svc, "workerId": "w", "taskId": task_id, "epoch": task.epoch})
    assert failed["task"]["parked"] is True
    # The lease as the older bridge's park left it: its id in park_id, none in park_ids.
    key = (OWNERS[0], svc, uuid.UUID(task_id))
    cql.execute(
        f"DELETE park_ids FROM {servers.keyspace}.leases WHERE owner = %s AND service = %s AND task_id = %s", key
    )
    lease = await b.queue.ctx.store.lease(QueueKey(*key[:2]), key[2], serial=True)
    assert lease.park_ids == frozenset() and lease.park_id is not None
    assert await engine.discard(svc, [task_id]) == 1
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        got = await next_result(results, 30, "the park's delivery_limit result (taken for a park never applied)")
    assert got["taskId"] == task_id and got["error"]["code"] == "delivery_limit"
    assert got["_message_id"] == f"{task_id}:{lease.park_id}"


async def test_results_reach_the_results_queue_after_the_results_exchange_was_recreated(
    make_bridge, engine, workers, servers, names
):
    """The results exchange deleted under a running bridge (an operator's mistake, a broker
    definitions import): the first publish closes the results channel, which the robust channel
    reopens, declaring the exchange again, but the results queue's binding was made on another
    channel, so every result stayed unroutable and pending until a restart. The queue is now
    declared and bound on the results channel, and restored with it."""
    import aio_pika
    import orjson

    await make_bridge(result_republish_after=1)
    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        await ch.exchange_delete(names["results_exchange"])
        q = await ch.declare_queue(names["queue_prefix"] + ".results", passive=True)
        svc = service_id()
        task_id = await engine.add(svc, "v", token={"wf": 1})
        w = await workers(svc, "w")
        task = await w.fetch()
        assert task is not None and await task.ack("done") is True
        got: list[dict[str, Any]] = []

        async def arrived() -> bool:
            message = await q.get(fail=False, no_ack=True)
            if message is not None:
                got.append(orjson.loads(message.body))
            return any(r.get("taskId") == task_id for r in got)

        await wait_for(arrived, 20, interval=0.2, what="the result in the engine's results queue")
    finally:
        await conn.close()


async def test_a_stop_while_cassandra_stalls_ends_within_its_grace(make_bridge, engine, workers):
    """Each waiting step of a stop was given the whole ``BRIDGE_SHUTDOWN_GRACE``, and the last
    flush of the queue counts none at all: a statement per queue, each waiting on a stalled
    Cassandra. A stop then took several times its grace, or for ever, past a pod's termination
    grace (SIGKILL mid-stop). The steps now share one deadline."""
    b = await make_bridge(shutdown_grace=2.0)
    svc = service_id()
    await engine.add(svc, "counted")  # a queue-count delta to flush
    stalled = asyncio.Event()

    async def flush(_store: Any) -> int:
        stalled.set()
        await asyncio.Event().wait()  # Cassandra does not answer
        return 0

    b.counts.flush = flush  # type: ignore[method-assign]
    await wait_for(stalled.is_set, 5, what="a flush under way")
    started = time.monotonic()
    await asyncio.wait_for(make_bridge.stop(b), 30)
    took = time.monotonic() - started
    assert took < 2.0 + 3.0, f"the stop took {took:.1f}s with a 2 s grace"


@pytest.mark.parametrize("down", ["cassandra", "rabbitmq"])
async def test_a_bridge_started_while_a_dependency_is_down_waits_for_it(
    bridge_env, servers, engine, workers, caplog, down
):
    """A sidecar started (or restarted) during a Cassandra or RabbitMQ outage exited with code 1,
    and Kubernetes' restart backoff (up to 5 minutes) kept its pod down long after the dependency
    was back. With ``BRIDGE_START_TIMEOUT`` it keeps trying, liveness answering meanwhile."""
    import logging

    from bridge.app import Bridge
    from tests.conftest import BRIDGE_USER, settings_from
    from tests.faults import TcpProxy

    overrides: dict[str, Any]
    if down == "cassandra":
        proxy = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
        overrides = {"cassandra_hosts": ["127.0.0.1"], "cassandra_port": proxy.port}
    else:
        proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
        overrides = {"amqp_url": f"amqp://{BRIDGE_USER}:{BRIDGE_USER}@127.0.0.1:{proxy.port}/"}
    proxy.cut()  # the dependency cannot be reached
    caplog.set_level(logging.WARNING, logger="bridge.app")
    b = Bridge(settings_from(bridge_env, start_timeout=60, **overrides))
    starting = asyncio.create_task(b.start())
    try:
        await wait_for(lambda: "cannot be reached at start" in caplog.text or starting.done(), 30, what="a try")
        assert not starting.done(), "it exited instead of waiting"
        proxy.restore()
        await asyncio.wait_for(starting, 40)
        svc = service_id()
        await engine.add(svc, "served once it was back")
        w = await workers(svc)
        task = await wait_for(lambda: w.fetch(), 15, interval=0.2, what="the task served")
        assert task.value == "served once it was back"
        assert await task.ack("done") is True
        # A channel error after such a start: the bridge consumes again. (The failed start's
        # close() left the transport closing, and no channel was ever reopened.)
        channel = b.transport._channel_named("consume")
        closed: list[object] = []
        channel.close_callbacks.add(lambda *args: closed.append(args))
        frames = await channel.get_underlay_channel()
        await frames.basic_ack(delivery_tag=2**40)  # an unknown delivery tag: the broker closes the channel
        await wait_for(lambda: closed, 10, what="the channel closed by the broker")
        await wait_for(b.transport.is_ready, 30, what="consuming again after the channel error")
        await engine.add(svc, "after the channel error")
        again = await wait_for(lambda: w.fetch(), 15, interval=0.2, what="the next task served")
        assert again.value == "after the channel error"
    finally:
        if not starting.done():
            starting.cancel()
        with contextlib.suppress(Exception):
            await b.stop()
        await proxy.stop()


async def test_sigterm_while_waiting_for_a_dependency_at_start_exits_at_once(bridge_processes):
    """SIGTERM while a bridge waits for Cassandra at start (BRIDGE_START_TIMEOUT): it exits 0 at
    once, not after its start timeout."""
    p = bridge_processes(BRIDGE_CASSANDRA_PORT="1", BRIDGE_START_TIMEOUT="120", BRIDGE_HTTP_PORT="0")
    await wait_for(lambda: "cannot be reached at start" in p.log_path.read_text(), 60, what="a try at start")
    started = time.monotonic()
    assert await asyncio.to_thread(p.terminate, 15) == 0
    assert time.monotonic() - started < 5
