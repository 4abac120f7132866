"""The counter trim's walk of the registered queues, on both stores: a page at a time, to the end."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bridge.domain import housekeeping
from bridge.domain.housekeeping import CounterTrim
from bridge.domain.records import QueueKey
from bridge.storage.errors import StorageUnavailable
from tests.queue_harness import TTL_S, Harness

pytestmark = pytest.mark.anyio


async def test_the_counter_trim_walks_every_registered_queue_a_page_at_a_time(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trim read every registered queue at once (a tenant naming a new service per add
    registers a million in days: 370 MB in the duty holder's memory every 6 h, past a sidecar's
    limit; found by review, 2026-12-06). It reads a page at a time and walks them all, owner
    after owner and within one owner's services."""
    h = harness
    tag = uuid.uuid4().hex[:8]
    mine = {QueueKey(f"trim-{tag}-{o}", f"svc{s}") for o in range(3) for s in range(4)}
    for q in mine:
        await h.store.register_service(q)
    monkeypatch.setattr(housekeeping, "TRIM_PAGE", 3)
    pages: list[int] = []
    real_page = h.store.queue_page

    async def queue_page(after: QueueKey | None, limit: int) -> list[QueueKey]:
        page = await real_page(after, limit)
        pages.append(len(page))
        return page

    trimmed: list[QueueKey] = []

    async def trim_counts(q: QueueKey, before_day: int) -> Any:
        trimmed.append(q)

    monkeypatch.setattr(h.store, "queue_page", queue_page)
    monkeypatch.setattr(h.store, "trim_counts", trim_counts)
    walked = await CounterTrim(h.store, h.clock, TTL_S * 1000).trim_once()
    assert mine <= set(trimmed), sorted(mine - set(trimmed))
    assert len(trimmed) == len(set(trimmed)) == walked, "each queue once"
    assert max(pages) <= 3 and len(pages) >= len(mine) // 3


async def test_a_queue_whose_trim_fails_does_not_end_the_pass_for_the_queues_after_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One failed delete ended the whole pass, and the next began 6 h later from the first queue:
    with 200,000 queues (400,000 deletes a pass) a pass seldom got through, and the queues past
    where it failed were never trimmed (their counter partitions grew for good). Each queue's
    failure is its own now (found by review, 2026-12-07)."""
    h = harness
    tag = uuid.uuid4().hex[:8]
    mine = {QueueKey(f"trim-{tag}", f"svc{s}") for s in range(6)}
    for q in mine:
        await h.store.register_service(q)
    failing: list[QueueKey] = []
    trimmed: list[QueueKey] = []

    async def trim_counts(q: QueueKey, before_day: int) -> Any:
        if not failing and q in mine:  # the first of these the walk reaches
            failing.append(q)
            raise StorageUnavailable("a delete timed out (injected)")
        trimmed.append(q)

    monkeypatch.setattr(h.store, "trim_counts", trim_counts)
    trim = CounterTrim(h.store, h.clock, TTL_S * 1000)
    await trim.trim_once()
    assert mine - set(failing) <= set(trimmed), "the queues after the failing one trimmed too"
    assert trim.failed == 1


async def test_a_trim_pass_stops_when_the_duty_leaves(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The duty moved mid-pass: the bridge it left went on deleting beside the new holder's pass."""
    h = harness
    tag = uuid.uuid4().hex[:8]
    for s in range(6):
        await h.store.register_service(QueueKey(f"trim-{tag}", f"svc{s}"))
    held = [True]
    trimmed: list[QueueKey] = []

    async def trim_counts(q: QueueKey, before_day: int) -> Any:
        trimmed.append(q)
        held[0] = False  # the duty leaves after the first delete

    monkeypatch.setattr(h.store, "trim_counts", trim_counts)
    await CounterTrim(h.store, h.clock, TTL_S * 1000).trim_once(held=lambda: held[0])
    assert len(trimmed) == 1


