"""Review 11: the per-queue gauges when one tenant has very many services (real Cassandra).

The refresh listed the registry with a plain ``LIMIT 20000``, in the partition tokens' order,
and shared the 1,000 gauge slots among the owners of those rows: one tenant with 20,000 services
or more (a service named per workflow) hid every owner after it in token order; their gauges
vanished, and an absent series looks healthy. The walk now reads a few services of each owner
first, then more of those that have more only while slots are left. Small limits here (the
module's constants, patched) stand for the real ones.
"""

from __future__ import annotations

import uuid

import pytest
from cassandra.concurrent import execute_concurrent_with_args
from cassandra.metadata import Murmur3Token

from bridge import app as app_module

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

LISTED = 300  # rows the first pass reads at most (GAUGE_QUEUES_LISTED, 20,000 in production)
SLOTS = 100  # gauges exported at most (MAX_GAUGE_QUEUES, 1,000)
FIRST = 3  # services of each owner the first pass reads (GAUGE_FIRST_PER_OWNER)
BIG = LISTED + 50  # the large tenant's services: more than the old LIMIT


def _token(owner: str) -> int:
    return int(Murmur3Token.hash_fn(owner.encode()))


def _owners() -> tuple[str, str]:
    """Two fresh owner names, the first before the second in Cassandra's token order."""
    a, b = (f"r11-gauge-{uuid.uuid4().hex[:10]}" for _ in range(2))
    return (a, b) if _token(a) < _token(b) else (b, a)


async def test_an_owner_after_a_tenant_with_very_many_services_keeps_its_gauges(
    make_bridge, cql, servers, monkeypatch
) -> None:
    monkeypatch.setattr(app_module, "GAUGE_QUEUES_LISTED", LISTED)
    monkeypatch.setattr(app_module, "MAX_GAUGE_QUEUES", SLOTS)
    monkeypatch.setattr(app_module, "GAUGE_FIRST_PER_OWNER", FIRST, raising=False)
    b = await make_bridge()  # (the keyspace is there once a bridge runs)
    big, small = _owners()
    insert = cql.prepare(f"INSERT INTO {servers.keyspace}.services (owner, service) VALUES (?, ?) USING TTL 3600")
    rows = [(big, f"svc-{i:05d}") for i in range(BIG)] + [(small, "the-small-tenants-queue")]
    for ok, result in execute_concurrent_with_args(cql, insert, rows, concurrency=64):
        assert ok, result

    gauges = await b._queue_gauge_rows()
    owners = {row[0] for row in gauges}
    assert (small, "the-small-tenants-queue") in {(row[0], row[1]) for row in gauges}, (
        f"{small}'s queue missing from the gauges; owners exported: {len(owners)}"
    )
    # The large tenant still has its fair share: a slot in turn with every other owner (the
    # keyspace is shared with the suite's other tests, whose owners may have many queues too).
    mine = [row for row in gauges if row[0] == big]
    assert len(mine) >= SLOTS // len(owners), len(mine)
    assert len(gauges) <= SLOTS
