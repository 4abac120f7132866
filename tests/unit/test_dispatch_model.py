"""Property test of the dispatcher's scan logic against the in-memory store (bridge.storage.memory).

Pure logic only (the real queries are proven against Cassandra in tests/integration). The property:
whatever the interleaving of adds (including adds whose id is a little older than entries already
scanned, as happens when an add's write lands late), claims by other instances, and fetches here,
every entry that nobody claimed is eventually offered: the position never skips one.
"""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.crypto import Sealed
from bridge.domain.clock import ManualClock
from bridge.domain.dispatch import Dispatcher
from bridge.domain.records import LANE_FRESH, Payload, QueueKey, ReadyEntry
from bridge.domain.timeline import bucket_of_task, timeuuid_from_ms
from bridge.storage.memory import MemoryTaskStore

SETTLE_MS = 1_000


PAYLOAD = Payload(Sealed("k", b"n" * 12, b"c" * 32), None, None, None)


async def _claim(store: MemoryTaskStore, q: QueueKey, seq: uuid.UUID) -> None:
    """What another instance's successful claim leaves in the index: the entry marked claimed."""
    await store.mark_claimed(q, ReadyEntry(LANE_FRESH, bucket_of_task(seq), seq, seq, None, False, False))


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 80), st.integers(0, 900)),  # n adds, up to 0.9 s "late"
        st.tuples(st.just("other_claims"), st.integers(1, 40), st.just(0)),  # another instance claims n
        st.tuples(st.just("fetch"), st.integers(1, 40), st.just(0)),  # n fetches here
        st.tuples(st.just("tick"), st.integers(1, 15_000), st.just(0)),  # time passes
        st.tuples(st.just("restart"), st.just(0), st.just(0)),  # a fresh instance (cursor from storage)
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_no_unclaimed_entry_is_ever_skipped(script: list[tuple[str, int, int]]) -> None:
    asyncio.run(_run(script))


class Model:
    """This instance's dispatcher, other instances' claims, and the truth about who claimed what."""

    def __init__(self) -> None:
        self.clock, self.q = ManualClock(1_700_000_000_000), QueueKey("o", "s")
        self.store = MemoryTaskStore(self.clock.now_ms)
        self.d = self.restart()
        self.added: list[uuid.UUID] = []
        self.claimed: set[uuid.UUID] = set()

    def restart(self) -> Dispatcher:
        """A fresh instance: empty memory, the cursor from storage."""
        self.d = Dispatcher(self.store, self.clock.now_ms, SETTLE_MS)
        return self.d

    async def add(self, n: int, late: int) -> None:
        for _ in range(n):
            seq = timeuuid_from_ms(self.clock.ms - late)
            await self.store.store_task(self.q, seq, PAYLOAD)
            self.added.append(seq)
        self.clock.advance(1)

    async def other_claims(self, n: int) -> None:
        for seq in [s for s in self.added if s not in self.claimed][:n]:
            self.claimed.add(seq)
            await _claim(self.store, self.q, seq)

    async def fetch_one(self) -> bool:
        while True:
            entry = await self.d.next_candidate(self.q, 1, spread=False)
            if entry is None:
                return False
            self.d.taken(self.q, entry)
            if entry.seq in self.claimed:
                continue  # another instance won it: the claim LWT fails, try the next one
            self.claimed.add(entry.seq)
            await _claim(self.store, self.q, entry.seq)
            return True

    async def fetch(self, n: int) -> None:
        for _ in range(n):
            if not await self.fetch_one():
                break


async def _run(script: list[tuple[str, int, int]]) -> None:
    m = Model()
    for op, n, late in script:
        if op == "add":
            await m.add(n, late)
        elif op == "other_claims":
            await m.other_claims(n)
        elif op == "fetch":
            await m.fetch(n)
        elif op == "tick":
            m.clock.advance(n)
        else:
            m.restart()
    # Drain: once time has moved past the settle window, every unclaimed entry must come out.
    m.clock.advance(3 * SETTLE_MS + 10_000)
    await m.fetch(len(m.added) + 5)
    assert set(m.added) - m.claimed == set(), "an unclaimed entry was never offered"
