"""The task TTL and the lifetimes of the index rows the bridge writes (each test failed before its
fix): a queue's registration and a recovered-lane bucket's index row outlive every task they
list. A short ``BRIDGE_TASK_TTL``; Cassandra's tables are read directly (``cql``).
"""

from __future__ import annotations

import uuid

import pytest

from bridge.domain.records import LANE_RECOVERED
from bridge.domain.timeline import ms_of
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _rows(cql, ks: str, table: str, svc: str, **where: object) -> list[dict]:
    rows = cql.execute(f"SELECT * FROM {ks}.{table} WHERE owner = %s ALLOW FILTERING", (OWNERS[0],))
    return [r for r in rows if r["service"] == svc and all(r.get(k) == v for k, v in where.items())]


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
    assert [r for r in _rows(cql, ks, "ready", svc) if str(r["task_id"]) == later], "the later task is alive"
    assert _rows(cql, ks, "services", svc), "the queue's registration expired while it held a task"
    listed = {s.service_id: s for s in await engine.stats()}
    assert svc in listed, "a queue holding a ready task is missing from the owner's stats"


@pytest.mark.timeout(300)  # a TTL of 75 s and an index row that outlives its first task by 60 s
async def test_a_recovered_task_stays_findable_by_a_scan_for_its_whole_life(make_bridge, engine, workers, cql, servers):
    """A lane-0 (recovered) entry lives for its task's remaining life, but the ``ready_buckets``
    row that makes scans find it is written once per process and 10 s bucket
    (``CassandraTaskStore._index_bucket``, remembered in ``_indexed``) with the remaining life of
    the FIRST task recovered into that bucket, plus 60 s. Recovered tasks are of every age, so
    when an old task's lease runs out first, a young task recovered by the same bridge in the same
    10 s loses its index row long before its entry: from then on no scan (every fetch with
    ``BRIDGE_HINTS=false``, reconciliation after a lost hint, purge, stats' oldest ready task) sees
    it. The task is neither handed out nor purged, and stays in flight for the stats, until its
    TTL. Here TTL 75 s: A (added at 0) and B (added at ~65) are both leased for 1 s at ~65; A's
    index row lives ~70 s, B's entry ~75 s; between the two, every other worker's fetch answers null
    (with hints on, only B's hint can still deliver it: once that is lost, or purged, nothing does)."""
    ttl_s = 75
    b = await make_bridge(task_ttl=ttl_s, hints=False)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    svc, ks = service_id(), servers.keyspace
    clock = b.queue.clock
    a_id = await engine.add(svc, "old")
    start = clock.now_ms()
    # Late in A's life, and not near a 10 s boundary (both recoveries land in one lane-0 bucket).
    await wait_for(
        lambda: clock.now_ms() - start > (ttl_s - 12) * 1000 and clock.now_ms() % 10_000 < 6_000,
        ttl_s,
        interval=0.1,
        what="A late in its life",
    )
    b_id = await engine.add(svc, "young")
    wa, wb = await workers(svc, "wa"), await workers(svc, "wb")
    got_a = await wa.fetch(time_to_recover_ms=1_000)
    got_b = await wb.fetch(time_to_recover_ms=1_000)
    assert (got_a.id, got_b.id) == (a_id, b_id)

    def recovered(task_id: str) -> list[dict]:
        return [r for r in _rows(cql, ks, "ready", svc, lane=LANE_RECOVERED) if str(r["task_id"]) == task_id]

    await wait_for(lambda: recovered(a_id) and recovered(b_id), 10, interval=0.1, what="both leases re-exposed")
    (entry_b,) = recovered(b_id)
    (entry_a,) = recovered(a_id)
    assert entry_a["bucket"] == entry_b["bucket"]
    bucket = entry_b["bucket"]

    def indexed() -> bool:
        return bool(_rows(cql, ks, "ready_buckets", svc, lane=LANE_RECOVERED, bucket=bucket))

    # Nobody fetches meanwhile (the two workers died: that is why their leases ran out). The index
    # row of B's bucket expired with A's life plus 60 s, long before B's entry; waited past that.
    a_row_until = ms_of(uuid.UUID(a_id)) + (ttl_s + 60) * 1000 + 1_500
    await wait_for(lambda: clock.now_ms() > a_row_until, ttl_s + 60, interval=0.5, what="A's life plus 60 s")
    assert clock.now_ms() < ms_of(uuid.UUID(b_id)) + (ttl_s - 2) * 1000, "set-up too slow: B is about to expire"
    assert indexed(), "the recovered lane's bucket index row expired while an entry of a live task was in it"
    assert recovered(b_id), "B's recovered entry is still stored"
    assert _rows(cql, ks, "leases", svc, task_id=uuid.UUID(b_id), state="leased"), "B's run-out lease is stored"
    other = await workers(svc, "other")  # not wb: a worker's own fetch re-sends the task it held
    got = await other.fetch(time_to_recover_ms=60_000)
    assert got is not None and got.id == b_id, "the recovered task B, alive and ready, is not found by a scan"
