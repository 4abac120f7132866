"""``Worker.run``: a stop that comes while an ack with ``next`` is on its way (real servers).

The next task its reply hands was claimed for this worker (a delivery counted): it is handled,
as the stop's drain handles a task a fetch without an answer claimed, not left leased to a
stopped worker. Given back instead (``fail``, a second delivery counted), a task on its last
allowed delivery was parked without ever running (a re-review, 2026-12-06)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.client import Task, Worker
from tests.conftest import OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_next_task_handed_as_the_worker_stops_is_handled_not_given_back(
    bridge, engine, servers, names, monkeypatch
):
    svc = service_id()
    first = await engine.add(svc, {"n": 1})
    second = await engine.add(svc, {"n": 2})
    url = servers.amqp_url(OWNERS[0])
    w = Worker(url, service=svc, worker_id="r11-stop", exchange=names["exchange"], time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    stop = asyncio.Event()
    real_call = w.call

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        reply = await real_call(method, body, **kw)
        if method == "ack" and "next" in body:
            stop.set()  # SIGTERM while the ack with next was on its way
        return reply

    monkeypatch.setattr(w, "call", call)
    seen: list[str] = []

    async def handler(task: Task) -> str:
        seen.append(task.id)
        return "ok"

    await w.open()
    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    finally:
        await w.close()
    assert seen == [first, second], f"the next task, claimed for the stopping worker, was not handled: {seen}"
    assert handled == 2
    # Completed: nothing left leased to the stopped worker, nothing handed to another.
    async with Worker(url, service=svc, worker_id="r11-other", exchange=names["exchange"]) as other:
        assert await other.fetch(wait_ms=1_000) is None
