"""``Worker.run`` cancelled at the edges of its steps (a real bridge; each moment is made exact by a
hook on the client or the bridge, not by timing): the sixth review of the cancel settling
(2026-12-08). In every case the task ends acked with its handler's result, or given back, never
left leased to a worker whose run has ended, its handler never run twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.client import Task
from tests.conftest import service_id, wait_for
from tests.integration import test_slow_store as slow

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _after_turns(turns: int, act: Any) -> None:
    """``act()`` after ``turns`` more turns of the event loop."""
    loop = asyncio.get_running_loop()
    if turns == 0:
        loop.call_soon(act)
    else:
        loop.call_soon(_after_turns_cb, turns - 1, act)


def _after_turns_cb(turns: int, act: Any) -> None:
    _after_turns(turns, act)


@pytest.mark.parametrize("turns", range(7))
async def test_a_run_cancelled_as_its_long_poll_is_answered_leaves_no_task_leased(
    turns, bridge, engine, workers, servers, cql
):
    """``run`` (with ``stop``) long-polls; the bridge answers with a task and ``run`` is cancelled
    ``turns`` loop turns later. One of those turns came after the long-poll's wait and before the
    fetch's result was taken, outside the ``except`` that gives back what a cancelled fetch was
    answered with: the task stayed leased to the cancelled worker until its lease ended."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=3.0)
    w.wait_ms = 2_000
    w.stop_grace = 2.0
    real_fetch = w.fetch
    running: asyncio.Task[Any] | None = None
    cancelled: list[str] = []  # once: the drain's own fetch of the task is not cancelled again

    async def fetch_then_cancel(*args: Any, **kwargs: Any) -> Task | None:
        task = await real_fetch(*args, **kwargs)
        if task is not None and running is not None and not cancelled:
            cancelled.append(task.id)
            _after_turns(turns, running.cancel)
        return task

    w.fetch = fetch_then_cancel  # type: ignore[method-assign]

    async def handler(task: Task) -> str:
        await asyncio.sleep(30)  # cancelled with the run
        return "done"

    running = asyncio.create_task(w.run(handler, stop=asyncio.Event()))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)
    lease = slow.lease_of(cql, servers.keyspace, svc, task_id)
    assert not (lease is not None and lease["state"] == "leased" and lease["worker"] == "runner"), (
        f"cancelled {turns} turns after the answer, the task stayed leased to the run that ended: {lease}"
    )


async def test_a_run_cancelled_twice_while_its_ack_is_on_its_way_keeps_the_result_in_hand(
    make_bridge, engine, workers, monkeypatch, servers, cql
):
    """The loop's ack is on its way (it never applies: no answer), and ``run`` is cancelled twice
    at once (the caller insisting): nothing more is sent, as a second cancel asks, but the result
    was not kept in hand either, and the next ``run`` of the same worker, handed the same lease,
    ran its handler a second time."""
    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    real_ack = b.queue.ack
    calls = 0
    acking = asyncio.Event()

    async def first_ack_lost(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # no answer, nothing applied
            acking.set()
            await asyncio.sleep(5.0)
            return False
        return await real_ack(*args, **kwargs)

    monkeypatch.setattr(b.queue, "ack", first_ack_lost)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=2.0)
    w.wait_ms = 1_000
    handled: list[str] = []

    async def handler(task: Task) -> str:
        handled.append(task.id)
        return "done"

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(acking.wait(), 15)
    running.cancel()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 5)
    assert calls == 1, "a second cancel sends nothing more"

    stop = asyncio.Event()
    again = asyncio.create_task(w.run(handler, stop=stop))
    await wait_for(
        lambda: slow.lease_of(cql, servers.keyspace, svc, task_id)["state"] == "done", 20, what="the task acked"
    )
    stop.set()
    await asyncio.wait_for(again, 30)
    assert handled == [task_id], f"the handler ran {len(handled)} times: the result was not kept in hand"


async def test_a_refused_ack_given_back_without_an_answer_is_not_acked_again_at_the_cancel(
    make_bridge, engine, workers, monkeypatch
):
    """``run`` is cancelled while the loop's ack is on its way; that ack and its resends at the
    cancel are answered ``internal`` (the bridge fails on them): the result is given back
    (``ResultRefused``), and that fail gets no answer. The settling, handed the task back, acked
    the refused result again (kept in hand before the ack went out, and looked at first) before
    sending the fail once more: the work the loop had judged refused was sent again, and the
    deadline spent on it. The fail is the latest outcome: only it is sent again."""
    b = await make_bridge()
    svc = service_id()
    await engine.add(svc, {"n": 1})
    sent: list[str] = []
    acking = asyncio.Event()
    real_fail = b.queue.fail

    async def ack_internal(*args: Any, **kwargs: Any) -> Any:
        sent.append("ack")
        if not acking.is_set():  # the loop's ack: on its way when the run is cancelled
            acking.set()
            await asyncio.sleep(0.5)
        raise RuntimeError("a bug the bridge did not expect")  # answered ``internal``

    first_fail_at: list[float] = []

    async def fails_lost_a_while(*args: Any, **kwargs: Any) -> Any:
        sent.append("fail")
        first_fail_at.append(first_fail_at[0] if first_fail_at else time.monotonic())
        if time.monotonic() - first_fail_at[0] < 4.0:  # no answer, nothing applied (the stop grace long)
            await asyncio.sleep(3.0)
            return None
        return await real_fail(*args, **kwargs)

    monkeypatch.setattr(b.queue, "ack", ack_internal)
    monkeypatch.setattr(b.queue, "fail", fails_lost_a_while)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=1.5)
    w.wait_ms = 1_000
    w.stop_grace = 3.0

    async def handler(task: Task) -> str:
        return "done"

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(acking.wait(), 20)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)
    first_fail = sent.index("fail")
    assert "ack" not in sent[first_fail:], f"the refused result was acked again after its give-back: {sent}"


