"""Races on the fetch path: two fetches of one worker id at once, stale pointers, clocks (real servers).

Each test failed before its fix; the docstrings say what was wrong."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest

from bridge.domain.records import LANE_FRESH, QueueKey
from tests.conftest import OWNERS, service_id, wait_for
from tests.integration.test_client_resilience import _waiters, named_worker

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_stale_pointer_clear_keeps_the_pointer_an_overlapping_fetch_just_wrote(
    bridge, engine, servers, names, cql
):
    """As test_client_resilience's orphaned long-poll, but the worker had acked a task before
    (through the one-LWT named ack, which leaves the pointer naming it). The second, not-fresh
    long-poll reads that stale pointer (its resend fails: the task is done), waits, finds
    nothing and then clears the pointer *blindly*, stamped with its own present: that wipes the
    write-ahead pointer the orphaned fetch wrote meanwhile for the task it claimed. The worker's
    next fetch (not fresh) then cannot get its task back: it stays leased for 60 s."""
    svc = service_id()
    w, _ = await named_worker(servers, names, svc)
    try:
        await engine.add(svc, {"n": 0})
        t0 = await wait_for(w.fetch, 10.0, what="the first task")
        assert await t0.ack("ok") is True  # tokenless named ack: the pointer still names t0

        first = asyncio.create_task(w.fetch(wait_ms=8_000))  # fresh
        await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the first long-poll waiting")
        # The caller stops waiting on a live connection (a client-side cancel): the bridge's
        # fetch goes on, and its requester is still there (a worker whose connection closed
        # claims nothing: test_waiters_and_hint_queues).
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first

        second = asyncio.create_task(w.fetch(wait_ms=2_000))  # not fresh: reads the stale pointer
        await wait_for(lambda: _waiters(bridge) == 2, 10.0, what="the orphan and the new long-poll waiting")
        task_id = await engine.add(svc, {"n": 1})
        assert await asyncio.wait_for(second, 10.0) is None  # the orphan took the hint
        ks, tid = servers.keyspace, uuid.UUID(task_id)
        lease = cql.execute(
            f"SELECT state, worker FROM {ks}.leases WHERE owner=%s AND service=%s AND task_id=%s", (OWNERS[0], svc, tid)
        ).one()
        assert lease == {"state": "leased", "worker": "w1"}  # claimed for w1 by the orphan
        pointer = cql.execute(
            f"SELECT task_id FROM {ks}.workers WHERE owner=%s AND service=%s AND worker=%s", (OWNERS[0], svc, "w1")
        ).one()
        assert pointer["task_id"] == tid, f"w1's pointer was wiped: {pointer}"

        again = await w.fetch()
        assert again is not None and again.id == task_id, (
            "the task leased to this worker by its orphaned long-poll is not handed back: the "
            "overlapping fetch's clear of its stale pointer wiped the orphan's write-ahead pointer"
        )
    finally:
        await w.close()


def _fetch_req(svc: str, worker: str, **kw: object):  # type: ignore[no-untyped-def]
    from bridge.domain.models import FetchRequest

    return FetchRequest.model_validate({"serviceId": svc, "workerId": worker, "timeToRecover": 60_000, **kw})


def _ack_req(svc: str, worker: str, task_id: str, epoch: int):  # type: ignore[no-untyped-def]
    from bridge.domain.models import AckRequest

    body = {"serviceId": svc, "workerId": worker, "taskId": task_id, "epoch": epoch, "hasToken": False, "result": 1}
    return AckRequest.model_validate(body)


async def test_a_fresh_fetch_on_a_bridge_behind_keeps_its_pointer_against_the_one_ahead(make_bridge, engine):
    """Worker pointers are promised to be Lamport-stamped ("a write that causally follows another
    always wins, whatever the clocks"). A ``fresh`` fetch skips the pointer read, so its
    write-ahead is stamped with its own present only: on a bridge whose clock is behind the one
    that wrote the previous pointer (within the margin), the new pointer loses last-write-wins and
    the row keeps naming the previous, acked task. The worker's retry of that fetch (a lost
    reply: not fresh) then does not get its task back: it stays leased to it until the lease ends."""
    host = {"clock_source": "host", "clock_skew_margin": 1.0}
    ahead = await make_bridge(clock_offset_ms=400, **host)
    behind = await make_bridge(clock_offset_ms=-400, **host)
    svc = service_id()
    owner = OWNERS[0]
    ids = [await engine.add(svc, {"n": i}) for i in range(2)]

    first = await wait_for(
        lambda: ahead.queue.fetch(owner, _fetch_req(svc, "w")), 10.0, what="the first task on the bridge ahead"
    )
    assert first.task_id == ids[0]
    assert await behind.queue.ack(owner, _ack_req(svc, "w", first.task_id, first.epoch)) is True
    second = await behind.queue.fetch(owner, _fetch_req(svc, "w", fresh=True))
    assert second is not None and second.task_id == ids[1]
    # The reply of that fetch was lost: the worker asks again, not fresh.
    again = await behind.queue.fetch(owner, _fetch_req(svc, "w"))
    assert again is not None and again.task_id == ids[1], (
        "the task the fresh fetch leased to this worker is not handed again: its pointer write "
        "lost last-write-wins to the previous pointer written by a bridge 800 ms ahead"
    )


async def test_an_add_retried_in_place_never_lands_behind_the_scan_position(make_bridge, engine, workers, monkeypatch):
    """An add whose store failed (``unavailable``) is retried in place for up to 30 s with the
    same prepared task, so its task id (its place in the ready index) is the time of the first
    attempt. Meanwhile a later task was added, claimed and acked, and a scan moved the lane's
    position past it once it was older than the settle window (margin + 1 s). The retried add's
    row then landed *behind* the position: with hints off (every fetch scans) no fetch ever found
    it, though the add was answered (with hints on, the same for reconciliation when its hint is
    lost). An attempt that never reached Cassandra is now retried under a new id."""
    from bridge.storage.errors import StorageNotSent

    b = await make_bridge(hints=False)
    store = b.queue.ctx.store
    real, prepare = store.store_task, b.queue.prepare_add
    late: list[uuid.UUID] = []  # every id the first add was prepared with: its first, then new ones
    released = asyncio.Event()

    async def prepare_add(owner, cmd, **kw):  # type: ignore[no-untyped-def]
        pending = await prepare(owner, cmd, **kw)
        if orjson.dumps(cmd.value) == b'"retried in place"':  # (held as its JSON: an orjson.Fragment)
            late.append(pending.task_id)
        return pending

    async def store_task(q, task_id, payload, **kw):  # type: ignore[no-untyped-def]
        # Every attempt of the first add fails until released, under whichever id: a retry under
        # a new id (once its first is stale, 0.5 s) stored it before the position had moved on
        # when the steps below took over 2.4 s (a loaded CI), and the test failed on its task.
        if task_id in late and not released.is_set():
            raise StorageNotSent("cassandra unavailable: no host available (injected)")
        await real(q, task_id, payload, **kw)

    monkeypatch.setattr(b.queue, "prepare_add", prepare_add)
    monkeypatch.setattr(store, "store_task", store_task)
    svc = service_id()
    add_late = asyncio.create_task(engine.add(svc, "retried in place"))
    await wait_for(lambda: late, 10.0, what="the first add's first attempt failing")

    later = await engine.add(svc, "added meanwhile")
    w = await workers(svc, "w")
    got = await w.fetch()
    assert got is not None and got.id == later
    assert await got.ack("ok") is True

    lane = (QueueKey(OWNERS[0], svc), LANE_FRESH)

    async def position_passed_the_acked_task() -> bool:
        assert await w.fetch() is None
        pos = b.queue.dispatcher._lanes[lane].position
        return pos is not None and pos[1] is not None and pos[1] == uuid.UUID(later)

    # Once the acked task is older than the settle window (margin + 1 s), a scan moves past it.
    await wait_for(position_passed_the_acked_task, 10.0, interval=0.2, what="the position past the acked task")

    released.set()
    late_id = await asyncio.wait_for(add_late, 15.0)  # answered: the add is accepted
    assert uuid.UUID(late_id) != late[0], "retried under its first, stale id"

    async def handed_out() -> bool:
        found = await w.fetch()
        assert found is None or found.id == late_id
        return found is not None

    await wait_for(handed_out, 8.0, interval=0.2, what="the task of the add retried in place")
