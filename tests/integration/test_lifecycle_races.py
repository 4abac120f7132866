"""Races between lifecycle RPCs on one task: each test forces one interleaving by holding a store
call of the bridge at a gate (as tests/integration/test_lifecycle.py does), never by sleeping. Each
failed before its fix; the docstrings say what was wrong."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from bridge.client.rpc import Engine
from bridge.domain.records import QueueKey
from tests.conftest import OWNERS, service_id, wait_for

# The helpers of the lifecycle tests: one copy for both files.
from tests.integration.test_lifecycle import FAST, call, fetch_until, parked_ids, stats_row

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def add_limited(engine: Engine, svc: str, value: Any, limit: int) -> str:
    reply = await engine.call("add", {"serviceId": svc, "value": value, "maxDeliveries": limit}, owner=OWNERS[0])
    return str(reply["task"]["id"])


# -- extend vs the scheduler parking the lease at its deadline ---------------------------------------
async def test_an_extend_that_refuses_the_schedulers_park_leaves_the_lease_watched(
    make_bridge, engine, workers, monkeypatch
):
    """The contract: "an extend after the lease ran out but before another fetch took the task still
    renews it". At the delivery limit the scheduler parks an expired lease instead of re-exposing it;
    an extend landing between its lease read and its park compare-and-set renews the lease and the
    park is refused. ``_handle`` then answers "handled" (scheduler.py, the park branch returns True
    whatever ``park`` answered) and nobody files the extended deadline in the timer wheel (extend
    never files one: it relies on the scheduler re-watching the old one). If the worker then dies,
    the task stays leased for its whole TTL: never parked, never handed out, never told to the engine."""
    b = await make_bridge(**FAST)
    store = b.queue.ctx.store
    real = store.add_parked
    arrivals: list[float] = []
    go = asyncio.Event()

    async def add_parked(*args: Any, **kwargs: Any) -> None:
        arrivals.append(time.monotonic())
        await asyncio.wait_for(go.wait(), 10)  # the interleaving: the extend lands in between
        await real(*args, **kwargs)

    monkeypatch.setattr(store, "add_parked", add_parked)
    svc = service_id()
    task_id = await add_limited(engine, svc, "v", 1)
    w = await workers(svc, "w")
    got = await fetch_until(w, 5, ttr=100)
    assert got["task"]["id"] == task_id
    # Both readers of the deadline (this bridge's timer for its own claim, and the scheduler's
    # pass over the running bucket) read the expired lease and went to park it.
    await wait_for(lambda: len(arrivals) >= 2, 10, what="the timer and the scheduler's pass parking the lease")
    # A late heartbeat (allowed: nobody took the task): a short lease, then the worker dies.
    ext = {"serviceId": svc, "workerId": "w", "taskId": task_id, "epoch": 1, "timeToRecover": 500}
    assert (await call(w, "extend", ext))["result"] is True
    go.set()
    # The extended lease runs out (0.5 s + margin) with the task at its limit: it must be parked
    # now (reason delivery_limit). The scheduler's second pass (late_ms) is well within 15 s.
    try:
        await wait_for(lambda: _parked(engine, svc, task_id), 15, interval=0.2)
    except AssertionError:
        lease = await store.lease(QueueKey(OWNERS[0], svc), uuid.UUID(task_id), serial=True)
        raise AssertionError(
            f"15 s after the extended lease ran out (0.5 s), the task is not parked: its lease is {lease}"
        ) from None


async def _parked(engine: Engine, svc: str, task_id: str) -> bool:
    return task_id in await parked_ids(engine, svc)


# -- redrive vs a fast re-park of the same task --------------------------------------------------------
async def test_redrive_does_not_delete_the_parked_row_of_a_later_park(make_bridge, engine, workers, monkeypatch):
    """``redrive`` unparks a task, then deletes its parked-index row unconditionally
    (lifecycle.py ``remove_parked(q, task_id)`` without the epoch). When the redriven task is claimed
    and parked again before that delete lands (a worker failing it at once on a task with
    ``maxDeliveries: 1``, another bridge fast while this one is slow), the delete takes the *new*
    park's row: the task is parked, but ``parked`` does not list it, ``stats`` counts 0 parked, and
    ``redrive all`` never finds it again."""
    b = await make_bridge(**FAST)
    store = b.queue.ctx.store
    real = store.remove_parked
    reached, go = asyncio.Event(), asyncio.Event()

    async def remove_parked(*args: Any, **kwargs: Any) -> None:
        if not reached.is_set():  # the first: redrive's
            reached.set()
            await asyncio.wait_for(go.wait(), 15)
        await real(*args, **kwargs)

    monkeypatch.setattr(store, "remove_parked", remove_parked)
    svc = service_id()
    task_id = await add_limited(engine, svc, "poison", 1)
    w = await workers(svc, "w")
    assert (await fetch_until(w, 5))["task"]["id"] == task_id
    first = await call(w, "fail", {"serviceId": svc, "workerId": "w", "error": {"n": 1}})
    assert first["task"]["parked"] is True
    assert await parked_ids(engine, svc) == [task_id]
    redrive = asyncio.create_task(call(engine, "redrive", {"serviceId": svc, "taskIds": [task_id]}))
    await wait_for(reached.is_set, 10, what="redrive unparked the task")
    # The redriven task comes back and fails again at once: parked again (epoch 2).
    again = await fetch_until(w, 5)
    assert again["task"]["id"] == task_id and again["task"]["epoch"] == 2
    second = await call(w, "fail", {"serviceId": svc, "workerId": "w", "error": {"n": 2}})
    assert second["task"]["parked"] is True
    go.set()
    assert (await redrive)["result"] == {"redriven": 1}
    assert await parked_ids(engine, svc) == [task_id], "a parked task missing from the parked listing"
    assert (await stats_row(engine, svc))["parked"] == 1


# -- two redrives at once --------------------------------------------------------------------------
async def test_two_concurrent_redrives_keep_to_the_redrive_rate(make_bridge, engine, workers, monkeypatch):
    """docs/asyncapi.yaml: ``redrive`` puts parked tasks back "at most BRIDGE_REDRIVE_RATE a second,
    so that a batch of poison tasks cannot take every worker at once". The pause is per request
    (lifecycle.py ``redrive``: ``asyncio.sleep(interval)`` between its own redriven tasks), and the
    bridge runs lifecycle requests side by side: two requests at once put their tasks back at twice
    the rate (N requests, N times; and each bridge of the fleet has its own). (Two ``redrive all``
    at once mostly collide on the same tasks and keep near the rate, but a request whose
    compare-and-set lost goes on to its next task without pausing: two tasks at once at the start.)"""
    rate = 5.0
    b = await make_bridge(**FAST, redrive_rate=rate)
    store = b.queue.ctx.store
    real = store.unpark
    applied: list[float] = []

    async def unpark(*args: Any, **kwargs: Any) -> Any:
        res = await real(*args, **kwargs)
        if res.applied:
            applied.append(time.monotonic())
        return res

    monkeypatch.setattr(store, "unpark", unpark)
    svc = service_id()
    n = 8
    for i in range(n):
        await add_limited(engine, svc, i, 1)
    w = await workers(svc, "w")
    for _ in range(n):
        await fetch_until(w, 5)
        assert (await call(w, "fail", {"serviceId": svc, "workerId": "w"}))["task"]["parked"] is True
    ids = await parked_ids(engine, svc)
    assert len(ids) == n
    # Two requests at once, each naming half of the batch (two operators, or a script redriving
    # a long list in parallel requests): together they must still keep to the rate.
    halves = [{"serviceId": svc, "taskIds": ids[: n // 2]}, {"serviceId": svc, "taskIds": ids[n // 2 :]}]
    first, second = await asyncio.gather(*(call(engine, "redrive", h) for h in halves))
    assert first["result"]["redriven"] + second["result"]["redriven"] == n, "each task redriven exactly once"
    assert len(applied) == n
    span = applied[-1] - applied[0]
    # At the rate: (n - 1) pauses of 1/rate between the n tasks put back.
    assert span >= 0.9 * (n - 1) / rate, f"{n} tasks put back in {span:.2f}s: faster than {rate}/s"


# -- the client's keep_alive heartbeat while the handler acks -------------------------------------------
async def test_a_beat_answered_false_while_the_ack_is_in_flight_is_not_a_loss(bridge, engine, workers, monkeypatch):
    """``Task.keep_alive`` (bridge/client/rpc.py): "a beat in flight when the handler acks is
    answered false (the task is done): not lost" (tests/unit/test_client_lifecycle.py). That holds
    only when the ack's answer comes back first: ``Task.extend`` sets ``lost`` unless ``_settled``,
    and ``_settled`` is set only once the ack is *answered*. A beat the bridge handles after the
    ack's compare-and-set but answers before the ack's reply arrives (ack and extend are consumed
    from two queues, side by side) marks the task lost, and logs that it is no longer this
    worker's, although this very ack completed it."""
    store = bridge.queue.ctx.store
    real_complete, real_extend = store.complete, store.extend
    completed, refused, go = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def complete(*args: Any, **kwargs: Any) -> Any:
        res = await real_complete(*args, **kwargs)
        if res.applied:
            completed.set()
            await asyncio.wait_for(go.wait(), 10)  # the ack's reply is on its way (held here)
        return res

    async def extend(*args: Any, **kwargs: Any) -> Any:
        res = await real_extend(*args, **kwargs)
        if not res.applied and completed.is_set():
            refused.set()
        return res

    monkeypatch.setattr(store, "complete", complete)
    monkeypatch.setattr(store, "extend", extend)
    svc = service_id()
    await engine.add(svc, {"job": 1})
    w = await workers(svc, "w")
    task = await w.fetch(time_to_recover_ms=10_000)
    assert task is not None
    real_renew = w._renew
    answered_false = asyncio.Event()

    async def renew(*args: Any, **kwargs: Any) -> Any:
        out = await real_renew(*args, **kwargs)
        if out is None:
            answered_false.set()
        return out

    monkeypatch.setattr(w, "_renew", renew)
    async with task.keep_alive(every_s=0.05):
        ack = asyncio.create_task(task.ack("done"))
        await wait_for(completed.is_set, 10, what="the ack's compare-and-set")
        await wait_for(answered_false.is_set, 10, what="a beat answered false after the completion")
        assert refused.is_set()
        go.set()
        assert await ack is True
    assert not task.lost, "the task this worker just completed is marked lost"


