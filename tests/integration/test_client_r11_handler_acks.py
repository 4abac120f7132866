"""``Worker.run``: an ack the handler sends itself and that is answered false (real servers).

``_serve`` took any task the handler settled for handled: an ack (or ``ack_error``) of the
handler's own answered false (the task was cancelled, or its lease lost to another worker) was
counted in what ``run`` returns, and not in ``worker.lost`` as the loop's own such acks are."""

from __future__ import annotations

import asyncio

import pytest

from bridge.client import Task, Worker
from tests.conftest import OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


@pytest.mark.parametrize("how", ["ack", "ack_error"])
async def test_a_handlers_own_ack_answered_false_counts_as_lost(bridge, engine, servers, names, how):
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="r11-acks", exchange=names["exchange"])
    w.wait_ms = 1_000
    stop = asyncio.Event()
    answers: list[bool] = []

    async def handler(task: Task) -> None:
        stop.set()
        assert await engine.cancel(svc, task.id)  # the task is no longer this worker's
        answers.append(await (task.ack("done") if how == "ack" else task.ack_error({"message": "no"})))

    await w.open()
    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    finally:
        await w.close()
    assert answers == [False], f"{task_id}: {answers}"
    assert (handled, w.lost) == (0, 1), f"handled {handled}, lost {w.lost}"
