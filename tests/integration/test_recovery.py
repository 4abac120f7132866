"""Leases, recovery and fencing end to end (AMQP, real time): a task not acked in time goes to the
next worker; the old one loses it. The same rules on a manual clock, for both stores, are in
tests/behaviour/test_recovery_rules.py (the lease extension by re-fetching is proven there)."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.conftest import OWNERS, own_results, re_exposed, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_abandoned_task_goes_to_next_worker_and_late_ack_loses(bridge, engine, workers, servers, names):
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        task_id = await engine.add(svc, {"job": 1}, token={"processId": "p"})
        first, second = await workers(svc, "first"), await workers(svc, "second")
        # Before the fetch is sent: the lease starts at the bridge between this moment and the
        # reply (taken after the reply, a loaded machine's slow reply made a correct redelivery
        # look 20 ms early).
        fetched_at = time.monotonic()
        lost = await first.fetch(time_to_recover_ms=500)
        assert lost is not None and lost.id == task_id
        # The first worker vanishes. The second polls until it gets the task: after the lease
        # plus the clock skew margin, plus a timer or a scheduler tick.
        got = await wait_for(second.fetch, 3.0, interval=0.02, what="recovered task")
        assert got.id == task_id
        assert got.deliveries == 2
        assert 0.5 + bridge.settings.clock_skew_margin <= time.monotonic() - fetched_at <= 3.0
        # The stale worker's ack cannot complete a task it lost, and publishes nothing.
        assert await first.ack(result="late") is False
        assert await got.ack("on time") is True
        await wait_for(lambda: not results.empty(), 10, what="result")
        # The stale ack came first: had it published anything, that would be the first message.
        msg = results.get_nowait()
        assert msg["result"] == "on time"


async def test_lease_is_not_handed_out_before_it_expires(bridge, engine, workers):
    svc = service_id()
    await engine.add(svc, "only")
    a, b = await workers(svc, "a"), await workers(svc, "b")
    held = await a.fetch(time_to_recover_ms=3000)
    assert held is not None
    # While the lease runs, nobody else gets it.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert await b.fetch() is None
    assert await a.ack("done") is True
    assert await b.fetch() is None


async def test_own_expired_task_comes_back_to_the_same_worker_if_nobody_took_it(bridge, engine, workers):
    svc = service_id()
    await engine.add(svc, "x")
    a = await workers(svc, "a")
    first = await a.fetch(time_to_recover_ms=200)
    assert first is not None
    # Wait until the lease has run out and the scheduler has re-exposed the task.
    await wait_for(lambda: re_exposed(bridge, OWNERS[0], svc, first.id), 5.0, what="lease expired and re-exposed")
    again = await a.fetch(time_to_recover_ms=5000)
    assert again is not None and again.id == first.id
    # Nobody else held it in between: the same lease (epoch) is extended, not a new delivery.
    assert (again.deliveries, again.epoch) == (1, first.epoch)
    assert await a.ack("ok") is True


async def test_recovery_does_not_lose_the_requesters_own_task(bridge, engine, workers):
    """Seed bug B: recovering someone else's task must not overwrite the requester's own lease."""
    svc = service_id()
    await engine.add(svc, "t0")
    await engine.add(svc, "t1")
    a, b = await workers(svc, "a"), await workers(svc, "b")
    t0 = await a.fetch(time_to_recover_ms=300)  # A takes t0 and dies
    t1 = await b.fetch(time_to_recover_ms=60_000)  # B takes t1
    assert t0 is not None and t1 is not None
    # Once t0's lease has run out and been re-exposed, B's fetch still returns its own task.
    await wait_for(lambda: re_exposed(bridge, OWNERS[0], svc, t0.id), 5.0, what="t0 re-exposed")
    assert (await b.fetch()).id == t1.id
    c = await workers(svc, "c")
    recovered = await wait_for(c.fetch, 4.0, interval=0.02, what="t0 recovered")
    assert recovered.id == t0.id
    assert await b.ack("r1") is True
    assert await c.ack("r0") is True


async def test_recovered_tasks_are_served_before_the_backlog(bridge, engine, workers, monkeypatch):
    """Seed bug C: recovery never moves the queue backwards or stalls it, and the recovered task is next."""
    svc = service_id()
    for i in range(30):
        await engine.add(svc, i)
    dead, busy = await workers(svc, "dead"), await workers(svc, "busy")
    # A lease long enough for the 20 fetches below to go first (with the 25 ms margin a 300 ms lease
    # came back in the middle of them): what is checked is the order once it is back.
    first = await dead.fetch(time_to_recover_ms=3000)
    assert first.value == 0
    # Which tasks the scheduler re-exposed (the recovered count also counts leases that earlier
    # tests left in the shared keyspace: a full run once fetched task 21 before task 0 was back).
    announced: set[str] = set()
    announce = bridge.queue.announce

    async def spy(q, hint):
        await announce(q, hint)
        announced.add(str(hint.task_id))

    monkeypatch.setattr(bridge.queue, "announce", spy)
    seen = []
    for _ in range(20):
        t = await busy.fetch()
        seen.append(t.value)
        await t.ack(None)
    assert seen == list(range(1, 21))
    await wait_for(lambda: first.id in announced, 10.0, what="task 0 re-exposed")
    t = await busy.fetch()
    assert t.value == 0
    await t.ack(None)
    rest = []
    while (t := await busy.fetch()) is not None:
        rest.append(t.value)
        await t.ack(None)
    assert rest == list(range(21, 30)), "the queue must not stall after a recovery"


async def test_scheduler_progress_grows_by_a_row_per_10_seconds_whatever_the_fleet(make_bridge, cql, servers):
    """Issue 13.9: `scheduler_cursors` gained ~4 rows/s per bridge, 30 days long, in one partition.
    Now positions are persisted on a 10 s grid, in day partitions, by the one bridge of the fleet
    that holds the scheduler duty."""
    a, b = await make_bridge(), await make_bridge()
    ks = servers.keyspace

    def rows() -> set[int]:
        found = cql.execute(f"SELECT day, pos FROM {ks}.scheduler_progress WHERE name = 'expiries' ALLOW FILTERING")
        return {r["pos"] for r in found}

    await wait_for(lambda: a.duty.held or b.duty.held, 10, what="one bridge holding the scheduler duty")
    holder = a if a.duty.held else b
    await wait_for(lambda: holder.scheduler.expiry_position, 10, what="first ticks")
    before = rows()
    start = holder.scheduler.expiry_position
    await wait_for(
        lambda: holder.scheduler.expiry_position >= start + 60,
        30,
        interval=0.2,
        what="15 s of expiry buckets confirmed",
    )
    new = rows() - before
    assert 1 <= len(new) <= 3, f"{len(new)} rows for 15 s of the fleet's progress"  # was ~60 per bridge
    assert all(pos % 40 == 0 for pos in new)


async def test_deadlines_of_one_window_spread_over_partitions(bridge, engine, workers, cql, servers):
    """No partition takes every claim of a 250 ms window: deadlines go to one of the bucket's shards."""
    svc = service_id()
    ws = [await workers(svc, f"w{i}") for i in range(24)]
    for i in range(24):
        await engine.add(svc, i)
    got = await asyncio.gather(*(w.fetch(time_to_recover_ms=60_000) for w in ws))
    ids = {t.id for t in got if t is not None}
    assert len(ids) == 24
    rows = [
        r
        for r in cql.execute(f"SELECT bucket, shard, task_id FROM {servers.keyspace}.expiry_shards")
        if str(r["task_id"]) in ids
    ]
    assert {str(r["task_id"]) for r in rows} == ids
    per_bucket: dict[int, set[int]] = {}
    for r in rows:
        per_bucket.setdefault(r["bucket"], set()).add(r["shard"])
    busiest = max(per_bucket.values(), key=len)
    assert len(busiest) >= 3, f"deadlines of one bucket in shards {per_bucket}"
    marks = {r["bucket"] for r in cql.execute(f"SELECT bucket FROM {servers.keyspace}.expiry_marks")}
    assert set(per_bucket) <= marks, "every bucket is marked before its deadlines"


