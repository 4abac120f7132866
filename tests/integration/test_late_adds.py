"""An add whose write lands late (real servers): a task answered as added is handed out.

A fetch's scan moves its lane's position over entries that are taken and older than the settle
window (the skew margin + 1 s), and never reads behind it again. An add takes its task id (its
entry's place in the index) before it writes, and a write can land seconds later (a coordinator's
pause, the key's compare-and-set, an attempt that timed out and is retried with the same id): a
scan that ran meanwhile, over tasks added and taken after it, moved past its place, and the task,
stored and answered, was never handed out. With hints off no hint reaches it either; with hints on
its hint is then the only way to it (lost with a broker restart). Found by review, 2026-12-06.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from bridge.domain.fetching import RequestAbandoned
from bridge.domain.models import AckRequest, AddCommand, FetchRequest, parse
from bridge.domain.timeline import ms_of
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]


def _add(svc: str, value: Any) -> AddCommand:
    return parse(AddCommand, {"serviceId": svc, "value": value})


def _fetch(svc: str) -> FetchRequest:
    return parse(FetchRequest, {"serviceId": svc, "workerId": "w", "timeToRecover": 120_000})


async def _fetch_and_ack(b: Any, svc: str) -> str | None:
    got = await b.queue.fetch(OWNER, _fetch(svc))
    if got is None:
        return None
    ack = {"serviceId": svc, "workerId": "w", "taskId": got.task_id, "epoch": got.epoch, "result": "ok"}
    assert await b.queue.ack(OWNER, parse(AckRequest, ack)) is True
    return str(got.task_id)


def _hold_store_task(store: Any, monkeypatch: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """The store's next task writes wait for ``release`` (``held`` set once one is on its way):
    a write held up at a slow coordinator."""
    real_store_task = store.store_task
    held, release = asyncio.Event(), asyncio.Event()

    async def slow_store_task(q: Any, task_id: uuid.UUID, *args: Any, **kwargs: Any) -> None:
        held.set()
        await release.wait()  # the write on its way, held up
        await real_store_task(q, task_id, *args, **kwargs)

    monkeypatch.setattr(store, "store_task", slow_store_task)
    return held, release


async def _adding_and_serving(make_bridge: Any, monkeypatch: Any, *, adding_hints: bool = False) -> Any:
    """Two bridges, the serving one without hints (only the store leads to a task there): the
    adding one's task writes held (``_hold_store_task``). (adding, serving, svc, store, held, release)."""
    adding = await make_bridge(hints=adding_hints)
    serving = await make_bridge(hints=False)
    store = adding.queue.ctx.store
    held, release = _hold_store_task(store, monkeypatch)
    return adding, serving, service_id(), store, held, release


async def _taken_and_passed(serving: Any, svc: str, tag: str, after_ms: int = 0) -> None:
    """Tasks added through the serving bridge (later ids), handed out and acked, and a scan's
    position moved past them (and past anything placed before ``after_ms``) once they are older
    than the settle window."""
    adds = [serving.queue.add(OWNER, _add(svc, f"{tag}{n}"), message_id=None, traceparent=None) for n in range(3)]
    others = [await a for a in adds]
    assert sorted([await _fetch_and_ack(serving, svc) for _ in others]) == sorted(others)  # (one ms: no order)
    last = max(after_ms, ms_of(uuid.UUID(others[-1])))
    settle_ms = serving.queue.dispatcher.settle_ms
    await wait_for(lambda: serving.queue.clock.now_ms() > last + settle_ms + 50, 10, what="settled")
    assert await _fetch_and_ack(serving, svc) is None


async def _handed_out_alone(serving: Any, svc: str, late_id: str) -> None:
    """The late task is handed out, and nothing else (a scan of the serving bridge's finds it)."""
    handed: list[str] = []

    async def handed_out() -> bool:
        if (got := await _fetch_and_ack(serving, svc)) is not None:
            handed.append(got)
        return late_id in handed

    await wait_for(handed_out, 15, interval=0.2, what="the late task handed out")
    assert handed == [late_id]


