"""Reconciliation's alarms: one queue's lost hints make that queue scan, not every queue."""

from __future__ import annotations

from bridge.domain.reconcile import Reconciliation
from bridge.domain.records import QueueKey

BROKEN, OTHER = QueueKey("acme", "broken"), QueueKey("acme", "other")


def quiet_after_a_scan_found_nothing(r: Reconciliation, now: int) -> None:
    for q in (BROKEN, OTHER):
        r.found_nothing(q, now)
        assert not r.due(q, now + 1)


def test_a_queue_whose_hint_queue_is_unusable_scans_alone() -> None:
    """Its waiting fetches alarm once a second for as long as its hint queue's node is down: with
    the bridge-wide alarm every fetch of every queue of the bridge scanned (and claimed brand-new
    tasks whose hints other bridges were handing to their waiting fetches)."""
    r = Reconciliation(grace_ms=3_000, interval_ms=30_000)
    quiet_after_a_scan_found_nothing(r, 100_000)
    r.alarm_queue(BROKEN, 101_000)
    assert r.due(BROKEN, 101_001)
    assert not r.due(OTHER, 101_001), "the other queue keeps its quiet interval"
    # What the broken queue placed before the alarm is taken without the grace; the other's is not.
    assert r.cutoff_ms(101_500, BROKEN) == 101_000
    assert r.cutoff_ms(101_500, OTHER) == 101_500 - 3_000


def test_a_bridge_wide_alarm_still_wakes_every_queue() -> None:
    """The broker connection restored, a hint publish failed: any queue's hints may be lost."""
    r = Reconciliation(grace_ms=3_000, interval_ms=30_000)
    quiet_after_a_scan_found_nothing(r, 100_000)
    r.alarm(101_000)
    assert r.due(BROKEN, 101_001) and r.due(OTHER, 101_001)
    assert r.cutoff_ms(101_500, OTHER) == 101_000


def test_queue_alarms_are_bounded() -> None:
    r = Reconciliation(grace_ms=3_000, interval_ms=30_000, max_queues=2)
    for i in range(5):
        r.alarm_queue(QueueKey("acme", f"s{i}"), 1_000 + i)
    assert r.cutoff_ms(3_500, QueueKey("acme", "s0")) == 500, "the oldest forgotten"
    assert r.cutoff_ms(3_500, QueueKey("acme", "s4")) == 1_004, "the newest kept"


def test_a_queue_forgotten_between_its_fetches_is_still_swept() -> None:
    """A queue not known here waited an interval before its first sweep; forgotten between its
    fetches on this bridge (more queues in use than the bound, a queue fetched seldom here), every
    fetch found it unknown, and it was never swept: a task whose hint was lost waited behind a hint
    queue that never ran dry (found by review, 2026-12-06)."""
    r = Reconciliation(grace_ms=3_000, interval_ms=30_000, max_queues=3)
    seldom = QueueKey("acme", "seldom")
    assert not r.sweep_due(seldom, 0), "the bridge's first interval: no sweep of every queue at its start"
    for now in range(40_000, 2_000_000, 40_000):
        for i in range(5):  # other queues in between: it is forgotten each time
            r.sweep_due(QueueKey("acme", f"busy{i}"), now)
        if r.sweep_due(seldom, now + 1):
            break
    else:
        raise AssertionError("a queue forgotten between its fetches was never swept")
    assert now == 40_000


def test_a_known_queue_is_swept_once_an_interval() -> None:
    r = Reconciliation(grace_ms=3_000, interval_ms=30_000)
    assert not r.sweep_due(BROKEN, 0)
    assert not r.sweep_due(BROKEN, 29_999)
    assert r.sweep_due(BROKEN, 30_000)
    r.swept(BROKEN, 30_000, found=False)
    assert not r.sweep_due(BROKEN, 30_001)
