"""Property test of the dispatcher's scan logic against an in-memory model of the `ready` index.

Pure logic only (the real queries are proven against Cassandra in tests/integration). The property:
whatever the interleaving of adds (including adds whose id is a little older than entries already
scanned, as happens when an add's write lands late), claims by other instances, and fetches here,
every entry that nobody claimed is eventually offered: the position never skips one.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.domain.dispatch import Dispatcher
from bridge.storage.repository import QueueKey, ReadyEntry
from bridge.storage.schema import READY_BUCKET_MS
from bridge.storage.timeuuid import ms_of, timeuuid_from_ms

SETTLE_MS = 1_000


@dataclass
class FakeRepo:
    """Just the reads and writes the dispatcher uses, with Cassandra's ordering semantics."""

    rows: dict[tuple[int, int], dict[uuid.UUID, bool]] = field(default_factory=dict)  # (lane, bucket) -> seq -> claimed
    cursors: dict[int, list[tuple[int, uuid.UUID]]] = field(default_factory=dict)

    def add(self, lane: int, seq: uuid.UUID) -> None:
        self.rows.setdefault((lane, ms_of(seq) // READY_BUCKET_MS), {})[seq] = False

    def claim(self, lane: int, seq: uuid.UUID) -> None:
        self.rows[(lane, ms_of(seq) // READY_BUCKET_MS)][seq] = True

    async def cursor(self, q: QueueKey, lane: int) -> tuple[int, uuid.UUID] | None:
        rows = self.cursors.get(lane)
        return max(rows, key=lambda r: (r[0], ms_of(r[1]), r[1].bytes)) if rows else None

    async def advance_cursor(self, q: QueueKey, lane: int, bucket: int, seq: uuid.UUID, ttl: int) -> None:
        self.cursors.setdefault(lane, []).append((bucket, seq))

    async def buckets_from(self, q: QueueKey, lane: int, bucket: int, limit: int) -> list[int]:
        return sorted(b for (ln, b) in self.rows if ln == lane and b >= bucket)[:limit]

    async def scan(self, q: QueueKey, lane: int, bucket: int, after: uuid.UUID | None, limit: int) -> list[ReadyEntry]:
        key = lambda s: (ms_of(s), s.bytes)  # noqa: E731  (timeuuid order: time, then bytes)
        seqs = sorted(self.rows.get((lane, bucket), {}), key=key)
        if after is not None:
            seqs = [s for s in seqs if key(s) > key(after)]
        return [ReadyEntry(lane, bucket, s, s, None, False, self.rows[(lane, bucket)][s]) for s in seqs[:limit]]


class Clock:
    def __init__(self) -> None:
        self.ms = 1_700_000_000_000

    def now_ms(self) -> int:
        return self.ms


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


async def _run(script: list[tuple[str, int, int]]) -> None:
    repo, clock, q = FakeRepo(), Clock(), QueueKey("o", "s")

    def make() -> Dispatcher:
        return Dispatcher(repo, clock.now_ms, SETTLE_MS, 3600)  # type: ignore[arg-type]

    d = make()
    added: list[uuid.UUID] = []
    claimed: set[uuid.UUID] = set()

    async def fetch_one() -> bool:
        while True:
            entry = await d.next_candidate(q, 1, spread=False)
            if entry is None:
                return False
            d.taken(q, entry)
            if entry.seq in claimed:
                continue  # another instance won it: the claim LWT fails, try the next one
            claimed.add(entry.seq)
            repo.claim(1, entry.seq)
            return True

    for op, n, late in script:
        if op == "add":
            for _ in range(n):
                seq = timeuuid_from_ms(clock.ms - late)
                repo.add(1, seq)
                added.append(seq)
            clock.ms += 1
        elif op == "other_claims":
            for seq in [s for s in added if s not in claimed][:n]:
                claimed.add(seq)
                repo.claim(1, seq)
        elif op == "fetch":
            for _ in range(n):
                if not await fetch_one():
                    break
        elif op == "tick":
            clock.ms += n
        else:
            d = make()
    # Drain: once time has moved past the settle window, every unclaimed entry must come out.
    clock.ms += 3 * SETTLE_MS + 10_000
    for _ in range(len(added) + 5):
        if not await fetch_one():
            break
    assert set(added) - claimed == set(), "an unclaimed entry was never offered"
