"""examples/worker.py stopping while idle (real servers).

The example stopped an idle worker by cancelling its ``async for`` long-poll and closing: a fetch
of its that a busy bridge ran after that (here held at the bridge until the worker stopped)
claimed a task at once and leased it to the stopped worker for its whole lease. It now serves
with ``Worker.run``, whose stop hands on what such a request claimed (its drain)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from types import ModuleType
from typing import Any

import pytest

from bridge.client import Worker
from tests.conftest import OWNERS, ROOT, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _load_worker_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qb_example_worker_r11", ROOT / "examples" / "worker.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_the_example_stopping_idle_hands_on_a_task_its_given_up_long_poll_claimed(
    bridge, engine, servers, names, monkeypatch, caplog
):
    example = _load_worker_example()
    svc = service_id()
    gate = asyncio.Event()
    arrived = 0
    finished = asyncio.Event()
    real = bridge.queue.fetch

    async def held_up(owner, req, **kw):  # type: ignore[no-untyped-def]
        nonlocal arrived
        arrived += 1
        if arrived == 1:
            await gate.wait()
        try:
            return await real(owner, req, **kw)
        finally:
            finished.set()

    monkeypatch.setattr(bridge.queue, "fetch", held_up)
    stop = asyncio.Event()
    lines: list[str] = []
    with caplog.at_level(logging.INFO, logger="bridge.client"):
        running = asyncio.create_task(
            example.main(
                servers.amqp_url(OWNERS[0]),
                service=svc,
                exchange=names["exchange"],
                worker_id="r11-example",
                stop=stop,
                fail_every=0,
                work_time=(0.0, 0.0),
                wait_timeout=10,
                log=lines.append,
            )
        )
        try:
            await wait_for(lambda: arrived == 1, 10.0, what="the example's long-poll held at the bridge")
            task_id = await engine.add(svc, {"text": "late"})
            stop.set()  # SIGTERM while idle
            await wait_for(
                lambda: running.done() or any(r.getMessage().startswith("stopping: ") for r in caplog.records),
                10.0,
                what="the example to stop or drain",
            )
            gate.set()  # the fetch given up goes on at the bridge and claims the task at once
            rc = await asyncio.wait_for(running, 30.0)
            await asyncio.wait_for(finished.wait(), 10.0)
        finally:
            gate.set()
            stop.set()
    output = "\n".join(lines)
    assert rc == 0, output
    async with Worker(
        servers.amqp_url(OWNERS[0]), service=svc, worker_id="r11-example", exchange=names["exchange"]
    ) as again:
        held: Any = await again.fetch()  # not ``fresh``: the task the worker id holds, if any
    assert held is None, f"task {task_id} is still leased to the stopped example worker:\n{output}"
    assert "'late' -> 'LATE'" in output, output
