"""The stats walk's count of one task by its lease (``bridge.domain.stats._Counts``): pure logic."""

from __future__ import annotations

import uuid

from bridge.domain.records import Lease, LeaseState
from bridge.domain.stats import _Counts
from bridge.domain.timeline import new_task_id

NOW = 1_800_000_000_000


def _lease(epoch: int, base_epoch: int, until: int) -> Lease:
    return Lease(LeaseState.LEASED, epoch, "w", until, uuid.uuid4(), None, base_epoch=base_epoch)


def test_a_lease_that_ran_out_is_ready_and_counted_expired_for_the_cli() -> None:
    """A dead worker's lease: ready in the walk, in flight in the queue's counters until claimed
    again; the CLI takes it from ready once (``expired_leases``) when it prints the counters'."""
    counts = _Counts()
    counts.add(new_task_id(NOW - 60_000), _lease(epoch=1, base_epoch=0, until=NOW - 1_000), NOW)
    assert (counts.ready, counts.in_flight, counts.expired_leases) == (1, 0, 1)


def test_a_redriven_lease_nobody_claimed_since_is_ready_and_not_counted_expired() -> None:
    """A redrive leaves the lease leased to nobody at its epoch (its base), already past its
    deadline; the counters hold it ready, not in flight: taken from ready by the CLI as an expired
    lease, it vanished from both counts (found by the session's re-review, 2026-12-06)."""
    counts = _Counts()
    counts.add(new_task_id(NOW - 60_000), _lease(epoch=2, base_epoch=2, until=NOW - 1_000), NOW)
    assert (counts.ready, counts.in_flight, counts.expired_leases) == (1, 0, 0)
