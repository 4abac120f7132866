"""Parking edges on the real servers: a park's owed result survives a discard, and a redrive met by the
scheduler before its unpark is still handed out (each failed before its fix)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from bridge.client.rpc import results_consumer
from bridge.domain.records import QueueKey
from tests.conftest import OWNERS, next_result, service_id, wait_for
from tests.integration.test_lifecycle import FAST, call, counts_become, fetch_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def add_limited(engine: Any, svc: str, value: Any, limit: int, token: Any = None) -> str:
    body: dict[str, Any] = {"serviceId": svc, "value": value, "maxDeliveries": limit}
    if token is not None:
        body["token"] = token
    reply = await engine.call("add", body, owner=OWNERS[0])
    return str(reply["task"]["id"])


async def park_by_its_worker(engine: Any, workers: Any, svc: str, ttr: int | None = None) -> tuple[str, Any]:
    """A task with a limit of one delivery, fetched by worker ``w`` and failed: parked. Returns
    (its id, the worker)."""
    task_id = await add_limited(engine, svc, "poison", 1)
    w = await workers(svc, "w")
    got = await fetch_until(w, 5, ttr=ttr)
    assert got["task"]["id"] == task_id
    assert (await call(w, "fail", {"serviceId": svc, "workerId": "w"}))["task"]["parked"] is True
    return task_id, w


async def park_owing_its_result(make_bridge: Any, engine: Any, workers: Any) -> tuple[Any, str, str]:
    """A bridge that cannot publish results yet (no results queue bound), and a token task parked
    by its worker's fail at a limit of 1: the relay owes its delivery_limit result."""
    b = await make_bridge(results_queue="", result_republish_after=1.0)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    svc = service_id()
    task_id = await engine.add(svc, "poison", token={"wf": 8}, max_deliveries=1)
    w = await workers(svc, "w")
    task = await w.fetch()
    assert task is not None and task.id == task_id
    reply = await w.call("fail", {"serviceId": svc, "workerId": "w", "taskId": task_id, "epoch": task.epoch})
    assert reply["task"]["parked"] is True
    await wait_for(lambda: b.scheduler.state.results_stuck >= 1, 30, interval=0.2, what="the park result owed")
    return b, svc, task_id


async def test_a_pending_park_result_is_still_published_after_a_discard(make_bridge, engine, workers, servers, names):
    """A task with a token parked while its delivery_limit result cannot be published yet (no
    queue bound for a while, a broker blip, the bridge killed after the park's LWT): the relay owes
    it. An operator discards the task before the relay's next try. ``discard`` (lease.cancel
    parked -> discarded) overwrites the lease's ``completion_id`` with its own id, and the relay
    (``names_entry``) then takes the park's outbox entry for a park that never applied and marks it
    published unsent: the engine never hears of the park, its workflow waits for ever."""
    _, svc, task_id = await park_owing_its_result(make_bridge, engine, workers)
    # The operator drops the parked task: discard publishes nothing of its own, but the park's
    # delivery_limit result is still owed to the engine (one result per park).
    assert await engine.discard(svc, [task_id]) == 1
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        # The relay retries the owed result (1 s, 2 s, 4 s ...). Not waited for by its count of
        # stuck results: that counts the whole keyspace's, and earlier tests leave some owed on
        # purpose (a CI run went red on one whose owner's key a test had taken away).
        got = await next_result(results, 40, "the delivery_limit result of the park (dropped unpublished)")
        assert got["taskId"] == task_id and got["error"]["code"] == "delivery_limit"


