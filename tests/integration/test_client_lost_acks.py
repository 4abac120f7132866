"""``Worker.run`` and an ack answered false (real servers). The loop ignored the answer of its own
ack: a task whose lease had run out while its handler worked, and that another worker had taken,
was acked, answered false (its result not applied: the task runs again elsewhere), and counted in
what ``run`` returned as handled, without a word. Now it is logged (task id, epoch, why), counted
in ``Worker.lost`` and not in ``run``'s count."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bridge.client import Task
from tests.conftest import service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_run_reports_an_ack_answered_false_and_does_not_count_it(bridge, engine, workers, caplog):
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    slow = await workers(svc, "slow", time_to_recover_ms=1_000)
    slow.wait_ms = 1_000
    other = await workers(svc, "other", time_to_recover_ms=60_000)
    stop = asyncio.Event()
    taken: list[Task] = []
    seen: list[tuple[str, int | None]] = []

    async def take_it_over() -> bool:
        got = await other.fetch(wait_ms=1_000)
        if got is not None:
            taken.append(got)
        return bool(taken)

    async def handler(task: Task) -> str:
        # The handler outlives its 1 s lease (no keep_alive): the task goes to another worker.
        seen.append((task.id, task.epoch))
        await wait_for(take_it_over, 15.0, what="the other worker taking the task over")
        stop.set()
        return "too late"

    with caplog.at_level(logging.WARNING, logger="bridge.client"):
        handled = await asyncio.wait_for(slow.run(handler, stop=stop), 30.0)
    assert seen and seen[0][0] == task_id and taken[0].id == task_id
    assert handled == 0, f"run counted {handled} task(s) handled, but its ack was answered false"
    assert slow.lost == 1
    warned = [r.getMessage() for r in caplog.records if "answered false" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    assert task_id in warned[0] and f"epoch {seen[0][1]}" in warned[0] and "lease was lost" in warned[0]
    # The other worker's lease is intact: its ack completes the task.
    assert await taken[0].ack("done") is True
