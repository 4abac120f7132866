"""Encryption at rest, tampering, owner isolation and the identity rules, on the real servers."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest

from bridge.client import Engine, UnauthorizedError, Worker
from bridge.client.errors import BridgeClientError, UnknownOwnerError
from tests.conftest import ENGINE_USER, OWNERS, next_result, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

SECRET = "canary-7f3a9c-plaintext-must-never-be-stored"


LANES = tuple(range(16))  # lane 0 (re-exposed), lane 1 (fresh) and the priority lanes after it


def ready_rows(cql, keyspace: str, owner: str, service: str) -> list[dict]:
    """One queue's rows of ``ready``, read partition by partition as the bridge finds them (through
    ``ready_buckets``). Never a scan of the table: the session's keyspace holds every earlier
    test's rows, 1 MiB values among them, and reading them all outlasted a test's 60 s (twice)."""
    buckets = cql.execute(
        f"SELECT lane, bucket FROM {keyspace}.ready_buckets WHERE owner = %s AND service = %s "
        f"AND lane IN ({', '.join(map(str, LANES))})",
        (owner, service),
    )
    rows: list[dict] = []
    for b in buckets:
        rows += cql.execute(
            f"SELECT * FROM {keyspace}.ready WHERE owner = %s AND service = %s AND lane = %s AND bucket = %s",
            (owner, service, b["lane"], b["bucket"]),
        )
    return rows


async def test_nothing_of_value_or_token_is_stored_in_clear(bridge, engine, workers, cql, servers):
    svc = service_id()
    await engine.add(svc, {"secret": SECRET}, token={"processId": SECRET})
    w = await workers(svc)
    task = await w.fetch()
    assert task.value == {"secret": SECRET}
    await task.ack({"echo": SECRET})
    ks = servers.keyspace
    checked = {}
    for table in ("ready", "leases", "workers", "outbox_shards", "expiry_shards", "idempotency"):
        # This test's rows only, filtered by Cassandra: the session's keyspace holds every earlier
        # test's rows (1 MiB values among them), and reading them all here outlasted the test's 60 s.
        rows = (
            ready_rows(cql, ks, OWNERS[0], svc)
            if table == "ready"
            else cql.execute(
                f"SELECT * FROM {ks}.{table} WHERE owner = %s AND service = %s ALLOW FILTERING", (OWNERS[0], svc)
            )
        )
        checked[table] = 0
        for row in rows:
            for value in row.values():
                blob = value if isinstance(value, bytes) else str(value).encode()
                assert SECRET.encode() not in blob, f"plaintext found in {table}"
            checked[table] += 1
    assert checked["ready"] and checked["leases"] and checked["workers"], checked
    ready = ready_rows(cql, ks, OWNERS[0], svc)
    assert ready and ready[0]["value_ct"] and ready[0]["key_id"]


def flip_stored_value(cql, ks: str, svc: str, task_id: str) -> None:
    """Tamper with a stored task: flip one bit of its value's ciphertext in `ready`."""
    row = next(r for r in ready_rows(cql, ks, OWNERS[0], svc) if str(r["seq"]) == task_id)
    flipped = bytes([row["value_ct"][0] ^ 0x01]) + row["value_ct"][1:]
    cql.execute(
        f"UPDATE {ks}.ready SET value_ct = %s WHERE owner = %s AND service = %s AND lane = 1 AND bucket = %s "
        "AND seq = %s",
        (flipped, row["owner"], row["service"], row["bucket"], row["seq"]),
    )


async def test_tampered_ciphertext_is_reported_and_dead_lettered_never_returned(bridge, engine, workers, cql, servers):
    svc = service_id()
    # Larger than a hint carries: the fetch reads the stored row (see the next test for small ones).
    bad_id = await engine.add(svc, {"n": 1, "pad": "x" * 9_000})
    await engine.add(svc, {"n": 2})
    ks = servers.keyspace
    flip_stored_value(cql, ks, svc, bad_id)
    w = await workers(svc)
    with pytest.raises(BridgeClientError) as err:
        await w.fetch()
    assert err.value.code == "integrity_error"
    assert bad_id in err.value.message
    lease = cql.execute(
        f"SELECT state FROM {ks}.leases WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(bad_id)),
    ).one()
    assert lease["state"] == "dead"
    nxt = await w.fetch()  # the queue goes on with the next task
    assert nxt.value == {"n": 2}