@pytest.mark.parametrize("met_by", ["a pass", "the look-ahead"])
async def test_a_redrive_read_by_the_scheduler_before_its_unpark_is_still_handed_out(
    make_bridge, engine, workers, monkeypatch, met_by
):
    """lifecycle.py: "a redrive files a deadline before it unparks, so the scheduler re-exposes
    it". A scheduler tick that reads that deadline between the write-ahead and the unpark finds the
    lease still ``parked``; ``_handle`` answers "handled" (not leased: final for this entry) and the
    entry's key (task, epoch) goes into the bucket's handled set. The unpark keeps the epoch, so the
    same key now names a lease that needs re-exposing, and both passes of the bucket skip it. Only
    the redriving bridge's in-memory timer (``soon``) is left; if that bridge dies or stops right
    after the unpark, or the timer's one lease read fails (swallowed: "the wheel entry is met by the
    scheduler anyway"), the task stays ``leased`` to nobody with a past deadline and no ready entry:
    never handed out again, not parked, not listed, counted ready until its TTL.

    The redrive files its deadline one bucket ahead, the bucket the scheduler's look-ahead
    (``_arm``) reads once, moments before it runs: met there, the parked lease was taken for final
    in the same way (a review found it after ``_handle`` was fixed)."""
    from bridge.domain.timeline import expiry_bucket
    from bridge.storage.errors import StorageUnavailable

    b = await make_bridge(**FAST)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    store, sched = b.queue.ctx.store, b.scheduler
    svc = service_id()
    q = QueueKey(OWNERS[0], svc)
    task_id, w = await park_by_its_worker(engine, workers, svc, ttr=300)
    # The claim's own deadline (300 ms) is past and confirmed by the scheduler's passes.
    claim_bucket = expiry_bucket(int(time.time() * 1000) + 1000)
    await wait_for(lambda: (sched.expiry_position or 0) > claim_bucket, 20, what="the claim's deadline passed")

    real_watch, real_unpark, real_lease = store.watch_expiry, store.unpark, store.lease
    filed: list[Any] = []
    unparked = asyncio.Event()
    timer_read_failed = asyncio.Event()

    async def watch_expiry(bucket: int, entry: Any, **kw: Any) -> None:
        await real_watch(bucket, entry, **kw)
        if str(entry.task_id) == task_id:
            filed.append((bucket, entry))

    real_handle = sched._handle
    met_parked = asyncio.Event()

    async def handle(entry: Any, lease: Any, *args: Any, **kwargs: Any) -> bool:
        settled = await real_handle(entry, lease, *args, **kwargs)
        if filed and entry == filed[-1][1] and lease is not None and lease.state.value == "parked":
            met_parked.set()
        return settled

    async def unpark(*args: Any, **kwargs: Any) -> Any:
        # The natural interleaving: a scheduler tick meets the redrive's deadline (written ahead)
        # between the write-ahead and the unpark compare-and-set, the lease still parked.
        if met_by == "the look-ahead":
            # The tick that reads the next bucket ahead, at this moment (its timing is the
            # scheduler's: called here, the interleaving is certain).
            bucket, entry = filed[-1]
            ahead = await store.expiries(bucket)
            assert entry in ahead
            await sched._arm(bucket, ahead)
            met_parked.set()
        await asyncio.wait_for(met_parked.wait(), 10)
        res = await real_unpark(*args, **kwargs)
        unparked.set()
        return res

    async def lease(qk: Any, tid: uuid.UUID, *, serial: bool = True) -> Any:
        if unparked.is_set() and not timer_read_failed.is_set() and str(tid) == task_id:
            timer_read_failed.set()  # the redriving bridge's own timer: one read times out
            raise StorageUnavailable("cassandra read timed out (injected)")
        return await real_lease(qk, tid, serial=serial)

    monkeypatch.setattr(store, "watch_expiry", watch_expiry)
    monkeypatch.setattr(store, "unpark", unpark)
    if met_by == "a pass":
        monkeypatch.setattr(sched, "_handle", handle)
    monkeypatch.setattr(store, "lease", lease)
    assert (await call(engine, "redrive", {"serviceId": svc, "taskIds": [task_id]}))["result"] == {"redriven": 1}
    await wait_for(timer_read_failed.is_set, 5, what="the timer's read")
    # "a redrive files a deadline before it unparks, so the scheduler re-exposes it": both passes
    # of its bucket are over within late_ms (5 s) of it.
    try:
        again = await fetch_until(w, 15)
    except AssertionError:
        cur = await real_lease(q, uuid.UUID(task_id), serial=True)
        raise AssertionError(f"the redriven task was never handed out again; its lease: {cur}") from None
    assert again["task"]["id"] == task_id


