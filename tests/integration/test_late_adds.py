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


@pytest.mark.parametrize("entering_fails", [False, True], ids=["entered again", "entering again fails once"])
async def test_an_add_whose_write_lands_after_a_scan_passed_its_place_is_handed_out(
    make_bridge, monkeypatch, entering_fails
):
    """Its second entry is best effort: one that fails (the store slow, the reason the add was
    late) does not fail the add, whose task is stored (its retry, or requeue, left it uncounted
    and unhinted); it is tried again in the background (found by the session's re-review)."""
    from bridge.storage.errors import StorageUnavailable

    adding = await make_bridge(hints=False)
    serving = await make_bridge(hints=False)
    svc = service_id()
    store = adding.queue.ctx.store
    real_store_task = store.store_task
    held = asyncio.Event()
    release = asyncio.Event()

    async def slow_store_task(q: Any, task_id: uuid.UUID, *args: Any, **kwargs: Any) -> None:
        held.set()
        await release.wait()  # the write on its way, held up
        await real_store_task(q, task_id, *args, **kwargs)

    monkeypatch.setattr(store, "store_task", slow_store_task)
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
    # Tasks added after it (later ids), handed out and acked through the other bridge.
    others = [await serving.queue.add(OWNER, _add(svc, n), message_id=None, traceparent=None) for n in range(3)]
    assert [await _fetch_and_ack(serving, svc) for _ in others] == others
    # Once they are older than the settle window, a scan moves its position past them (and past
    # the late task's place, where nothing is stored yet).
    settle_ms = serving.queue.dispatcher.settle_ms
    await wait_for(
        lambda: serving.queue.clock.now_ms() > ms_of(uuid.UUID(others[-1])) + settle_ms + 50, 10, what="settled"
    )
    assert await _fetch_and_ack(serving, svc) is None
    release.set()
    late_id = await asyncio.wait_for(late, 20)  # answered: the engine was told it is added
    assert [str(t) for t in failed] == ([late_id] if entering_fails else [])

    handed: list[str] = []

    async def handed_out() -> bool:
        if (got := await _fetch_and_ack(serving, svc)) is not None:
            handed.append(got)
        return late_id in handed

    await wait_for(handed_out, 15, interval=0.2, what="the late task handed out")
    assert handed == [late_id]
