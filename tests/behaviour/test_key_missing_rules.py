"""A task whose key is gone for good (rotated out and removed while tasks it sealed were queued) is
parked once claims of it in a row have found the key missing for BRIDGE_KEY_MISSING_PARK_AFTER_SECONDS,
instead of being offered again, ever later, until its TTL and then gone without a word (the known
limit of 2026-12-07). Claims whose key lookup failed (the key server away) neither count nor break
the run; a claim that hands the task out (a bridge that has the key) and a redrive start it again;
0 parks nothing. Both stores, clock time only."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import pytest

from bridge.crypto.errors import KeyUnavailable, UnknownKey
from bridge.domain.errors import KeyMissing, KeysUnavailable, Unavailable
from bridge.domain.models import FailRequest, parse
from bridge.domain.records import Lease, LeaseState, QueueKey
from bridge.domain.timeline import timeuuid_from_ms
from tests.conftest import wait_for
from tests.queue_harness import OWNER, Harness

pytestmark = pytest.mark.anyio

TTR_MS = 1_000
PARK_AFTER_MS = 10_000
# Clock time one claim may need: the let-go's wait (its lease, doubling per key-missing claim
# before it, up to 64 s here) plus the skew margin and the scheduler's passes.
CLAIM_WITHIN_MS = 80_000


async def _key_missing(owner: str, key_id: str) -> Any:
    raise UnknownKey(f"owner {owner!r} has no key {key_id!r}")


async def _key_server_away(owner: str, key_id: str) -> Any:
    raise KeyUnavailable("the key server did not answer")


def _park_after(h: Harness, ms: int) -> None:
    h.queue.ctx.limits = replace(h.queue.ctx.limits, key_missing_park_after_ms=ms)


async def _lease(h: Harness, task_id: str) -> Lease:
    lease = await h.store.lease(QueueKey(OWNER, h.service), uuid.UUID(task_id), serial=True)
    assert lease is not None
    return lease


async def _claim_unopened(h: Harness, expect: type[Exception] = KeyMissing) -> int:
    """Advance the clock until a fetch claims the task and cannot open it (``expect`` raised);
    the clock's time then."""
    waited = 0
    while True:
        try:
            got = await h.fetch("w", ttr_ms=TTR_MS)
        except expect:
            return h.clock.now_ms()
        assert got is None, f"handed out: {got}"
        assert waited < CLAIM_WITHIN_MS, f"not claimed again within {CLAIM_WITHIN_MS} ms of clock time"
        await h.advance(1_000 if waited > 4_000 else 250)
        waited += 1_000 if waited > 4_000 else 250