@pytest.mark.parametrize("entering_fails", [False, True], ids=["entered again", "entering again fails once"])
async def test_an_add_whose_write_lands_after_a_scan_passed_its_place_is_handed_out(
    make_bridge, monkeypatch, entering_fails
):
    """Its second entry is best effort: one that fails (the store slow, the reason the add was
    late) does not fail the add, whose task is stored (its retry, or requeue, left it uncounted
    and unhinted); it is tried again in the background (found by the session's re-review)."""
    from bridge.storage.errors import StorageUnavailable

    adding, serving, svc, store, held, release = await _adding_and_serving(make_bridge, monkeypatch)
    real_enter_again = store.enter_again
    failed: list[uuid.UUID] = []

    async def enter_again(q: Any, task_id: uuid.UUID, *args: Any) -> None:
        if entering_fails and not failed:
            failed.append(task_id)
            raise StorageUnavailable("cassandra timeout (injected)")
        await real_enter_again(q, task_id, *args)

    monkeypatch.setattr(store, "enter_again", enter_again)
    late = asyncio.ensure_future(adding.queue.add(OWNER, _add(svc, "late"), message_id=None, traceparent=None))
    await wait_for(held.is_set, 10, what="the late add's write on its way")
    await _taken_and_passed(serving, svc, "a")  # past the late task's place, where nothing is stored yet
    release.set()
    late_id = await asyncio.wait_for(late, 20)  # answered: the engine was told it is added
    assert [str(t) for t in failed] == ([late_id] if entering_fails else [])
    await _handed_out_alone(serving, svc, late_id)


async def test_second_entries_of_tasks_taken_through_their_first_are_passed_over_and_marked(make_bridge):
    """After a store stall that made many adds late, their second entries meet a scan as claims
    refused (their tasks were taken through their first entries): eight in a row made a fetch
    answer null while a task waited behind them, and every scanning bridge paid a write-ahead and
    an LWT for each, as nobody marked them claimed (found in CI, 2026-12-06: a worker loop that
    stops at its first null fetch stopped early). A second entry is looked up first (one read)
    and, once its task is known claimed, passed over and marked claimed for every other bridge."""
    from bridge.domain.records import LANE_FRESH, QueueKey
    from bridge.domain.timeline import bucket_of_task, new_task_id

    b = await make_bridge(hints=False)
    svc = service_id()
    q = QueueKey(OWNER, svc)
    store = b.queue.ctx.store
    taken = [await b.queue.add(OWNER, _add(svc, n), message_id=None, traceparent=None) for n in range(24)]
    seconds = []
    for task in taken:
        payload = await store.payload(q, uuid.UUID(task))
        assert payload is not None
        seq = new_task_id(b.queue.clock.now_ms())
        await store.enter_again(q, uuid.UUID(task), seq, payload)
        seconds.append(seq)
    waiting = await b.queue.add(OWNER, _add(svc, "waiting"), message_id=None, traceparent=None)
    handed = [await _fetch_and_ack(b, svc) for _ in range(len(taken) + 1)]
    assert sorted(map(str, handed)) == sorted([*taken, waiting])  # never null while one waits
    assert await _fetch_and_ack(b, svc) is None  # a scan that reads past every second entry

    def claims(outcome: str) -> float:
        labels = {"source": "scan", "outcome": outcome}
        return b.metrics.registry.get_sample_value("queue_bridge_claims_total", labels) or 0.0

    assert claims("lost") == 0  # no write-ahead and refused claim a second entry

    async def marked() -> bool:
        rows = []
        for bucket in sorted({bucket_of_task(s) for s in seconds}):
            rows += await store.scan(q, LANE_FRESH, bucket, None, 100)
        return all(r.claimed for r in rows if r.seq in seconds)

    await wait_for(marked, 10, interval=0.1, what="the second entries marked claimed")


async def test_a_late_add_whose_bridge_died_is_entered_again_by_the_copy_that_finds_it_stored(make_bridge, monkeypatch):
    """The bridge whose write landed late dies (kill -9) before it gives its task a second
    entry; the broker redelivers the add to another bridge (or the engine retries its publish),
    which finds the task stored and answered it as added: that copy enters it again (it did not
    since ``c5fa63f``: the task stayed behind the scans' positions, never handed out with hints
    off; found by review, 2026-12-06)."""
    adding, serving, svc, _store, held, release = await _adding_and_serving(make_bridge, monkeypatch)

    async def dies_first(*args: Any) -> None:
        return None  # killed before its second entry: nothing more of this bridge runs

    monkeypatch.setattr(adding.queue, "_enter_again_if_late_or_later", dies_first)
    late = asyncio.ensure_future(
        adding.queue.add(OWNER, _add(svc, "late"), message_id="m-late", traceparent=None, first_copy=True)
    )
    await wait_for(held.is_set, 10, what="the late add's write on its way")
    await _taken_and_passed(serving, svc, "a")  # past the late task's place, where nothing is stored yet
    release.set()
    late_id = await asyncio.wait_for(late, 20)
    # The redelivered copy, on the other bridge: the same task.
    again = await serving.queue.add(OWNER, _add(svc, "late"), message_id="m-late", traceparent=None)
    assert again == late_id
    await _handed_out_alone(serving, svc, late_id)


