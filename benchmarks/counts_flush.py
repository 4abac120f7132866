"""B-counts-flush: the queue-count flusher, its partitions one after another (before 2026-12-07)
or side by side (``FLUSH_PARTITIONS_AT_ONCE``), both measured in the same run.

Each bridge flushes the count deltas of every queue it touched about once a second, one counter
statement per partition (a queue's counts, its delayed counts). Written one after another, a flush
of N queues took N round trips, and one statement stalled on a hung coordinator held every other
queue's counts behind it (a stop's bounded flush then wrote none). This runs ``QueueCounts.flush``
against a store that answers each statement after a simulated round trip (no servers: the
latency is a parameter, not Cassandra's) and reports (1) the flush's wall time for N queues and
(2) how many healthy queues a 1 s bounded flush wrote while one partition stalled.

    python -m benchmarks.counts_flush
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from bridge.domain import counting
from bridge.domain.counting import QueueCounts
from bridge.domain.records import QueueKey
from bridge.storage.memory import MemoryTaskStore

QUEUES = 200
RTT_S = 0.001  # a round trip to a Cassandra node on the same network
STALL_S = 5.0  # a statement on a hung coordinator (the driver's timeout is longer)
BOUND_S = 1.0  # a stop's bounded flush


class SlowStore(MemoryTaskStore):
    def __init__(self, stalled: QueueKey | None = None) -> None:
        super().__init__(lambda: 0, 3600)
        self.stalled = stalled
        self.written = 0

    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        await asyncio.sleep(STALL_S if q == self.stalled else RTT_S)
        self.written += 1


def _pending(n: int) -> tuple[QueueCounts, list[QueueKey]]:
    counts, queues = QueueCounts(), [QueueKey("owner", f"svc-{i}") for i in range(n)]
    for q in queues:
        counts.move(q, 0, ready=1)
    return counts, queues


async def _wall(at_once: int) -> float:
    counting.FLUSH_PARTITIONS_AT_ONCE = at_once
    counts, _ = _pending(QUEUES)
    t0 = time.perf_counter()
    await counts.flush(SlowStore())
    return time.perf_counter() - t0


async def _written_within_bound(at_once: int) -> int:
    counting.FLUSH_PARTITIONS_AT_ONCE = at_once
    counts, queues = _pending(QUEUES)
    store = SlowStore(stalled=queues[0])  # the first partition's statement hangs
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(counts.flush(store), BOUND_S)
    return store.written


async def main() -> None:
    after = counting.FLUSH_PARTITIONS_AT_ONCE
    rows = []
    for _ in range(3):  # best of three
        rows.append((await _wall(1), await _wall(after)))
    before_s, after_s = min(r[0] for r in rows), min(r[1] for r in rows)
    print(f"flush of {QUEUES} queues at {RTT_S * 1000:.0f} ms a statement (best of 3):")
    print(f"  one after another: {before_s * 1000:7.1f} ms")
    print(f"  {after} side by side:   {after_s * 1000:7.1f} ms   ratio after/before {after_s / before_s:.3f}")
    stalled_before, stalled_after = await _written_within_bound(1), await _written_within_bound(after)
    print(f"one partition stalled, a {BOUND_S:.0f} s bounded flush wrote, of {QUEUES - 1} healthy queues:")
    print(f"  one after another: {stalled_before}")
    print(f"  {after} side by side:   {stalled_after}")
    counting.FLUSH_PARTITIONS_AT_ONCE = after


if __name__ == "__main__":
    asyncio.run(main())
