"""Background work at its edges (recovery scheduler, timer wheel, duty, relay), on the real servers.

Each test failed before its fix; the docstrings say what was wrong."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from bridge.domain.records import QueueKey
from bridge.domain.timeline import EXPIRY_BUCKET_MS, expiry_bucket
from tests.conftest import OWNERS, service_id, settings_from, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _until_ms(clock, t_ms: int) -> None:
    """A timer on the bridge's clock (what the test does at a moment, not a wait for a condition)."""
    while (left := t_ms - clock.now_ms()) > 0:  # noqa: ASYNC110 - a timer, not a condition
        await asyncio.sleep(left / 1000)


async def test_a_lease_extended_at_its_deadline_within_its_bucket_is_not_stranded(bridge, engine, workers):
    """A worker extends its lease right at its deadline with a short timeToRecover (allowed: 100 ms
    and more), so that the new deadline + margin falls in the same 250 ms expiry bucket as the old
    one. The scheduler's pass over the running bucket meets the old deadline between the two, files
    the new one again in that same bucket (same (task, epoch) key) and counts the key as handled:
    every later pass of that bucket skips the re-filed deadline. The worker then dies: the task
    must come back to another worker shortly after the new deadline + margin."""
    await wait_for(lambda: bridge.duty.held, 10, what="the duty")
    margin = int(bridge.settings.clock_skew_margin * 1000)
    clock = bridge.queue.clock
    svc = service_id()
    q = QueueKey(OWNERS[0], svc)
    holder, other = await workers(svc, "holder"), await workers(svc, "other")
    misses: list[str] = []
    for attempt in range(15):
        await engine.add(svc, attempt)
        now = clock.now_ms()
        # Aim the deadline + margin at the start of a bucket (the fetch takes a few ms).
        ttr = 1000 + ((20 - (now + 1000 + margin + 10)) % EXPIRY_BUCKET_MS)
        task = await holder.fetch(time_to_recover_ms=ttr)
        assert task is not None and task.value == attempt
        u1 = (await bridge.store.lease(q, uuid.UUID(task.id))).lease_until_ms
        if (u1 + margin) % EXPIRY_BUCKET_MS > 60:
            misses.append(f"deadline at {(u1 + margin) % EXPIRY_BUCKET_MS} ms into its bucket")
            assert await task.ack("off the mark")
            continue
        await _until_ms(clock, u1 - 10)
        # Right at the deadline, by the least allowed (100 ms, less than half a bucket): u2 is
        # about u1 + 90 ms, in u1's bucket unless the old deadline sat 160 ms into it (with 200 ms
        # the slack was under 60 ms, and a slow extend put u2 in the next bucket).
        assert await task.extend(100)
        u2 = (await bridge.store.lease(q, uuid.UUID(task.id))).lease_until_ms
        if expiry_bucket(u2 + margin) != expiry_bucket(u1 + margin):
            misses.append(f"extended deadline {u2 - u1} ms after the first, in the next bucket")
            await task.ack("other bucket")  # not the case under test: try again
            continue
        break
    else:
        # Not a skip: a test that skips on a slow machine stops testing the case there for good.
        pytest.fail(f"could not place the two deadlines in one bucket in 15 attempts: {misses}")
    # The holder dies now: it never extends again. Someone else must get the task, at the latest
    # after the bucket's passes (first: just after the bucket ends; second: 5 s later).
    got = await wait_for(other.fetch, 9.0, interval=0.05, what="the task re-exposed after the extended deadline")
    assert got.id == task.id and got.epoch == task.epoch + 1


@pytest.fixture
async def cassandra_proxy(servers):
    proxy = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    yield proxy
    await proxy.stop()


async def test_a_duty_holder_cut_off_from_cassandra_hands_the_duty_over(
    bridge_env, cassandra_proxy, make_bridge, engine, workers
):
    """The bridge holding the scheduler duty loses Cassandra (its own link: the rest of the fleet is
    fine). It stops consuming requests (unready), but keeps the duty token: every tick of the
    fleet's only recovery scheduler and result relay fails, and a lease that runs out on a healthy
    bridge is never taken back while the cut lasts. Expected: the healthy bridge takes the duty
    over (or recovers the lease) within a few seconds of the deadline."""
    from bridge.app import Bridge

    cut_off = Bridge(settings_from(bridge_env, cassandra_port=cassandra_proxy.port, cassandra_timeout=1.0))
    await cut_off.start()
    try:
        await wait_for(lambda: cut_off.duty.held, 10, what="the first bridge holding the duty")
        healthy = await make_bridge()
        svc = service_id()
        cassandra_proxy.cut()
        await wait_for(lambda: not cut_off.transport.consuming(), 10, what="the cut-off bridge paused")
        await wait_for(lambda: healthy.duty.held, 10, what="the healthy bridge taking the duty over")
        assert not cut_off.duty.held
        await engine.add(svc, "abandoned")
        gone, other = await workers(svc, "gone"), await workers(svc, "other")
        # Longer than the claim's own timer covers (2 s): only the duty holder's passes take it back.
        held = await gone.fetch(time_to_recover_ms=2_500)
        assert held is not None
        got = await wait_for(other.fetch, 8.0, interval=0.1, what="the abandoned lease taken back")
        assert got.id == held.id and got.epoch == held.epoch + 1
        # Back in reach, it competes for the duty again: it takes it when the holder goes.
        cassandra_proxy.restore()
        await wait_for(lambda: cut_off.transport.consuming(), 20, what="the cut-off bridge serving again")
        await healthy.stop()
        await wait_for(lambda: cut_off.duty.held, 15, what="the duty back with the first bridge")
    finally:
        cassandra_proxy.restore()
        await cut_off.stop()


