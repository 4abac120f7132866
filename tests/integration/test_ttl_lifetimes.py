"""The task TTL and the lifetimes of the rows the bridge writes (each test failed before its fix):
a queue's registration and a recovered-lane bucket's index row outlive every task they list, and
every row about a task lives as long as the task, whichever bridge writes it (a fleet whose bridges
do not share one BRIDGE_TASK_TTL, as during a rolling change of it). A short ``BRIDGE_TASK_TTL``;
Cassandra's tables are read directly (``cql``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from bridge.domain.models import AckRequest, AddCommand, FetchRequest, parse
from bridge.domain.records import LANE_RECOVERED, QueueKey
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
    (``CassandraTaskStore._bucket_index``, remembered in ``_indexed``) and took the remaining life
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


async def test_a_bucket_stays_indexed_while_a_longer_ttl_bridges_task_in_it_lives(
    make_bridge, cql, servers, monkeypatch
):
    """BRIDGE_TASK_TTL changed pod by pod (a fleet of sidecars is never changed at once): a bridge
    on the longer TTL adds a task, then one on the shorter TTL adds another to the same 10 s
    bucket. The bucket's ``ready_buckets`` row was an INSERT, whose row marker takes the TTL of
    the LAST write: the shorter-TTL bridge cut the row's life to its own, and the longer-lived
    task dropped out of every scan (fetches with ``BRIDGE_HINTS=false``, reconciliation after a
    lost hint, purge, stats' oldest ready task) for the rest of its life. Here the TTLs are 1 h
    and 3 s, the index's grace 1 s and the rounding of its end 1 s (60 s and a minute in
    production)."""
    from bridge.storage import repository

    monkeypatch.setattr(repository, "BUCKET_INDEX_GRACE_S", 1)
    monkeypatch.setattr(repository, "BUCKET_INDEX_ROUNDING_MS", 1_000, raising=False)
    longer = await make_bridge(task_ttl=3600, hints=False)
    shorter = await make_bridge(task_ttl=3, hints=False)
    ks = servers.keyspace
    for _ in range(3):  # both adds in one 10 s bucket (a retry if the first pair straddles two)
        svc = service_id()
        kept = uuid.UUID(await longer.queue.add(OWNERS[0], _add(svc, "kept"), message_id=None, traceparent=None))
        brief = uuid.UUID(await shorter.queue.add(OWNERS[0], _add(svc, "brief"), message_id=None, traceparent=None))
        if bucket_of_task(kept) == bucket_of_task(brief):
            break
    bucket = bucket_of_task(kept)
    assert bucket_of_task(brief) == bucket, "set-up: three pairs of adds straddled two buckets"

    def indexed() -> bool:
        query = f"SELECT bucket FROM {ks}.ready_buckets WHERE owner = %s AND service = %s AND lane = 1"
        return any(r["bucket"] == bucket for r in cql.execute(query, (OWNERS[0], svc)))

    assert indexed()
    # Past the shorter-TTL bridge's index write (its task's 3 s, the grace and the rounding).
    clock = shorter.queue.clock
    await wait_for(lambda: clock.now_ms() > ms_of(brief) + 6_500, 15, interval=0.1, what="the brief task's row gone")
    assert _rows(cql, ks, "ready", svc, bucket=bucket, task_id=kept), "the longer-TTL task is alive"
    assert indexed(), "the bucket's index row took the shorter TTL of its last write: no scan finds the live task"
    got = await longer.queue.fetch(OWNERS[0], _fetch(svc, "w1", timeToRecover=60_000))
    assert got is not None and got.task_id == str(kept), "a scan finds the longer-TTL task"


# -- a fleet whose bridges have different task TTLs -------------------------------------------------
# Requests go to a chosen bridge through its ``WorkQueue`` (the domain, on the real servers): with
# both bridges consuming the same AMQP queues a client cannot choose which one answers.


def _add(svc: str, value: Any) -> AddCommand:
    return parse(AddCommand, {"serviceId": svc, "value": value})


def _fetch(svc: str, worker: str, **kw: Any) -> FetchRequest:
    return parse(FetchRequest, {"serviceId": svc, "workerId": worker, **kw})


def _ack(svc: str, worker: str, task_id: str, epoch: int, result: Any = "ok") -> AckRequest:
    return parse(
        AckRequest,
        {"serviceId": svc, "workerId": worker, "taskId": task_id, "epoch": epoch, "result": result},
    )


def _lease_row(cql: Any, keyspace: str, svc: str, task_id: str) -> Any:
    return cql.execute(
        f"SELECT state, epoch, worker, lease_until, expires_at FROM {keyspace}.leases WHERE owner = %s "
        "AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()


async def _pause() -> None:
    # The pace of the windows below: seeing that nothing happens (a row expiring, a task handed out
    # twice) takes time, watched for seconds past the short TTL.
    await asyncio.sleep(0.1)


@pytest.mark.parametrize("hints", [True, False], ids=["hinted", "scanned"])
async def test_a_lease_granted_by_a_bridge_with_a_shorter_task_ttl_lasts_its_whole_time_to_recover(
    make_bridge, cql, servers, hints
):
    """BRIDGE_TASK_TTL raised pod by pod (3 s -> 1 h; in production e.g. 1 day -> 7 days): a task
    added through a new bridge lives an hour, but a bridge still on the old setting wrote its
    lease row with the rest of *its* TTL (``CassandraTaskStore.ttl_for``). The row vanished while
    the worker's 60 s lease ran: the task read as never claimed, another worker was handed it
    (two workers held it at once) and the first worker's ack was refused. The lease now lives as
    long as the task, which its add fixed: the claim reads it from the hint's copy (``hinted``) or
    from the task's row (``scanned``: the bridge takes no hints)."""
    new = await make_bridge(task_ttl=3600, hint_grace=0.0)
    old = await make_bridge(task_ttl=3, hints=hints)
    svc = service_id()
    task_id = await new.queue.add(OWNERS[0], _add(svc, {"n": 1}), message_id=None, traceparent=None)

    first = await old.queue.fetch(OWNERS[0], _fetch(svc, "w-old", timeToRecover=60_000))
    assert first is not None and first.task_id == task_id
    granted = time.monotonic()

    # The lease runs 60 s. Its row must exist as long as it runs (the task lives an hour).
    gone = False
    while time.monotonic() - granted < 8:
        if _lease_row(cql, servers.keyspace, svc, task_id) is None:
            gone = True
            break
        await _pause()
    second = await new.queue.fetch(OWNERS[0], _fetch(svc, "w-new", timeToRecover=60_000))
    acked = await old.queue.ack(OWNERS[0], _ack(svc, "w-old", first.task_id, first.epoch))
    seen = {"lease row expired": gone, "second worker got": second and second.task_id, "holder's ack": acked}
    assert not gone, f"the lease row of a running lease expired (the granting bridge's shorter TTL): {seen}"
    assert second is None, f"a second worker was handed the task while the first one's lease ran: {seen}"
    assert acked is True, f"the holder of a running lease had its ack refused: {seen}"


