"""The task TTL and the lifetimes of the index rows the bridge writes (each test failed before its
fix): a queue's registration and a recovered-lane bucket's index row outlive every task they
list. A short ``BRIDGE_TASK_TTL``; Cassandra's tables are read directly (``cql``).
"""

from __future__ import annotations

import uuid

import pytest

from bridge.domain.records import LANE_RECOVERED
from bridge.domain.timeline import bucket_of_task, ms_of
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _rows(cql, ks: str, table: str, svc: str, **where: object) -> list[dict]:
    # By partition only: a scan of the session's keyspace took the whole per-test timeout in CI.
    if table == "services":
        rows = cql.execute(f"SELECT * FROM {ks}.services WHERE owner = %s AND service = %s", (OWNERS[0], svc))
    else:  # ready, fresh lane: the task's own bucket
        rows = cql.execute(
            f"SELECT * FROM {ks}.ready WHERE owner = %s AND service = %s AND lane = 1 AND bucket = %s",
            (OWNERS[0], svc, where.pop("bucket")),
        )
    return [r for r in rows if all(r.get(k) == v for k, v in where.items())]


async def test_an_active_queue_stays_listed_while_it_holds_tasks(make_bridge, engine, cql, servers):
    """``services`` (what ``stats`` without a ``serviceId``, the console and the per-queue gauges
    list) is written with ``USING TTL <task ttl>`` from the registration, but a bridge registers a
    queue only once a DAY (``WorkQueue._register``). So with a TTL under a day the row expires
    while tasks added since are alive (and, whatever the TTL, a queue's last day of adds outlives
    its row by up to a day, a delayed task's by up to a TTL more): ``stats()`` of the owner
    answers without the queue, and its gauges vanish, although it holds a ready task."""
    ttl_s = 6
    b = await make_bridge(task_ttl=ttl_s)
    svc, ks = service_id(), servers.keyspace
    first = await engine.add(svc, "first")  # registers the queue (TTL 6 s from now)
    await wait_for(lambda: _rows(cql, ks, "services", svc), 5, what="the queue registered")
    # Half a TTL later, a second task: alive for a whole TTL from then.
    clock = b.queue.clock
    await wait_for(lambda: clock.now_ms() - ms_of(uuid.UUID(first)) > ttl_s * 500, ttl_s, what="half a TTL")
    later = await engine.add(svc, "later")
    # Past the first registration's TTL (where the row used to expire), within the later task's life.
    registered_until = ms_of(uuid.UUID(first)) + ttl_s * 1000 + 1_500
    await wait_for(lambda: clock.now_ms() > registered_until, ttl_s, interval=0.1, what="the first task's TTL")
    later_id = uuid.UUID(later)
    assert _rows(cql, ks, "ready", svc, bucket=bucket_of_task(later_id), task_id=later_id), "the later task is alive"
    assert _rows(cql, ks, "services", svc), "the queue's registration expired while it held a task"
    listed = {s.service_id: s for s in await engine.stats()}
    assert svc in listed, "a queue holding a ready task is missing from the owner's stats"


async def test_a_recovered_lane_bucket_stays_indexed_while_a_task_in_it_lives(
    make_bridge, engine, cql, servers, monkeypatch
):
    """A lane-0 (recovered) entry lives for its task's remaining life, but the ``ready_buckets``
    row that makes scans find it is written once per process and 10 s bucket
    (``CassandraTaskStore._index_bucket``, remembered in ``_indexed``) and took the remaining life
    of the FIRST task recovered into that bucket, plus a grace. Recovered tasks are of every age
    (a bucket takes those whose leases ran out in its ten seconds), so when an old task is
    recovered first, a young task recovered into the same bucket loses its index row long before
    its entry: no scan (every fetch with ``BRIDGE_HINTS=false``, reconciliation after a lost hint,
    purge, stats' oldest ready task) sees it again, until its TTL. Here the grace is 2 s (60 s in
    production) and the TTL 20 s: A added at 0, B at 12, both recovered into one bucket at 12."""
    from bridge.domain.records import QueueKey
    from bridge.domain.timeline import bucket_of_task, timeuuid_from_ms
    from bridge.storage import repository

    ttl_s, grace_s = 20, 2
    monkeypatch.setattr(repository, "BUCKET_INDEX_GRACE_S", grace_s)
    b = await make_bridge(task_ttl=ttl_s, hints=False)
    store, clock = b.queue.ctx.store, b.queue.clock
    svc, ks = service_id(), servers.keyspace
    q = QueueKey(OWNERS[0], svc)
    a_id = uuid.UUID(await engine.add(svc, "old"))
    await wait_for(lambda: clock.now_ms() - ms_of(a_id) > 12_000, 20, interval=0.1, what="A late in its life")
    b_id = uuid.UUID(await engine.add(svc, "young"))
    # Both leases ran out in the same ten seconds: re-exposed into one bucket, A first.
    now = clock.now_ms()
    bucket = bucket_of_task(timeuuid_from_ms(now))
    for task_id in (a_id, b_id):
        await store.expose_recovered(q, bucket, timeuuid_from_ms(clock.now_ms()), task_id, 1, False)

    def indexed() -> bool:
        query = f"SELECT bucket FROM {ks}.ready_buckets WHERE owner = %s AND service = %s AND lane = %s"
        return any(r["bucket"] == bucket for r in cql.execute(query, (OWNERS[0], svc, LANE_RECOVERED)))

    def entry_of_b() -> bool:
        query = f"SELECT task_id FROM {ks}.ready WHERE owner = %s AND service = %s AND lane = %s AND bucket = %s"
        return any(r["task_id"] == b_id for r in cql.execute(query, (OWNERS[0], svc, LANE_RECOVERED, bucket)))

    assert indexed() and entry_of_b()
    # Past A's life plus the grace (where the row expired), within B's life.
    a_row_until = ms_of(a_id) + (ttl_s + grace_s) * 1000 + 1_500
    await wait_for(lambda: clock.now_ms() > a_row_until, 30, interval=0.2, what="A's life plus the grace")
    assert clock.now_ms() < ms_of(b_id) + (ttl_s - 2) * 1000, "set-up too slow: B is about to expire"
    assert entry_of_b(), "B's recovered entry is still stored"
    assert indexed(), "the bucket's index row expired while the entry of a live task was in it: no scan finds B"