async def test_a_relay_catching_up_a_day_of_outbox_buckets_does_not_stop_lease_recovery(bridge_env, engine, workers):
    """The relay's persisted cursor stops at the first bucket still owing a result (one that could not
    be published: "a restart retries it too"); such a result stays owed until its TTL (7 days by
    default). After a restart (or a duty handover) the new holder sweeps every 10 s bucket from
    there to now in ONE tick (``_relay``'s ``while self._outbox_next < limit`` has no bound, unlike
    the expiry passes' CATCH_UP_BATCH), and the recovery passes wait behind it: a day of buckets
    (8,640 reads) takes about 14 s here, a week about 100 s, and no lease is taken back meanwhile.
    The scheduler below is the bridge's own, with its positions under a name of this test, the
    outbox position one day back (the state a day-old stuck result leaves)."""
    from bridge.app import Bridge
    from bridge.domain.scheduler import RecoveryScheduler
    from bridge.domain.timeline import OUTBOX_BUCKET_MS, outbox_bucket

    b = Bridge(settings_from(bridge_env))
    prefix = f"hunt-{uuid.uuid4().hex[:8]}-"
    old = b.scheduler
    b.scheduler = RecoveryScheduler(
        b.queue,
        interval_s=old.interval_s,
        late_ms=old.late_ms,
        republish_after_ms=old.republish_after_ms,
        report_pending=old.report_pending,
        progress_prefix=prefix,
    )
    await b.start()
    try:
        await wait_for(lambda: b.duty.held, 10, what="the duty")
        day_ago = outbox_bucket(b.queue.clock.now_ms()) - 86_400_000 // OUTBOX_BUCKET_MS
        await b.store.advance_scheduler_cursor(prefix + "outbox", day_ago, day_ago * OUTBOX_BUCKET_MS)
        b.scheduler._forget_positions()  # as after a restart: positions read again from the store
        b.scheduler._last_outbox_ms = 0  # the relay sweeps at the next tick (as at start)
        svc = service_id()
        await engine.add(svc, "abandoned")
        gone, other = await workers(svc, "gone"), await workers(svc, "other")
        held = await gone.fetch(time_to_recover_ms=2_500)  # beyond the claim's own timer (2 s)
        assert held is not None
        got = await wait_for(other.fetch, 8.0, interval=0.1, what="the abandoned lease taken back")
        assert got.id == held.id and got.epoch == held.epoch + 1
    finally:
        await b.stop()


async def test_a_delayed_task_announced_before_its_row_is_stored_is_not_burnt(bridge, engine, workers, monkeypatch):
    """A delayed add files its due entry first (write-ahead), then stores the task row. When that
    write is slow (a Cassandra latency spike longer than the delay), the scheduler announces the
    task at its due time before its row exists; a waiting worker's claim (``claim_new``, IF NOT
    EXISTS) then applies although the payload read finds nothing: the worker is answered null, but
    the task now holds a lease at epoch 1 in nobody's hands. It comes back only after that lease
    runs out, with a delivery counted that never happened: with maxDeliveries 1 it is parked (and
    the engine told "parked after 1 deliveries") without ever having been handed to a worker."""
    await wait_for(lambda: bridge.duty.held, 10, what="the duty")
    store_task = bridge.store.store_task
    slow = asyncio.Event()

    async def slow_store_task(*args, **kwargs):
        if slow.is_set():
            await asyncio.sleep(0.8)  # fault injection: a slow write (latency spike), not a wait
        return await store_task(*args, **kwargs)

    monkeypatch.setattr(bridge.store, "store_task", slow_store_task)
    svc = service_id()
    w = await workers(svc, "waiting")
    waiting = asyncio.create_task(w.fetch(time_to_recover_ms=1_000, wait_ms=4_000))
    slow.set()
    task_id = await engine.add(svc, "delayed", delay_ms=200, max_deliveries=1)
    got = await waiting
    if got is None:  # the worker was answered null: the task must still come to a worker
        got = await wait_for(w.fetch, 6.0, interval=0.1, what="the delayed task handed out")
    assert got.id == task_id
    assert got.deliveries == 1
