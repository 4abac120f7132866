"""Absent values (no token, no traceparent, the default priority) are written unset, not null, in
the rows scans read: a null is a cell tombstone, and each entry of a tokenless queue carried four
(Cassandra warned of 1,133 tombstone cells for 283 rows read; past tombstone_failure_threshold a
read fails). Checked on Cassandra by a traced read of the rows (found by review, 2026-12-07)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bridge.domain.records import QueueKey
from tests.queue_harness import OWNER, Harness

pytestmark = pytest.mark.anyio


def _tombstones(cql: Any, query: str, params: tuple[Any, ...]) -> list[str]:
    """What the read's trace says about tombstone cells (each replica's "Read N live rows and M
    tombstone cells"), for the reads that met any."""
    trace = cql.execute(query, params, trace=True).get_query_trace(max_wait_sec=10)
    said = [e.description for e in trace.events if "tombstone cells" in e.description]
    assert said, "the trace says nothing of the rows read"
    return [d for d in said if " 0 tombstone cells" not in d]


async def test_a_tokenless_queues_entries_and_deadlines_carry_no_tombstones(harness: Harness, cql: Any) -> None:
    h = harness
    if not hasattr(h.store, "db"):
        pytest.skip("tombstones are Cassandra's")
    keyspace = h.store.db.keyspace  # type: ignore[attr-defined]
    ids = [await h.add(i) for i in range(20)]
    q = QueueKey(OWNER, h.service)
    where = "owner = %s AND service = %s"
    parts = {
        (r["lane"], r["bucket"])
        for r in cql.execute(
            f"SELECT lane, bucket FROM {keyspace}.ready WHERE {where} ALLOW FILTERING", (q.owner, q.service)
        )
    }
    assert parts, "no entry written"
    for lane, bucket in parts:
        read = f"SELECT * FROM {keyspace}.ready WHERE {where} AND lane = %s AND bucket = %s"
        met = _tombstones(cql, read, (q.owner, q.service, lane, bucket))
        assert not met, met
    held = await h.fetch("w", ttr_ms=60_000)  # its deadline is filed in the timer wheel
    assert held is not None and held.task_id in ids
    found = f"SELECT bucket, shard FROM {keyspace}.expiry_shards WHERE task_id = %s ALLOW FILTERING"
    rows = list(cql.execute(found, (uuid.UUID(held.task_id),)))
    assert rows, "no deadline filed"
    bucket, shard = rows[0]["bucket"], rows[0]["shard"]
    met = _tombstones(cql, f"SELECT * FROM {keyspace}.expiry_shards WHERE bucket = %s AND shard = %s", (bucket, shard))
    assert not met, met