async def test_a_task_completed_through_a_bridge_with_a_shorter_task_ttl_is_never_handed_out_again(
    make_bridge, cql, servers
):
    """The same rolling change of BRIDGE_TASK_TTL: the ``done`` lease row (and the ready row's
    ``claimed`` mark) written by the bridge on the old, shorter TTL expired long before the task's
    own row, written by a new bridge. The task then read as never claimed: a scan handed the
    completed task out again and a second ack completed it a second time (a second result)."""
    new = await make_bridge(task_ttl=3600, hint_grace=0.0)
    old = await make_bridge(task_ttl=3)
    svc = service_id()
    task_id = await new.queue.add(OWNERS[0], _add(svc, {"n": 2}), message_id=None, traceparent=None)
    first = await old.queue.fetch(OWNERS[0], _fetch(svc, "w-old", timeToRecover=60_000))
    assert first is not None and first.task_id == task_id
    assert await old.queue.ack(OWNERS[0], _ack(svc, "w-old", first.task_id, first.epoch)) is True

    started = time.monotonic()
    while time.monotonic() - started < 6 and _lease_row(cql, servers.keyspace, svc, task_id) is not None:
        await _pause()
    gone = _lease_row(cql, servers.keyspace, svc, task_id) is None
    started = time.monotonic()
    again = None
    while time.monotonic() - started < 8 and again is None:
        again = await new.queue.fetch(OWNERS[0], _fetch(svc, f"w-{uuid.uuid4().hex[:6]}", fresh=True))
        if again is None:
            await _pause()
    assert again is None, (
        f"the completed task was handed out again (epoch {again and again.epoch}; done row gone: {gone})"
    )