async def test_a_tampered_task_with_a_token_is_reported_to_its_engine(bridge, engine, workers, cql, servers, names):
    """A tampered task is dead-lettered and its worker moves on; its workflow waits for a result.
    Nothing was sent to the engine: the workflow waited for ever. It now gets an
    ``integrity_error`` result, once."""
    from bridge.client.rpc import results_consumer

    svc = service_id()
    bad_id = await engine.add(svc, {"n": 1, "pad": "x" * 9_000}, token={"wf": "tampered"})
    flip_stored_value(cql, servers.keyspace, svc, bad_id)
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        w = await workers(svc)
        with pytest.raises(BridgeClientError) as err:
            await w.fetch()
        assert err.value.code == "integrity_error"
        got = await next_result(results, 30, "the engine's integrity_error result of the dead-lettered task")
        assert got["taskId"] == bad_id and got["token"] == {"wf": "tampered"}, got
        assert got["error"]["code"] == "integrity_error", got
        assert await w.fetch() is None  # dead: never handed out again
        assert results.empty(), "one result"


async def test_a_tampered_task_met_while_the_key_server_stalls_is_still_reported_to_its_engine(
    make_bridge, engine, workers, cql, servers, names, monkeypatch
):
    """The engine's integrity_error is sealed with the owner's current key. When that lookup failed
    for a moment (the key server slow), the task was dead-lettered all the same with nothing
    written for the engine, and its workflow waited for ever. The fetch now answers unavailable
    before the kill, and the worker's retry dead-letters it with its result."""
    from bridge.client.errors import UnavailableError
    from bridge.client.rpc import results_consumer
    from bridge.domain.errors import KeysUnavailable

    b = await make_bridge()
    svc = service_id()
    bad_id = await engine.add(svc, {"n": 1, "pad": "x" * 9_000}, token={"wf": "stalled keys"})
    flip_stored_value(cql, servers.keyspace, svc, bad_id)
    keys = b.queue.ctx.keys
    real_current = keys.current
    calls = [0]

    async def current(owner: str) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # the second lookup of the fetch: the one that seals the engine's result
            raise KeysUnavailable("key provider unavailable: timed out (injected)")
        return await real_current(owner)

    monkeypatch.setattr(keys, "current", current)
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        w = await workers(svc)
        with pytest.raises(UnavailableError):
            await w.fetch()
        with pytest.raises(BridgeClientError) as err:
            await w.fetch()  # the retry: the task is dead-lettered now, with its result
        assert err.value.code == "integrity_error"
        got = await next_result(results, 30, "the engine's integrity_error result")
        assert got["taskId"] == bad_id and got["error"]["code"] == "integrity_error", got