async def _offered_again_within(h: Harness, ms: int) -> bool:
    """Whether a fetch claims the task (and fails to open it) within ``ms`` of clock time."""
    for _ in range(ms // 250):
        try:
            await h.fetch("w", ttr_ms=TTR_MS)
        except KeyMissing:
            return True
        await h.advance(250)
    return False


async def _claims_until_parked(h: Harness, task_id: str, after_ms: int = PARK_AFTER_MS) -> tuple[int, int]:
    """Claims that find the key missing until one parks the task: (claims in the run, clock time
    from the run's first to the parking one). Each claim before it leaves the task leased (let go)."""
    await _claim_unopened(h)
    lease = await _lease(h, task_id)
    claims, first = lease.key_missing, lease.key_missing_since_ms
    while lease.state is LeaseState.LEASED:
        assert claims < 30, "never parked"
        at = await _claim_unopened(h)
        claims += 1
        lease = await _lease(h, task_id)
        if lease.state is LeaseState.LEASED:
            assert lease.key_missing == claims and lease.key_missing_since_ms == first, lease
            assert claims < 3 or at - first < after_ms, f"not parked at claim {claims}, {at - first} ms in"
    return claims, at - first


async def test_a_task_whose_key_stays_missing_is_parked_after_the_grace_not_before(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    _park_after(h, PARK_AFTER_MS)
    task_id = await h.add({"sealed with": "a key about to be removed"}, token={"workflow": 1})
    opens = h.keys.key_by_id
    monkeypatch.setattr(h.keys, "key_by_id", _key_missing)
    await h.scheduler.tick()
    claims, elapsed = await _claims_until_parked(h, task_id)
    assert claims >= 3 and elapsed >= PARK_AFTER_MS, (claims, elapsed)
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.PARKED and lease.park_reason == "key_missing", lease
    assert h.metrics.total("tasks_parked", reason="key_missing") == 1
    (parked,) = await h.queue.lifecycle.parked(OWNER, h.service, 10)
    assert str(parked.task_id) == task_id and parked.reason == "key_missing" and parked.has_token, parked
    assert not await _offered_again_within(h, 10_000), "a parked task was claimed again"
    await h.queue.drain_background(5.0)
    # Its token is sealed with the missing key: nothing can go to the engine (nothing owed either).
    assert h.sink.messages == []
    # The key restored, a redrive puts it back and it completes.
    monkeypatch.setattr(h.keys, "key_by_id", opens)
    assert await h.queue.lifecycle.redrive(OWNER, h.service, [uuid.UUID(task_id)]) == 1
    got = await h.fetch_until("w", ttr_ms=TTR_MS)
    assert got.task_id == task_id
    assert await h.ack("w", got, result="done") is True
    await h.queue.drain_background(5.0)
    assert [m.task_id for m in h.sink.messages] == [task_id]


async def test_a_failed_lookup_a_delivery_or_a_redrive_starts_the_run_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    grace = 60_000  # longer than the claims below take before the last run
    _park_after(h, grace)
    task_id = await h.add("sealed")
    opens = h.keys.key_by_id
    await h.scheduler.tick()
    # The key missing at two claims, then the key server away at one: the run ends there (a key
    # server crash-looping answers "unknown key" now and then for keys it has).
    monkeypatch.setattr(h.keys, "key_by_id", _key_missing)
    first = await _claim_unopened(h)
    await _claim_unopened(h)
    lease = await _lease(h, task_id)
    assert lease.key_missing == 2 and lease.key_missing_since_ms == first, lease
    monkeypatch.setattr(h.keys, "key_by_id", _key_server_away)
    await _claim_unopened(h, KeysUnavailable)
    lease = await _lease(h, task_id)
    assert lease.key_missing == 0 and lease.uncounted == 3, lease
    monkeypatch.setattr(h.keys, "key_by_id", _key_missing)
    restarted = await _claim_unopened(h)
    lease = await _lease(h, task_id)
    assert lease.key_missing == 1 and lease.key_missing_since_ms == restarted, lease
    # A bridge with the key hands it out; its worker gives it back (fail): the key was there, so the
    # next claim that finds it missing starts a new run.
    monkeypatch.setattr(h.keys, "key_by_id", opens)
    got = await h.fetch_until("w", ttr_ms=TTR_MS)
    body = {"serviceId": h.service, "workerId": "w", "taskId": got.task_id, "epoch": got.epoch, "retryInMs": 0}
    assert await h.queue.fail(OWNER, parse(FailRequest, body)) is not None
    monkeypatch.setattr(h.keys, "key_by_id", _key_missing)
    again = await _claim_unopened(h)
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.LEASED and lease.key_missing == 1 and lease.key_missing_since_ms == again
    # Parked after the grace from there; redriven with the key still missing, the run starts again.
    await _claims_until_parked(h, task_id, grace)
    assert (await _lease(h, task_id)).state is LeaseState.PARKED
    assert await h.queue.lifecycle.redrive(OWNER, h.service, [uuid.UUID(task_id)]) == 1
    await _claim_unopened(h)
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.LEASED and lease.key_missing == 1, lease
    await _claims_until_parked(h, task_id, grace)
    assert h.metrics.total("tasks_parked", reason="key_missing") == 2


async def test_zero_never_parks_a_task_for_its_missing_key(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h = harness
    _park_after(h, 0)
    task_id = await h.add("sealed")
    await h.scheduler.tick()
    monkeypatch.setattr(h.keys, "key_by_id", _key_missing)
    first = await _claim_unopened(h)
    claims = 1
    while h.clock.now_ms() - first < PARK_AFTER_MS * 2 or claims < 4:
        await _claim_unopened(h)
        claims += 1
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.LEASED and lease.key_missing == claims, lease
    assert h.metrics.total("tasks_parked") == 0


async def test_a_park_of_an_unopened_claim_applies_only_at_the_claims_own_deadline(harness: Harness) -> None:
    """The park takes a let-go's place, and holds to its condition: a copy of the fetch that resent
    the task to its worker since (a bridge with the key) moved the deadline on, and parked then,
    the task would be taken from a worker working on it."""
    h = harness
    task_id = await h.add("sealed")
    got = await h.fetch("w", ttr_ms=TTR_MS)
    assert got is not None and got.task_id == task_id
    q, tid, now = QueueKey(OWNER, h.service), uuid.UUID(task_id), h.clock.now_ms()
    moved = await h.store.park(
        q, tid, got.epoch, now, "key_missing", timeuuid_from_ms(now), worker="w", until_ms=got.lease_expires_at_ms + 1
    )
    assert not moved.applied
    assert (await _lease(h, task_id)).state is LeaseState.LEASED
    own = await h.store.park(
        q, tid, got.epoch, now, "key_missing", timeuuid_from_ms(now), worker="w", until_ms=got.lease_expires_at_ms
    )
    assert own.applied
    assert (await _lease(h, task_id)).state is LeaseState.PARKED


async def test_a_claim_it_could_not_open_is_never_resent_to_its_worker(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim that found the key missing, kept to its deadline (a lease of a minute), still named
    its worker: when the pointer's clear failed, the worker's next fetch on a bridge with the key
    resent the task, a delivery its lease never counted, which did not end the run of claims that
    found the key missing either (found by re-review, 2026-12-07). The lease is nobody's now."""
    h = harness
    task_id = await h.add("sealed")
    opens = h.keys.key_by_id
    await h.scheduler.tick()
    monkeypatch.setattr(h.keys, "key_by_id", _key_missing)
    clear = h.store.clear_worker

    async def clear_fails(*args: Any, **kwargs: Any) -> Any:
        raise Unavailable("the pointer's clear timed out")

    monkeypatch.setattr(h.store, "clear_worker", clear_fails)
    with pytest.raises(Unavailable):
        await h.fetch("w", ttr_ms=60_000)
    monkeypatch.setattr(h.store, "clear_worker", clear)

    async def uncounted() -> bool:  # the let-go runs on beside the failed clear
        lease = await _lease(h, task_id)
        return lease.uncounted_epoch == lease.epoch == 1 and lease.key_missing == 1

    await wait_for(uncounted, 10, what="the claim uncounted")
    # The key back: the worker's next fetch does not get the claim it was never handed.
    monkeypatch.setattr(h.keys, "key_by_id", opens)
    assert await h.fetch("w", ttr_ms=60_000) is None
    # At the claim's deadline the task comes back, and its delivery counts.
    got = await h.fetch_until("w", ttr_ms=60_000, step_ms=1_000, limit_ms=90_000)
    assert got.task_id == task_id and got.epoch == 2
    lease = await _lease(h, task_id)
    assert lease.deliveries_counted == 1 and lease.uncounted == 1, lease
