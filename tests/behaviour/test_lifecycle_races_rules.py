"""Races of the worker lifecycle (parks, extends, redrives) with the recovery scheduler, on both
stores. Each interleaving is forced by hooking a store (or lifecycle) call: the racing request runs
inside the hook, between a decision's read and its compare-and-set. Found by a review (2026-12)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bridge.domain.models import AddCommand, ExtendRequest, FailRequest, parse
from bridge.domain.records import LeaseState, ParkedEntry, QueueKey, TaskOptions
from bridge.domain.timeline import timeuuid_from_ms
from tests.conftest import wait_for
from tests.queue_harness import MARGIN_MS, OWNER, Harness

pytestmark = pytest.mark.anyio


async def _add_limited(h: Harness, *, token: bool = True) -> str:
    """A task with a delivery limit of 1 (and a token: the engine is told when it is parked)."""
    body: dict[str, Any] = {"serviceId": h.service, "value": "poison", "maxDeliveries": 1}
    if token:
        body["token"] = "t"
    task_id = await h.queue.add(OWNER, parse(AddCommand, body), message_id=None, traceparent=None)
    h.clock.advance(1)
    return task_id


def _extend(h: Harness, worker: str, task_id: str, epoch: int, ttr_ms: int) -> ExtendRequest:
    body = {"serviceId": h.service, "workerId": worker, "taskId": task_id, "epoch": epoch, "timeToRecover": ttr_ms}
    req: ExtendRequest = parse(ExtendRequest, body)
    return req


def _fail(h: Harness, worker: str, task_id: str, epoch: int) -> FailRequest:
    body = {"serviceId": h.service, "workerId": worker, "taskId": task_id, "epoch": epoch, "error": {"why": "boom"}}
    req: FailRequest = parse(FailRequest, body)
    return req


async def _lease(h: Harness, task_id: str) -> Any:
    return await h.store.lease(QueueKey(OWNER, h.service), uuid.UUID(task_id), serial=True)


def _limit_results(h: Harness) -> list[bytes]:
    return [m.value_json for m in h.sink.messages if b"delivery_limit" in m.value_json]


# -- 1. a refused park takes back its own parked-index row, not a later park's at the same epoch -------
async def test_a_refused_park_leaves_the_row_of_a_later_park_at_the_same_epoch(harness: Harness) -> None:
    """The scheduler parks an expired lease at its limit (epoch E): row written ahead, then the
    compare-and-set. The worker's late extend lands in between (allowed: nobody took the task) and
    refuses it; the worker's ``fail`` then parks the task at the SAME epoch E (its row replaces the
    scheduler's). The refused park took back "its" row by epoch (``IF epoch = ?``) and deleted the
    fail's: the task was parked, but missing from the listing, stats and ``redrive all``."""
    h = harness
    task_id = await _add_limited(h)
    got = await h.fetch("W", ttr_ms=1_000)
    assert got is not None and got.task_id == task_id
    h.scheduler.cancel_timers()  # the scheduler's pass makes the park, under the hooks below
    h.clock.advance(1_000 + MARGIN_MS + 300)  # W's lease ran out; W is still at work
    real_park, real_remove = h.store.park, h.store.remove_parked
    seen = {"park": 0, "remove": 0}

    async def park(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("worker") is None and seen["park"] == 0:
            seen["park"] += 1
            # W's late heartbeat lands just before the scheduler's compare-and-set.
            assert await h.queue.extend(OWNER, _extend(h, "W", task_id, got.epoch, 5_000)) is not None
        return await real_park(*args, **kwargs)

    async def remove_parked(*args: Any, **kwargs: Any) -> None:
        if seen["remove"] == 0:
            seen["remove"] += 1
            # ... and W's work fails right after: on its last allowed delivery, ``fail`` parks it.
            failed = await h.queue.fail(OWNER, _fail(h, "W", task_id, got.epoch))
            assert failed is not None and failed.parked
        await real_remove(*args, **kwargs)

    h.store.park = park  # type: ignore[method-assign]
    h.store.remove_parked = remove_parked  # type: ignore[method-assign]
    await h.scheduler.tick()
    await h.queue.drain_background(5.0)
    h.store.park, h.store.remove_parked = real_park, real_remove  # type: ignore[method-assign]
    assert seen == {"park": 1, "remove": 1}, f"the interleaving did not happen: {seen}"
    lease = await _lease(h, task_id)
    assert lease is not None and lease.state is LeaseState.PARKED and lease.park_reason == "failed"
    listed = [p.task_id for p in await h.queue.parked(OWNER, h.service, 100)]
    assert listed == [uuid.UUID(task_id)], "a parked task missing from the parked listing"
    assert (await h.queue.stats(OWNER, h.service))[0].parked == 1
    h.clock.advance(1)  # ``redrive all`` takes the tasks parked before its now
    assert await h.queue.redrive(OWNER, h.service, None) == 1, "`redrive all` did not find the parked task"


# -- 2. a lease shortened by an extend (or a resend) is recovered at its new deadline ----------------
async def test_an_extend_that_shortens_the_lease_is_recovered_at_the_new_deadline(harness: Harness) -> None:
    """A worker holding a 10-minute lease extends it with a shorter timeToRecover (5 s), then dies.
    The answer said the lease ends in 5 s, but the only deadline in the timer wheel was the old,
    later one: the task came back 10 minutes later instead of 5 s (+ the skew margin)."""
    h = harness
    task_id = await h.add("v")
    got = await h.fetch("W", ttr_ms=600_000)
    assert got is not None and got.task_id == task_id
    extended = await h.queue.extend(OWNER, _extend(h, "W", task_id, got.epoch, 5_000))
    assert extended is not None and extended.lease_until_ms == h.clock.now_ms() + 5_000
    start = h.clock.now_ms()
    again = await h.fetch_until("other", step_ms=500, limit_ms=20_000)  # W died
    waited = h.clock.now_ms() - start
    assert again.task_id == task_id and again.epoch == 2
    assert 5_000 + MARGIN_MS <= waited <= 5_000 + MARGIN_MS + 1_000, f"recovered {waited} ms after the extend"
    assert await h.ack("W", got) is False
    assert await h.ack("other", again) is True


async def test_a_resend_with_a_shorter_lease_is_recovered_at_the_new_deadline(harness: Harness) -> None:
    """The same through a fetch that hands the worker its task again (the pointer's resend) with a
    shorter timeToRecover than the lease it holds."""
    h = harness
    task_id = await h.add("v")
    got = await h.fetch("W", ttr_ms=600_000)
    assert got is not None and got.task_id == task_id
    resent = await h.fetch("W", ttr_ms=5_000)  # a retry of the fetch, say: the same task, a short lease
    assert resent is not None and resent.task_id == task_id and resent.epoch == got.epoch
    assert resent.lease_expires_at_ms == h.clock.now_ms() + 5_000
    start = h.clock.now_ms()
    again = await h.fetch_until("other", step_ms=500, limit_ms=20_000)  # W died
    waited = h.clock.now_ms() - start
    assert again.task_id == task_id and again.epoch == 2
    assert 5_000 + MARGIN_MS <= waited <= 5_000 + MARGIN_MS + 1_000, f"recovered {waited} ms after the resend"


async def test_a_lengthening_extend_still_moves_the_deadline_later(harness: Harness) -> None:
    """The usual heartbeat (a later deadline) is unchanged: the task is not handed out before it."""
    h = harness
    task_id = await h.add("v")
    got = await h.fetch("W", ttr_ms=2_000)
    assert got is not None
    await h.advance(1_500)
    extended = await h.queue.extend(OWNER, _extend(h, "W", task_id, got.epoch, 10_000))
    assert extended is not None and extended.lease_until_ms == h.clock.now_ms() + 10_000
    for _ in range(10):  # past the first deadline + margin, up to 10 s later: still W's
        await h.advance(1_000)
        assert await h.fetch("other") is None
    assert await h.ack("W", got) is True


# -- 3. a scheduler's park decided before a redrive does not apply after it -------------------------
async def test_the_schedulers_park_does_not_apply_to_a_task_redriven_since_its_read(harness: Harness) -> None:
    """The scheduler reads an expired lease at its limit (epoch E) and goes to park it. Meanwhile the
    worker fails it (parked at E) and an operator redrives it: leased to nobody at E again, expired
    (claimable at once). ``park_expired``'s condition (leased, epoch E, deadline passed) held again,
    and the scheduler parked the task the operator had just put back, with no delivery since, and
    told the engine a second time."""
    h = harness
    task_id = await _add_limited(h)
    got = await h.fetch("W", ttr_ms=1_000)
    assert got is not None and got.task_id == task_id
    h.scheduler.cancel_timers()
    h.clock.advance(1_000 + MARGIN_MS + 300)
    real_options, target = h.store.task_options, uuid.UUID(task_id)
    seen: list[int] = []

    async def task_options(q: QueueKey, task_id: uuid.UUID) -> TaskOptions:
        if not seen and task_id == target:
            seen.append(1)
            # Between the scheduler's lease read and its park: W fails it, an operator redrives it.
            failed = await h.queue.fail(OWNER, _fail(h, "W", str(target), got.epoch))
            assert failed is not None and failed.parked
            assert await h.queue.redrive(OWNER, h.service, [target]) == 1
        return await real_options(q, task_id)

    h.store.task_options = task_options  # type: ignore[method-assign]
    await h.scheduler.tick()
    await h.queue.drain_background(5.0)
    h.store.task_options = real_options  # type: ignore[method-assign]
    assert seen, "the interleaving did not happen"
    lease = await _lease(h, task_id)
    assert lease is not None and lease.state is LeaseState.LEASED, f"the redriven task was parked again: {lease}"
    assert lease.base_epoch == lease.epoch == got.epoch
    assert len(_limit_results(h)) == 1, "the engine was told of a park twice"
    assert await h.queue.parked(OWNER, h.service, 100) == []
    assert (await h.queue.stats(OWNER, h.service))[0].parked == 0
    again = await h.fetch_until("other", step_ms=250, limit_ms=5_000)
    assert again.task_id == task_id and again.epoch == got.epoch + 1
    assert await h.ack("other", again) is True


async def test_a_redriven_task_whose_lease_runs_out_again_is_parked_again(harness: Harness) -> None:
    """The condition on ``base_epoch`` does not stand in the way of a park decided after the
    redrive (its read sees the redrive's ``base_epoch``), nor of a cancel of the redriven task."""
    h = harness
    task_id = await _add_limited(h)
    got = await h.fetch("W", ttr_ms=500)
    assert got is not None and got.task_id == task_id
    lease = None
    for _ in range(20):  # its lease runs out at its limit: parked
        await h.advance(250)
        lease = await _lease(h, task_id)
        if lease.state is LeaseState.PARKED:
            break
    assert lease is not None and lease.state is LeaseState.PARKED and lease.park_reason == "delivery_limit"
    h.clock.advance(1)
    assert await h.queue.redrive(OWNER, h.service, [uuid.UUID(task_id)]) == 1
    again = await h.fetch_until("W2", step_ms=250, limit_ms=5_000, ttr_ms=500)
    assert again.task_id == task_id and again.epoch == got.epoch + 1
    for _ in range(20):  # runs out again (its one delivery since the redrive): parked again
        await h.advance(250)
        lease = await _lease(h, task_id)
        if lease.state is LeaseState.PARKED:
            break
    assert lease.state is LeaseState.PARKED and lease.epoch == again.epoch and lease.base_epoch == got.epoch
    assert len(_limit_results(h)) == 2
    assert [p.task_id for p in await h.queue.parked(OWNER, h.service, 100)] == [uuid.UUID(task_id)]
    h.clock.advance(1)
    assert await h.queue.redrive(OWNER, h.service, [uuid.UUID(task_id)]) == 1
    assert await h.queue.cancel(OWNER, h.service, uuid.UUID(task_id)) is True  # redriven: leased to nobody
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.CANCELLED
    assert await h.queue.parked(OWNER, h.service, 100) == []


@pytest.mark.parametrize("applied", [False, True], ids=["lost", "landed"])
async def test_an_extend_whose_outcome_was_unknown_is_settled_by_the_deadline_it_left(
    harness: Harness, applied: bool
) -> None:
    """An extend's compare-and-set timed out (Cassandra's adapter resolves it: the same statement
    once more, then a SERIAL read). A shortening one never applies (its condition wants a later
    deadline): the resend is refused, and the read must not take the lease's later deadline for
    ours, or the lease is never shortened. A lengthening one whose first copy landed: the resend
    applies (the same deadline), and nothing more is sent."""
    from bridge.storage.errors import UnknownOutcome

    h = harness
    if not hasattr(h.store, "_lease_write"):
        pytest.skip("unknown outcomes are the Cassandra adapter's")
    task_id = await h.add("v")
    got = await h.fetch("W", ttr_ms=10_000 if applied else 600_000)
    assert got is not None
    real, sent = h.store._lease_write, []

    async def lease_write(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        if name == "lease.extend" and sent.count(name) == 1:
            if applied:
                await real(tid, name, *args, **kwargs)
            raise UnknownOutcome("the extend's reply timed out (injected)")
        return await real(tid, name, *args, **kwargs)

    h.store._lease_write = lease_write
    extended = await h.queue.extend(OWNER, _extend(h, "W", task_id, got.epoch, 60_000 if applied else 5_000))
    h.store._lease_write = real
    assert extended is not None
    assert sent == (["lease.extend"] * 2 if applied else ["lease.extend", "lease.extend", "lease.shorten"])
    lease = await _lease(h, task_id)
    assert lease is not None and lease.held_by("W", got.epoch) and lease.lease_until_ms == extended.lease_until_ms


# -- a redrive still pacing keeps its pace when the bridge forgets idle queues' paces ------------------
async def test_a_redrive_still_pacing_keeps_its_pace_when_idle_paces_are_forgotten(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past 1,000 queues redriven, a bridge cleared every queue's pace: a redrive still pacing lost
    its lock, and a second redrive of its queue ran beside it, twice the configured rate (the
    flood of poison tasks the rate is there to stop). Found by review, 2026-12-06."""
    import asyncio

    from bridge.domain import lifecycle

    monkeypatch.setattr(lifecycle, "REDRIVE_PACES_MAX", 3)
    paces = harness.queue.lifecycle
    q = QueueKey(OWNER, harness.service)
    loop = asyncio.get_running_loop()
    await paces._paced(q, 0.5)  # its first slot: now; the next one half a second later
    started = loop.time()
    pacing = asyncio.ensure_future(paces._paced(q, 0.5))  # waits for that slot, holding the pace
    lock, _ = paces._redrive_pace[q]
    await wait_for(lock.locked, 5, interval=0.01, what="the second redrive pacing")
    for n in range(3):  # other queues, redriven once each: the third is past the bound
        await paces._paced(QueueKey(OWNER, f"{harness.service}-other-{n}"), 0.5)
    assert q in paces._redrive_pace, "a pace in use was forgotten"
    second = asyncio.ensure_future(paces._paced(q, 0.5))  # another redrive of the same queue
    await asyncio.wait_for(asyncio.gather(pacing, second), 5)
    assert loop.time() - started >= 0.95, "the second redrive did not wait for the first one's pace"


@pytest.mark.parametrize("where", ["ready", "held"])
async def test_a_copy_of_a_cancel_answers_true_as_its_first_copy_did(harness: Harness, where: str) -> None:
    """A cancel applied, and its reply was lost (the bridge died before it, or the caller's wait
    ended): the copy (redelivered to another bridge, or resent with the same message-id) read the
    task cancelled and answered false, "it had finished", and the engine waited for a result that
    never came (found by review, 2026-12-06). The copy answers true; another request, false."""
    h = harness
    task_id = await h.add("v")
    if where == "held":
        assert await h.fetch("w") is not None
    tid = uuid.UUID(task_id)
    assert await h.queue.cancel(OWNER, h.service, tid, request_id="req-1") is True
    other, _ = h.instance(h.clock)  # another bridge: nothing of the first copy in its memory
    assert await other.cancel(OWNER, h.service, tid, request_id="req-1") is True
    assert await other.cancel(OWNER, h.service, tid, request_id="req-2") is False
    assert await other.cancel(OWNER, h.service, tid) is False
    assert h.metrics.total("tasks_cancelled") == 1


async def test_a_shortening_held_up_after_its_read_never_undoes_a_later_deadline(harness: Harness) -> None:
    """A worker shortens its lease (extend with a shorter timeToRecover); the bridge reads the
    lease, files the earlier deadline, and is held up there (a slow coordinator). The worker's
    retry, through another bridge, shortens the lease to a later deadline (measured later) and is
    told it. Then the first shortening landed, unconditionally: the lease ended before what the
    worker was told, and another worker took the task while the first still held it. A shortening
    applies only from the deadline it was decided on (found by review, 2026-12-07)."""
    h = harness
    await h.add("v")
    got = await h.fetch("W", ttr_ms=20_000)
    assert got is not None
    other, _ = h.instance(h.clock)
    real_watch = h.store.watch_expiry
    told: list[Any] = []

    async def watch_expiry(*args: Any, **kwargs: Any) -> None:
        if not told:
            told.append(None)  # the retry below files its own deadline through here too: once
            h.clock.advance(1_500)  # the client's timeout, then its retry through another bridge
            told[0] = await other.extend(OWNER, _extend(h, "W", got.task_id, got.epoch, 5_000))
        await real_watch(*args, **kwargs)

    h.store.watch_expiry = watch_expiry  # type: ignore[method-assign]
    try:
        late = await h.queue.extend(OWNER, _extend(h, "W", got.task_id, got.epoch, 5_000))
    finally:
        h.store.watch_expiry = real_watch  # type: ignore[method-assign]
    assert told and told[0] is not None
    lease = await _lease(h, got.task_id)
    assert lease.lease_until_ms >= told[0].lease_until_ms, "the lease ends before what the worker was told"
    assert late is not None and late.lease_until_ms == lease.lease_until_ms, "the late copy is told the lease's end"


async def test_a_redrive_whose_unpark_was_unknown_does_not_take_another_redrives_for_its_own(
    harness: Harness,
) -> None:
    """Two redrives of one parked task (a retry on another bridge, `redrive all` beside a named
    one). The other's unpark applies and a worker claims the task at once; ours timed out unsent.
    Settled by a SERIAL read, ours was judged applied because the lease was unparked at the parked
    epoch and claimed since: the task counted ready twice (stats showed a ready task that did not
    exist for a day) and both answered `redriven: 1` (found by review, 2026-12-07)."""
    from bridge.storage.errors import UnknownOutcome

    h = harness
    if not hasattr(h.store, "_lease_write"):
        pytest.skip("unknown outcomes are the Cassandra adapter's")
    from bridge.domain.counting import QueueCounts

    counts = h.queue.ctx.counts = QueueCounts()
    task_id = await _add_limited(h, token=False)
    got = await h.fetch("W", ttr_ms=60_000)
    assert got is not None and got.task_id == task_id
    assert await h.queue.fail(OWNER, _fail(h, "W", task_id, got.epoch)) is not None
    assert (await _lease(h, task_id)).state is LeaseState.PARKED
    real, sent, others = h.store._lease_write, [], []
    claimed: list[Any] = []

    async def lease_write(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        if name == "lease.unpark" and sent.count(name) == 1:
            others.append(await h.queue.redrive(OWNER, h.service, [uuid.UUID(task_id)]))  # the other copy
            claimed.append(await h.fetch_until("W2", step_ms=250, limit_ms=5_000, ttr_ms=60_000))
            raise UnknownOutcome("the unpark's reply timed out, never sent (injected)")
        return await real(tid, name, *args, **kwargs)

    h.store._lease_write = lease_write
    try:
        ours = await h.queue.redrive(OWNER, h.service, [uuid.UUID(task_id)])
    finally:
        h.store._lease_write = real
    assert others == [1] and claimed[0].task_id == task_id
    assert ours == 0, "took the other redrive's unpark for its own"
    assert await h.ack("W2", claimed[0]) is True
    await h.queue.drain_background(5.0)
    assert await counts.flush(h.store) == 0
    [stats] = await h.queue.stats(OWNER, h.service)
    assert (stats.ready, stats.in_flight, stats.parked) == (0, 0, 0)


async def test_an_unknown_outcome_is_not_read_after_a_resend_left_no_time_for_it(harness: Harness) -> None:
    """A compare-and-set whose outcome was unknown is sent once more only if that can end before
    the caller's deadline; its refusal was then followed by a SERIAL read whatever time was left,
    so an ack could be answered after its caller had given up (and retried elsewhere). The read
    is made only if it too can end in time; else the caller hears `unavailable` while it still
    listens (found by review, 2026-12-07)."""
    from bridge.domain.deadlines import request_deadline_ms
    from bridge.domain.errors import Unavailable
    from bridge.storage.errors import UnknownOutcome

    h = harness
    if not hasattr(h.store, "_lease_write"):
        pytest.skip("unknown outcomes are the Cassandra adapter's")
    await h.add("v")
    got = await h.fetch("W", ttr_ms=60_000)
    assert got is not None
    timeout_ms = 1_000
    h.store.request_timeout_ms = timeout_ms
    real, sent = h.store._lease_write, []

    async def lease_write(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        if name.startswith("lease.complete"):
            if sent.count(name) == 1:
                await real(tid, name, *args, **kwargs)  # applied, its reply lost
                raise UnknownOutcome("the completion's reply timed out (injected)")
            h.clock.advance(timeout_ms)  # the resend takes its whole timeout (refused: applied already)
        return await real(tid, name, *args, **kwargs)

    h.store._lease_write = lease_write
    deadline = request_deadline_ms.set(h.clock.now_ms() + 2 * timeout_ms + 400)  # room for one more, not two
    try:
        with pytest.raises(Unavailable):
            await h.ack("W", got)
    finally:
        request_deadline_ms.reset(deadline)
        h.store._lease_write = real
        h.store.request_timeout_ms = None
    completions = [n for n in sent if n.startswith("lease.complete")]
    assert len(completions) == 2 and len(set(completions)) == 1, completions  # the first copy and its resend


async def test_a_claim_whose_count_cannot_read_the_lease_still_hands_the_task_out_and_counts_it(
    harness: Harness,
) -> None:
    """A redriven task found by a scan (hints off, or reconciliation) is counted by reading its
    lease (was it redriven?). That read failing (Cassandra struggling) raised out of the claim
    that had applied: the fetch was answered `unavailable`, its deadline's timer was never set,
    and the task was never counted out of `ready` (its retry got it through the worker's pointer,
    which counts nothing): stats showed a ready task that did not exist, and one in flight fewer
    once it completed (found by review, 2026-12-07)."""
    from bridge.domain.counting import QueueCounts
    from bridge.storage.errors import StorageUnavailable

    h = harness
    counts = h.queue.ctx.counts = QueueCounts()
    task_id = await _add_limited(h, token=False)
    got = await h.fetch("W", ttr_ms=60_000)
    assert got is not None and got.task_id == task_id
    assert await h.queue.fail(OWNER, _fail(h, "W", task_id, got.epoch)) is not None
    h.clock.advance(1)
    assert await h.queue.redrive(OWNER, h.service, [uuid.UUID(task_id)]) == 1
    real, real_claim, failures, failed = h.store.leases_of, h.store.claim_expired, [], []

    async def claim_expired(*args: Any, **kwargs: Any) -> Any:
        res = await real_claim(*args, **kwargs)
        if res.applied and not failed:
            failures.append(1)  # the next lease read (the count's) fails
        return res

    async def leases_of(q: QueueKey, task_ids: Any) -> Any:
        if failures:
            failed.append(failures.pop())
            raise StorageUnavailable("the lease read timed out (injected)")
        return await real(q, task_ids)

    h.store.leases_of = leases_of  # type: ignore[method-assign]
    h.store.claim_expired = claim_expired  # type: ignore[method-assign]
    try:
        again = await h.fetch_until("W2", step_ms=250, limit_ms=5_000, ttr_ms=60_000)
    finally:
        h.store.leases_of = real  # type: ignore[method-assign]
        h.store.claim_expired = real_claim  # type: ignore[method-assign]
    assert again.task_id == task_id and failed, "the failing read was made"
    assert await h.ack("W2", again) is True
    await h.queue.drain_background(5.0)
    assert await counts.flush(h.store) == 0
    [stats] = await h.queue.stats(OWNER, h.service)
    assert (stats.ready, stats.in_flight, stats.parked) == (0, 0, 0)


async def test_a_slow_claim_whose_deadline_cannot_be_filed_again_is_still_handed_out_and_counted(
    harness: Harness,
) -> None:
    """A claim that took half its lease to land files its deadline again (the scheduler may have
    met the one written ahead already). That write failing raised out of the claim that had
    applied: the fetch answered `unavailable`, the claim never counted (its retry got the task
    through the pointer, which counts nothing) and no timer set (a re-review, 2026-12-07)."""
    from bridge.domain.counting import QueueCounts
    from bridge.storage.errors import StorageUnavailable

    h = harness
    counts = h.queue.ctx.counts = QueueCounts()
    task_id = await h.add("v")
    ttr = 2_000
    real_claim, real_watch, armed, failed = h.store.claim_new, h.store.watch_expiry, [], []

    async def claim_new(*args: Any, **kwargs: Any) -> Any:
        res = await real_claim(*args, **kwargs)
        if res.applied:
            h.clock.advance(ttr - 200)  # landed late: near its deadline
            armed.append(1)
        return res

    async def watch_expiry(*args: Any, **kwargs: Any) -> Any:
        if armed:
            failed.append(armed.pop())
            raise StorageUnavailable("the deadline's write timed out (injected)")
        return await real_watch(*args, **kwargs)

    h.store.claim_new = claim_new  # type: ignore[method-assign]
    h.store.watch_expiry = watch_expiry  # type: ignore[method-assign]
    try:
        got = await h.fetch("W", ttr_ms=ttr)
    finally:
        h.store.claim_new = real_claim  # type: ignore[method-assign]
        h.store.watch_expiry = real_watch  # type: ignore[method-assign]
    assert got is not None and got.task_id == task_id and failed, "the failing refile was made"
    await h.queue.drain_background(5.0)
    assert h.metrics.total("claims_refiled") == 1, "its deadline filed again in the background"
    assert await h.ack("W", got) is True
    await h.queue.drain_background(5.0)
    assert await counts.flush(h.store) == 0
    [stats] = await h.queue.stats(OWNER, h.service)
    assert (stats.ready, stats.in_flight) == (0, 0)


# -- a redrive whose unpark lands late is still met by a deadline (review round 16) -----------------
async def _parked(h: Harness) -> str:
    """A task of delivery limit 1 whose lease ran out: parked by the scheduler."""
    task_id = await _add_limited(h, token=False)
    got = await h.fetch("W", ttr_ms=500)
    assert got is not None and got.task_id == task_id
    for _ in range(20):
        await h.advance(250)
        lease = await _lease(h, task_id)
        if lease.state is LeaseState.PARKED:
            return task_id
    raise AssertionError("the task was not parked")


@pytest.mark.parametrize("outcome", ["slow", "unknown"])
async def test_a_redrive_whose_unpark_lands_after_both_passes_of_its_deadline_comes_back(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, outcome: str
) -> None:
    """The redrive files the task's deadline one bucket ahead, then unparks it. An unpark whose
    Paxos round took longer than the scheduler's two passes over that bucket (both read the task
    parked and let the entry go), its bridge's own timer failing (the bridge died, its clock gate
    closed): leased to nobody, with no deadline, no ready entry and no parked row, until its TTL
    (found by review, 2026-12-07). A slow unpark's deadline is filed again, in a bucket to come;
    so is one whose outcome stayed unknown (answered `unavailable`: the operator's retry found
    the task not parked, and skipped it)."""
    from bridge.domain.errors import Unavailable

    h = harness
    task_id = await _parked(h)
    target = [uuid.UUID(task_id)]
    monkeypatch.setattr(h.queue.lifecycle, "soon", lambda watch, due: None)
    real = h.store.unpark

    async def late(*args: Any) -> Any:
        for _ in range(30):  # 7.5 s of clock time: both passes (the second late_ms, 5 s, after)
            await h.advance(250)
        res = await real(*args)
        if outcome == "unknown":
            raise Unavailable("the unpark's outcome is unknown")
        return res

    monkeypatch.setattr(h.store, "unpark", late)
    h.clock.advance(1)
    if outcome == "slow":
        assert await h.queue.redrive(OWNER, h.service, target) == 1
    else:
        with pytest.raises(Unavailable):
            await h.queue.redrive(OWNER, h.service, target)
        monkeypatch.setattr(h.store, "unpark", real)
        assert await h.queue.redrive(OWNER, h.service, target) == 0  # the retry: not parked
    await h.queue.drain_background(5.0)
    again = await h.fetch_until("W2", step_ms=250, limit_ms=10_000, ttr_ms=500)
    assert again.task_id == task_id


async def test_an_unpark_a_plain_read_does_not_show_yet_is_read_serial_at_the_second_pass(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unpark Paxos accepted but did not commit (its coordinator cut short) is invisible to a
    plain read until the next round on the partition completes it. Both passes read the task
    parked and let the entry go; the second pass now reads it SERIAL, which completes the round."""
    h = harness
    task_id = await _parked(h)
    target = uuid.UUID(task_id)
    monkeypatch.setattr(h.queue.lifecycle, "soon", lambda watch, due: None)
    parked_lease = await _lease(h, task_id)
    committed = False
    real_lease, real_leases = h.store.lease, h.store.leases_of

    async def lease(q: QueueKey, task: uuid.UUID, *, serial: bool) -> Any:
        nonlocal committed
        if task == target and not committed:
            if not serial:
                return parked_lease  # the accepted round not seen by a plain read
            committed = True
        return await real_lease(q, task, serial=serial)

    async def leases_of(q: QueueKey, tasks: Any) -> Any:
        found = await real_leases(q, tasks)
        if not committed and target in found:
            found = {**found, target: parked_lease}
        return found

    monkeypatch.setattr(h.store, "lease", lease)
    monkeypatch.setattr(h.store, "leases_of", leases_of)
    h.clock.advance(1)
    assert await h.queue.redrive(OWNER, h.service, [target]) == 1
    again = await h.fetch_until("W2", step_ms=250, limit_ms=10_000, ttr_ms=500)
    assert again.task_id == task_id
    assert committed, "the task came back without the SERIAL read"


async def test_a_task_redriven_its_limit_of_times_stays_parked(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each park and each unpark adds an id to the lease's ``park_ids``, which nothing removes: a
    task failed and redriven in a loop grew it without bound (read with the lease by every claim,
    ack and scheduler pass). Past REDRIVES_PER_TASK_MAX redrives the task stays parked, listed."""
    from bridge.domain import lifecycle

    monkeypatch.setattr(lifecycle, "REDRIVES_PER_TASK_MAX", 2)
    h = harness
    task_id = await _add_limited(h, token=False)
    target = uuid.UUID(task_id)
    for cycle in range(3):
        got = await h.fetch_until(f"W{cycle}", step_ms=250, limit_ms=5_000, ttr_ms=60_000)
        assert got.task_id == task_id
        outcome = await h.queue.fail(OWNER, _fail(h, f"W{cycle}", task_id, got.epoch))
        assert outcome is not None and outcome.parked
        h.clock.advance(1)
        redriven = await h.queue.redrive(OWNER, h.service, [target])
        assert redriven == (1 if cycle < 2 else 0), f"cycle {cycle}: {redriven}"
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.PARKED and len(lease.park_ids) == 5
    assert [p.task_id for p in await h.queue.parked(OWNER, h.service, 100)] == [target]
    h.clock.advance(1)
    assert await h.queue.redrive(OWNER, h.service, None) == 0  # `redrive all` leaves it too


async def test_a_kill_whose_outcome_was_unknown_is_settled_and_counted(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task whose stored value does not open is killed (dead-lettered) by the fetch that claimed
    it. The kill's compare-and-set was the one lease write not settled after an unknown outcome:
    it raised, the fetch was answered `unavailable`, and the task stayed counted in flight until its
    TTL, no dead letter counted (found by review, 2026-12-07). It is resent and read as a
    completion's is."""
    import dataclasses

    from bridge.domain.counting import QueueCounts
    from bridge.storage.errors import UnknownOutcome

    h = harness
    if not hasattr(h.store, "_lease_write"):
        pytest.skip("unknown outcomes are the Cassandra adapter's")
    counts = h.queue.ctx.counts = QueueCounts()
    task_id = await h.add("to be tampered with")
    real_payload = h.store.payload

    async def tampered(q: QueueKey, tid: uuid.UUID) -> Any:
        p = await real_payload(q, tid)
        if p is None or str(tid) != task_id:
            return p
        flipped = bytes([p.value.ciphertext[0] ^ 1]) + p.value.ciphertext[1:]
        return dataclasses.replace(p, value=dataclasses.replace(p.value, ciphertext=flipped))

    monkeypatch.setattr(h.store, "payload", tampered)
    real_write, sent = h.store._lease_write, []

    async def lease_write(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        if name == "lease.kill" and sent.count(name) == 1:
            await real_write(tid, name, *args, **kwargs)  # applied, its reply lost
            raise UnknownOutcome("the kill's reply timed out (injected)")
        return await real_write(tid, name, *args, **kwargs)

    monkeypatch.setattr(h.store, "_lease_write", lease_write)
    from bridge.domain.errors import IntegrityError

    with pytest.raises(IntegrityError):  # the worker is told, as for any dead-lettered task (not `unavailable`)
        await h.fetch("W")
    assert sent.count("lease.kill") == 2, sent
    lease = await _lease(h, task_id)
    assert lease.state is LeaseState.DEAD
    assert h.metrics.total("tasks_dead_lettered", reason="integrity") == 1
    await h.queue.drain_background(5.0)
    await counts.flush(h.store)
    [stats] = await h.queue.stats(OWNER, h.service)
    assert (stats.ready, stats.in_flight) == (0, 0), stats


async def test_a_completed_or_cancelled_lease_says_when_on_both_stores(harness: Harness) -> None:
    """The console's `completedAt` (a task's info) read null on the in-memory store, which did not
    keep the time of a completion or a cancel as Cassandra's statements do; nor did its unpark
    name its id in `claim_id` (found by review, 2026-12-07): a rule that read either would pass
    on one store and fail on the other."""
    h = harness
    acked = await h.add("acked")
    got = await h.fetch("W")
    assert got is not None and got.task_id == acked
    h.clock.advance(5)
    done_at = h.clock.now_ms()
    assert await h.ack("W", got) is True
    lease = await _lease(h, acked)
    assert lease.state is LeaseState.DONE and lease.completed_at_ms == done_at
    cancelled = await h.add("cancelled")
    h.clock.advance(5)
    cancel_at = h.clock.now_ms()
    assert await h.queue.cancel(OWNER, h.service, uuid.UUID(cancelled)) is True
    lease = await _lease(h, cancelled)
    assert lease.state is LeaseState.CANCELLED and lease.completed_at_ms == cancel_at
    parked = await _parked(h)
    h.clock.advance(1)
    assert await h.queue.redrive(OWNER, h.service, [uuid.UUID(parked)]) == 1
    lease = await _lease(h, parked)
    assert lease.claim_id is not None and lease.claim_id in lease.park_ids


async def test_a_claims_deadline_on_a_task_parked_since_costs_no_serial_read(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second pass reads a lease still parked at its entry's epoch SERIAL, for an unpark Paxos
    accepted and did not commit; it did so for every parked task's claim deadline too (a task
    failed at its limit leaves its claim's entry in the wheel): a Paxos read per parked task on the
    duty holder (the re-review, 2026-12-07). Only entries filed past their deadline's bucket (a
    redrive's) are read SERIAL."""
    h = harness
    task_id = await _add_limited(h, token=False)
    got = await h.fetch("W", ttr_ms=5_000)
    assert got is not None and got.task_id == task_id
    for _ in range(16):  # the holder's look-ahead reads the deadline's bucket while the task is held
        await h.advance(250)
    outcome = await h.queue.fail(OWNER, _fail(h, "W", task_id, got.epoch))
    assert outcome is not None and outcome.parked
    serial_reads: list[uuid.UUID] = []
    real = h.store.lease

    async def spied(q: QueueKey, tid: uuid.UUID, *, serial: bool = True) -> Any:
        if serial:
            serial_reads.append(tid)
        return await real(q, tid, serial=serial)

    monkeypatch.setattr(h.store, "lease", spied)
    for _ in range(60):  # past the claim's deadline and both passes over its bucket (late_ms, 5 s)
        await h.advance(250)
    assert uuid.UUID(task_id) not in serial_reads, "a SERIAL read for a claim's deadline on a parked task"
    assert (await _lease(h, task_id)).state is LeaseState.PARKED


async def test_a_claim_whose_task_read_failed_is_not_made(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task's row is read beside the claim's write-ahead, and the claim records the task's end
    of life that the row tells. Made whatever the read did, a claim beside a failed read recorded
    this bridge's own BRIDGE_TASK_TTL instead, and every later write of the lease followed it: in
    a fleet changing its TTL, a lease that ended before its task or after (found by review,
    2026-12-07). No claim now: the fetch is answered `unavailable`, and the retry claims it."""
    from bridge.domain.errors import Unavailable
    from bridge.storage.errors import StorageUnavailable

    h = harness
    task_id = await h.add("v")
    real = h.store.payload
    failed: list[uuid.UUID] = []

    async def payload(q: QueueKey, tid: uuid.UUID) -> Any:
        if not failed:
            failed.append(tid)
            raise StorageUnavailable("the task's read timed out (injected)")
        return await real(q, tid)

    monkeypatch.setattr(h.store, "payload", payload)
    with pytest.raises(Unavailable):
        await h.fetch("W")
    assert failed == [uuid.UUID(task_id)]
    assert await _lease(h, task_id) is None, "claimed beside a failed read"
    got = await h.fetch("W")
    assert got is not None and got.task_id == task_id and got.epoch == 1
    assert await h.ack("W", got) is True


async def test_a_first_delivery_whose_claim_stayed_uncertain_is_counted_delivered(harness: Harness) -> None:
    """A claim whose outcome stayed unknown (its resend too) is answered `unavailable`; the worker's
    retry gets the task through its pointer, counted as a resend. Landed, the claim was counted in
    the queue's counts but never in tasks_delivered: first deliveries went missing from the metric
    in an LWT-timeout storm (found by review, 2026-12-07)."""
    from bridge.domain.errors import Unavailable
    from bridge.storage.errors import UnknownOutcome

    h = harness
    if not hasattr(h.store, "_lease_insert"):
        pytest.skip("unknown outcomes are the Cassandra adapter's")
    task_id = await h.add("v")
    real, sent = h.store._lease_insert, []

    async def lease_insert(tid: uuid.UUID, name: str, *args: Any, **kwargs: Any) -> Any:
        sent.append(name)
        if name == "lease.claim_new" and sent.count(name) == 1:
            await real(tid, name, *args, **kwargs)  # applied, its reply lost
            raise UnknownOutcome("the claim's reply timed out (injected)")
        if name == "lease.claim_new" and sent.count(name) == 2:
            raise UnknownOutcome("its resend's reply timed out too (injected)")
        return await real(tid, name, *args, **kwargs)

    h.store._lease_insert = lease_insert
    try:
        with pytest.raises(Unavailable):
            await h.fetch("W")
    finally:
        h.store._lease_insert = real
    await h.queue.drain_background(10.0)
    assert h.metrics.total("tasks_delivered", kind="claim") == 1
    got = await h.fetch("W")  # the retry: through the worker's pointer
    assert got is not None and got.task_id == task_id
    assert h.metrics.total("tasks_delivered", kind="claim") == 1, "counted once"


# -- the two parked indexes: a task listed once, whatever rows it has --------------------------------
async def test_a_parked_task_is_listed_counted_and_redriven_through_its_own_park_row_alone(harness: Harness) -> None:
    """A parked task whose ``parked`` row is gone (the last-write-wins loss of that one-row-per-task
    index, which ``tests/integration/test_parked_index_order.py`` forces with two bridge clocks)
    and which has, before its own park's row in ``parks``, the row of an earlier park that was
    refused (its delete failed): listed once, also one task at a time (the refused park's row read
    alone on the first page), counted once by stats, found by ``redrive all``; the refused park's
    row is removed by the listing, and the redrive removes the park's own."""
    h = harness
    q = QueueKey(OWNER, h.service)
    task_id = await _add_limited(h, token=False)
    got = await h.fetch("W", ttr_ms=5_000)
    assert got is not None and got.task_id == task_id
    tid = uuid.UUID(task_id)
    refused = timeuuid_from_ms(h.clock.now_ms() - 10)  # ordered before the fail's park below
    await h.store.add_parked(q, ParkedEntry(tid, got.epoch, h.clock.now_ms() - 10, "delivery_limit", False, refused))
    failed = await h.queue.fail(OWNER, _fail(h, "W", task_id, got.epoch))
    assert failed is not None and failed.parked
    await h.store.remove_parked(q, tid)  # ``parked`` lost its row
    rows = await h.store.parked(q, 100)
    assert [(e.park_id == refused, e.in_parks) for e in rows] == [(True, True), (False, True)], rows
    for limit in (1, 100):
        listed = await h.queue.parked(OWNER, h.service, limit)
        assert [p.task_id for p in listed] == [tid], f"limit {limit}: {listed}"
    assert (await h.queue.stats(OWNER, h.service))[0].parked == 1
    await h.queue.drain_background(5.0)  # the listing removes the refused park's row
    assert [e.park_id == refused for e in await h.store.parked(q, 100)] == [False]
    h.clock.advance(1)  # ``redrive all`` takes the tasks parked before its now
    assert await h.queue.redrive(OWNER, h.service, None) == 1
    assert await h.store.parked(q, 100) == [], "the redrive left its park's row"


async def test_a_listing_keeps_the_parked_row_of_a_parked_task_that_names_an_earlier_park(harness: Harness) -> None:
    """The one-row-per-task ``parked`` row of a parked task can name an earlier park (a later
    park's insert lost to the earlier one's stamps): bridges before ``parks`` list the task by that
    row alone, so a listing keeps it while the task is parked (removed, the task vanished from
    their listings, stats and ``redrive all``; found by review, 2026-12-07)."""
    h = harness
    q = QueueKey(OWNER, h.service)
    task_id = await _add_limited(h, token=False)
    got = await h.fetch("W", ttr_ms=5_000)
    assert got is not None
    failed = await h.queue.fail(OWNER, _fail(h, "W", task_id, got.epoch))
    assert failed is not None and failed.parked
    tid, earlier = uuid.UUID(task_id), timeuuid_from_ms(h.clock.now_ms() - 10)
    # The ``parked`` row now names an earlier park, at an earlier epoch; that park's own row is gone.
    await h.store.add_parked(q, ParkedEntry(tid, got.epoch - 1, h.clock.now_ms() - 10, "failed", False, earlier))
    await h.store.remove_park(q, tid, earlier, h.clock.now_ms() - 10)
    assert [p.task_id for p in await h.queue.parked(OWNER, h.service, 100)] == [tid]
    await h.queue.drain_background(5.0)
    assert [(e.in_parks, e.park_id == earlier) for e in await h.store.parked(q, 100)] == [(True, False), (False, True)]