async def test_a_task_whose_rows_record_no_end_of_life_is_still_claimed_and_acked(make_bridge, cql, servers):
    """A rolling upgrade: a task row and a lease row written by an older bridge record no end of
    life (``expires_at``). The claim then takes the task row's own TTL for it, and a write of a
    lease recording none (an ack) is accepted with the writing bridge's own TTL, as before."""
    b = await make_bridge(task_ttl=3600, hints=False)
    svc, ks = service_id(), servers.keyspace
    q = (OWNERS[0], svc)
    ids = [await b.queue.add(OWNERS[0], _add(svc, {"n": n}), message_id=None, traceparent=None) for n in range(2)]
    for task_id in ids:  # as an older bridge wrote it
        tid = uuid.UUID(task_id)
        cql.execute(
            f"UPDATE {ks}.ready SET expires_at = null WHERE owner = %s AND service = %s AND lane = 1 "
            "AND bucket = %s AND seq = %s",
            (*q, bucket_of_task(tid), tid),
        )
    b.queue.ctx.store._expiries.clear()  # type: ignore[attr-defined]  # nothing remembered from the adds

    got = await b.queue.fetch(OWNERS[0], _fetch(svc, "w1", timeToRecover=60_000))
    assert got is not None and got.task_id == ids[0]
    row = _lease_row(cql, ks, svc, got.task_id)
    ends = ms_of(uuid.UUID(got.task_id)) + 3_600_000
    assert row is not None and row["expires_at"] == ends, "the claim gives the lease the task row's own life"
    assert await b.queue.ack(OWNERS[0], _ack(svc, "w1", got.task_id, got.epoch)) is True

    other = await b.queue.fetch(OWNERS[0], _fetch(svc, "w2", timeToRecover=60_000))
    assert other is not None and other.task_id == ids[1]
    # A lease an older bridge granted: no recorded end either.
    cql.execute(
        f"UPDATE {ks}.leases SET expires_at = null WHERE owner = %s AND service = %s AND task_id = %s",
        (*q, uuid.UUID(other.task_id)),
    )
    b.queue.ctx.store._expiries.clear()  # type: ignore[attr-defined]
    assert await b.queue.ack(OWNERS[0], _ack(svc, "w2", other.task_id, other.epoch)) is True
    done = _lease_row(cql, ks, svc, other.task_id)
    assert done is not None and done["state"] == "done"


async def test_counter_rows_past_every_readers_window_are_trimmed_and_recent_ones_kept(make_bridge, cql, servers):
    """``queue_counts`` and ``delayed_counts`` are counter tables, which take no TTL: a queue with
    delayed tasks due every minute grew its ``delayed_counts`` partition by a row a minute for
    ever. The duty holder now deletes each queue's rows older than the retention (twice the TTL,
    at least 30 days, plus a day); the rows stats read are kept."""
    from bridge.domain.counting import DAY_MS, MINUTE_MS
    from bridge.domain.housekeeping import first_kept_day
    from bridge.domain.records import QueueKey

    b = await make_bridge()
    ks = servers.keyspace
    q = QueueKey(OWNERS[0], service_id())
    now = b.clock.now_ms()
    first_kept = first_kept_day(now, b.settings.task_ttl_seconds * 1000)
    assert first_kept * DAY_MS < now - 30 * DAY_MS, "stats' window (the TTL) is kept, and more"
    today, this_minute = now // DAY_MS, now // MINUTE_MS
    old_days, kept_days = (first_kept - 400, first_kept - 1), (first_kept, today)
    for day in (*old_days, *kept_days):
        await b.store.add_counts(q, day, 1, 0)
        await b.store.add_delayed(q, day * DAY_MS // MINUTE_MS + 7, 1)
    await b.store.add_delayed(q, this_minute + 5, 1)
    await b.store.register_service(q)
    before = await b.queue.stats(q.owner, q.service)

    assert await b.trim.trim_once() >= 1

    days = {
        r["day"]
        for r in cql.execute(
            f"SELECT day FROM {ks}.queue_counts WHERE owner = %s AND service = %s", (q.owner, q.service)
        )
    }
    minutes = {
        r["minute"]
        for r in cql.execute(
            f"SELECT minute FROM {ks}.delayed_counts WHERE owner = %s AND service = %s", (q.owner, q.service)
        )
    }
    assert days == set(kept_days)
    assert minutes == {d * DAY_MS // MINUTE_MS + 7 for d in kept_days} | {this_minute + 5}
    # What stats read is untouched (the window is the TTL): the same counts as before the trim.
    assert await b.queue.stats(q.owner, q.service) == before
    assert before[0].delayed >= 1, "the task due in 5 minutes"


async def test_a_result_still_owed_when_its_task_ends_reaches_the_engine(make_bridge, engine, workers, servers, names):
    """A result owed to the engine (its publish not confirmed: no queue bound, a broker outage)
    when its task's life ended was marked published unsent: its outbox row, the lease naming its
    completion and the token (in the task's own row) all expired with the task, and the relay
    found no lease, then no token, and dropped it without a word. The engine's workflow waited
    for ever. It outlives the task now (RESULT_OWED_MS), the token copied beside it."""
    from bridge.client.rpc import results_consumer
    from tests.conftest import next_result

    b = await make_bridge(results_queue="", result_republish_after=1.0, task_ttl=6)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    svc = service_id()
    await engine.add(svc, {"n": 1}, token={"workflow": "end-of-life"})
    w = await workers(svc)
    task = await w.fetch()
    assert task is not None and task.value == {"n": 1}
    assert await task.ack({"ok": True}) is True  # its publish fails: nothing is bound to the exchange
    await wait_for(lambda: b.scheduler.state.results_stuck >= 1, 20, interval=0.2, what="the result to be owed")
    store, q, task_id = b.queue.ctx.store, QueueKey(OWNERS[0], svc), uuid.UUID(task.id)
    await wait_for(lambda: _gone(store.payload(q, task_id)), 20, interval=0.2, what="the task's end (its row gone)")
    async with results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc) as got:
        message = await next_result(got, 30, "the owed result, after its task's end")
    assert message["taskId"] == task.id
    assert message["token"] == {"workflow": "end-of-life"}
    assert message["result"] == {"ok": True}


async def _gone(payload: Any) -> bool:
    return await payload is None


async def test_a_park_result_still_owed_after_a_discard_and_the_tasks_end_reaches_the_engine(
    make_bridge, engine, workers, servers, names
):
    """A park's result (the engine's delivery_limit error) still owed when an operator discarded
    the task, then the task's life ended: the discard rewrote the lease with the task's own life,
    the lease read as none past the end, and the relay voided the result unsent."""
    from bridge.client.rpc import results_consumer
    from tests.conftest import next_result

    b = await make_bridge(results_queue="", result_republish_after=1.0, task_ttl=6)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    svc = service_id()
    await engine.add(svc, {"n": 1}, token={"workflow": "parked"}, max_deliveries=1)
    w = await workers(svc)
    task = await w.fetch()
    assert task is not None
    failed = await task.fail({"why": "poison"})
    assert failed is not None and failed.parked
    assert await engine.discard(svc, [task.id]) == 1
    await wait_for(lambda: b.scheduler.state.results_stuck >= 1, 20, interval=0.2, what="the park's result owed")
    store, q, task_id = b.queue.ctx.store, QueueKey(OWNERS[0], svc), uuid.UUID(task.id)
    await wait_for(lambda: _gone(store.payload(q, task_id)), 20, interval=0.2, what="the task's end (its row gone)")
    async with results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc) as got:
        message = await next_result(got, 30, "the park's owed result, after its task's end")
    assert message["token"] == {"workflow": "parked"}
    assert message["error"]["code"] == "delivery_limit"


