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
from bridge.domain.timeline import ms_of
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


async def test_a_delayed_add_retried_past_its_due_time_is_still_handed_out(make_bridge, engine, workers, monkeypatch):
    """A ready add retried in place after ``NotSent`` gets a new task id once its first id is
    older than ``ADD_ID_FRESH_MS`` (handlers._stale): a row landing behind where the dispatchers'
    positions have moved is never scanned again. A delayed add is exempted outright ("no scan
    passes it before then"), but its id is its due time, and once the due time has passed during
    the retries it is exactly as stale: its row lands behind the scan position and no fetch (with
    BRIDGE_HINTS=false every fetch scans; with hints, the reconciliation scan) ever finds it."""
    from bridge.storage.errors import StorageNotSent

    b = await make_bridge(hints=False)
    store = b.queue.ctx.store
    real_watch = store.watch_expiry
    cassandra_back = asyncio.Event()
    refused = asyncio.Event()

    async def watch_expiry(*args: Any, **kwargs: Any) -> None:
        if not cassandra_back.is_set():
            refused.set()
            raise StorageNotSent("cassandra unavailable (injected): no host available")
        await real_watch(*args, **kwargs)

    monkeypatch.setattr(store, "watch_expiry", watch_expiry)
    svc = service_id()
    added_at = b.queue.clock.now_ms()
    delayed = asyncio.create_task(
        engine.call("add", {"serviceId": svc, "value": "delayed", "delayMs": 200}, owner=OWNERS[0])
    )
    await wait_for(refused.is_set, 10, what="the delayed add's first write refused")
    # Its due time passes while the bridge retries it; a ready task is added after that time.
    await wait_for(lambda: b.queue.clock.now_ms() > added_at + 400, 5, what="the due time passing")
    later = await engine.add(svc, "later")
    w = await workers(svc, "w")
    task = await w.fetch()
    assert task is not None and task.id == later
    assert await task.ack("ok") is True
    # Fetches scan; once "later" is older than the settle window the position moves past it.
    settle_ms = b.settings.clock_skew_margin * 1000 + 1000

    got: list[str] = []

    async def position_passed() -> bool:
        t = await w.fetch()  # (the add, retried as a ready task once its time came, may come now)
        if t is not None:
            got.append(t.id)
            assert await t.ack("ok") is True
        return b.queue.clock.now_ms() > ms_of(uuid.UUID(later)) + settle_ms + 300

    await wait_for(position_passed, 10, interval=0.2, what="the scan position passing the later task")
    cassandra_back.set()
    reply = await asyncio.wait_for(delayed, 15)
    delayed_id = reply["task"]["id"]

    async def handed_out() -> bool:
        t = await w.fetch()
        if t is not None:
            got.append(t.id)
            await t.ack("ok")
        return delayed_id in got

    try:
        await wait_for(handed_out, 8, interval=0.2, what="the delayed task handed out")
    except AssertionError:
        raise AssertionError(
            f"the add answered task {delayed_id} (due {ms_of(uuid.UUID(delayed_id)) - added_at} ms after the add, "
            f"stored behind the scan position) and no fetch ever hands it out; handed out: {got}"
        ) from None


