"""The add path at its edges (real servers): numbers JSON cannot hold, and a delayed add retried
after its first attempt died. Each test failed before its fix (the docstrings say what was wrong)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest

from bridge.client.errors import RequestTimeout
from bridge.client.rpc import IDEMPOTENCY_HEADER
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


# -- 1. a body that is not JSON is stored, its numbers turned into null ---------------------------
@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
async def test_non_json_numbers_in_an_add_are_refused_not_stored_as_null(bridge, engine, workers, literal):
    """``NaN``/``Infinity`` are not JSON and ``1e400`` cannot be stored exactly: alone in a value
    the bridge refuses them (``bad_request``). But any run of 19+ digits anywhere in the body (here
    inside a string) sends the body down the exact big-integer path (``json.loads``), which reads
    them as float nan/inf, and orjson then writes those as ``null``: the add is accepted and the
    worker receives ``null`` where the engine sent a number."""
    svc = service_id()
    value = b'{"order": "12345678901234567890123", "n": ' + literal + b"}"
    raw = b'{"serviceId": "' + svc.encode() + b'", "value": ' + value + b"}"
    reply, _ = await engine.call_raw("add", None, raw=raw, owner=OWNERS[0])
    w = await workers(svc)
    task = await w.fetch()
    handed = None if task is None else task.value
    assert "error" in reply and reply["error"]["code"] == "bad_request", (
        f"accepted: {reply}; the worker was handed {handed!r}"
    )
    assert task is None


async def test_non_json_numbers_in_an_ack_are_refused_not_published_as_null(bridge, engine, workers, servers, names):
    """The same on the way back: an ack whose body holds ``NaN`` (and a run of 19+ digits) is
    accepted, the task completed, and the engine's result message carries ``null``."""
    from bridge.client.rpc import results_consumer

    svc = service_id()
    async with results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"]) as results:
        await engine.add(svc, "v", token={"p": 1})
        w = await workers(svc)
        task = await w.fetch()
        raw = (
            b'{"serviceId": "%s", "workerId": "%s", "taskId": "%s", "epoch": %d, '
            b'"result": {"invoice": "12345678901234567890123", "amount": NaN}}'
            % (svc.encode(), w.worker_id.encode(), task.id.encode(), task.epoch)
        )
        reply, _ = await w.call_raw("ack", None, raw=raw)
        published = None
        if "error" not in reply:
            await wait_for(lambda: not results.empty(), 10, what="the result")
            published = results.get_nowait()
    assert "error" in reply and reply["error"]["code"] == "bad_request", (
        f"ack answered {reply}; the engine was sent {published}"
    )


# -- 2. a delayed add whose first attempt died mid-write blocks its key for the whole delay ------
async def test_a_retried_delayed_add_after_a_crashed_first_attempt_is_stored(bridge, engine, workers, monkeypatch):
    """An add's idempotency record is written before its task (LWT, then the task row). If the
    bridge dies between the two, a retry finds a record naming a task that does not exist; it waits
    ``IDEMPOTENCY_SETTLE_MS`` (measured from the time in the recorded task id) and then replaces
    it. But a delayed task's id carries its *due* time, not the time it was added: for a task
    delayed by an hour, ``now - ms_of(existing)`` stays negative for the hour, so every retry
    answers ``unavailable`` (the add is retried in place, requeued, redelivered, ...) and the
    caller's key is blocked until the due time: the task cannot be added at all.

    The settle window and the in-place retry budget are shortened here to keep the test short;
    the same happens with the defaults (30 s), only slower."""
    import bridge.domain.queue as queue_module
    import bridge.transport.handlers as handlers_module

    monkeypatch.setattr(queue_module, "IDEMPOTENCY_SETTLE_MS", 500)
    monkeypatch.setattr(handlers_module, "ADD_RETRY_BUDGET_S", 3.0)
    svc = service_id()
    key = f"order-{uuid.uuid4().hex[:8]}"
    delay_ms = 3_600_000
    store = bridge.queue.ctx.store
    real_store_task = store.store_task
    crashed = asyncio.Event()

    async def dies_before_the_task_row(*args: Any, **kwargs: Any) -> None:
        # The first attempt recorded its key (the LWT) and died before writing the task.
        crashed.set()
        raise RuntimeError("the bridge died here")

    monkeypatch.setattr(store, "store_task", dies_before_the_task_row)
    first = await engine.publish(
        "add",
        {"serviceId": svc, "value": "v", "delayMs": delay_ms},
        reply=False,
        owner=OWNERS[0],
        headers={IDEMPOTENCY_HEADER: key},
    )
    assert first is None
    await wait_for(crashed.is_set, 10, what="the first attempt dying")
    monkeypatch.setattr(store, "store_task", real_store_task)
    # The retry: the bridge retries it in place (3 s here) past the settle window (0.5 s here),
    # after which the first attempt counts as crashed and is replaced, as it is for a ready task.
    started = time.monotonic()
    try:
        reply, _ = await engine.call_raw(
            "add",
            {"serviceId": svc, "value": "v", "delayMs": delay_ms},
            owner=OWNERS[0],
            headers={IDEMPOTENCY_HEADER: key},
        )
    except RequestTimeout:
        reply = {"error": "no reply: the add is requeued again and again (unavailable)"}
    assert "task" in reply, f"no task after {time.monotonic() - started:.1f}s: {reply}"