async def test_an_add_whose_batch_landed_only_in_part_is_indexed_when_found_stored(make_bridge, servers):
    """The bucket's index row goes in the add's own request (an UNLOGGED batch: not atomic). A
    batch that timed out may have stored the task row and not the index row; an add without a
    message-id then has no redelivered copy to index the task again (``WorkQueue._dedupe``), and
    the lookup that finds it stored (``_count_add_if_stored``) counted it and offered a hint but
    left it out of every scan: with the hint lost, or hints off, never handed out until its TTL.
    The lookup indexes it again. Found by review, 2026-12-06."""
    from bridge.domain.records import LANE_FRESH, QueueKey
    from bridge.storage.errors import StorageUnavailable

    b = await make_bridge(hints=False)
    store = b.queue.ctx.store
    real = store.db.execute_batch

    async def task_row_only(name: str, items: Any) -> None:
        if name == "add.indexed":
            for part, params in items:
                if part == "ready.insert":
                    await store.db.execute(part, params)
            raise StorageUnavailable("write timed out (test): the index row was not applied")
        await real(name, items)

    store.db.execute_batch = task_row_only
    svc = service_id()
    q = QueueKey(OWNERS[0], svc)
    with pytest.raises(StorageUnavailable):
        await b.queue.add(OWNERS[0], _add(svc, {"n": 1}), message_id=None, traceparent=None)
    store.db.execute_batch = real
    (task_id,) = [t for t, counted in b.queue._adds_in_doubt.items() if counted is False]
    bucket = bucket_of_task(task_id)
    assert bucket not in await store.buckets_from(q, LANE_FRESH, bucket, 4), "set-up: the index row was written"
    # The lookup (2 s after the write) finds the task stored and indexes its bucket again.
    await wait_for(lambda: b.queue._adds_in_doubt.get(task_id) is True, 15, what="the uncertain add counted")
    indexed = await store.buckets_from(q, LANE_FRESH, bucket, 4)
    assert bucket in indexed, "a stored task left out of every scan"
    got = await b.queue.fetch(OWNERS[0], _fetch(svc, "w1", timeToRecover=60_000))
    assert got is not None and got.task_id == str(task_id)