async def test_a_late_add_handed_to_a_waiting_fetch_that_gives_it_up_is_entered_again(make_bridge, monkeypatch):
    """A late add handed to a fetch waiting on its own bridge got no second entry (that fetch
    would claim it); a claim that is then not decided (its caller's deadline passed while the
    write was held up, the worker gone) puts the hint back, and once that one hint is lost the
    task stood behind every scan's position: answered as added, never handed out (found by
    review, 2026-12-06). The serving bridge here takes no hints: only the store can lead to it."""
    adding, serving, svc, _store, held, release = await _adding_and_serving(make_bridge, monkeypatch, adding_hints=True)
    waiting_req = parse(FetchRequest, {"serviceId": svc, "workerId": "waiter", "waitMs": 20_000})
    now = adding.queue.clock.now_ms()
    waiter = asyncio.ensure_future(adding.queue.fetch(OWNER, waiting_req, deadline_ms=now + 1_000))
    await wait_for(lambda: sum(len(w.waiters) for w in adding.hints._waiting.values()) > 0, 10, what="a fetch waiting")
    late = asyncio.ensure_future(adding.queue.add(OWNER, _add(svc, "late"), message_id=None, traceparent=None))
    await wait_for(held.is_set, 10, what="the late add's write on its way, its hint handed to the waiting fetch")
    assert adding.hints.handed_here == 1
    await _taken_and_passed(serving, svc, "a")  # past the late task's place, where nothing is stored yet
    release.set()
    late_id = await asyncio.wait_for(late, 20)
    # The waiting fetch's caller gave up meanwhile (its deadline passed): it claims nothing.
    with pytest.raises(RequestAbandoned):
        await asyncio.wait_for(waiter, 20)
    await _handed_out_alone(serving, svc, late_id)


async def test_a_delayed_add_whose_write_lands_after_its_due_time_and_a_scan_is_handed_out(make_bridge, monkeypatch):
    """A delayed task's entry sits at its due time; its write held up past it (a slow coordinator,
    a retry with the same id) landed behind a scan position that had moved on over tasks added
    after its due time and taken, and the due announcement gives up on a row still missing 5 s
    after its time: with hints off it was never handed out. Late adds got a second entry, delayed
    ones not (found by review, 2026-12-06)."""
    adding, serving, svc, _store, held, release = await _adding_and_serving(make_bridge, monkeypatch)
    delayed = parse(AddCommand, {"serviceId": svc, "value": "delayed", "delayMs": 100})
    late = asyncio.ensure_future(adding.queue.add(OWNER, delayed, message_id=None, traceparent=None))
    await wait_for(held.is_set, 10, what="the delayed add's write on its way")
    due_ms = adding.queue.clock.now_ms() + 100
    await wait_for(lambda: serving.queue.clock.now_ms() > due_ms + 50, 10, what="past its due time")
    await _taken_and_passed(serving, svc, "a")  # past the late task's place, where nothing is stored yet
    release.set()
    late_id = await asyncio.wait_for(late, 20)
    await _handed_out_alone(serving, svc, late_id)


@pytest.mark.parametrize("second_write", ["lands", "fails"])
async def test_a_second_entry_whose_own_write_lands_late_is_written_again(make_bridge, monkeypatch, second_write):
    """The second entry of a late add takes its place from the clock, then is written: the same
    slow store that made the add late could hold that write up too, and it landed behind a scan
    position that had moved on meanwhile (found by review, 2026-12-06). One that lands later than
    the scans wait for is written again, at a later place. That write (after the add's reply, in
    the background) gave up at its first failure (a write timeout that did not land): both of the
    task's entries lay behind the positions, never handed out with hints off (found by the third
    re-review, 2026-12-06). A failed write is tried again, further ahead ("fails")."""
    from bridge.domain.errors import Unavailable

    adding = await make_bridge(hints=False)
    serving = await make_bridge(hints=False)
    svc = service_id()
    store = adding.queue.ctx.store
    real_enter_again = store.enter_again
    held, release = _hold_store_task(store, monkeypatch)
    entering, go_on = asyncio.Event(), asyncio.Event()
    calls = 0

    async def slow_enter_again(*args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            entering.set()
            await go_on.wait()  # its place taken from the clock already, its write held up
        elif calls == 2 and second_write == "fails":
            raise Unavailable("the write timed out (injected; it did not land)")
        await real_enter_again(*args)

    monkeypatch.setattr(store, "enter_again", slow_enter_again)
    late = asyncio.ensure_future(adding.queue.add(OWNER, _add(svc, "late"), message_id=None, traceparent=None))
    await wait_for(held.is_set, 10, what="the late add's write on its way")
    await _taken_and_passed(serving, svc, "a")  # past the late task's own place
    release.set()
    await wait_for(entering.is_set, 10, what="its second entry placed, its write held up")
    await _taken_and_passed(serving, svc, "b", serving.queue.clock.now_ms())  # past the second entry's place too
    go_on.set()
    late_id = await asyncio.wait_for(late, 20)
    if second_write == "fails":
        await wait_for(lambda: calls >= 3, 20, what="the failed write tried again")
    await _handed_out_alone(serving, svc, late_id)