async def test_a_handler_that_finished_as_the_run_was_cancelled_has_its_result_acked(
    bridge, engine, workers, servers, cql
):
    """With ``stop_timeout`` the handler runs in a task of its own; it finished in the very loop
    turn ``run`` was cancelled, and its result was thrown away: the task was given back
    (``Cancelled``) and its work ran again. Its result is acked."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=3.0, stop_timeout=5.0)
    w.wait_ms = 1_000
    running: asyncio.Task[Any] | None = None

    async def handler(task: Task) -> str:
        assert running is not None
        running.cancel()  # the run is cancelled as this handler returns
        return "done"

    running = asyncio.create_task(w.run(handler, stop=asyncio.Event()))
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)
    lease = slow.lease_of(cql, servers.keyspace, svc, task_id)
    assert lease["state"] == "done", f"the handler's result was not acked: {lease}"


async def test_a_run_stopped_and_cancelled_at_once_while_it_pauses_is_cancelled(bridge, workers, monkeypatch):
    """Shutdown code sets ``stop`` and cancels ``run`` in one go while it pauses between fetches
    (an empty queue, no long-poll). On Python 3.11 the pause's ``asyncio.wait_for`` returned as
    ``stop`` was set and swallowed the cancel: ``run`` returned 0, and its task was left counting a
    cancel nobody would see raised."""
    from bridge.client import Worker

    w = await workers(service_id(), "idle", timeout=3.0, poll_interval=5.0)
    w.wait_ms = 0
    pausing = asyncio.Event()
    real_pause = Worker._pause

    async def watched_pause(seconds: float, stop: asyncio.Event | None) -> None:
        pausing.set()
        await real_pause(seconds, stop)

    monkeypatch.setattr(w, "_pause", watched_pause)
    stop = asyncio.Event()
    running = asyncio.create_task(w.run(lambda task: asyncio.sleep(0), stop=stop))
    await asyncio.wait_for(pausing.wait(), 15)
    stop.set()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 15)


@contextlib.asynccontextmanager
async def _worker_stuck_connecting(close_s: float) -> AsyncIterator[tuple[Any, asyncio.Event]]:
    """A worker (2 s timeout) whose loop's fetch never connects (a broker that accepts TCP and
    never speaks AMQP) and takes ``close_s`` to give up when cancelled (a slow TLS close); the
    event is set once that fetch is under way."""
    import socket

    from bridge.client import Worker

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never speaks AMQP
    connecting = asyncio.Event()
    w = Worker(
        f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/",
        service=service_id(),
        worker_id="w",
        timeout=2.0,
        connect_timeout=30.0,
        stop_grace=5.0,
    )

    async def slow_to_give_up_connecting(*args: Any, **kwargs: Any) -> Task | None:
        assert w.channel is None  # never connected: nothing can have been sent
        connecting.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(close_s)  # the connect's close, slow (TLS)
            raise
        return None

    w.fetch = slow_to_give_up_connecting  # type: ignore[method-assign]
    try:
        yield w, connecting
    finally:
        await w.close()
        silent.close()


async def test_a_run_cancelled_while_its_long_poll_is_still_connecting_ends_within_one_timeout() -> None:
    """``run`` (with ``stop``) cancelled while its long-poll was still connecting, and the connect
    slow to give up (a node's TLS close takes up to 30 s): past one ``timeout`` of waiting for it,
    the fetch was taken for one that may have been sent, and the cancelled run asked a broker it
    could not reach what it claimed, for ``stop_grace`` plus two ``timeout``s more (found by review,
    2026-12-08). Nothing was sent: it ends after that one ``timeout``."""
    async with _worker_stuck_connecting(close_s=6.0) as (w, connecting):
        running = asyncio.create_task(w.run(lambda task: asyncio.sleep(0), stop=asyncio.Event()))
        await asyncio.wait_for(connecting.wait(), 10)
        cancelled_at = time.monotonic()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 40)
        took = time.monotonic() - cancelled_at
    # One ``timeout`` (2 s) waiting for the fetch; asking the broker once more took another.
    assert took < 3.0, f"a run cancelled as its long-poll connected took {took:.1f} s to end"


async def test_a_run_stopped_while_its_long_poll_is_still_connecting_returns_within_one_timeout() -> None:
    """``stop`` set while the loop's long-poll was still connecting, the connect slow to give up
    (a TLS close, up to 30 s): the stop waited for it with no bound, past the documented
    ``stop_grace`` plus two ``timeout``s (found by review, 2026-12-08). It waits one ``timeout``."""
    async with _worker_stuck_connecting(close_s=8.0) as (w, connecting):
        stop = asyncio.Event()
        running = asyncio.create_task(w.run(lambda task: asyncio.sleep(0), stop=stop))
        await asyncio.wait_for(connecting.wait(), 10)
        stopped_at = time.monotonic()
        stop.set()
        assert await asyncio.wait_for(running, 40) == 0
        took = time.monotonic() - stopped_at
    assert took < 3.5, f"a run stopped as its long-poll connected took {took:.1f} s to return"
