"""QueueCounts.flush: an update that was not applied is kept for the next flush; one that may
have been applied (timed out after it was sent) is never sent again, since an increment sent
twice counts twice. The real-server reproduction is tests/integration/test_counts_unknown_outcome.py."""

from __future__ import annotations

import asyncio

import pytest

from bridge.domain.counting import DAY_MS, QueueCounts
from bridge.domain.errors import MaybeApplied, Unavailable
from bridge.domain.records import QueueKey
from bridge.storage.memory import MemoryTaskStore
from tests.conftest import wait_for

pytestmark = pytest.mark.anyio

Q = QueueKey("worker-a", "svc")


class FailingOnce(MemoryTaskStore):
    def __init__(self, error: Exception) -> None:
        super().__init__(lambda: 0, 3600)
        self.error: Exception | None = error

    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, MaybeApplied):  # it reached the store, and the answer was lost
                await super().add_counts(q, day, ready, in_flight)
            raise error
        await super().add_counts(q, day, ready, in_flight)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Unavailable("cassandra unavailable: no host available"), (1, 2)),  # not applied: sent again
        (MaybeApplied("WriteTimeout"), (1, 2)),  # applied once, not sent again
    ],
)
async def test_a_failed_flush_is_retried_only_when_it_cannot_have_applied(
    error: Exception, expected: tuple[int, int]
) -> None:
    store = FailingOnce(error)
    counts = QueueCounts()
    counts.move(Q, 3 * DAY_MS, ready=1, in_flight=2)
    uncertain = await counts.flush(store)
    assert uncertain == (1 if isinstance(error, MaybeApplied) else 0)
    assert await counts.flush(store) == 0
    assert counts.pending == 0
    assert await store.counts(Q, 0) == expected


class Unreachable(MemoryTaskStore):
    def __init__(self) -> None:
        super().__init__(lambda: 0, 3600)

    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        raise Unavailable("cassandra unavailable: no host available")


async def test_flushes_failing_through_an_outage_write_one_warning_not_one_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The counts are flushed every second and kept while Cassandra is away: an outage of a minute
    wrote 60 warnings on every bridge of the fleet."""
    store, counts = Unreachable(), QueueCounts()
    caplog.set_level("WARNING", logger="bridge.counts")
    for _ in range(60):
        counts.move(Q, 3 * DAY_MS, ready=1)
        await counts.flush(store)
    assert counts.pending == 1  # kept, all along
    assert len([r for r in caplog.records if "not flushed" in r.getMessage()]) == 1


def _a_thousand_minutes_pending(troubled: QueueKey, healthy: QueueKey) -> QueueCounts:
    """Counts with a delayed delta pending for each of 1,000 minutes of ``troubled``, and one of ``healthy``."""
    counts = QueueCounts()
    for minute in range(1_000):
        counts.delay(troubled, minute * 60_000, 1)
    counts.delay(healthy, 0, 1)
    return counts


class RefusingOneQueue(MemoryTaskStore):
    """A store whose counter partition of one queue answers ``error`` (its replicas down:
    refused; up but not serving: timed out)."""

    def __init__(self, refused: QueueKey, error: Exception | None = None) -> None:
        super().__init__(lambda: 0, 3600)
        self.refused: QueueKey | None = refused
        self.error = error or Unavailable("cassandra unavailable: Unavailable (replicas down)")
        self.sent: list[QueueKey] = []

    async def add_delayed(self, q: QueueKey, minute: int, delta: int) -> None:
        self.sent.append(q)
        if q == self.refused:
            raise self.error
        await super().add_delayed(q, minute, delta)


async def test_a_queue_whose_counter_partition_is_refused_is_tried_once_a_flush_and_its_deltas_kept() -> None:
    """Each pending minute of a queue whose counter replicas are down was sent, one refused
    statement after another, at every flush of every bridge (a day of delayed minutes: a
    thousand a second each) while healthy queues' flushes waited (a re-review, 2026-12-07)."""
    down, healthy = QueueKey("worker-a", "down"), QueueKey("worker-a", "healthy")
    store = RefusingOneQueue(down)
    counts = _a_thousand_minutes_pending(down, healthy)
    assert await counts.flush(store) == 0
    assert store.sent.count(down) == 1 and store.sent.count(healthy) == 1
    assert counts.pending == 1_000, "the refused queue's deltas kept"
    store.refused = None  # its replicas back
    store.sent.clear()
    assert await counts.flush(store) == 0
    assert store.sent.count(down) == 1_000 and counts.pending == 0


async def test_a_queue_whose_counter_update_timed_out_sends_no_more_of_its_keys_that_flush() -> None:
    """One timed-out update (dropped: it may have applied) and the flush went on with the same
    partition's next key, each waiting its timeout: a thousand pending minutes took 83 minutes
    and all were dropped, while no other queue's counts were flushed (a re-review, 2026-12-07)."""
    slow, healthy = QueueKey("worker-a", "slow"), QueueKey("worker-a", "healthy")
    store = RefusingOneQueue(slow, MaybeApplied("WriteTimeout (its replica up but not serving)"))
    counts = _a_thousand_minutes_pending(slow, healthy)
    assert await counts.flush(store) == 1
    assert store.sent.count(slow) == 1 and store.sent.count(healthy) == 1
    assert counts.pending == 999, "the unsent ones kept, the timed-out one dropped"


class Stalling(MemoryTaskStore):
    """A store whose counter partition of one queue never answers (its coordinator hung)."""

    def __init__(self, stalled: QueueKey) -> None:
        super().__init__(lambda: 0, 3600)
        self.stalled = stalled
        self.written: list[QueueKey] = []

    async def add_counts(self, q: QueueKey, day: int, ready: int, in_flight: int) -> None:
        if q == self.stalled:
            await asyncio.Event().wait()
        self.written.append(q)


async def test_a_flush_cut_short_keeps_the_deltas_it_had_not_sent_yet() -> None:
    """A stop bounds its last flushes, and cancels the flusher: a flush cancelled while an update
    waited on a stalled Cassandra lost every delta it had taken out and not written yet, every
    other queue's too, with no log and no metric (found by review, 2026-12-07). The other queues'
    partitions are written meanwhile (one stalled statement held them all: the re-review); of the
    stalled one, the update in flight is dropped (it may have applied), the rest kept."""
    stalled = QueueKey("worker-a", "stalled")
    healthy = [QueueKey("worker-a", f"svc-{n}") for n in range(4)]
    store = Stalling(stalled)
    counts = QueueCounts()
    counts.move(stalled, 0, ready=1)
    counts.move(stalled, DAY_MS, ready=1)  # a second key of the stalled partition: not sent yet
    for q in healthy:
        counts.move(q, 0, ready=1)
    flush = asyncio.create_task(counts.flush(store))
    await wait_for(lambda: len(store.written) == len(healthy), 5, what="the healthy queues' counts written")
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    assert sorted(store.written, key=str) == sorted(healthy, key=str), "the healthy queues' counts not written"
    assert counts.pending == 1, "the stalled queue's unsent update kept"
    assert counts.dropped_by_cancel == 1, "the update in flight counted uncertain"