# -- a late copy of an extend vs the worker's own later extend ------------------------------------------
async def test_a_late_extend_never_shortens_a_lease_below_what_its_worker_was_told(make_bridge, engine, workers):
    """A worker's extend reached bridge B1, which computed its deadline (now + timeToRecover) and
    stalled (a paused VM, a slow coordinator) before its compare-and-set; the worker's retry went
    through B2 and was told a later deadline. B1's extend then ran, was refused (the lease ends
    later than its deadline) and took itself for a shortening: it set the lease to its older
    deadline, and another worker took the task while the first still held it, as told (found by
    review, 2026-12-06). A shortening measures its deadline from the moment it applies."""
    from bridge.domain.models import ExtendRequest, parse

    first, second = await make_bridge(), await make_bridge()
    svc = service_id()
    q = QueueKey(OWNERS[0], svc)
    task_id = await engine.add(svc, "long work")
    w = await workers(svc, "w")
    task = await w.fetch(time_to_recover_ms=20_000)
    assert task is not None and task.id == task_id
    real = first.store.extend
    stalled, resume = asyncio.Event(), asyncio.Event()

    async def stalls_once(*args: Any, **kwargs: Any) -> Any:
        if not stalled.is_set():
            stalled.set()
            await resume.wait()
        return await real(*args, **kwargs)

    first.store.extend = stalls_once  # type: ignore[method-assign]
    body = {"serviceId": svc, "workerId": "w", "taskId": task_id, "epoch": task.epoch, "timeToRecover": 20_000}
    late = asyncio.ensure_future(first.queue.extend(OWNERS[0], parse(ExtendRequest, body)))
    await wait_for(stalled.is_set, 10, what="B1's extend stalled before its compare-and-set")
    began = first.queue.clock.now_ms()
    await wait_for(lambda: first.queue.clock.now_ms() > began + 1_500, 10, what="time passing")
    told = await second.queue.extend(OWNERS[0], parse(ExtendRequest, body))
    assert told is not None
    resume.set()
    await asyncio.wait_for(late, 20)
    lease = await second.store.lease(q, uuid.UUID(task_id))
    assert lease is not None and lease.worker == "w"
    assert lease.lease_until_ms is not None and lease.lease_until_ms >= told.lease_until_ms, (
        f"the lease ends {told.lease_until_ms - lease.lease_until_ms} ms before the deadline its worker was told"
    )