@pytest.mark.timeout(120)
async def test_a_tampered_result_still_owed_reaches_the_engine_as_an_integrity_error(
    make_bridge, engine, workers, cql, servers, names
):
    """A result whose stored ciphertext fails authentication when the relay reads it (its own
    publish had failed: no queue bound yet) was dropped: marked published, never sent. The token
    still opens, so the engine now gets an ``integrity_error`` for its workflow.

    In a keyspace of its own: a duty holder relays every result of its keyspace, and in the shared
    one a test that leaves 600 results unroutable in the same seconds (test_background_isolation)
    put this one behind their pages (twice in CI, past 100 s)."""
    import uuid

    from bridge.client.rpc import results_consumer

    ks = f"qb_own_{uuid.uuid4().hex[:8]}"
    b = await make_bridge(results_queue="", result_republish_after=1.0, cassandra_keyspace=ks)
    try:
        await wait_for(lambda: b.duty.held, 10, what="the duty")
        svc = service_id()
        task_id = await engine.add(svc, {"n": 1}, token={"wf": "owed"})
        w = await workers(svc)
        task = await w.fetch()
        assert task is not None and task.id == task_id
        assert await task.ack({"secret": "result"}) is True

        def owed_rows() -> list[Any]:
            # Once its token is kept (its first publish failed): that write gives the result's
            # cells again, as the relay read them, and a flip before it was written over.
            return [
                r
                for r in cql.execute(f"SELECT * FROM {ks}.outbox_shards ALLOW FILTERING")
                if str(r["task_id"]) == task_id and not r["published"] and r["token_ct"] is not None
            ]

        [row] = await wait_for(owed_rows, 10, what="the owed result in the outbox, its token kept")
        flipped = bytes([row["result_ct"][0] ^ 0x01]) + row["result_ct"][1:]
        cql.execute(
            f"UPDATE {ks}.outbox_shards SET result_ct = %s WHERE bucket = %s AND shard = %s AND owner = %s "
            "AND service = %s AND task_id = %s AND completion_id = %s",
            (flipped, row["bucket"], row["shard"], row["owner"], row["service"], row["task_id"], row["completion_id"]),
        )
        consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
        async with consumer as results:
            got = await next_result(results, 40, "the engine's integrity_error in place of the tampered result")
        assert got["taskId"] == task_id and got["token"] == {"wf": "owed"}, got
        assert got["error"]["code"] == "integrity_error" and "secret" not in str(got), got
    finally:
        await make_bridge.stop(b)
        cql.execute(f"DROP KEYSPACE IF EXISTS {ks}", timeout=60)


