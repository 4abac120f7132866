"""Review 11: the gauges' walk of the service registry (pure logic, the memory store).

It reads a few services of each owner, then more of those that have more while gauge slots are
left; what it chooses must be what ``fair_share`` chooses from the whole registry, whatever the
owners' sizes (a registry read with a plain LIMIT lost every owner after a large tenant).
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from bridge import app as app_module
from bridge.app import Bridge
from bridge.domain.records import QueueKey
from bridge.domain.stats import fair_share
from bridge.storage.memory import MemoryTaskStore

pytestmark = pytest.mark.anyio


class CountingStore(MemoryTaskStore):
    def __init__(self) -> None:
        super().__init__(lambda: 0)
        self.rows_read = 0

    async def queue_page(self, after: QueueKey | None, limit: int) -> list[QueueKey]:
        page = await super().queue_page(after, limit)
        self.rows_read += len(page)
        return page

    async def queues_after_owner(self, owner: str, limit: int) -> list[QueueKey]:
        page = await super().queues_after_owner(owner, limit)
        self.rows_read += len(page)
        return page


async def _walk(store: CountingStore) -> tuple[list[QueueKey], bool]:
    stand_in: Any = SimpleNamespace(store=store)
    return await Bridge._gauge_queues(stand_in)


@pytest.mark.parametrize("seed", range(12))
async def test_the_walk_chooses_what_fair_share_of_the_whole_registry_does(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "MAX_GAUGE_QUEUES", 50)
    monkeypatch.setattr(app_module, "GAUGE_FIRST_PER_OWNER", 3)
    monkeypatch.setattr(app_module, "GAUGE_QUEUES_LISTED", 10_000)  # never the bound here
    rnd = random.Random(seed)
    store = CountingStore()
    for o in range(rnd.randint(1, 40)):
        for s in range(rnd.choice([1, 2, 3, 4, 10, 60, 400])):
            store.service_rows.add(QueueKey(f"owner-{o:03d}", f"svc-{s:04d}"))
    everything = sorted(store.service_rows, key=lambda q: (q.owner, q.service))
    chosen, cut = await _walk(store)
    assert chosen == fair_share(everything, 50)
    assert cut == (len(everything) > 50)
    # Each owner's services are read only as deep as the slots need (never all of a large one).
    assert store.rows_read <= 3 * len(everything), store.rows_read


async def test_a_large_tenant_first_in_order_hides_no_owner_after_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "MAX_GAUGE_QUEUES", 10)
    monkeypatch.setattr(app_module, "GAUGE_FIRST_PER_OWNER", 2)
    monkeypatch.setattr(app_module, "GAUGE_QUEUES_LISTED", 40)
    store = CountingStore()
    store.service_rows |= {QueueKey("a-large", f"svc-{s:05d}") for s in range(5_000)}
    store.service_rows |= {QueueKey("b-small", "one"), QueueKey("c-small", "two")}
    chosen, cut = await _walk(store)
    assert QueueKey("b-small", "one") in chosen and QueueKey("c-small", "two") in chosen
    assert len(chosen) == 10 and cut
    assert store.rows_read < 100, store.rows_read


async def test_every_owner_has_its_gauges_when_a_thousand_have_more_than_their_first_services() -> None:
    """1,000 owners of 21 services each, at the real bounds: the row read past an owner's first
    20 services (it only says the owner has more) was counted in the 20,000 rows' budget, and
    the same 47 owners had no gauges at every refresh (a re-review, 2026-12-06)."""
    store = CountingStore()
    for o in range(1_000):
        for s in range(21):
            store.service_rows.add(QueueKey(f"owner-{o:04d}", f"svc-{s:02d}"))
    chosen, cut = await _walk(store)
    assert cut
    assert len({q.owner for q in chosen}) == 1_000
    assert store.rows_read <= 22_000, store.rows_read
