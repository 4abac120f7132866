"""A result published whose mark could not be written (its bridge cut off from Cassandra just
after the broker confirmed it) is marked once Cassandra answers again, before the relay's
republish: a Cassandra blip on one bridge does not send the engine a second copy. Found by the
drill "a bridge cut off from Cassandra" (CI of stop 47: one result published twice)."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.domain.records import OutboxEntry
from bridge.storage.errors import StorageNotSent
from tests.conftest import wait_for
from tests.queue_harness import Harness

pytestmark = pytest.mark.anyio


async def test_a_result_whose_mark_failed_once_is_not_published_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    mark = h.store.mark_published
    marks: list[OutboxEntry] = []

    async def cut_off_once(entry: OutboxEntry, *args: Any, **kwargs: Any) -> None:
        marks.append(entry)
        if len(marks) == 1:
            raise StorageNotSent("no host could take the request (cut off)")
        await mark(entry, *args, **kwargs)

    monkeypatch.setattr(h.store, "mark_published", cut_off_once)
    await h.scheduler.tick()
    await h.add("v", token={"pid": 7})
    got = await h.fetch("w")
    assert got is not None
    assert await h.ack("w", got) is True
    await wait_for(lambda: len(h.sink.messages) == 1, 10.0, what="the result published beside the ack")
    await wait_for(lambda: len(marks) >= 2, 10.0, what="its mark tried again")
    await h.queue.drain_background(5.0)
    for _ in range(4):  # past the harness's republish delay (5 s) and both sweeps of its bucket
        await h.advance(10_000, ticks=2)
    assert len(h.sink.messages) == 1, "the engine was sent the result twice"