async def test_an_add_whose_write_timed_out_and_landed_is_not_stored_twice(make_bridge, engine, workers, monkeypatch):
    """``_add_retrying`` gives a stale prepared add a new task id when an attempt fails with
    ``NotSent`` ("nothing of it reached Cassandra"), and ``_dedupe`` then moves the idempotency
    record to the new id (``replaces``) without looking whether the old id's task exists. But an
    *earlier* attempt of the same prepared add may have timed out after its write landed (the
    comment itself says such an attempt "may still land: it keeps its id"): only the last attempt
    was NotSent. Sequence: attempt 1 writes the task row and times out; Cassandra then becomes
    unreachable (NotSent) until the id is older than ADD_ID_FRESH_MS; the next attempt stores a
    second task under a new id. An add with a key of the caller's own makes two tasks."""
    from bridge.storage.errors import StorageNotSent, StorageUnavailable

    # Every fetch scans the ready index (BRIDGE_HINTS=false), so every stored task is found at
    # once; with hints the first attempt's task (stored without a hint) waits for a reconciliation.
    bridge = await make_bridge(hints=False)
    store = bridge.queue.ctx.store
    real_store_task = store.store_task
    first_id: list[uuid.UUID] = []

    async def store_task(q: Any, task_id: uuid.UUID, *args: Any, **kwargs: Any) -> None:
        if not first_id:
            first_id.append(task_id)
            await real_store_task(q, task_id, *args, **kwargs)  # it lands ...
            raise StorageUnavailable("cassandra timeout (injected): write timed out")  # ... unseen
        if task_id == first_id[0] and bridge.queue.clock.now_ms() - ms_of(task_id) <= 3000:
            raise StorageNotSent("cassandra unavailable (injected): no host available")
        await real_store_task(q, task_id, *args, **kwargs)

    monkeypatch.setattr(store, "store_task", store_task)
    svc = service_id()
    key = f"order-{uuid.uuid4().hex[:8]}"
    reply = await engine.call(
        "add", {"serviceId": svc, "value": "once"}, owner=OWNERS[0], headers={IDEMPOTENCY_HEADER: key}
    )
    w = await workers(svc, "w")
    handed: list[str] = []

    async def drained() -> bool:
        t = await w.fetch()
        if t is None:
            return len(handed) > 0
        handed.append(t.id)
        assert await t.ack("ok") is True
        return False

    await wait_for(drained, 10, interval=0.1, what="the queue drained")
    assert handed == [reply["task"]["id"]], (
        f"one add with key {key!r} answered {reply['task']['id']} and the queue handed out {handed} "
        f"(the first attempt's task {first_id[0]} landed and was stored again under a new id)"
    )


async def test_a_keyless_add_reported_not_sent_after_its_write_landed_is_not_stored_twice(
    make_bridge, workers, servers, names, monkeypatch
):
    """A driver sends an idempotent write to the next node when the connection to the first closes
    under it, and reports "no host available" (``NotSent``: "certainly not applied") when no node
    is left, though the first may have applied it. An add with neither a key nor a message-id (many
    AMQP clients set none) whose prepared id had gone stale then took a new id: its first task was
    stored, and the second made the add two tasks. Now the add looks whether its task is stored
    before it takes a new id."""
    import aiormq

    import bridge.transport.handlers as handlers
    from bridge.storage.errors import StorageNotSent
    from bridge.transport import frames
    from tests.conftest import ENGINE_USER

    monkeypatch.setattr(handlers, "ADD_ID_FRESH_MS", -(10**9))  # every prepared id is stale at once
    bridge = await make_bridge(hints=False)  # every fetch scans: every stored task is found at once
    store = bridge.queue.ctx.store
    real_store_task = store.store_task
    writes: list[uuid.UUID] = []

    async def store_task(q: Any, task_id: uuid.UUID, *args: Any, **kwargs: Any) -> None:
        writes.append(task_id)
        await real_store_task(q, task_id, *args, **kwargs)  # it lands ...
        if len(writes) == 1:
            raise StorageNotSent("cassandra unavailable (injected): no host available")  # ... said not sent

    monkeypatch.setattr(store, "store_task", store_task)
    svc = service_id()
    # Written frame by frame: every aiormq publish gets a random message-id, which guards a
    # redelivery and, recorded beside the task, also caught this case.
    connection = await aiormq.connect(servers.amqp_url(ENGINE_USER))
    try:
        channel = await connection.channel(publisher_confirms=False)
        props = frames.properties(
            content_type="application/json",
            headers={IDEMPOTENCY_HEADER: "", "x-owner": OWNERS[0]},
            delivery_mode=2,
            user_id=ENGINE_USER,
        )
        body = b'{"serviceId": "' + svc.encode() + b'", "value": "once"}'
        await frames.publish_on(channel, "add", body, props, exchange=names["exchange"])
        w = await workers(svc, "w")
        handed: list[str] = []

        async def drained() -> bool:
            t = await w.fetch()
            if t is None:
                return len(handed) > 0 and len(writes) >= 1
            handed.append(t.id)
            assert await t.ack("ok") is True
            return False

        await wait_for(drained, 10, interval=0.1, what="the queue drained")
        assert len(handed) == 1, f"one add, {len(handed)} tasks handed out: {handed} (written: {writes})"
    finally:
        await connection.close()