async def test_a_rolling_upgrade_from_1_2_recovers_the_deadlines_it_filed(make_bridge, engine, workers, cql, servers):
    """A 1.2 bridge files deadlines in the unsharded tables: a 1.3 holder set to read them
    (BRIDGE_READ_UNSHARDED, on during the upgrade) recovers the lease; without it they are not read."""
    svc = service_id()
    ks = servers.keyspace
    upgraded = await make_bridge(read_unsharded=True)
    await wait_for(lambda: upgraded.duty.held, 10, what="the bridge holding the duty")
    plain = await make_bridge()
    task_id = await engine.add(svc, "from a 1.2 fleet")
    lost = await (await workers(svc, "crashed")).fetch(time_to_recover_ms=1_500)
    assert lost is not None and lost.id == task_id
    # What a 1.2 bridge would have written instead: the deadline in `expiries`, its bucket marked.
    # Filtered by Cassandra: the session's keyspace holds every earlier test's rows.
    rows = list(
        cql.execute(f"SELECT * FROM {ks}.expiry_shards WHERE task_id = %s ALLOW FILTERING", (uuid.UUID(task_id),))
    )
    assert len(rows) == 1
    r = rows[0]
    cql.execute(f"DELETE FROM {ks}.expiry_shards WHERE bucket = %s AND shard = %s", (r["bucket"], r["shard"]))
    cql.execute(
        f"INSERT INTO {ks}.expiries (bucket, lease_until, owner, service, task_id, epoch, has_token) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (r["bucket"], r["lease_until"], r["owner"], r["service"], r["task_id"], r["epoch"], r["has_token"]),
    )
    bucket = r["bucket"]  # (marked in `expiry_marks` already: 1.2 and 1.3 share the marks)
    assert task_id not in {str(e.task_id) for e in await plain.store.expiries(bucket)}, "not read without it"
    assert task_id in {str(e.task_id) for e in await upgraded.store.expiries(bucket)}
    other = await workers(svc, "other")
    got = await wait_for(other.fetch, 15.0, interval=0.1, what="the 1.2 deadline recovered")
    assert got.id == task_id and got.deliveries == 2


