"""``Worker.run``: a ``fail`` that got no answer (real servers).

``_give_back`` logged "returns when its lease ends" and went on: the next fetch, not ``fresh``,
got the same task back at once (the bridge hands the worker the task it holds), at the same
epoch, and the handler ran again at once, with no backoff. The worker now remembers the lease of
a fail without an answer and, handed that lease again, sends the fail again instead of running
the handler: the task comes back after the fail's backoff, at a new epoch."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any

import pytest

from bridge.client import RequestTimeout, Task, Worker
from tests.conftest import OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_a_task_handed_back_after_its_fail_got_no_answer_is_failed_again_not_rerun(
    bridge, engine, servers, names, monkeypatch, caplog
):
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = Worker(
        servers.amqp_url(OWNERS[0]),
        service=svc,
        worker_id="r11-fail",
        exchange=names["exchange"],
        time_to_recover_ms=60_000,
    )
    w.wait_ms = 1_000
    real_call = w.call
    dropped = 0
    outcomes: list[dict[str, Any]] = []  # the fail replies that came

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        nonlocal dropped
        if method == "fail" and not dropped:
            dropped += 1  # the first fail never gets an answer (here: it never leaves)
            raise RequestTimeout("no reply to fail (dropped by the test)", waited_s=0.0)
        reply = await real_call(method, body, **kw)
        if method == "fail":
            outcomes.append(reply)
        return reply

    monkeypatch.setattr(w, "call", call)
    stop = asyncio.Event()
    runs: list[tuple[str, int | None, int, float]] = []

    async def handler(task: Task) -> str:
        runs.append((task.id, task.epoch, task.deliveries, w.bridge_time()))
        if len(runs) >= 2:
            stop.set()
            return "ok"
        raise RuntimeError("boom")

    await w.open()
    try:
        with caplog.at_level(logging.INFO, logger="bridge.client"):
            handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    finally:
        await w.close()
    assert dropped == 1
    epochs = [(run[1], run[2]) for run in runs]
    assert epochs[0] != epochs[1], f"the handler ran again at the same lease (epoch, delivery): {epochs}"
    assert handled == 2 and [run[0] for run in runs] == [task_id, task_id] and runs[1][2] == 2, runs
    [fail_reply] = outcomes  # the fail sent again, answered
    retry_at = datetime.fromisoformat(fail_reply["task"]["retryAt"]).timestamp()
    assert runs[1][3] >= retry_at - 0.05, f"handed out {retry_at - runs[1][3]:.3f}s before the fail's backoff ended"
    said = [r.getMessage() for r in caplog.records if r.name == "bridge.client"]
    assert any("its fail got no answer" in m and "sent again if the bridge hands it back" in m for m in said), said
