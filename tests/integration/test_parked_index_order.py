"""The parked-task indexes on the real Cassandra, written by bridges whose clocks differ.

In ``parked`` (one row per task, which bridges before ``parks`` read) a task's row is written by a
plain insert (stamped by the writing bridge's clock) and taken back by compare-and-set deletes
(stamped by their Paxos ballot): last-write-wins by those stamps, not by the order they happened
in. Two parks of one task at one epoch (the scheduler's, refused by a late extend; the worker's
`fail` at its limit) on bridges whose clocks differ within the skew margin: the first park's
insert, stamped ahead, shadowed the second's; its refused park's delete (``IF park_id = <first>``)
then applied and took the row: the task parked, in no listing, no stats, no `redrive all`, until
its TTL (found by review, 2026-12-07). Writing the row through Paxos fixed it, but put every park
of a queue through Paxos on one partition, which a park storm contends on.

``parks`` keys a row by its park: a refused park deletes its own row by key, stamped after that
row's insert, and no other park's row is touched, whatever the clocks."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bridge.domain.records import ParkedEntry, QueueKey
from bridge.storage.repository import CassandraTaskStore
from bridge.storage.session import open_session

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

TTL_S = 7 * 86_400
# The first park's bridge, ahead: by more than the test's own round trips take (so that its row's
# stamps stay ahead of the second park's whatever the machine's load), as a bridge ahead within
# its skew margin is ahead of one that writes a few milliseconds after it.
AHEAD_MS = 5_000


CLOCKS: dict[str, Callable[[], int]] = {
    "ahead": lambda: int(time.time() * 1000) + AHEAD_MS,
    "behind": lambda: int(time.time() * 1000),
}


@asynccontextmanager
async def _two_bridges(settings: Any) -> AsyncIterator[tuple[CassandraTaskStore, CassandraTaskStore]]:
    """The stores of a bridge ahead and one behind: each session stamps its writes by its clock."""
    sessions = {name: open_session(settings, now_ms=clock) for name, clock in CLOCKS.items()}
    for db in sessions.values():
        await db.connect()
    try:
        stores = [CassandraTaskStore(sessions[name], CLOCKS[name], TTL_S) for name in ("ahead", "behind")]
        for store in stores:
            await store.prepare()
        yield stores[0], stores[1]
    finally:
        for db in sessions.values():
            await db.close()


async def test_a_refused_park_takes_back_its_own_row_not_a_later_park_of_a_bridge_behind(
    cassandra_settings: Any,
) -> None:
    async with _two_bridges(cassandra_settings) as (ahead, behind):  # the run's keyspace, its schema created
        q = QueueKey("worker-a", f"svc-{uuid.uuid4().hex[:10]}")
        task = uuid.uuid1()
        first, second = uuid.uuid1(), uuid.uuid1()
        now = int(time.time() * 1000)
        await ahead.add_parked(q, ParkedEntry(task, 3, now, "delivery_limit", True, park_id=first))
        await behind.add_parked(q, ParkedEntry(task, 3, now + 1, "failed", True, park_id=second))
        # The first park's compare-and-set was refused: it takes back its own rows, as
        # ``Lifecycle._park`` does (in ``parked``, only if the row is still its).
        await ahead.remove_parked(q, task, park_id=first)
        await ahead.remove_park(q, task, first, now)
        listed = await behind.parked(q, 10)
        # ``parked`` lost the second park's row to the first's stamps (its known limit, which a
        # bridge before ``parks`` still has); ``parks`` keeps it, so listings and stats find it.
        assert [(e.task_id, e.park_id) for e in listed if e.in_parks] == [(task, second)], listed


async def test_a_parks_row_is_deleted_by_a_bridge_whose_clock_is_behind_its_writers(cassandra_settings: Any) -> None:
    """A redrive (or a listing's clean-up) on a bridge behind the parking bridge's clock: its
    delete, stamped by its own clock, was older than the row it deleted, and the row stayed (a
    stale row every listing and stats read passed, and checked against its lease, until its TTL).
    Stamped after the row's own time, it goes."""
    async with _two_bridges(cassandra_settings) as (ahead, behind):
        q = QueueKey("worker-a", f"svc-{uuid.uuid4().hex[:10]}")
        task, park = uuid.uuid1(), uuid.uuid1()
        parked_at = CLOCKS["ahead"]()  # the park's time, by its bridge's clock
        await ahead.add_parked(q, ParkedEntry(task, 2, parked_at, "failed", False, park_id=park))
        await behind.remove_park(q, task, park, parked_at)
        assert [e for e in await behind.parked(q, 10) if e.in_parks] == []