async def test_the_relay_reads_whole_only_the_outbox_entries_it_owes(make_bridge, engine, workers, cql, servers):
    """The relay's sweep of an outbox bucket reads keys and ``published`` flags, then the
    unpublished entries whole, from the sharded table and (during a rolling upgrade from 1.2)
    the unsharded one; published entries are not read whole (their results stay on disk)."""
    svc = service_id()
    ks = servers.keyspace
    upgraded = await make_bridge(read_unsharded=True)
    ids = [await engine.add(svc, f"task {i}", token={"n": i}) for i in range(3)]
    w = await workers(svc, "w")
    for _ in ids:
        task = await w.fetch()
        assert task is not None and await task.ack({"done": task.value}) is True
    # Filtered by Cassandra: the session's keyspace holds every earlier test's results (1 MiB ones
    # among them), which reading them all here would decode.
    rows = [
        r
        for r in cql.execute(f"SELECT * FROM {ks}.outbox_shards WHERE service = %s ALLOW FILTERING", (svc,))
        if str(r["task_id"]) in ids
    ]
    assert len(rows) == 3
    by_id = {str(r["task_id"]): r for r in rows}
    owed, moved, done = (by_id[i] for i in ids)
    # No queue takes results here, so none can be published: one entry stays unpublished, one is
    # marked published, one is moved to where a 1.2 bridge would have written it (unsharded).
    key = "bucket = %s AND shard = %s AND owner = %s AND service = %s AND task_id = %s AND completion_id = %s"
    for row, published in ((owed, False), (done, True), (moved, True)):
        cql.execute(
            f"UPDATE {ks}.outbox_shards SET published = %s WHERE {key}",
            (published, *(row[c] for c in ("bucket", "shard", "owner", "service", "task_id", "completion_id"))),
        )
    cql.execute(
        f"INSERT INTO {ks}.outbox (bucket, owner, service, task_id, completion_id, key_id, result_nonce, "
        "result_ct, published) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, false)",
        tuple(moved[c] for c in ("bucket", "owner", "service", "task_id", "completion_id"))
        + tuple(moved[c] for c in ("key_id", "result_nonce", "result_ct")),
    )
    found = {}
    for bucket in {owed["bucket"], moved["bucket"], done["bucket"]}:
        found.update({str(e.task_id): e for e in await upgraded.store.outbox(bucket)})
    ours = {i: e for i, e in found.items() if i in ids}
    assert set(ours) == {str(owed["task_id"]), str(moved["task_id"])}, "only what is owed"
    for row in (owed, moved):
        entry = ours[str(row["task_id"])]
        assert (entry.result.key_id, entry.result.nonce, entry.result.ciphertext) == (
            row["key_id"],
            row["result_nonce"],
            row["result_ct"],
        )
        assert entry.completion_id == row["completion_id"] and entry.published is False
