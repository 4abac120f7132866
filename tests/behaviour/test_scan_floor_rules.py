"""Where a walk of the ready index starts when its lane has no stored cursor, on both stores.

A queue quiet for longer than the task TTL (its cursor rows expired) or never scanned has no
cursor. Its walks (a fetch's scan, stats, a purge, ``queue-bridge stats``) started at bucket 0 and
read every index row the queue ever wrote: on Cassandra, expired ``ready_buckets`` rows are
tombstones kept for ``gc_grace_seconds``, and a lane of 8,640 buckets a day failed that read with
READ_TOO_MANY_TOMBSTONES (``unavailable``) for 10 days and more. No live task's entry lies more
than the TTL behind the present, so such a walk starts there (with a margin).

Here the old entries are tasks added more than a TTL (plus two days) ago and never scanned: on the
memory store their buckets are still listed (as Cassandra's index rows are, until compacted), and
on Cassandra their rows are still live (their TTL ran on Cassandra's clock, not on the test's), so
a walk that reads them is seen both in the calls it makes and in what it answers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest

from bridge.domain.records import QueueKey, ReadyEntry
from bridge.domain.stats import queue_stats
from bridge.domain.timeline import bucket_of_task, ready_bucket
from tests.queue_harness import OWNER, TTL_S, Harness

pytestmark = pytest.mark.anyio

OLD_TASKS = 20
DAY_MS = 86_400_000
LEFT_MS = 60_000  # the live task's life left when the queue is walked


@dataclass
class Reads:
    """The ready-index reads of the queue under test: the bucket each bucket listing starts at, and
    each bucket whose entries were read."""

    q: QueueKey
    listed_from: list[int] = field(default_factory=list)
    scanned: list[int] = field(default_factory=list)

    def watch(self, h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
        buckets_from, scan = h.store.buckets_from, h.store.scan

        async def listed(q: QueueKey, lane: int, bucket: int, limit: int) -> list[int]:
            if q == self.q:
                self.listed_from.append(bucket)
            return await buckets_from(q, lane, bucket, limit)

        async def scanned(q: QueueKey, lane: int, bucket: int, after: uuid.UUID | None, limit: int) -> list[ReadyEntry]:
            if q == self.q:
                self.scanned.append(bucket)
            return await scan(q, lane, bucket, after, limit)

        monkeypatch.setattr(h.store, "buckets_from", listed)
        monkeypatch.setattr(h.store, "scan", scanned)

    def assert_nothing_before(self, old_buckets: list[int], floor: int, what: str) -> None:
        assert self.listed_from, f"{what} listed no bucket at all"
        too_early = [b for b in self.listed_from if b < floor]
        assert not too_early, (
            f"{what} listed the lane's buckets from {too_early[:3]}, before {floor} (a TTL and a day ago): "
            "on Cassandra every expired index row after it is a tombstone read"
        )
        old = sorted(set(self.scanned) & set(old_buckets))
        assert not old, f"{what} read {len(old)} buckets of tasks expired two days ago: {old[:3]}"


async def _quiet_queue_with_history(h: Harness) -> tuple[list[int], str]:
    """Tasks added over 200 s, then nothing for two days; one task added then; the clock moved to a
    minute before that task's end of life. No walk has run: the lanes have no cursor."""
    old_buckets = []
    for i in range(OLD_TASKS):
        old_buckets.append(bucket_of_task(uuid.UUID(await h.add({"old": i}))))
        h.clock.advance(10_000)
    h.clock.advance(2 * DAY_MS)
    live = await h.add("live")
    h.clock.advance(TTL_S * 1000 - LEFT_MS)
    return old_buckets, live


def _floor(h: Harness) -> int:
    """A walk may start no earlier than this and still find every live task: a day of margin."""
    return ready_bucket(h.clock.now_ms() - TTL_S * 1000 - DAY_MS)


async def test_a_fetch_with_no_cursor_scans_from_a_ttl_ago_not_from_bucket_zero(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    old_buckets, live = await _quiet_queue_with_history(h)
    reads = Reads(QueueKey(OWNER, h.service))
    reads.watch(h, monkeypatch)
    got = await h.fetch("w")
    assert got is not None and got.task_id == live, "the task a minute from its end of life is still handed out"
    reads.assert_nothing_before(old_buckets, _floor(h), "a fetch's scan")
    # A bridge restarted (a new dispatcher, no position in memory) does the same.
    assert await h.ack("w", got)
    other, _ = h.instance(h.clock)
    reads.listed_from.clear()
    reads.scanned.clear()
    assert await h.fetch("w2", queue=other) is None
    reads.assert_nothing_before(old_buckets, _floor(h), "a restarted bridge's scan")


async def test_stats_with_no_cursor_read_from_a_ttl_ago(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    old_buckets, _ = await _quiet_queue_with_history(h)
    reads = Reads(QueueKey(OWNER, h.service))
    reads.watch(h, monkeypatch)
    [stats] = await h.queue.stats(OWNER, h.service)
    assert stats.oldest_ready_age_ms is not None
    assert stats.oldest_ready_age_ms <= TTL_S * 1000, "the oldest ready task is the live one, not an expired one"
    reads.assert_nothing_before(old_buckets, _floor(h), "stats")


async def test_the_operators_walk_with_no_cursor_reads_from_a_ttl_ago(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``queue-bridge stats`` (``queue_stats``), given the TTL as the CLI gives it."""
    h = harness
    old_buckets, _ = await _quiet_queue_with_history(h)
    reads = Reads(QueueKey(OWNER, h.service))
    reads.watch(h, monkeypatch)
    stats = await queue_stats(h.store, OWNER, h.service, h.clock.now_ms(), ttl_ms=TTL_S * 1000)
    assert (stats.ready, stats.scanned) == (1, 1), stats
    reads.assert_nothing_before(old_buckets, _floor(h), "queue-bridge stats")


async def test_a_purge_with_no_cursor_walks_from_a_ttl_ago(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    old_buckets, _ = await _quiet_queue_with_history(h)
    reads = Reads(QueueKey(OWNER, h.service))
    reads.watch(h, monkeypatch)
    assert await h.queue.purge(OWNER, h.service) == (1, False), "only the live task is purged"
    reads.assert_nothing_before(old_buckets, _floor(h), "a purge")
