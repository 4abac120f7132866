"""Operator and engine operations racing the workers, on a fleet of two bridges.

cancel (engine side), purge (ready tasks only), park / redrive / discard run on one bridge (called
on its ``WorkQueue`` directly, so that it is *that* bridge) while workers fetch, ack and fail over
AMQP, served by both bridges. Each test checks the contract's promises once the race
has settled: no task both cancelled and completed, purge never takes an in-flight task nor leaves
a task ready before it, a parked task redriven or discarded, never both, never handed out twice
at once, the engine told exactly once per park (a park's result still owed when the task is
redriven and parked again included) and never for a cancel, and stats back to exact values once
quiet.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from bridge.client.rpc import Engine, Worker, results_consumer
from bridge.domain.errors import Unavailable
from bridge.domain.records import LANE_RECOVERED, LeaseState, QueueKey
from bridge.domain.stats import walk_lane
from bridge.domain.timeline import ms_of
from tests.conftest import OWNERS, service_id, wait_for
from tests.integration.test_lifecycle import FAST, counts_become, parked_ids

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]
ZERO = {"ready": 0, "inFlight": 0, "delayed": 0, "parked": 0}


async def fetch(w: Worker, *, ttr: int = 30_000, fresh: bool = False) -> dict[str, Any] | None:
    body: dict[str, Any] = {"serviceId": w.service, "workerId": w.worker_id, "timeToRecover": ttr}
    if fresh:
        body["fresh"] = True
    reply = await w.call("fetch", body)
    return reply.get("task")


async def ack(w: Worker, task: dict[str, Any], result: Any = "ok") -> bool:
    body = {
        "serviceId": w.service,
        "workerId": w.worker_id,
        "taskId": task["id"],
        "epoch": task["epoch"],
        "hasToken": task["hasToken"],
        "result": result,
    }
    return bool((await w.call("ack", body))["result"])


async def work_until_stopped(
    w: Worker,
    stop: asyncio.Event,
    on_task: Callable[[Worker, dict[str, Any], float], Awaitable[None]],
    *,
    quiet: int = 3,
    idle_s: float = 0.02,
) -> None:
    """A worker's loop: fetch, hand each task to ``on_task`` (with when its fetch was sent), until
    ``stop`` is set and ``quiet`` fetches in a row found nothing."""
    nulls = 0
    while not (stop.is_set() and nulls >= quiet):
        sent = time.monotonic()
        task = await fetch(w, fresh=True)
        if task is None:
            nulls += 1
            await asyncio.sleep(idle_s)
            continue
        nulls = 0
        await on_task(w, task, sent)


async def cancel(b: Any, svc: str, task_id: str) -> bool:
    for _ in range(10):
        try:
            return bool(await b.queue.cancel(OWNER, svc, uuid.UUID(task_id)))
        except Unavailable:
            await asyncio.sleep(0.01)
    raise AssertionError("cancel answered unavailable 10 times")


async def drain_results(results: asyncio.Queue[dict[str, Any]], quiet: float = 2.0) -> list[dict[str, Any]]:
    """Every result message that arrives until none has for ``quiet`` seconds."""
    got: list[dict[str, Any]] = []
    while True:
        try:
            got.append(await asyncio.wait_for(results.get(), quiet))
        except TimeoutError:
            return got


async def background_idle(*bridges: Any) -> None:
    await wait_for(lambda: all(not b.queue.ctx.background._tasks for b in bridges), 10, what="background work done")


async def park_all(engine: Engine, workers: Any, svc: str, n: int, *, token: bool = False) -> list[str]:
    """``n`` tasks with ``maxDeliveries: 1``, each taken and failed once: parked."""
    ids = []
    for i in range(n):
        body: dict[str, Any] = {"serviceId": svc, "value": i, "maxDeliveries": 1}
        if token:
            body["token"] = {"n": i}
        ids.append(str((await engine.call("add", body, owner=OWNER))["task"]["id"]))
    w = await workers(svc, "parker")
    for _ in range(n):
        task = None
        deadline = time.monotonic() + 10
        while task is None:
            assert time.monotonic() < deadline, "a task never came"
            task = await fetch(w)
        body = {"serviceId": svc, "workerId": "parker", "taskId": task["id"], "epoch": task["epoch"]}
        assert (await w.call("fail", body))["task"]["parked"] is True
    assert sorted(await parked_ids(engine, svc)) == sorted(ids)
    return ids


# -- cancel vs fetch and ack ----------------------------------------------------------------------------
async def test_cancel_racing_workers_on_another_bridge(make_bridge, engine, workers, servers, names):
    """Every task is either cancelled (then no ack of it answers true, no fetch sent after the
    cancel's answer gets it, and the engine hears nothing) or completed once (then cancel answers
    false and the engine gets exactly its result)."""
    a = await make_bridge(**FAST)
    b = await make_bridge(**FAST)
    svc = service_id()
    n = 40
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        ids = []
        for i in range(n):
            token = {"n": i} if i % 2 else None
            ids.append(await engine.add(svc, i, token=token))
        delivered: dict[str, list[tuple[float, int, str]]] = defaultdict(list)  # sent-at, epoch, worker
        acked: dict[str, list[bool]] = defaultdict(list)
        cancelled: dict[str, tuple[bool, float]] = {}
        stop = asyncio.Event()

        async def handle(w: Worker, task: dict[str, Any], sent: float) -> None:
            delivered[task["id"]].append((sent, task["epoch"], w.worker_id))
            await asyncio.sleep(random.uniform(0, 0.03))
            acked[task["id"]].append(await ack(w, task, {"by": w.worker_id}))

        async def work(w: Worker) -> None:
            await work_until_stopped(w, stop, handle)

        async def cancel_all() -> None:
            order = ids[:]
            random.shuffle(order)
            for task_id in order:
                await asyncio.sleep(random.uniform(0, 0.015))
                result = await cancel(b, svc, task_id)
                cancelled[task_id] = (result, time.monotonic())

        ws = [await workers(svc, f"w{i}") for i in range(3)]
        runs = [asyncio.create_task(work(w)) for w in ws]
        await cancel_all()
        stop.set()
        await asyncio.gather(*runs)
        got = await drain_results(results)

    problems = []
    for task_id in ids:
        was_cancelled, at = cancelled[task_id]
        trues = sum(acked[task_id])
        if was_cancelled and trues:
            problems.append(f"{task_id}: cancel answered true and an ack answered true")
        if not was_cancelled and trues != 1:
            problems.append(f"{task_id}: cancel answered false but {trues} acks answered true")
        if was_cancelled and any(sent > at for sent, _, _ in delivered[task_id]):
            problems.append(f"{task_id}: handed out by a fetch sent after its cancel answered true")
    assert not problems, problems
    per_task = Counter(m["taskId"] for m in got)
    for task_id in ids:
        want = 1 if sum(acked[task_id]) and ids.index(task_id) % 2 else 0
        assert per_task[task_id] == want, f"{task_id}: {per_task[task_id]} results, expected {want}"
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


# -- purge vs workers ---------------------------------------------------------------------------------------
async def test_purge_racing_workers_takes_only_ready_tasks_and_leaves_none(make_bridge, engine, workers):
    """Purge on one bridge while workers (long leases) take and ack tasks through both: no ack of a
    task a worker was handed answers false (purge never takes an in-flight task), every task is
    either acked or purged, and no task is handed out by a fetch sent after the purge answered."""
    a = await make_bridge(**FAST)
    b = await make_bridge(**FAST)
    svc = service_id()
    n = 80
    ids = [await engine.add(svc, i) for i in range(n)]
    delivered: dict[str, list[float]] = defaultdict(list)
    acked: dict[str, list[bool]] = defaultdict(list)
    stop = asyncio.Event()

    async def handle(w: Worker, task: dict[str, Any], sent: float) -> None:
        delivered[task["id"]].append(sent)
        await asyncio.sleep(random.uniform(0, 0.02))
        acked[task["id"]].append(await ack(w, task))

    async def work(w: Worker) -> None:
        await work_until_stopped(w, stop, handle)

    ws = [await workers(svc, f"w{i}") for i in range(3)]
    runs = [asyncio.create_task(work(w)) for w in ws]
    await wait_for(lambda: len(delivered) >= 5, 10, what="workers under way")
    purged, more = await b.queue.purge(OWNER, svc)
    done_at = time.monotonic()
    while more:
        p, more = await b.queue.purge(OWNER, svc)
        purged += p
    stop.set()
    await asyncio.gather(*runs)
    refused = [t for t, answers in acked.items() if not all(answers)]
    assert not refused, f"acks of handed-out tasks answered false (purged in flight?): {refused}"
    late = [t for t, sends in delivered.items() if min(sends) > done_at]
    assert not late, f"tasks ready before the purge handed out after it: {late}"
    completed = sum(1 for t in ids if any(acked[t]))
    assert completed + purged == n, f"{completed} acked + {purged} purged != {n} added"
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


# -- redrive vs discard --------------------------------------------------------------------------------------
async def test_redrive_racing_discard_on_two_bridges_settles_each_task_once(make_bridge, engine, workers):
    """Each parked task is either redriven (then handed out once and never discarded) or discarded
    (never handed out again), never both; the parked list and stats end empty."""
    a = await make_bridge(**FAST, redrive_rate=1000.0)
    b = await make_bridge(**FAST, redrive_rate=1000.0)
    svc = service_id()
    n = 16
    ids = await park_all(engine, workers, svc, n)
    uids = [uuid.UUID(t) for t in ids]
    first, second = uids[:], uids[:]
    random.shuffle(first)
    random.shuffle(second)
    redriven, discarded = await asyncio.gather(a.queue.redrive(OWNER, svc, first), b.queue.discard(OWNER, svc, second))
    assert redriven + discarded == n, f"{redriven} redriven + {discarded} discarded != {n}"
    q = QueueKey(OWNER, svc)
    states = {str(t): (await a.queue.ctx.store.lease(q, t, serial=True)).state for t in uids}
    back = {t for t, s in states.items() if s is LeaseState.LEASED}
    gone = {t for t, s in states.items() if s is LeaseState.DISCARDED}
    assert len(back) == redriven and len(gone) == discarded, states
    w = await workers(svc, "after")
    seen: list[str] = []
    deadline = time.monotonic() + 15
    while len(seen) < len(back) and time.monotonic() < deadline:
        task = await fetch(w, fresh=True)
        if task is None:
            await asyncio.sleep(0.05)  # the worker's polling pace (the loop's deadline bounds the wait)
            continue
        seen.append(task["id"])
        assert await ack(w, task)
    assert Counter(seen) == Counter(back), f"handed out {sorted(seen)}, redriven {sorted(back)}"
    assert await fetch(w, fresh=True) is None
    assert await parked_ids(engine, svc) == []
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


async def test_two_bridges_redriving_the_same_tasks_hand_each_out_once(make_bridge, engine, workers):
    """Two operators (or a retried request) redrive the same parked tasks through two bridges while
    workers fetch: each task is put back once (the answers add up to the tasks), handed out once,
    and every ack of it answers true."""
    a = await make_bridge(**FAST, redrive_rate=1000.0)
    b = await make_bridge(**FAST, redrive_rate=1000.0)
    svc = service_id()
    n = 16
    ids = await park_all(engine, workers, svc, n)
    delivered: dict[str, list[tuple[int, str]]] = defaultdict(list)
    acked: dict[str, list[bool]] = defaultdict(list)
    stop = asyncio.Event()

    async def handle(w: Worker, task: dict[str, Any], _sent: float) -> None:
        delivered[task["id"]].append((task["epoch"], w.worker_id))
        await asyncio.sleep(random.uniform(0, 0.02))
        acked[task["id"]].append(await ack(w, task))

    async def work(w: Worker) -> None:
        await work_until_stopped(w, stop, handle, quiet=5, idle_s=0.03)

    ws = [await workers(svc, f"w{i}") for i in range(3)]
    runs = [asyncio.create_task(work(w)) for w in ws]
    uids = [uuid.UUID(t) for t in ids]
    r1, r2 = await asyncio.gather(a.queue.redrive(OWNER, svc, uids), b.queue.redrive(OWNER, svc, uids[::-1]))
    await wait_for(lambda: len(acked) >= n, 15, what="every redriven task handed out and acked")
    stop.set()
    await asyncio.gather(*runs)
    assert r1 + r2 == n, f"redriven {r1} + {r2} != {n}"
    twice = {t: d for t, d in delivered.items() if len(d) != 1}
    assert not twice, f"handed out more than once: {twice}"
    assert all(all(v) for v in acked.values()), dict(acked)
    assert await parked_ids(engine, svc) == []
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


# -- cancel vs a park at the limit (tasks with a token) ---------------------------------------------------------
async def test_cancel_racing_a_park_tells_the_engine_once_per_park_only(make_bridge, engine, workers, servers, names):
    """Workers fail their tasks at the limit (a park: the engine's delivery_limit result) while the
    engine cancels the same tasks on another bridge. A park that happened is told to the engine
    exactly once; a task cancelled before its park is told nothing; the parked list and stats end
    empty (every task ends cancelled)."""
    a = await make_bridge(**FAST)
    b = await make_bridge(**FAST)
    svc = service_id()
    n = 12
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        ids = []
        for i in range(n):
            body = {"serviceId": svc, "value": i, "maxDeliveries": 1, "token": {"n": i}}
            ids.append(str((await engine.call("add", body, owner=OWNER))["task"]["id"]))
        held: dict[str, tuple[Worker, dict[str, Any]]] = {}
        for i in range(n):
            w = await workers(svc, f"w{i}")
            task = None
            deadline = time.monotonic() + 10
            while task is None:
                assert time.monotonic() < deadline
                task = await fetch(w)
            held[task["id"]] = (w, task)
        assert sorted(held) == sorted(ids)
        parked: dict[str, bool] = {}
        cancels: dict[str, bool] = {}

        async def fail(task_id: str) -> None:
            w, task = held[task_id]
            await asyncio.sleep(random.uniform(0, 0.02))
            body = {"serviceId": svc, "workerId": w.worker_id, "taskId": task_id, "epoch": task["epoch"]}
            reply = await w.call("fail", body)
            parked[task_id] = "task" in reply and bool(reply["task"]["parked"])

        async def cancel_one(task_id: str) -> None:
            await asyncio.sleep(random.uniform(0, 0.02))
            cancels[task_id] = await cancel(b, svc, task_id)

        await asyncio.gather(*(fail(t) for t in ids), *(cancel_one(t) for t in ids))
        got = await drain_results(results, quiet=3.0)
    assert all(cancels.values()), f"a cancel of a leased or parked task answered false: {cancels}"
    per_task = Counter(m["taskId"] for m in got)
    wrong = {t: (parked[t], per_task[t]) for t in ids if per_task[t] != (1 if parked[t] else 0)}
    assert not wrong, f"(parked, results told) per task: {wrong}"
    assert all(m["error"]["code"] == "delivery_limit" for m in got)
    assert await parked_ids(engine, svc) == []
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


# -- a park whose result is still owed when the task is parked again ---------------------------------------------
async def test_a_park_result_still_owed_when_the_redriven_task_is_parked_again_reaches_the_engine(
    make_bridge, engine, workers, servers, names
):
    """A parked task that carries a token gets one engine result per park (docs/asyncapi.yaml).
    The first park's result cannot be published yet (no results queue bound: a broker blip, a
    bridge killed after the park); an operator redrives the task and a worker fails it again at
    once: parked again. When results can flow, the engine hears of both parks. The lease named
    only the last park (``park_id``), and the relay marked the first park's result published
    unsent, taking it for a park that never applied."""
    b = await make_bridge(**FAST, results_queue="", result_republish_after=1.0, redrive_rate=1000.0)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    svc = service_id()
    task_id = await engine.add(svc, "poison", token={"wf": 1}, max_deliveries=1)
    w = await workers(svc, "w")
    park_ids: list[str] = []
    for expected_epoch in (1, 2):
        task = None
        deadline = time.monotonic() + 10
        while task is None:
            assert time.monotonic() < deadline
            task = await fetch(w)
        assert task["id"] == task_id and task["epoch"] == expected_epoch
        body = {"serviceId": svc, "workerId": "w", "taskId": task_id, "epoch": task["epoch"]}
        assert (await w.call("fail", body))["task"]["parked"] is True
        lease = await b.queue.ctx.store.lease(QueueKey(OWNER, svc), uuid.UUID(task_id), serial=True)
        park_ids.append(f"{task_id}:{lease.park_id}")
        if expected_epoch == 1:
            assert await b.queue.redrive(OWNER, svc, [uuid.UUID(task_id)]) == 1
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + 20
        while len(got) < 2 and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got.append(await asyncio.wait_for(results.get(), 1))
    told = sorted(m["_message_id"] for m in got)
    assert told == sorted(park_ids), f"parks {park_ids}, the engine was told of {told}"
    assert len({m["_message_id"] for m in got}) == 2


# -- purge of expired leases, backoffs and redriven tasks -------------------------------------------------------
async def test_purge_of_expired_leases_backoffs_and_redriven_tasks_leaves_exact_counts(make_bridge, engine, workers):
    """A queue with every kind of ready task: never claimed, an abandoned lease that ran out, a
    failed task whose backoff ended, a redriven task; and one held by a live worker. A purge on
    the other bridge takes the ready ones, never the held one; afterwards nothing is handed out,
    the live worker's ack answers true, the abandoned worker's false, and stats are exact."""
    a = await make_bridge(**FAST, redrive_rate=1000.0)
    b = await make_bridge(**FAST, redrive_rate=1000.0)
    svc = service_id()
    reply = await engine.call("add", {"serviceId": svc, "value": "p", "maxDeliveries": 1}, owner=OWNER)
    limited = str(reply["task"]["id"])
    abandoned_id = await engine.add(svc, "abandoned")
    failed_id = await engine.add(svc, "failed")
    held_id = await engine.add(svc, "held")
    for i in range(3):
        await engine.add(svc, f"r{i}")
    # The limited task: parked by its worker's fail, then redriven (ready again).
    p = await workers(svc, "p")
    task = await fetch(p)
    assert task is not None and task["id"] == limited
    body = {"serviceId": svc, "workerId": "p", "taskId": limited, "epoch": 1}
    assert (await p.call("fail", body))["task"]["parked"] is True
    x = await workers(svc, "x")
    task = await fetch(x, ttr=200)
    assert task is not None and task["id"] == abandoned_id
    f = await workers(svc, "f")
    task = await fetch(f)
    assert task is not None and task["id"] == failed_id
    body = {"serviceId": svc, "workerId": "f", "taskId": failed_id, "epoch": 1, "retryInMs": 100}
    assert "task" in await f.call("fail", body)
    h = await workers(svc, "h")
    held = await fetch(h)
    assert held is not None and held["id"] == held_id
    assert await a.queue.redrive(OWNER, svc, [uuid.UUID(limited)]) == 1
    q = QueueKey(OWNER, svc)
    margin = a.queue.ctx.limits.skew_margin_ms

    async def reexposed() -> bool:
        # The abandoned lease and the backoff have run out (past their deadline and the skew
        # margin, as purge requires) and the scheduler has re-exposed them in lane 0, like the
        # redriven task (a redrive files a deadline): an unclaimed lane-0 entry of each at its
        # lease's epoch, what purge takes. Every one of them is ready.
        entries, _ = await walk_lane(a.queue.ctx.store, q, LANE_RECOVERED, 100)
        exposed = {(e.task_id, e.epoch) for e in entries if not e.claimed}
        now = a.queue.ctx.clock.now_ms()
        n = 0
        for t in (abandoned_id, failed_id, limited):
            lease = await a.queue.ctx.store.lease(q, uuid.UUID(t), serial=True)
            n += (
                lease is not None
                and lease.lease_until_ms is not None
                and lease.lease_until_ms + margin <= now
                and (uuid.UUID(t), lease.epoch) in exposed
            )
        return n == 3

    await wait_for(reexposed, 10, what="the leases run out and are re-exposed")
    await counts_become(engine, svc, {"ready": 4, "inFlight": 3, "delayed": 0, "parked": 0})
    purged, more = await b.queue.purge(OWNER, svc)
    assert (purged, more) == (6, False), f"purged {purged} (more {more}) of the 6 ready tasks"
    other = await workers(svc, "other")
    for _ in range(10):
        assert await fetch(other, fresh=True) is None, "a task handed out after the purge"
        await asyncio.sleep(0.05)  # seeing that nothing happens takes time: 10 fetches over 0.5 s
    assert await ack(h, held) is True, "the held task was taken by the purge"
    assert await ack(x, {"id": abandoned_id, "epoch": 1, "hasToken": False}) is False
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


# -- cancel of delayed tasks around their due time -------------------------------------------------------------------
async def test_cancel_of_delayed_tasks_around_their_due_time_keeps_exact_counts(make_bridge, engine, workers):
    """Delayed tasks coming due while workers long-poll on both bridges and the engine cancels
    them on one: each is cancelled or completed, never both, and stats end at zero (a delayed
    task's add counts it under its due minute; whatever takes it off must take it off there)."""
    a = await make_bridge(**FAST)
    b = await make_bridge(**FAST)
    svc = service_id()
    n = 24
    ids = []
    for i in range(n):
        reply = await engine.call("add", {"serviceId": svc, "value": i, "delayMs": 300 + 40 * i}, owner=OWNER)
        ids.append(str(reply["task"]["id"]))
    acked: dict[str, list[bool]] = defaultdict(list)
    cancelled: dict[str, bool] = {}
    stop = asyncio.Event()

    async def work(w: Worker) -> None:
        while not stop.is_set():
            body = {"serviceId": svc, "workerId": w.worker_id, "waitMs": 300, "fresh": True}
            reply = await w.call("fetch", body, wait_s=0.3)
            task = reply.get("task")
            if task is None:
                continue
            acked[task["id"]].append(await ack(w, task))

    async def cancel_some() -> None:
        order = ids[:]
        random.shuffle(order)
        for task_id in order:
            await asyncio.sleep(random.uniform(0, 0.06))
            cancelled[task_id] = await cancel(b, svc, task_id)

    ws = [await workers(svc, f"w{i}") for i in range(3)]
    runs = [asyncio.create_task(work(w)) for w in ws]
    await cancel_some()
    # The workers take every task not cancelled as it comes due.
    await wait_for(lambda: all(cancelled[t] or acked.get(t) for t in ids), 10, what="the rest completed")
    # A cancelled task handed out all the same would be by now: past the last task's due time (a
    # delayed task's id is its due time), the margin the bridge announces it after, and two of the
    # workers' 300 ms long-polls (seeing that nothing happens takes time).
    quiet_until = max(ms_of(uuid.UUID(t)) for t in ids) + a.queue.ctx.limits.skew_margin_ms + 2 * 300
    await wait_for(lambda: a.queue.ctx.clock.now_ms() > quiet_until, 10, what="the last task due, and a window")
    stop.set()
    await asyncio.gather(*runs)
    for task_id in ids:
        trues = sum(acked[task_id])
        assert not (cancelled[task_id] and trues), f"{task_id} cancelled and completed"
        assert cancelled[task_id] or trues == 1, f"{task_id} neither cancelled nor completed"
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)


# -- purge right after a redrive answered ----------------------------------------------------------------------
async def test_a_purge_after_a_redrive_answered_takes_every_redriven_task(make_bridge, engine, workers):
    """Redriven tasks are ready (stats count them so) once the redrive has answered; a purge sent
    after that answer, on another bridge, must take every one of them."""
    a = await make_bridge(**FAST, redrive_rate=1000.0)
    b = await make_bridge(**FAST, redrive_rate=1000.0)
    svc = service_id()
    n = 12
    ids = await park_all(engine, workers, svc, n)
    assert await a.queue.redrive(OWNER, svc, [uuid.UUID(t) for t in ids]) == n
    purged, _ = await b.queue.purge(OWNER, svc)
    w = await workers(svc, "after")
    late = []
    for _ in range(20):
        task = await fetch(w, fresh=True)
        if task is not None:
            late.append(task["id"])
            assert await ack(w, task)
        await asyncio.sleep(0.05)  # seeing that nothing happens takes time: 20 fetches over 1 s
    assert (purged, late) == (n, []), f"purged {purged} of {n} redriven tasks; handed out after the purge: {late}"
    await background_idle(a, b)
    await counts_become(engine, svc, ZERO)
