"""The counter trim (bridge.domain.housekeeping): what it keeps, and that only the duty holder runs it."""

from __future__ import annotations

import asyncio

import pytest

from bridge.domain import housekeeping
from bridge.domain.clock import ManualClock
from bridge.domain.counting import DAY_MS, MINUTE_MS
from bridge.domain.housekeeping import CounterTrim, first_kept_day
from bridge.domain.records import QueueKey
from bridge.storage.memory import MemoryTaskStore
from tests.conftest import wait_for

TTL_MS = 7 * DAY_MS


def test_the_retention_is_twice_the_ttl_and_at_least_thirty_days_plus_one() -> None:
    now = 20_000 * DAY_MS + 5
    assert first_kept_day(now, TTL_MS) == 20_000 - 31
    assert first_kept_day(now, 60 * DAY_MS) == 20_000 - 121


class _Duty:
    def __init__(self) -> None:
        self.held = False


async def _filled(store: MemoryTaskStore, now: int) -> QueueKey:
    q = QueueKey("o", "s")
    first = first_kept_day(now, TTL_MS)
    for day in (first - 2, first - 1, first, now // DAY_MS):
        await store.add_counts(q, day, 1, 0)
        await store.add_delayed(q, day * DAY_MS // MINUTE_MS, 1)
    await store.register_service(q)
    return q


@pytest.mark.anyio
async def test_only_the_duty_holder_trims_and_it_keeps_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(housekeeping, "TRIM_FIRST_S", 0.02)
    now = 20_000 * DAY_MS
    store = MemoryTaskStore(lambda: now)
    q = await _filled(store, now)
    trim = CounterTrim(store, ManualClock(now), TTL_MS)
    duty, stop = _Duty(), asyncio.Event()
    running = asyncio.create_task(trim.run(stop, duty))
    await asyncio.sleep(0.1)
    assert trim.passes == 0 and len(store.count_rows) == 4, "not the duty holder: nothing trimmed"
    duty.held = True
    await wait_for(lambda: trim.passes > 0, 5, interval=0.01, what="a trim pass")
    stop.set()
    await running
    first = first_kept_day(now, TTL_MS)
    assert sorted(day for (k, day) in store.count_rows if k == q) == [first, now // DAY_MS]
    assert sorted(m for (k, m) in store.delayed_rows if k == q) == [
        first * DAY_MS // MINUTE_MS,
        now // MINUTE_MS,
    ]
