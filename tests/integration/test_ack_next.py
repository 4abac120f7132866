"""Contract 1.6: an ack that also fetches the worker's next task (``next``), on the real servers.

A busy worker's loop was fetch, work, ack, fetch...: two requests a task. With ``next`` the ack's
reply carries the next task, so a worker that keeps finding work sends one request a task.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.client.errors import BadRequestError
from tests.conftest import fail_next_write_ahead, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_an_ack_with_next_completes_its_task_and_hands_out_the_next_one(bridge, engine, workers):
    svc = service_id()
    ids = [await engine.add(svc, {"n": i}) for i in range(3)]
    w = await workers(svc, "busy")
    first = await w.fetch()
    assert first is not None and first.id == ids[0]
    seen = [first.id]
    while True:
        acked, task = await w.ack_and_fetch({"done": seen[-1]})
        assert acked is True
        if task is None:
            break
        assert w.current is task and task.deliveries == 1
        seen.append(task.id)
    assert seen == ids  # in order, each once
    # Every one of them is complete: nobody gets any of them again.
    other = await workers(svc, "other")
    assert await other.fetch() is None
    assert await w.fetch() is None


async def test_the_next_task_is_held_like_a_fetched_one(bridge, engine, workers):
    """The next task's lease is the worker's: a fetch without ``fresh`` (a retry) hands it again,
    and its own ack completes it."""
    svc = service_id()
    a, b = await engine.add(svc, "a"), await engine.add(svc, "b")
    w = await workers(svc, "holder")
    assert (await w.fetch()).id == a
    acked, task = await w.ack_and_fetch("ok", time_to_recover_ms=30_000)
    assert acked is True and task is not None and task.id == b
    again = await w.call("fetch", {"serviceId": svc, "workerId": "holder"})
    assert again["task"]["id"] == b and again["task"]["epoch"] == task.epoch
    assert await task.ack("done") is True


async def test_a_stale_ack_with_next_is_false_and_still_hands_out_the_next_task(bridge, engine, workers):
    svc = service_id()
    first_id = await engine.add(svc, "first")
    slow, quick = await workers(svc, "slow"), await workers(svc, "quick")
    held = await slow.fetch(time_to_recover_ms=1_000)
    assert held is not None and held.id == first_id
    # The lease runs out and the task goes to another worker.
    taken = await wait_for(quick.fetch, 15.0, interval=0.2, what="the first task handed out again")
    assert taken.id == first_id and taken.deliveries == 2
    second_id = await engine.add(svc, "second")
    acked, task = await slow.ack_and_fetch("too late")
    assert acked is False
    assert task is not None and task.id == second_id
    assert await taken.ack("in time") is True
    assert await task.ack("ok") is True


async def test_a_next_fetch_that_fails_leaves_the_ack_done_and_says_why(bridge, engine, workers, monkeypatch):
    svc = service_id()
    first_id = await engine.add(svc, "first")
    second_id = await engine.add(svc, "second")
    w = await workers(svc, "w")
    assert (await w.fetch()).id == first_id
    fail_next_write_ahead(bridge, monkeypatch)
    reply = await w.call(
        "ack",
        {"serviceId": svc, "workerId": "w", "taskId": first_id, "epoch": 1, "result": 1, "next": {"fresh": True}},
    )
    assert reply["result"] is True
    assert reply["next"]["error"]["code"] == "unavailable"
    # The ack stands (a repeat is still true); the next task is fetched on its own.
    w.current = None
    again = await w.fetch()
    assert again is not None and again.id == second_id
    assert await again.ack("ok") is True


@pytest.mark.parametrize(
    "bad_next",
    [{"timeToRecover": "soon"}, {"timeToRecover": 5}, {"fresh": "yes"}, "next please", 1],
)
async def test_a_malformed_next_is_refused_and_the_ack_not_applied(bridge, engine, workers, bad_next):
    svc = service_id()
    task_id = await engine.add(svc, "x")
    w = await workers(svc, "w")
    task = await w.fetch()
    assert task is not None and task.id == task_id
    body = {"serviceId": svc, "workerId": "w", "taskId": task_id, "epoch": 1, "result": 1, "next": bad_next}
    with pytest.raises(BadRequestError, match="next"):
        await w.call("ack", body)
    assert await task.ack("ok") is True  # it was still held: the refused ack did nothing


# -- Worker.run: the client's loop on ack-with-next ---------------------------------------------------
def _count_requests(w, monkeypatch):  # type: ignore[no-untyped-def]
    """The requests the worker sends, by method."""
    sent: dict[str, int] = {}
    real_call = w.call

    async def call(method, body, **kw):  # type: ignore[no-untyped-def]
        sent[method] = sent.get(method, 0) + 1
        return await real_call(method, body, **kw)

    monkeypatch.setattr(w, "call", call)
    return sent


async def test_run_serves_each_task_with_one_request(bridge, engine, workers, monkeypatch):
    svc = service_id()
    ids = [await engine.add(svc, {"n": i}) for i in range(12)]
    w = await workers(svc, "runner")
    w.wait_ms = 1_000
    sent = _count_requests(w, monkeypatch)
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        seen.append(task.id)
        if len(seen) == len(ids):
            stop.set()
        return {"double": task.value["n"] * 2}

    handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    assert handled == len(ids) and seen == ids  # in order, each once
    assert sent == {"fetch": 1, "ack": len(ids)}, "one fetch to start, then one ack (with next) per task"
    other = await workers(svc, "other")
    assert await other.fetch() is None  # every one of them completed, none left leased


async def test_run_gives_back_a_task_its_handler_raised_on(make_bridge, engine, workers):
    await make_bridge(retry_base_ms=100, retry_cap_ms=200)
    svc = service_id()
    task_id = await engine.add(svc, "flaky")
    w = await workers(svc, "runner")
    w.wait_ms = 1_000
    stop = asyncio.Event()
    deliveries: list[int] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        deliveries.append(task.deliveries)
        if task.deliveries == 1:
            raise RuntimeError("the first attempt breaks")
        stop.set()
        return "second time lucky"

    assert await asyncio.wait_for(w.run(handler, stop=stop), 30.0) == 2
    assert deliveries == [1, 2], "given back (fail), then handed out again and acked"
    assert await w.fetch() is None  # not this worker's any more: acked
    assert await (await workers(svc, "other")).fetch() is None, f"{task_id} is neither ready nor leased"


async def test_run_stops_between_tasks_and_leaves_nothing_leased(bridge, engine, workers):
    svc = service_id()
    ids = [await engine.add(svc, i) for i in range(3)]
    w = await workers(svc, "runner")
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        stop.set()  # e.g. SIGTERM while the first task runs
        return "ok"

    assert await asyncio.wait_for(w.run(handler, stop=stop), 30.0) == 1
    # The other two were not fetched by the last ack: another worker gets them at once.
    other = await workers(svc, "other")
    for expected in ids[1:]:
        task = await other.fetch()
        assert task is not None and task.id == expected and task.deliveries == 1
        assert await task.ack("ok") is True
    assert await w.fetch() is None  # and the runner holds nothing
