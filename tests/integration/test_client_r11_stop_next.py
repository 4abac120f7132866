"""``Worker.run``: a stop that comes while an ack with ``next`` is on its way (real servers).

``take_next`` was checked only before the request went out: the next task its reply handed was
then run in full, although the worker was stopping ("no next one taken"). It is now given back
at once (``fail`` with ``retry_in_ms=0``), its handler not run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.client import Task, Worker
from tests.conftest import OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_next_task_handed_after_stop_is_given_back_unrun(bridge, engine, servers, names, monkeypatch):
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
    assert seen == [first], f"the stopping worker ran the next task too: {seen}"
    assert handled == 1
    # Given back to come again at once, not left leased to the stopped worker for its 60 s lease.
    async with Worker(url, service=svc, worker_id="r11-other", exchange=names["exchange"]) as other:
        again = await other.fetch(wait_ms=3_000)
        assert again is not None and again.id == second, again
        assert await again.ack("done")
