"""A lane's scan position (``cursors``) stays a small partition however many bridges move it.

Every advance inserts a row (the greatest row is the position: no read-modify-write, no LWT, and
no writer can move it back), and each bridge of a fleet writes its own. Kept for the tasks' whole
TTL, a busy lane's partition grew with the fleet: 100 bridges sweeping it every 30 s wrote some 2
million rows a week (about 80 MB, past Cassandra's large-partition warning), carried by every
compaction and repair. The rows behind a position are never read again (every entry before it is
taken and settled), so each bridge now drops them (a range delete) now and then. Found by review,
documented as a limit until 2026-12-07."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bridge.domain.records import QueueKey
from bridge.storage.repository import CURSOR_TRIM_EVERY_MS, CassandraTaskStore
from tests.queue_harness import TTL_S, Harness

pytestmark = pytest.mark.anyio

SWEEP_MS = 30_000  # one advance a bridge every reconciliation interval


def _seq(at_ms: int) -> uuid.UUID:
    """A time UUID at ``at_ms`` (the positions' second half; only its order matters here)."""
    ticks = at_ms * 10_000 + 0x01B21DD213814000
    low, mid, high = ticks & 0xFFFFFFFF, (ticks >> 32) & 0xFFFF, (ticks >> 48) & 0x0FFF
    return uuid.UUID(fields=(low, mid, high | 0x1000, 0x80, 0, uuid.uuid4().node))


async def test_a_fleets_scan_positions_stay_a_few_rows_and_never_move_back(harness: Harness, cql: Any) -> None:
    h = harness
    if not hasattr(h.store, "db"):
        pytest.skip("the memory store keeps one position a lane")
    db = h.store.db  # type: ignore[attr-defined]
    fleet = [h.store] + [CassandraTaskStore(db, h.clock.now_ms, TTL_S) for _ in range(3)]
    q = QueueKey("owner-cursors", f"svc-{uuid.uuid4().hex[:8]}")
    lane = 1
    steps = 3 * CURSOR_TRIM_EVERY_MS // SWEEP_MS  # three trim periods
    newest: tuple[int, uuid.UUID] | None = None
    for step in range(steps):
        h.clock.advance(SWEEP_MS)
        for i, store in enumerate(fleet):
            # Each bridge a little behind the one before it, as scans that ran at different moments.
            bucket = 1_000 + step * 3 - i
            seq = _seq(h.clock.now_ms() - i)
            await store.advance_cursor(q, lane, bucket, seq)
            if newest is None or bucket > newest[0]:
                newest = (bucket, seq)
    assert newest is not None
    rows = cql.execute(
        f"SELECT COUNT(*) AS n FROM {db.keyspace}.cursors WHERE owner = %s AND service = %s AND lane = %s",
        (q.owner, q.service, lane),
    ).one()["n"]
    written = steps * len(fleet)
    # Kept: what the fleet wrote since each bridge's last trim (a period's advances), not the history.
    per_period = CURSOR_TRIM_EVERY_MS // SWEEP_MS + 1
    assert rows <= len(fleet) * per_period, f"{rows} rows kept of {written} written"
    assert await h.store.cursor(q, lane) == newest
    # A bridge that lags far behind writes an old position after the trims: the position stays.
    await fleet[-1].advance_cursor(q, lane, 1_000, _seq(0))
    assert await h.store.cursor(q, lane) == newest


async def test_a_lanes_position_outlives_a_short_task_ttl(harness: Harness) -> None:
    """A position row lived the writing bridge's task TTL. While the TTL is raised pod by pod
    (1 day to 7), a 1-day bridge's head row, with the rows behind it trimmed, expired after a quiet
    day: the lane had no position, a scan started from a TTL (the short one) ago and moved past
    7-day tasks' entries it never read (their hints lost). The row now lives at least a month,
    whatever the TTL (the trims keep the partition small). Found by review, 2026-12-07."""
    import asyncio
    import time

    h = harness
    if not hasattr(h.store, "db"):
        pytest.skip("row lifetimes are Cassandra's")
    short = CassandraTaskStore(h.store.db, h.clock.now_ms, 1)  # type: ignore[attr-defined]
    q = QueueKey("owner-cursors", f"svc-{uuid.uuid4().hex[:8]}")
    position = (2_000, _seq(h.clock.now_ms()))
    await short.advance_cursor(q, 0, *position)
    ends = time.monotonic() + 2.5  # more than twice the short TTL
    while time.monotonic() < ends:
        assert await h.store.cursor(q, 0) == position, "the position expired with the short task TTL"
        await asyncio.sleep(0.25)