async def test_a_pass_that_stops_at_its_limit_is_gone_on_with_by_the_next(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass walks MAX_QUEUES queues at most, and each began at the first: with more registered
    queues (a tenant naming a service per job), those after them were never trimmed again (their
    counter partitions grew for good; found by review, 2026-12-07). The next pass goes on where
    the last stopped, and starts again at the first once one reached the end."""
    h = harness
    tag = uuid.uuid4().hex[:8]
    mine = [QueueKey(f"trim-{tag}", f"svc{s}") for s in range(5)]
    for q in mine:
        await h.store.register_service(q)
    real_page = h.store.queue_page

    async def only_mine(after: QueueKey | None, limit: int) -> list[QueueKey]:
        # The keyspace holds every other test's queues too: this walk sees these five alone.
        if after is None:
            after = QueueKey(f"trim-{tag}", "")
        page = [q for q in await real_page(after, limit) if q in mine]
        return page

    trimmed: list[list[QueueKey]] = []

    async def trim_counts(q: QueueKey, before_day: int) -> Any:
        trimmed[-1].append(q)

    monkeypatch.setattr(h.store, "queue_page", only_mine)
    monkeypatch.setattr(h.store, "trim_counts", trim_counts)
    monkeypatch.setattr(housekeeping, "MAX_QUEUES", 3)
    monkeypatch.setattr(housekeeping, "TRIM_PAGE", 2)
    trim = CounterTrim(h.store, h.clock, TTL_S * 1000)
    for _ in range(3):
        trimmed.append([])
        await trim.trim_once()
    first, second, third = trimmed
    assert first == sorted(mine, key=lambda q: q.service)[:3]
    assert set(first) | set(second) == set(mine), f"queues never trimmed: {set(mine) - set(first) - set(second)}"
    assert second == sorted(mine, key=lambda q: q.service)[3:]
    assert third == first, "after the end, the walk starts again at the first queue"


async def test_a_bridge_adding_to_more_queues_than_it_remembers_forgets_the_least_recent_only(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bridge registers each queue it adds to once a day. Past its limit of remembered queues it
    forgot them all, and a bridge taking adds to more queues than that (every bridge of a fleet
    takes every queue's adds) registered nearly every add again: a write and a background task each
    (found by review, 2026-12-07). Only the least recently added to are forgotten now."""
    from bridge.domain.models import AddCommand, parse
    from tests.queue_harness import OWNER

    h = harness
    monkeypatch.setattr(h.queue.dispatcher, "max_lanes", 3)
    registered: list[QueueKey] = []
    real = h.store.register_service

    async def register_service(q: QueueKey) -> None:
        registered.append(q)
        await real(q)

    monkeypatch.setattr(h.store, "register_service", register_service)
    tag = uuid.uuid4().hex[:6]

    async def add(service: str) -> None:
        command = parse(AddCommand, {"serviceId": f"{tag}-{service}", "value": 1})
        await h.queue.add(OWNER, command, message_id=None, traceparent=None)
        await h.queue.drain_background(5.0)

    for name in ("a", "b", "c", "a", "d"):  # "d" is one more than remembered: "b" is the oldest
        await add(name)
    assert [q.service for q in registered] == [f"{tag}-{n}" for n in ("a", "b", "c", "d")]
    for name in ("a", "c", "d"):
        await add(name)
    assert len(registered) == 4, f"registered again: {[q.service for q in registered[4:]]}"
    await add("b")
    assert registered[-1].service == f"{tag}-b"


async def test_a_pass_whose_page_read_fails_keeps_its_progress(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The position was saved only by a pass that ended: one whose page read timed out (one
    among a thousand) lost its progress, and the next began where the last had (the re-review,
    2026-12-07)."""
    h = harness
    tag = uuid.uuid4().hex[:8]
    mine = sorted((QueueKey(f"trim-{tag}", f"svc{s}") for s in range(5)), key=lambda q: q.service)
    for q in mine:
        await h.store.register_service(q)
    real_page = h.store.queue_page
    reads = 0

    async def only_mine(after: QueueKey | None, limit: int) -> list[QueueKey]:
        nonlocal reads
        reads += 1
        if reads == 2:
            raise StorageUnavailable("a page read timed out (injected)")
        return [q for q in await real_page(after or QueueKey(f"trim-{tag}", ""), limit) if q in mine]

    trimmed: list[QueueKey] = []

    async def trim_counts(q: QueueKey, before_day: int) -> Any:
        trimmed.append(q)

    monkeypatch.setattr(h.store, "queue_page", only_mine)
    monkeypatch.setattr(h.store, "trim_counts", trim_counts)
    monkeypatch.setattr(housekeeping, "TRIM_PAGE", 2)
    trim = CounterTrim(h.store, h.clock, TTL_S * 1000)
    with pytest.raises(StorageUnavailable):
        await trim.trim_once()
    assert trimmed == mine[:2]
    await trim.trim_once()
    assert trimmed == mine, "the next pass goes on after the queues the failed one trimmed"