async def test_a_tampered_row_is_never_returned_when_the_hint_carries_the_value(bridge, engine, workers, cql, servers):
    """A small task's sealed value rides on its hint (1.3): the worker gets the authenticated
    copy; the tampered row is not read now, and is detected when it is (a redelivery)."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    ks = servers.keyspace
    flip_stored_value(cql, ks, svc, task_id)
    w = await workers(svc)
    first = await w.fetch(time_to_recover_ms=300)
    assert first is not None and first.id == task_id and first.value == {"n": 1}, "the authentic value"
    # Abandoned: the redelivery reads the stored row, finds it tampered, and dead-letters the task.
    other = await workers(svc, "other")

    async def refused() -> bool:
        try:
            await other.fetch()
        except BridgeClientError as err:
            return err.code == "integrity_error" and task_id in err.message
        return False

    await wait_for(refused, 15.0, interval=0.1, what="the redelivery reading the tampered row")
    lease = cql.execute(
        f"SELECT state FROM {ks}.leases WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()
    assert lease["state"] == "dead"


async def test_owners_never_see_each_others_tasks(bridge, servers, names, workers):
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"]) as ea:
        await ea.add(svc, "for a")
    other = await workers(svc, "same-worker-id", user=OWNERS[1])
    assert await other.fetch() is None
    assert await other.ack("x", held=True) is False
    mine = await workers(svc, "same-worker-id", user=OWNERS[0])
    assert (await mine.fetch()).value == "for a"


async def test_only_trusted_users_may_name_another_owner(bridge, servers, names):
    svc = service_id()
    async with Engine(servers.amqp_url(OWNERS[1]), owner=OWNERS[0], exchange=names["exchange"]) as impostor:
        with pytest.raises(UnauthorizedError):
            await impostor.add(svc, "sneaky")
    async with Engine(servers.amqp_url(OWNERS[1]), exchange=names["exchange"]) as own:
        assert await own.add(svc, "own") is not None  # no x-owner: the user is the owner


async def test_an_empty_x_owner_is_the_same_as_none(bridge, engine, workers):
    """docs/asyncapi.yaml, Owners: a trusted user acts for "the x-owner header if present and
    non-empty, else the user-id". An empty x-owner was refused as bad_request instead (it was
    checked as an owner name, 1 to 255 characters)."""
    svc = service_id()
    reply, _ = await engine.call_raw("add", {"serviceId": svc, "value": 1}, owner="")
    assert "error" not in reply, f"an empty x-owner from {ENGINE_USER!r} was refused: {reply}"
    assert reply["result"] is True
    mine = await workers(svc, user=ENGINE_USER)
    assert (await mine.fetch()).value == 1, "the task is the engine user's own"
    # Any other user: the empty x-owner names nobody else, so the user acts for itself.
    w = await workers(svc)
    reply, _ = await w.call_raw("fetch", {"serviceId": svc, "workerId": w.worker_id}, owner="")
    assert reply == {"result": None}, reply


async def test_message_without_user_id_is_unauthorized(bridge, servers, names):
    async with Worker(servers.amqp_url(OWNERS[0]), service="s", worker_id="w", exchange=names["exchange"]) as w:
        w.user = None  # type: ignore[assignment]  # publish without the user_id property
        reply, _ = await w.call_raw("fetch", {"serviceId": "s", "workerId": "w"})
        assert reply["error"]["code"] == "unauthorized"


async def test_unknown_owner_gets_a_clear_error(bridge, servers, names):
    async with Engine(servers.amqp_url(ENGINE_USER), owner="nobody-has-keys", exchange=names["exchange"]) as e:
        reply, _ = await e.call_raw("add", {"serviceId": "s", "value": 1}, owner="nobody-has-keys")
        assert reply["error"]["code"] == "unknown_owner"


async def test_add_with_same_message_id_creates_one_task(bridge, engine, workers, cql, servers):
    svc = service_id()
    first = await engine.add(svc, "once", message_id="m-1")
    again = await engine.add(svc, "once", message_id="m-1")
    other = await engine.add(svc, "twice", message_id="m-2")
    assert first == again
    assert other != first
    assert len(ready_rows(cql, servers.keyspace, OWNERS[0], svc)) == 2
    w = await workers(svc)
    got = []
    while (t := await w.fetch()) is not None:
        got.append(t.value)
        await t.ack(None)
    assert got == ["once", "twice"]
    assert await engine.add(svc, "once", message_id="m-1") == first, "idempotent for as long as the task lives"


async def test_a_forged_reply_to_cannot_close_the_bridges_connection(bridge, servers, names, workers, dead_letters):
    """Issue 13.3: RabbitMQ closes the connection that publishes to a malformed direct reply-to name,
    or to one naming an unknown node (541), dropping every reply in flight on it."""
    import aio_pika
    import orjson

    connection = bridge.transport.connection
    lost: list[object] = []
    connection.close_callbacks.add(lambda *args: lost.append(args))
    malformed = "amq.rabbitmq.reply-to.a.b"
    unknown_node = "amq.rabbitmq.reply-to.g1h2AAlyZXh1c0BvbmUAAF0nAAAAAAAAAAA=.Z3Vlc3Q="
    conn = await aio_pika.connect(servers.amqp_url(OWNERS[0]))
    try:
        ch = await conn.channel()
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        for reply_to in [malformed, unknown_node] * 5:
            body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
            message = aio_pika.Message(body, reply_to=reply_to, user_id=OWNERS[0], correlation_id="c")
            await ex.publish(message, routing_key="fetch")
        # The malformed ones are refused before they run (dead-lettered, no reply possible) ...
        assert len(await dead_letters.drain(5, timeout=15)) == 5
        # ... the others are answered, and their replies refused, on the probation connection (a
        # reply racing them on it may be lost: its requester retries, as on any lost reply) ...
        await wait_for(lambda: bridge.transport.replies.refused >= 1, 15, what="a forged reply refused")
        assert await bridge.transport.wait_idle(10)
        # ... and a legitimate requester keeps getting its replies after.
        w = await workers(service_id())
        for _ in range(20):
            assert await w.fetch() is None
    finally:
        await conn.close()
    assert lost == [], "the bridge's AMQP connection was closed"
    assert bridge.transport.is_ready()


async def test_a_reply_to_a_node_proven_once_and_gone_since_closes_the_main_connection_once_at_most(
    bridge, servers, names
):
    """A node, once proven (a worker's reply went through), stayed proven for the life of the
    process. After it left the cluster, every request naming it (stale queued ones, a reused reply
    name, or one delivered again because its ack was lost with the connection) got its reply on
    the main connection, which RabbitMQ closes for an unknown node (541): every fetch and ack in
    flight on the bridge cut, at each such request. A reconnection now forgets the proven nodes:
    the next reply to that node goes through the probation connection and is refused there."""
    import aio_pika
    import orjson

    from bridge.transport.replies import reply_node

    gone_node = "amq.rabbitmq.reply-to.g1h2AAlyZXh1c0BvbmUAAF0nAAAAAAAAAAA=.Z3Vlc3Q="
    replies = bridge.transport.replies
    replies.proven.add(reply_node(gone_node))  # proven while it was a member of the cluster
    closed: list[object] = []
    bridge.transport.connection.close_callbacks.add(lambda *args: closed.append(args))
    conn = await aio_pika.connect(servers.amqp_url(OWNERS[0]))
    try:
        ch = await conn.channel()
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        for n in range(2):
            body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
            message = aio_pika.Message(body, reply_to=gone_node, user_id=OWNERS[0], correlation_id=f"c{n}")
            await ex.publish(message, routing_key="fetch")
            # The first reply closes the main connection (541), once: the bridge reconnects.
            await wait_for(lambda: closed, 20, what="the main connection closed by the first reply")
            await wait_for(bridge.transport.is_ready, 30, what="the bridge ready again")
        await wait_for(lambda: replies.refused >= 1, 20, what="the second reply refused on the probation connection")
    finally:
        await conn.close()
    assert len(closed) == 1, f"the main connection was closed {len(closed)} times"


async def test_a_direct_reply_to_naming_a_real_node_with_a_broken_pid_is_refused_before_it_runs(
    bridge, servers, names, workers, dead_letters, monkeypatch
):
    """Only the node atom at the head of the pid was checked: a name whose node the bridge had
    already seen accepted (any worker's real one) went to the main reply channel even when the
    rest of its pid was cut off or overlong, or its node a latin-1 atom, and RabbitMQ closed the
    bridge's main connection (541), dropping every reply in flight on it."""
    import base64

    import aio_pika
    import orjson

    from bridge.transport.replies import DIRECT_REPLY_PREFIX

    w = await workers(service_id())
    seen: list[str] = []
    real_publish = bridge.transport.replies.publish

    async def publish(body, fields, reply_to):  # type: ignore[no-untyped-def]
        seen.append(reply_to)
        return await real_publish(body, fields, reply_to)

    monkeypatch.setattr(bridge.transport.replies, "publish", publish)
    assert await w.fetch() is None  # a real worker: its node is proven now
    assert await w.fetch() is None
    pid_enc, key = seen[-1][len(DIRECT_REPLY_PREFIX) :].split(".", 1)
    pid = base64.b64decode(pid_enc)
    node_end = 5 + int.from_bytes(pid[3:5], "big")
    # As RabbitMQ 3.10 makes them: NEW_PID_EXT, an ATOM_UTF8_EXT node, id, serial and creation.
    assert pid[:3] == b"\x83Xv" and len(pid) == node_end + 12
    broken = {  # each one closes the publishing connection (checked on RabbitMQ 3.10)
        "the node only": pid[:node_end],
        "one byte short": pid[:-1],
        "one byte over": pid + b"\x00",
        "a latin-1 node atom": b"\x83Xd" + pid[3:],
    }
    lost: list[object] = []
    bridge.transport.connection.close_callbacks.add(lambda *args: lost.append(args))
    conn = await aio_pika.connect(servers.amqp_url(OWNERS[0]))
    try:
        ch = await conn.channel()
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        for shape, forged in broken.items():
            reply_to = f"{DIRECT_REPLY_PREFIX}{base64.b64encode(forged).decode()}.{key}"
            body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
            message = aio_pika.Message(body, reply_to=reply_to, user_id=OWNERS[0], correlation_id=shape)
            await ex.publish(message, routing_key="fetch")
    finally:
        await conn.close()
    # Refused before they run, as malformed names (dead-lettered: no reply possible) ...
    dead = await dead_letters.drain(len(broken), timeout=15)
    assert sorted(m.correlation_id for m in dead) == sorted(broken)
    # ... and the next replies on the main connection come after their answers were attempted.
    try:
        for _ in range(3):
            assert await w.fetch() is None
    except Exception as exc:
        pytest.fail(f"a legitimate fetch failed after the forged reply_to: {exc!r} (connection closed: {bool(lost)})")
    assert lost == [], "a worker's reply_to closed the bridge's AMQP connection"


async def test_replies_go_only_to_direct_reply_to_or_a_server_named_queue(bridge, servers, names, dead_letters):
    """The bridge replied to any reply_to but a malformed direct reply-to name, through the default
    exchange and with its own user_id: a worker, which may write neither to amq.default nor to the
    results exchange, could have it write into the engine's results queue (a confused deputy)."""
    import aio_pika
    import orjson

    results_queue = names["queue_prefix"] + ".results"
    conn = await aio_pika.connect(servers.amqp_url(OWNERS[0]))
    try:
        ch = await conn.channel()
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
        await ex.publish(
            aio_pika.Message(body, reply_to=results_queue, user_id=OWNERS[0], correlation_id="c"), routing_key="fetch"
        )
    finally:
        await conn.close()
    dead = await dead_letters.drain(1, timeout=15)
    assert len(dead) == 1 and dead[0].reply_to == results_queue, "refused before it ran: dead-lettered"
    engine_conn = await aio_pika.connect(servers.amqp_url(ENGINE_USER))
    try:
        ch = await engine_conn.channel()
        q = await ch.get_queue(results_queue, ensure=False)

        async def a_reply() -> Any:
            # Results of earlier tests may come in (the session's relays publish what they owe
            # into this shared queue, without a correlation id); only a reply, which carries the
            # request's, is the defect.
            message = await q.get(fail=False, no_ack=True)
            return None if message is None or message.correlation_id is None else message

        got = None
        with contextlib.suppress(AssertionError):  # no reply within the wait: as it should be
            got = await wait_for(a_reply, 3, what="a reply in the results queue")
    finally:
        await engine_conn.close()
    forged = None if got is None else (got.user_id, got.type, got.body)
    assert got is None, f"the engine's results queue got a message in the bridge's name: {forged}"

    # A queue of one's own still gets its replies when the broker named it (amq.gen-...: no client
    # can choose such a name). The local stack's guest may declare queues.
    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        own = await ch.declare_queue(exclusive=True)
        assert own.name.startswith("amq.gen-")
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
        await ex.publish(aio_pika.Message(body, reply_to=own.name, user_id="guest", correlation_id="c"), "fetch")
        reply = await wait_for(lambda: own.get(fail=False, no_ack=True), 15, what="the reply in the own queue")
        assert orjson.loads(reply.body) == {"result": None} and reply.correlation_id == "c"
    finally:
        await conn.close()


async def test_fetches_naming_new_services_do_not_grow_memory_without_bound(make_bridge, engine, workers):
    """Issue 13.4: every serviceId fetched kept about 3 kB in the dispatcher, forever."""
    b = await make_bridge(max_queues_in_memory=50)
    kept = service_id()
    await engine.add(kept, "first")
    await engine.add(kept, "second")
    w = await workers(kept)
    assert (await w.fetch()).value == "first"
    assert await w.ack("ok") is True
    for i in range(300):
        w.service = f"{service_id()}-{i}"
        assert await w.fetch() is None
        assert b.queue.dispatcher.lanes_in_memory <= 2 * 50  # two lanes a queue: fresh, recovered
    # A forgotten queue still works: its position comes back from Cassandra.
    w.service = kept
    assert (await w.fetch()).value == "second"


@pytest.mark.parametrize("rewrite", ["traceparent", "token"])
async def test_rewriting_the_clear_columns_of_a_task_is_detected(bridge, engine, workers, cql, servers, rewrite):
    """Issue 13.8: the trace context and whether a task has a token were not bound into the AEAD:
    rewriting the row changed the trace id, and nulling the token columns made an ack publish nothing."""
    svc = service_id()
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    task_id = await engine.add(svc, {"n": 1}, token={"processId": "p"}, traceparent=trace)
    ks = servers.keyspace
    row = next(r for r in ready_rows(cql, ks, OWNERS[0], svc) if str(r["seq"]) == task_id)
    where = "WHERE owner = %s AND service = %s AND lane = 1 AND bucket = %s AND seq = %s"
    key = (row["owner"], row["service"], row["bucket"], row["seq"])
    if rewrite == "traceparent":
        forged = "00-11111111111111111111111111111111-00f067aa0ba902b7-01"
        cql.execute(f"UPDATE {ks}.ready SET traceparent = %s {where}", (forged, *key))
    else:
        cql.execute(f"UPDATE {ks}.ready SET token_nonce = null, token_ct = null {where}", key)
    w = await workers(svc)
    with pytest.raises(BridgeClientError) as err:
        await w.fetch()
    assert err.value.code == "integrity_error"


async def test_a_worker_whose_owner_has_no_key_is_told_so(make_bridge, servers, names, tmp_path):
    """Issue 10: fetch answered null and ack false to a worker whose owner has no key, so a
    misconfigured worker polled forever without knowing why. Both answer unknown_owner now."""
    from bridge.crypto import generate_keyring, write_keyring

    keyring = tmp_path / "only-a.json"
    write_keyring(keyring, generate_keyring([OWNERS[0], ENGINE_USER]))  # worker-b has no key
    await make_bridge(keyring=str(keyring))
    async with Worker(servers.amqp_url(OWNERS[1]), service="s", worker_id="w", exchange=names["exchange"]) as w:
        with pytest.raises(UnknownOwnerError):
            await w.fetch()
        with pytest.raises(UnknownOwnerError):
            await w.ack("x", task_id=str(uuid.uuid1()), epoch=1)
    async with Worker(servers.amqp_url(OWNERS[0]), service="s", worker_id="w", exchange=names["exchange"]) as ok:
        assert await ok.fetch() is None  # an owner with a key: nothing ready, no error


async def test_the_bundled_results_consumer_takes_results_only_from_the_bridges_user(
    bridge, engine, workers, servers, names
):
    """docs/security.md asks every engine to check that a result's ``user_id`` is the bridge's user;
    the bundled ``results_consumer`` (the demo's) could not: it gave neither the ``user_id`` nor a
    filter, so a message anyone may publish to the results exchange was taken for a result. Found
    by the security review, 2026-12-05."""
    import aio_pika
    import orjson

    from bridge.client.rpc import results_consumer

    svc = service_id()
    # Bound to this service's results only (the duty holder relays results earlier tests left owed
    # onto this test's exchange, each under its own service's key). The forged message is published
    # under the same key: it reaches the consumer, and only its user check can keep it out.
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        forger = await aio_pika.connect(servers.amqp_url("guest"))
        try:
            channel = await forger.channel()
            exchange = await channel.get_exchange(names["results_exchange"], ensure=False)
            forged = {"taskId": "forged", "serviceId": svc, "result": "forged"}
            await exchange.publish(aio_pika.Message(orjson.dumps(forged), user_id="guest"), routing_key=svc)
        finally:
            await forger.close()
        task_id = await engine.add(svc, {"n": 1}, token={"t": 1})
        task = await (await workers(svc)).fetch()
        assert task is not None and await task.ack("real") is True
        got: list[dict[str, Any]] = []

        def arrived() -> bool:
            while not results.empty():
                got.append(results.get_nowait())
            return any(m.get("taskId") == task_id for m in got)

        await wait_for(arrived, 15, what="the real result")
    assert [m["taskId"] for m in got] == [task_id], "the forged message was taken for a result"
    assert got[0]["_user_id"] == "queue-bridge"
