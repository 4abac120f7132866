"""``KeyMissingRun.after``: which claims that found a task's key missing make one run (pure logic;
the stores' behaviour is in tests/behaviour/test_key_missing_rules.py)."""

from __future__ import annotations

from dataclasses import replace

from bridge.domain.records import NO_KEY_MISSING_RUN, KeyMissingRun, Lease, LeaseState

NOW = 1_000_000


def _claimed(epoch: int, uncounted: int = 0, run: KeyMissingRun | None = None) -> Lease:
    """A lease as a claim at ``epoch`` reads it (held, not yet uncounted)."""
    lease = Lease(LeaseState.LEASED, epoch, "w", NOW, None, None, uncounted=uncounted)
    if run is None:
        return lease
    return replace(lease, key_missing=run.claims, key_missing_since_ms=run.since_ms, key_missing_mark=run.mark)


def test_the_first_claim_starts_a_run() -> None:
    assert KeyMissingRun.after(_claimed(3), NOW) == KeyMissingRun(1, NOW, 3)


def test_the_next_claim_after_a_let_go_goes_on_with_it() -> None:
    first = KeyMissingRun.after(_claimed(1), 10)
    # Let go (uncounted 1), claimed again at epoch 2.
    assert KeyMissingRun.after(_claimed(2, 1, first), NOW) == KeyMissingRun(2, 10, first.mark)


def test_a_failed_lookup_in_between_ends_it() -> None:
    # Epoch 2 could not look the key up: its uncount wrote NO_KEY_MISSING_RUN; epoch 3 finds it missing.
    assert KeyMissingRun.after(_claimed(3, 2, NO_KEY_MISSING_RUN), NOW) == KeyMissingRun(1, NOW, 1)


def test_a_delivery_in_between_starts_a_new_run() -> None:
    first = KeyMissingRun.after(_claimed(1), 10)
    # Epoch 2 handed the task out (counted); epoch 3 finds the key missing.
    assert KeyMissingRun.after(_claimed(3, 1, first), NOW) == KeyMissingRun(1, NOW, 2)


def test_a_redrive_by_a_bridge_that_resets_only_uncounted_starts_a_new_run() -> None:
    run = KeyMissingRun(7, 10, 1)  # seven claims in a row since epoch 1, never delivered
    # An older bridge's redrive: uncounted back to 0, the run's columns left as they were.
    assert KeyMissingRun.after(_claimed(9, 0, run), NOW) == KeyMissingRun(1, NOW, 9)
