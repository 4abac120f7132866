"""Time boundaries of the storage layout: expiry buckets (250 ms), the wheel's hour partitions of
marks, ready buckets (10 s), day partitions of the counters and of the loops' progress, the task's
TTL. Each test asserts a documented promise (docs/storage.md) at such a boundary."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.domain.clock import ManualClock
from bridge.domain.counting import DAY_MS, QueueCounts
from bridge.domain.models import AddCommand, FetchRequest, parse
from bridge.domain.records import QueueKey
from bridge.domain.timeline import EXPIRY_BUCKET_MS, expiry_bucket, ms_of
from tests.conftest import OWNERS, service_id, wait_for
from tests.queue_harness import MARGIN_MS, OWNER, Harness

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _add(svc: str, value: Any, **kw: Any) -> AddCommand:
    return parse(AddCommand, {"serviceId": svc, "value": value, **kw})


def _fetch(svc: str, worker: str, **kw: Any) -> FetchRequest:
    return parse(FetchRequest, {"serviceId": svc, "workerId": worker, **kw})


async def _waiting(b: Any) -> bool:
    return any(x.waiters for x in b.hints._waiting.values())


# -- a delayed task due at the end of its lifetime ---------------------------------------------------
def _wheel(cql: Any, ks: str, svc: str, task_id: uuid.UUID, bucket: int) -> tuple[bool, bool]:
    """(the due entry is in ``expiry_shards``, its bucket is marked in ``expiry_marks``)."""
    from bridge.domain.timeline import EXPIRY_SHARDS, shard_of
    from bridge.storage.repository import MARK_HOUR_BUCKETS

    rows = cql.execute(
        f"SELECT owner, service, task_id FROM {ks}.expiry_shards WHERE bucket = %s AND shard = %s",
        (bucket, shard_of(task_id, EXPIRY_SHARDS)),
    )
    filed = any(r["service"] == svc and r["task_id"] == task_id for r in rows)
    marks = cql.execute(
        f"SELECT bucket FROM {ks}.expiry_marks WHERE hour = %s AND bucket = %s",
        (bucket // MARK_HOUR_BUCKETS, bucket),
    )
    return filed, bool(list(marks))


async def test_a_task_delayed_close_to_its_ttl_is_announced_when_due(make_bridge, cql, servers):
    """docs/storage.md, "Delayed tasks": the add files the due time in the timer wheel
    (``expiry_shards``, bucket of due + margin) and the recovery scheduler, meeting it once due +
    margin has passed, sends the hint; a task may be delayed up to (not beyond) its TTL
    (``prepare_add`` refuses only ``due - now >= TTL``), and its life runs from its due time.

    The scheduler reads only buckets *marked* in ``expiry_marks``. The mark was written with
    ``USING TTL <BRIDGE_TASK_TTL>`` counted from the add (``CassandraTaskStore._mark_if_new``),
    while the bucket it marks lies up to TTL + margin + 250 ms ahead. A delay with delay + margin
    (+ the bucket, + Cassandra's whole-second TTL rounding) beyond the TTL left the due entry filed
    in an unmarked bucket: the scheduler never read it and never sent the hint; only a
    reconciliation scan (every 30 s at most, never during a long-poll) found the task. With
    the default 25 ms margin that is a delay in the last ~0.3-1.3 s of the TTL; a 2 s margin
    (allowed up to 60 s) makes the window 2 s wide and the test deterministic. The mark now
    lives its bucket's time plus the TTL.

    Control: a task due early in the TTL reaches a long-polling worker at due + margin."""
    from bridge.domain.timeline import expiry_bucket

    ttl_s, margin_ms = 10, 2_000
    b = await make_bridge(task_ttl=ttl_s, clock_skew_margin=margin_ms / 1000)
    owner, svc, ks = OWNERS[0], service_id(), servers.keyspace
    clock = b.queue.clock

    # Control: due in 2 s.
    waiting = asyncio.create_task(b.queue.fetch(owner, _fetch(svc, "w1", waitMs=10_000)))
    await wait_for(lambda: _waiting(b), 5, what="the fetch waiting")
    early = await b.queue.add(owner, _add(svc, "early", delayMs=2_000), message_id=None, traceparent=None)
    got = await asyncio.wait_for(waiting, 15)
    late_by = clock.now_ms() - (ms_of(uuid.UUID(early)) + margin_ms)
    assert got is not None and got.task_id == early, "the control task was not announced"
    assert late_by < 1_500, f"control announced {late_by} ms after due + margin"

    # Delayed 8.5 s of a 10 s TTL: due + margin is 10.5 s after the add, within the task's life.
    waiting = asyncio.create_task(b.queue.fetch(owner, _fetch(svc, "w2", waitMs=13_000)))
    await wait_for(lambda: _waiting(b), 5, what="the fetch waiting")
    late = uuid.UUID(await b.queue.add(owner, _add(svc, "late", delayMs=8_500), message_id=None, traceparent=None))
    due_plus_margin = ms_of(late) + margin_ms
    bucket = expiry_bucket(due_plus_margin)
    at_add = _wheel(cql, ks, svc, late, bucket)
    got = await asyncio.wait_for(waiting, 20)
    answered = clock.now_ms()
    at_end = _wheel(cql, ks, svc, late, bucket)
    evidence = (
        f"(filed, marked) at the add: {at_add}, when the long-poll ended: {at_end}; "
        f"the long-poll answered {got and got.task_id} {(answered - due_plus_margin) / 1000:.1f} s after due + margin"
    )
    assert got is not None and got.task_id == str(late), (
        f"a task delayed 8.5 s of its 10 s TTL was never announced: {evidence}"
    )
    assert answered - due_plus_margin < 1_500, evidence


async def test_a_lease_granted_by_a_bridge_with_a_shorter_task_ttl_is_taken_back_when_it_runs_out(
    make_bridge, cql, servers
):
    """docs/storage.md, "Row lifetimes follow the task's" and "No loss on crash": during a rolling
    change of BRIDGE_TASK_TTL every row about a task lives the task's life, whichever bridge
    writes it, and a claim's deadline is in the timer wheel before the claim exists, so a lease
    whose worker dies is re-exposed at deadline + margin. The deadline row gets the task's life,
    but the bucket's mark in ``expiry_marks`` (which alone makes the scheduler read that bucket)
    got the *claiming* bridge's own TTL (``_mark_if_new``: ``USING TTL self.task_ttl_s``).
    Claimed through a bridge on a 3 s TTL with a 6 s lease, the mark was gone before the bucket
    came: nobody took the task back, for the task's whole (1 h) life. The mark now lives at
    least as long as the deadline row it comes with."""
    new = await make_bridge(task_ttl=3600, hint_grace=0.0)
    old = await make_bridge(task_ttl=3)
    owner, svc, ks = OWNERS[0], service_id(), servers.keyspace
    task_id = await new.queue.add(owner, _add(svc, {"n": 1}), message_id=None, traceparent=None)
    held = await old.queue.fetch(owner, _fetch(svc, "w-dies", timeToRecover=6_000))
    assert held is not None and held.task_id == task_id
    margin = old.queue.skew_margin_ms
    bucket = expiry_bucket(held.lease_expires_at_ms + margin)
    at_claim = _wheel(cql, ks, svc, uuid.UUID(task_id), bucket)
    # The worker dies. Another worker polls; the task is due back at deadline + margin, at the
    # latest by the scheduler's second pass over the bucket (5 s later): waited for 7 s.
    clock = new.queue.clock
    back_by = held.lease_expires_at_ms + margin + 7_000
    got = None
    while got is None and clock.now_ms() < back_by:
        got = await new.queue.fetch(owner, _fetch(svc, "w-next", waitMs=500))
    at_end = _wheel(cql, ks, svc, uuid.UUID(task_id), bucket)
    assert got is not None and got.task_id == task_id and got.epoch == 2, (
        f"the expired lease was not re-exposed within 7 s of deadline + margin; (deadline filed, bucket "
        f"marked) at the claim: {at_claim}, at the end: {at_end}"
    )


# -- the domain on the real Cassandra, on a manual clock just before a midnight (UTC) ----------------
# A bridge's queue and scheduler over ``CassandraTaskStore`` (tests/queue_harness.py), its clock set
# a few seconds before a day boundary some days ahead of real time (different per test: its expiry
# buckets, marks and loop positions are its own). Midnight is also an hour boundary (the partitions
# of ``expiry_marks``), a 10 s ready-bucket boundary and a minute boundary (``delayed_counts``).


def _next_midnight() -> int:
    return (int(time.time() * 1000) // DAY_MS + random.randrange(2, 30)) * DAY_MS


@pytest.fixture
async def at_midnight(cassandra_settings: Any, keyring_path: Any) -> AsyncIterator[tuple[Harness, int]]:
    """A harness whose clock reads 3 s before a midnight; yields (harness, that midnight in ms)."""
    from bridge.crypto import KeyringFileProvider
    from bridge.storage.repository import CassandraTaskStore
    from bridge.storage.session import open_session
    from tests.queue_harness import TTL_S

    midnight = _next_midnight()
    clock = ManualClock(midnight - 3_000)
    db = open_session(cassandra_settings)
    await db.connect()
    try:
        store = CassandraTaskStore(db, clock.now_ms, TTL_S)
        await store.prepare()
        h = Harness(store, KeyringFileProvider(keyring_path), clock, prefix=f"hunt-{uuid.uuid4().hex[:8]}-")
        h.queue.ctx.counts = QueueCounts()
        await h.scheduler.tick()  # the scheduler starts before any lease exists, as in a bridge
        try:
            yield h, midnight
        finally:
            await h.close()
            await h.queue.drain_background(5.0)
    finally:
        await db.close()


async def _advance_to(h: Harness, at_ms: int, step_ms: int = 100) -> None:
    while h.clock.now_ms() < at_ms:
        await h.advance(min(step_ms, at_ms - h.clock.now_ms()))


async def test_a_lease_whose_deadline_plus_margin_is_midnight_comes_back_on_time(at_midnight):
    """docs/storage.md, recovery scheduler: a deadline is filed under deadline + margin and the
    lease is re-exposed no earlier than that and within a bucket and a tick or two of it. Here
    deadline + margin is exactly midnight: the first bucket of a new day and of a new hour
    partition of ``expiry_marks`` (the marks are read across the two hours)."""
    h, midnight = at_midnight
    task_id = await h.add("spans midnight")
    ttr = midnight - MARGIN_MS - h.clock.now_ms()
    held = await h.fetch("a", ttr_ms=ttr)
    assert held is not None and held.task_id == task_id
    assert expiry_bucket(held.lease_expires_at_ms + MARGIN_MS) == midnight // EXPIRY_BUCKET_MS
    # Until midnight nobody else gets it; from then on the next worker does, promptly.
    while h.clock.now_ms() < midnight:
        assert await h.fetch("b") is None, f"handed out {midnight - h.clock.now_ms()} ms before deadline + margin"
        await h.advance(100)
    got = await h.fetch_until("b", step_ms=50, limit_ms=2_000)
    late = h.clock.now_ms() - midnight
    assert got.task_id == task_id and got.epoch == 2
    assert late <= 500, f"re-exposed {late} ms after deadline + margin (at midnight)"
    assert await h.ack("a", held) is False
    assert await h.ack("b", got) is True


async def test_a_successor_scheduler_after_midnight_resumes_from_yesterdays_position(at_midnight):
    """docs/storage.md, ``scheduler_progress``: positions are partitioned by the day they fall in,
    and a (re)start reads today's partition, then earlier days. The duty holder's last position
    is in yesterday's partition; it dies just before midnight with a lease due just after it. The
    next holder starts after midnight (today's partition is empty) and must resume from
    yesterday's position: no deadline between the two is skipped."""
    h, midnight = at_midnight
    task_id = await h.add("orphan")
    held = await h.fetch("a", ttr_ms=midnight + 500 - MARGIN_MS - h.clock.now_ms())
    assert held is not None
    # The first holder runs until 1 s before midnight, then dies (its loops stop).
    await _advance_to(h, midnight - 1_000)
    first_position = h.scheduler.expiry_position
    assert first_position is not None and first_position * EXPIRY_BUCKET_MS < midnight
    # 8 s later (past the second pass of the deadline's bucket), another bridge takes the duty.
    h.clock.advance(9_000)
    queue2, scheduler2 = h.instance(h.clock)
    saved = await h.store.scheduler_cursor(scheduler2._expiry_cursor, h.clock.now_ms())
    assert saved is not None and saved * EXPIRY_BUCKET_MS < midnight, "yesterday's position is found"
    for _ in range(3):
        await scheduler2.tick()
        h.clock.advance(100)
    got = await h.fetch("b", queue=queue2)
    assert got is not None and got.task_id == task_id and got.epoch == 2, (
        f"the lease due at midnight + 500 ms was not re-exposed by the successor (position {saved})"
    )
    assert await h.ack("b", got, queue=queue2) is True


async def test_stats_count_every_task_exactly_across_midnight(at_midnight):
    """docs/storage.md, "Queue counts": each move is attributed to the day of its task's id (a
    delayed add to its due minute) and stats sum the days from the one holding now - TTL, so
    counts are exact (no bridge killed) across a day change: tasks added before midnight and
    claimed or acked after it, and a delayed task added before midnight and due after it. Stats
    count a delayed task delayed until its due minute has passed, then ready (to the minute)."""
    from bridge.domain.stats import service_stats

    h, midnight = at_midnight
    store, counts = h.store, h.queue.ctx.counts
    assert counts is not None
    q = QueueKey(OWNER, h.service)
    ttl_ms = 3_600_000  # a 1 h stats window: its first day is yesterday until 01:00

    async def stats() -> tuple[int, int, int]:
        await counts.flush(store)
        s = await service_stats(store, q, h.clock.now_ms(), ttl_ms, MARGIN_MS, MARGIN_MS)
        return s.ready, s.in_flight, s.delayed

    r1, r2, r3 = [await h.add(f"r{i}") for i in (1, 2, 3)]
    delayed = await h.queue.add(
        OWNER,
        parse(AddCommand, {"serviceId": h.service, "value": "d", "delayMs": 4_000}),
        message_id=None,
        traceparent=None,
    )
    assert ms_of(uuid.UUID(delayed)) >= midnight
    first = await h.fetch("a", ttr_ms=60_000)
    assert first is not None and first.task_id == r1
    assert await stats() == (2, 1, 1), "before midnight"

    await _advance_to(h, midnight + 200)
    assert await stats() == (2, 1, 1), "just after midnight, nothing moved"
    assert await h.ack("a", first) is True
    second = await h.fetch("b", ttr_ms=60_000)
    assert second is not None and second.task_id == r2
    assert await stats() == (1, 1, 1), "a claim and an ack after midnight of tasks added before it"

    h.clock.advance(60_000)  # the delayed task's due minute (the first of the day) has passed
    assert await stats() == (2, 1, 0)
    third = await h.fetch("c", ttr_ms=60_000)
    fourth = await h.fetch("d", ttr_ms=60_000)
    assert third is not None and fourth is not None
    assert {third.task_id, fourth.task_id} == {r3, delayed}
    assert await stats() == (0, 3, 0)
    for w, d in (("b", second), ("c", third), ("d", fourth)):
        assert await h.ack(w, d) is True
    assert await stats() == (0, 0, 0)


async def test_an_owed_result_bucket_is_remembered_as_long_as_a_result_lives(cassandra_settings: Any) -> None:
    """The relay records an outbox bucket still owing a publish apart from its position. The record
    lived 30 days under the bucket's day, and a new duty holder looked a month back: with
    BRIDGE_TASK_TTL over 29 days, a result nobody could take for a month (no queue bound) outlived
    its record, was forgotten at the next handover, and stayed owed for good. Found by review."""
    from bridge.domain.timeline import OUTBOX_BUCKET_MS
    from bridge.storage.repository import CassandraTaskStore
    from bridge.storage.session import open_session

    db = open_session(cassandra_settings)
    await db.connect()
    try:
        store = CassandraTaskStore(db, lambda: int(time.time() * 1000), 60 * 24 * 3600)  # 60 days
        await store.prepare()
        name = f"relay-{uuid.uuid4().hex[:8]}.owed"
        now = int(time.time() * 1000)
        bucket = now // OUTBOX_BUCKET_MS
        await store.remember_owed(name, bucket, bucket * OUTBOX_BUCKET_MS)
        assert bucket in await store.owed_positions(name, now)
        forty_days_on = now + 40 * DAY_MS  # results of a 60-day task still live then
        assert bucket in await store.owed_positions(name, forty_days_on), "a handover 40 days on forgot it"
        await store.forget_owed(name, bucket, bucket * OUTBOX_BUCKET_MS)
        assert bucket not in await store.owed_positions(name, now)
    finally:
        await db.close()