async def test_stale_parked_rows_hide_neither_the_listing_nor_redrive_all(bridge, engine, workers, cql, servers):
    """A parked-index row outlives its park when a bridge dies between a redrive's unpark and the
    row's delete, or between a discard's compare-and-set and its delete. Listing and ``redrive
    all`` read the first rows of the index and skip those whose lease is no longer parked, but
    never removed them: with ``limit`` such rows ahead (1,000 for ``redrive all``) the queue
    listed no parked task and ``redrive all`` answered 0, which the client takes for "none left",
    while a task stayed parked behind them until its TTL."""
    from cassandra.util import uuid_from_time  # type: ignore[import-untyped]

    svc = service_id()
    task_id, w = await park_by_its_worker(engine, workers, svc)

    # What such crashes leave: index rows of earlier tasks whose leases are no longer parked (here
    # gone altogether, as once a discarded task's lease expired), ahead of the parked task's row.
    ks = servers.keyspace
    insert = cql.prepare(
        f"INSERT INTO {ks}.parked (owner, service, task_id, epoch, parked_at, reason, has_token) "
        "VALUES (?, ?, ?, 1, toTimestamp(now()), 'delivery_limit', false) USING TTL 600"
    )
    from cassandra.concurrent import execute_concurrent_with_args  # type: ignore[import-untyped]

    start = time.time() - 3600
    stale = [(OWNERS[0], svc, uuid_from_time(start + i / 1000)) for i in range(1000)]
    execute_concurrent_with_args(cql, insert, stale, concurrency=64, raise_on_first_error=True)

    listed = await engine.parked(svc)
    assert [t.id for t in listed] == [task_id], "the parked task is not listed behind stale index rows"
    assert await engine.redrive(svc, all=True) == 1, "redrive all did not reach the parked task"
    again = await fetch_until(w, 10)
    assert again["task"]["id"] == task_id


