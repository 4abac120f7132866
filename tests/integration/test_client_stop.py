"""``Worker.run`` stopping (real servers): what its drain takes, how long a lost request keeps it
unsure, and a handler that does not end.

* The drain after stop fetched (not ``fresh``) for up to ``stop_grace``, and once more after it:
  a fetch claims the queue's next task when the worker holds none, so a stopping worker took new
  work. It now asks the bridge whether it holds a task (an extend naming none, which reads its
  pointer and never claims) and fetches only then.
* A request without an answer kept the worker unsure until its deadline counted again from when
  it failed (``wait + timeout`` after a RequestTimeout that came at ``wait + timeout``): twice too long.
* ``stop`` waited for the task in hand however long its handler took: ``stop_timeout`` now bounds
  it, cancels the handler and gives its task back to come again at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aio_pika
import pytest

from bridge.client import RequestTimeout, Task, Worker
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _draining(caplog: pytest.LogCaptureFixture) -> bool:
    return any(r.getMessage().startswith("stopping: ") for r in caplog.records)


async def test_the_drain_hands_back_a_task_claimed_for_the_worker_after_it_stopped(
    bridge, engine, servers, names, monkeypatch, caplog
):
    """The drain's purpose: a fetch of the worker's that a busy bridge ran after the worker gave
    it up (here held at the bridge until the drain runs) claims a ready task at once (no probe of
    its reply-to): the drain finds the worker holds it and handles it."""
    svc = service_id()
    gate = asyncio.Event()
    real = bridge.queue.fetch
    arrived = 0

    async def held_up(owner, req, **kw):  # type: ignore[no-untyped-def]
        nonlocal arrived
        arrived += 1
        await gate.wait()
        return await real(owner, req, **kw)

    monkeypatch.setattr(bridge.queue, "fetch", held_up)
    url = servers.amqp_url(OWNERS[0])
    w = Worker(url, service=svc, worker_id="runner", exchange=names["exchange"], time_to_recover_ms=60_000)
    await w.open()
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task: Task) -> str:
        seen.append(task.id)
        return "handled"

    try:
        with caplog.at_level(logging.INFO, logger="bridge.client"):
            running = asyncio.create_task(w.run(handler, stop=stop))
            await wait_for(lambda: arrived == 1, 10.0, what="the worker's fetch held at the bridge")
            task_id = await engine.add(svc, {"n": 1})
            stop.set()
            await wait_for(lambda: _draining(caplog), 10.0, what="the drain to start")
            gate.set()  # the fetch given up goes on at the bridge and claims the task
            handled = await asyncio.wait_for(running, 30.0)
    finally:
        gate.set()
        await w.close()
    assert handled == 1 and seen == [task_id], f"handled {handled}: {seen}"
    async with Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="runner", exchange=names["exchange"]) as r:
        assert await r.fetch() is None, "the task is still leased to the stopped worker"


async def test_the_drain_hands_back_every_task_claimed_for_the_worker_after_it_stopped(
    bridge, engine, servers, names, monkeypatch, caplog
):
    """Two fetches of the worker's given up and held at a busy bridge, each claiming a task after
    the worker stopped. The drain handled the first, and its ack left the task as the worker's
    current one: every later question "what do I hold?" named that task (answered false) instead
    of reading the pointer, and the second task stayed leased to the stopped worker."""
    svc = service_id()
    gates = [asyncio.Event(), asyncio.Event()]
    real_fetch, real_ack = bridge.queue.fetch, bridge.queue.ack
    arrived = 0
    acked = asyncio.Event()

    async def held_up(owner, req, **kw):  # type: ignore[no-untyped-def]
        nonlocal arrived
        gate = gates[arrived] if arrived < len(gates) else None
        arrived += 1
        if gate is not None:
            await gate.wait()
        return await real_fetch(owner, req, **kw)

    async def ack(owner, req, **kw):  # type: ignore[no-untyped-def]
        done = await real_ack(owner, req, **kw)
        acked.set()
        return done

    monkeypatch.setattr(bridge.queue, "fetch", held_up)
    monkeypatch.setattr(bridge.queue, "ack", ack)
    url = servers.amqp_url(OWNERS[0])
    w = Worker(url, service=svc, worker_id="runner", exchange=names["exchange"], time_to_recover_ms=60_000)
    w.stop_grace = 15.0
    await w.open()
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task: Task) -> str:
        seen.append(task.id)
        return "handled"

    try:
        with caplog.at_level(logging.INFO, logger="bridge.client"):
            running = asyncio.create_task(w.run(handler, stop=stop))
            await wait_for(lambda: arrived >= 1, 10.0, what="the worker's long-poll held at the bridge")
            # Its connection drops: the loop's fetch fails (ConnectionLost) and the next goes on a
            # new connection, while the first, within its deadline, is still at the bridge.
            conn = w.connection
            assert conn is not None
            await conn.close()
            await wait_for(lambda: arrived >= 2, 20.0, what="two fetches of the worker held at the bridge")
            ids = [await engine.add(svc, {"n": n}) for n in range(2)]
            stop.set()
            await wait_for(lambda: _draining(caplog), 10.0, what="the drain to start")
            gates[0].set()  # the first claims a task, which the drain handles and acks
            await asyncio.wait_for(acked.wait(), 15.0)
            gates[1].set()  # the second claims the other one
            await asyncio.wait_for(running, 40.0)
    finally:
        for gate in gates:
            gate.set()
        await w.close()
    async with Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="runner", exchange=names["exchange"]) as r:
        left = await r.fetch()
    assert left is None, f"task {left and left.id} is still leased to the stopped worker (handled: {seen})"
    assert sorted(seen) == sorted(ids)


async def test_a_fetch_without_an_answer_keeps_the_worker_unsure_until_its_own_deadline(servers, names):
    """Nobody consumes the requests (the exchange exists, no bridge runs): a long-poll of 1 s with
    a 1 s timeout raises RequestTimeout 2 s after it was sent, and could run at a bridge until
    then (plus a second for the clocks): 3 s after it was sent, not 5."""
    admin = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        await (await admin.channel()).declare_exchange(names["exchange"], aio_pika.ExchangeType.DIRECT, durable=True)
    finally:
        await admin.close()
    async with Worker(
        servers.amqp_url(OWNERS[0]), service=service_id(), worker_id="w", exchange=names["exchange"], timeout=1.0
    ) as w:
        sent = time.monotonic()
        with pytest.raises(RequestTimeout):
            await w.fetch(wait_ms=1_000)
        assert time.monotonic() - sent >= 2.0
        unsure_for = w._unsure_until - sent
    assert 2.0 <= unsure_for <= 3.0 + 0.2, f"unsure for {unsure_for:.2f}s after the fetch was sent (its deadline: 3s)"


async def test_stop_timeout_cancels_the_handler_and_gives_its_task_back_at_once(bridge, engine, workers):
    """A handler that never ends held ``run`` (and the task's lease) until the pod was killed;
    the task came back only when its lease ran out (60 s here). With ``stop_timeout`` the handler
    is cancelled that long after stop and the task failed with ``retry_in_ms=0``: another worker
    gets it at once, its delivery counted."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "stuck", time_to_recover_ms=60_000, stop_timeout=1.0)
    w.wait_ms = 1_000
    stop = asyncio.Event()
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def handler(task: Task) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()  # never ends on its own
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    running = asyncio.create_task(w.run(handler, stop=stop))
    await asyncio.wait_for(started.wait(), 10.0)
    loop = asyncio.get_running_loop()
    stopped_at = loop.time()
    stop.set()
    handled = await asyncio.wait_for(running, 20.0)
    took = loop.time() - stopped_at
    assert cancelled == [True] and handled == 0
    assert took < 1.0 + 3.0, f"run took {took:.1f}s to stop with stop_timeout 1s"
    other = await workers(svc, "other", time_to_recover_ms=60_000)
    got = await other.fetch(wait_ms=2_000)
    assert got is not None and got.id == task_id and got.deliveries == 2, got
    assert await got.ack("done") is True


def test_stop_timeout_by_default_waits_for_the_handler() -> None:
    w = Worker("amqp://guest:guest@127.0.0.1:1/", service="s", worker_id="w")
    assert w.stop_timeout is None
    with pytest.raises(ValueError, match="stop_timeout"):
        Worker("amqp://guest:guest@127.0.0.1:1/", service="s", worker_id="w", stop_timeout=-1)