async def test_a_scheduler_park_whose_first_copy_lands_after_its_read_still_tells_the_engine(
    make_bridge, engine, workers, servers, names, monkeypatch
):
    """A scheduler's park (``park_expired``) is not sent twice: its outcome, unknown, is judged by
    a SERIAL read alone. A first copy still queued at a stalled coordinator then lands after the
    read said "not parked". The park voided its delivery_limit result (marked published unsent) and
    removed its index row, and the next pass's park was refused (parked already) and voided its own:
    the task sat parked, the engine never heard of it, and the listing did not show it."""
    from bridge.storage.errors import UnknownOutcome

    b = await make_bridge(**FAST)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    store, life = b.queue.ctx.store, b.queue.lifecycle
    svc = service_id()
    task_id = await add_limited(engine, svc, "poison", 1, token={"wf": 11})
    real_write, real_park = store._lease_write, life.park
    judged = asyncio.Event()
    landed: list[Any] = []

    async def land_late(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        await judged.wait()  # the park was judged not applied, and its caller went on
        landed.append(await real_write(*args, **kwargs))

    async def lease_write(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "lease.park_expired" and str(tid) == task_id and not landed and not judged.is_set():
            asyncio.get_running_loop().create_task(land_late((tid, name, *args), kwargs))
            raise UnknownOutcome("the park's reply timed out (injected); its first copy lands later")
        return await real_write(tid, name, *args, **kwargs)

    async def park(q: Any, tid: uuid.UUID, *args: Any, **kwargs: Any) -> bool:
        parked = await real_park(q, tid, *args, **kwargs)
        if str(tid) == task_id:
            judged.set()
        return parked

    monkeypatch.setattr(store, "_lease_write", lease_write)
    monkeypatch.setattr(life, "park", park)
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        w = await workers(svc, "w")
        got = await fetch_until(w, 5, ttr=300)  # never acked: parked when its lease ends (limit 1)
        assert got["task"]["id"] == task_id
        await wait_for(lambda: bool(landed), 20, what="the park's first copy landing after its read")
        got = await next_result(results, 45, "the engine's delivery_limit result (voided by a park judged not applied)")
        assert got["taskId"] == task_id and got["error"]["code"] == "delivery_limit"
    listed = await call(engine, "parked", {"serviceId": svc})
    assert [t["id"] for t in listed["result"]["tasks"]] == [task_id], listed


async def test_a_redrive_whose_unpark_reply_is_lost_counts_the_task_claimed_moments_after(
    make_bridge, engine, workers, monkeypatch
):
    """An unpark whose reply is lost is judged by a SERIAL read: "ours if the lease names our claim
    id". A waiting worker's claim, moments after the unpark, writes its own claim id: the redrive
    was judged not applied. It answered ``redriven: 0`` for a task it put back, never counted the
    task ready (the claim counted it out of ready: one below the truth for the task's day) and
    left its parked row (stats showed it parked while a worker held it)."""
    from bridge.storage.errors import UnknownOutcome

    b = await make_bridge(**FAST)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    store = b.queue.ctx.store
    svc = service_id()
    task_id, _ = await park_by_its_worker(engine, workers, svc)
    await counts_become(engine, svc, {"ready": 0, "inFlight": 0, "parked": 1})
    other = await workers(svc, "other")
    waiting = asyncio.ensure_future(other.fetch(wait_ms=15_000))
    real_write = store._lease_write

    async def lease_write(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        rows = await real_write(tid, name, *args, **kwargs)
        if name == "lease.unpark" and str(tid) == task_id:
            # Applied; its reply is lost while the waiting worker claims the task it put back.
            await asyncio.wait_for(asyncio.shield(waiting), 10)
            raise UnknownOutcome("the unpark's reply timed out (injected)")
        return rows

    monkeypatch.setattr(store, "_lease_write", lease_write)
    assert (await call(engine, "redrive", {"serviceId": svc, "taskIds": [task_id]}))["result"] == {"redriven": 1}
    task = await waiting
    assert task is not None and task.id == task_id
    await counts_become(engine, svc, {"ready": 0, "inFlight": 1, "parked": 0})


async def test_stats_count_only_the_parked_index_rows_whose_task_is_still_parked(bridge, engine, workers, cql, servers):
    """Stats counted the parked index's rows as they were. A row outlives its park when a bridge
    dies between a redrive's (or discard's, or cancel's) compare-and-set and the row's delete, and
    only a listing removes it: stats and the parked gauge showed tasks parked that a worker held,
    or that were long done, until someone listed the queue."""
    from cassandra.util import uuid_from_time  # type: ignore[import-untyped]

    svc = service_id()
    await park_by_its_worker(engine, workers, svc)
    held = await engine.add(svc, "held by a worker")
    other = await workers(svc, "other")
    assert (await fetch_until(other, 5))["task"]["id"] == held
    ks = servers.keyspace
    insert = cql.prepare(
        f"INSERT INTO {ks}.parked (owner, service, task_id, epoch, parked_at, reason, has_token) "
        "VALUES (?, ?, ?, 1, toTimestamp(now()), 'delivery_limit', false) USING TTL 600"
    )
    # What such crashes leave: a row of a task a worker holds now, and rows of tasks long gone.
    for stale in [uuid.UUID(held), *(uuid_from_time(time.time() - 3600 + i) for i in range(3))]:
        cql.execute(insert, (OWNERS[0], svc, stale))
    await counts_become(engine, svc, {"parked": 1, "inFlight": 1})


async def test_a_cancel_of_a_parked_task_whose_index_row_delete_fails_answers_true(
    make_bridge, engine, workers, monkeypatch
):
    """A cancel (or discard, or redrive) whose decision applied and whose parked-index row delete
    then failed was answered ``unavailable``; the caller's retry found the task cancelled already
    and answered false ("it had finished or is unknown") for a task this request cancelled."""
    from bridge.storage.errors import StorageUnavailable

    b = await make_bridge(**FAST)
    svc = service_id()
    task_id, _ = await park_by_its_worker(engine, workers, svc)

    async def remove_parked(*args: Any, **kwargs: Any) -> None:
        raise StorageUnavailable("cassandra write timed out (injected)")

    monkeypatch.setattr(b.queue.ctx.store, "remove_parked", remove_parked)
    assert (await call(engine, "cancel", {"serviceId": svc, "taskId": task_id}))["result"] is True
    await counts_become(engine, svc, {"parked": 0})  # the row left behind is not counted
