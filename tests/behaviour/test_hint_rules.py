"""Dispatch by hints and long-poll fetch, on both stores (hints modelled in memory, as the broker
hands them out: each to one fetch, recovered ones first)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from bridge.domain.errors import KeysUnavailable
from bridge.domain.fetching import RequestAbandoned, Requester
from bridge.domain.models import AddCommand, FetchRequest, parse
from bridge.domain.records import LANE_FRESH, QueueKey
from bridge.domain.timeline import bucket_of_task, ms_of
from tests.conftest import wait_for
from tests.queue_harness import GRACE_MS, MARGIN_MS, OWNER, Harness

pytestmark = pytest.mark.anyio


async def test_bridges_sharing_a_queue_do_not_race_for_its_tasks(hinted: Harness) -> None:
    h = hinted
    second, _ = h.instance(h.clock)
    third, _ = h.instance(h.clock)
    ids = [await h.add(i) for i in range(30)]
    got = []

    async def worker(name: str, queue: object) -> None:
        while (d := await h.fetch(name, queue=queue)) is not None:  # type: ignore[arg-type]
            got.append(d.task_id)
            assert await h.ack(name, d, queue=queue) is True  # type: ignore[arg-type]

    await asyncio.gather(*(worker(f"w{i}", q) for i, q in enumerate([h.queue, second, third] * 3)))
    assert sorted(got) == sorted(ids)
    assert h.metrics.total("claim_conflicts") == 0, "no fetch tried a claim another fetch had won"
    assert h.metrics.total("claims", source="scan") == 0, "no scan of the ready index was needed"


async def test_a_waiting_fetch_gets_a_task_added_while_it_waits(hinted: Harness) -> None:
    h = hinted
    assert h.hints is not None
    waiting = asyncio.create_task(h.fetch("w", wait_ms=5_000))
    await wait_for(lambda: h.hints.waiting == 1, 10.0, what="the fetch waiting")  # type: ignore[union-attr]
    before = h.store_requests()
    await asyncio.sleep(0.2)  # seeing that nothing happens takes time: 0.2 s of waiting
    assert h.store_requests() == before, "a waiting fetch does not poll the store"
    task_id = await h.add("late")
    got = await asyncio.wait_for(waiting, 4.5)  # within its 5 s wait: the hint woke it
    assert got is not None and got.task_id == task_id


async def test_a_waiting_fetch_that_meets_a_task_it_cannot_open_waits_on_for_the_next(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-poll whose hint named a task sealed with a key this bridge lacks: the claim is let
    go, and the fetch answered ``unavailable`` at once, the worker backing off while the healthy
    task added next waited (found by re-review, 2026-12-07). It waits on, as a short fetch goes on
    to the next task, and gets that one."""
    from bridge.crypto.errors import UnknownKey

    h = hinted
    assert h.hints is not None
    key_by_id, calls = h.keys.key_by_id, [0]

    async def first_missing(owner: str, key_id: str) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise UnknownKey(f"owner {owner!r} has no key {key_id!r}")
        return await key_by_id(owner, key_id)

    monkeypatch.setattr(h.keys, "key_by_id", first_missing)
    waiting = asyncio.create_task(h.fetch("w", wait_ms=10_000))
    await wait_for(lambda: h.hints.waiting == 1, 10.0, what="the fetch waiting")  # type: ignore[union-attr]
    await h.add("its key is not here")
    await wait_for(lambda: calls[0] == 1 or waiting.done(), 5.0, what="the first task claimed")
    healthy = await h.add("healthy")
    got = await asyncio.wait_for(waiting, 9.0)
    assert got is not None and got.task_id == healthy


async def test_a_waiting_fetch_answers_null_when_its_wait_ends(hinted: Harness) -> None:
    h = hinted
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await h.fetch("w", wait_ms=150) is None
    assert 0.14 <= loop.time() - start < 5.0  # its 150 ms, plus a loaded machine's delays


async def test_shutdown_answers_waiting_fetches_at_once(hinted: Harness) -> None:
    h = hinted
    assert h.hints is not None
    waiting = asyncio.create_task(h.fetch("w", wait_ms=20_000))
    await wait_for(lambda: h.hints.waiting == 1, 10.0, what="the fetch waiting")  # type: ignore[union-attr]
    h.hints.close()
    assert await asyncio.wait_for(waiting, 5.0) is None  # not its 20 s


async def test_tasks_whose_hints_were_lost_are_found_by_reconciliation(hinted: Harness) -> None:
    h = hinted
    assert h.hints is not None
    ids = [await h.add(i) for i in range(3)]
    assert h.hints.drop(QueueKey(OWNER, h.service)) == 3  # a broker restart
    assert await h.fetch("w") is None, "younger than the grace period: left to their hints"
    await h.advance(GRACE_MS + 5_000)  # past the grace period and the quiet interval after an empty scan
    got = []
    for _ in ids:
        d = await h.fetch("w")
        assert d is not None
        got.append(d.task_id)
        assert await h.ack("w", d) is True
    assert got == ids
    assert await h.fetch("w") is None


async def test_a_recovered_task_is_hinted_to_a_waiting_fetch(hinted: Harness) -> None:
    h = hinted
    task_id = await h.add("v")
    lost = await h.fetch("crashed", ttr_ms=500)
    assert lost is not None and lost.task_id == task_id
    waiting = asyncio.create_task(h.fetch("w", wait_ms=5_000))
    await h.advance(500 + MARGIN_MS + 300, ticks=2)  # the scheduler re-exposes it and hints it
    got = await asyncio.wait_for(waiting, 4.5)  # within its 5 s wait
    assert got is not None and got.task_id == task_id and got.epoch == 2
    assert await h.ack("crashed", lost) is False


async def test_an_alarm_about_lost_hints_rescans_at_once(hinted: Harness) -> None:
    """After a broker reconnect (or a failed hint publish) a queue is scanned at its next fetch,
    without waiting out the quiet interval that follows an empty scan."""
    h = hinted
    assert h.hints is not None
    await h.advance(GRACE_MS + 1_000)
    assert await h.fetch("w") is None  # an empty scan: the queue goes quiet for the interval
    task_id = await h.add("v")
    h.hints.drop(QueueKey(OWNER, h.service))  # ... and then the broker restarts
    await h.advance(GRACE_MS + 1_000)
    assert await h.fetch("w") is None, "still within the quiet interval, no alarm yet"
    h.reconciles[0].alarm(h.clock.now_ms())  # what the bridge's hints transport does on a reconnect
    got = await h.fetch("w")
    assert got is not None and got.task_id == task_id


async def test_tasks_whose_hints_an_alarm_reports_lost_are_taken_at_once(hinted: Harness) -> None:
    """A broker restart loses the hints of adds that were just answered: the next fetch takes
    those tasks at once instead of answering null until they are older than the grace."""
    h = hinted
    assert h.hints is not None
    ids = [await h.add(i) for i in range(3)]
    h.hints.drop(QueueKey(OWNER, h.service))  # the publishes failed: the tasks are stored, hintless
    h.reconciles[0].alarm(h.clock.now_ms())  # ... which the transport reports
    got = [await h.fetch(f"w{i}") for i in range(3)]
    assert [d.task_id if d else None for d in got] == ids, "no waiting out the grace"
    h.clock.advance(1)
    await h.add("after the alarm")
    h.hints.drop(QueueKey(OWNER, h.service))  # (lost too, but no alarm says so yet)
    assert await h.fetch("w9") is None, "one placed after the alarm is left to its hint for the grace"


async def test_stats_find_the_oldest_ready_task_behind_tasks_taken_through_hints(hinted: Harness) -> None:
    """Stats read 64 entries after each lane's cursor for the oldest ready task, and with hints
    the cursor moves only in reconciliation scans and purges: once 64 tasks had been handed out
    through hints, those 64 were all taken and ``oldest_ready_age_ms`` was None under a backlog.
    Stats now page on past taken entries (a bounded number) and move the cursor past them."""
    from bridge.domain.counting import QueueCounts

    h = hinted
    counts = QueueCounts()
    h.queue.ctx.counts = counts
    q = QueueKey(OWNER, h.service)
    ids = [await h.add(i) for i in range(100)]
    for _ in range(70):
        got = await h.fetch("w")
        assert got is not None and await h.ack("w", got) is True
    await h.queue.drain_background(5.0)  # the claimed marks, written after each claim
    h.clock.advance(MARGIN_MS + 1_000)  # past the settle window: the cursor may pass them
    assert await counts.flush(h.store) == 0
    assert await h.store.cursor(q, LANE_FRESH) is None, "no scan or purge moved the cursor"
    [stats] = await h.queue.stats(OWNER, h.service)
    assert stats.ready == 30
    assert stats.oldest_ready_age_ms == h.clock.now_ms() - ms_of(uuid.UUID(ids[70]))
    assert await h.store.cursor(q, LANE_FRESH) == (bucket_of_task(uuid.UUID(ids[69])), uuid.UUID(ids[69]))


async def _cancelled(h: Harness, n: int, priority: int = 0) -> None:
    """``n`` tasks added and cancelled: their hints stay in the hint queue (a broker's message
    cannot be taken back), naming finished tasks."""
    for i in range(n):
        body = {"serviceId": h.service, "value": f"gone-{i}", "priority": priority}
        task_id = await h.queue.add(OWNER, parse(AddCommand, body), message_id=None, traceparent=None)
        h.clock.advance(1)
        assert await h.queue.cancel(OWNER, h.service, uuid.UUID(task_id)) is True


async def test_hints_of_cancelled_tasks_do_not_use_up_a_fetchs_claim_attempts(hinted: Harness) -> None:
    """A fetch tried 8 hints (MAX_CLAIM_ATTEMPTS), then scanned. Eight cancelled tasks' hints used
    them up, and the scan left the ready task behind them to its hint (younger than the grace):
    the fetch answered null while a task was ready. A hint whose refused claim shows the task
    finished no longer counts as a lost claim."""
    from bridge.domain.fetching import MAX_CLAIM_ATTEMPTS

    h = hinted
    await _cancelled(h, MAX_CLAIM_ATTEMPTS)
    ready = await h.add("ready")
    got = await h.fetch("w")
    assert got is not None and got.task_id == ready, "fetch answered null while a task was ready"


async def test_hints_of_cancelled_tasks_do_not_send_a_fetch_to_a_scan_that_ignores_priority(
    hinted: Harness,
) -> None:
    """The same, with the ready tasks older than the grace: the scan the fetch fell back to takes
    the oldest ready task whatever its priority, and a priority-0 task was handed out before a
    ready priority-2 one."""
    from bridge.domain.fetching import MAX_CLAIM_ATTEMPTS

    h = hinted
    low = await h.add("low")
    body = {"serviceId": h.service, "value": "mid", "priority": 2}
    mid = await h.queue.add(OWNER, parse(AddCommand, body), message_id=None, traceparent=None)
    h.clock.advance(1)
    await _cancelled(h, MAX_CLAIM_ATTEMPTS, priority=3)
    h.clock.advance(GRACE_MS + 500)  # what a busy queue's backlog is: older than the grace
    got = await h.fetch("w")
    assert got is not None and got.task_id == mid, f"handed the priority-0 task {low} before {mid}"


async def test_a_fetch_behind_a_long_run_of_cancelled_tasks_hints_is_bounded(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale hints do not count as lost claims, but each still costs a write-ahead and a refused
    claim: a fetch stops after MAX_STALE_HINTS of them (made small here) and answers; the next
    fetches take the rest, and the task behind them."""
    import bridge.domain.fetching as fetching

    monkeypatch.setattr(fetching, "MAX_STALE_HINTS", 4)
    h = hinted
    await _cancelled(h, 10)
    ready = await h.add("ready")
    got = [await h.fetch("w") for _ in range(3)]
    assert got[0] is None, "the first fetch stopped after 4 stale hints (the task is younger than the grace)"
    assert [d.task_id for d in got if d is not None] == [ready]


async def test_a_lost_hint_behind_a_long_run_of_tasks_taken_through_hints_is_found_at_the_next_fetch(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With hints on, only reconciliation scans move a queue's scan position, and a scan continued
    past its first refill could not move it; a fetch reads four refills at most, and a scan that
    stopped on that budget was taken for an empty one (the queue went quiet for the interval). So
    a queue that took more than a chain's entries (4,096) per interval through hints fell behind
    for good: a task whose hint was lost waited an interval per 4,096 entries (45 minutes after an
    hour at 100 tasks/s), and every idle scan re-read the claimed history. Here the budget is made
    small (64 entries a fetch) and 100 tasks are taken through hints. Found by review, 2026-12-05."""
    from bridge.domain import dispatch

    monkeypatch.setattr(dispatch, "SCAN_LIMIT", 8)
    monkeypatch.setattr(dispatch, "MAX_PAGES", 2)  # 4 refills of 2 pages of 8: 64 entries a fetch
    h = hinted
    assert h.hints is not None
    for i in range(100):
        await h.add(i)
        d = await h.fetch("w")
        assert d is not None and await h.ack("w", d) is True
    await h.queue.drain_background(5.0)  # the index marks of the claims
    lost = await h.add("behind them")
    assert h.hints.drop(QueueKey(OWNER, h.service)) == 1  # its hint lost (a bridge killed, a broker restart)
    await h.advance(GRACE_MS + 1_000)
    got = await h.fetch("w")
    if got is None:  # the first scan stopped on its budget: not an empty queue
        got = await h.fetch("w")
    assert got is not None and got.task_id == lost, "found at the next fetch, not an interval later"
    assert await h.ack("w", got) is True
    # The scan position moved over the run: the next scan does not read it again.
    await h.advance(6_000)  # past the quiet interval after an empty scan
    before = h.store_requests()
    assert await h.fetch("w") is None
    # The persisted position read, each lane's buckets and first page: the run is 13 pages.
    assert h.store_requests() - before <= 8, f"{h.store_requests() - before} store calls for an empty scan"


class _Handed:
    """A hint as ``AmqpHints.hand_here`` gives it to a waiting fetch of the adding bridge."""

    def __init__(self, hint: Any) -> None:
        self.hint = hint

    async def done(self) -> None:
        return None

    async def retry(self) -> None:
        return None


class _OneHintHandedHere:
    """Hints that hand one add's hint to the next fetch, before the add's write is acknowledged."""

    def __init__(self, hint: Any) -> None:
        self.hint: Any = hint

    async def take(self, q: QueueKey, wait_ms: int) -> _Handed | None:
        hint, self.hint = self.hint, None
        return _Handed(hint) if hint is not None else None

    async def offer(self, q: QueueKey, hint: Any) -> None:
        return None

    def hand_here(self, q: QueueKey, hint: Any) -> bool:
        return False

    async def discard(self, q: QueueKey) -> int:
        return 0


async def test_a_pointer_naming_a_task_never_stored_claims_nothing(harness: Harness) -> None:
    """A fetch handed an add's hint in the process writes its pointer ahead of the add's write; the
    bridge killed -9 in between never stores that task (the broker redelivers the add, stored under
    a new id). The worker's retry on another bridge read the pointer, found no lease and claimed
    the id: a lease on a task that does not exist, for its TTL, re-exposed and claimed at each
    lease's end and parked at the limit, a phantom in every listing. Found by review, 2026-12-05."""
    h = harness
    q = QueueKey(OWNER, h.service)
    pending = await h.queue.prepare_add(
        OWNER, parse(AddCommand, {"serviceId": h.service, "value": "v"}), traceparent=None
    )
    stored: asyncio.Future[bool] = asyncio.get_running_loop().create_future()  # the add's write: never acknowledged
    h.queue._fetcher.hints = _OneHintHandedHere(pending.hint(stored))  # type: ignore[assignment]

    async def written_ahead() -> bool:
        return (await h.store.worker(q, "w")).pointer is not None

    fetch = asyncio.create_task(h.fetch("w", ttr_ms=2_000, fresh=True))
    await wait_for(written_ahead, 5.0, interval=0.001, what="the fetch's pointer written ahead")
    fetch.cancel()  # the bridge killed -9: the add's write never lands
    with pytest.raises(asyncio.CancelledError):
        await fetch
    again = await h.add("the redelivered add, under its own id")
    other, _ = h.instance(h.clock)
    got = await h.fetch("w", ttr_ms=2_000, queue=other)  # the worker's retry (not fresh), on another bridge
    assert got is not None and got.task_id == again
    assert not await h.store.task_exists(q, pending.task_id)
    assert await h.store.lease(q, pending.task_id) is None, "a lease on a task that was never stored"


async def test_a_task_whose_hint_was_lost_is_found_while_hints_keep_coming(hinted: Harness) -> None:
    """Reconciliation scanned only when a fetch found no hint: on a queue whose hint queue never
    ran dry (adds keeping pace with the workers), a task whose hint was lost (a bridge killed
    between its write and its hint, a broker restart) waited until the backlog drained, up to
    its TTL. A queue due for reconciliation is scanned before its hints are taken."""
    h = hinted
    assert h.hints is not None
    lost = await h.add("lost")
    assert h.hints.drop(QueueKey(OWNER, h.service)) == 1
    backlog = [await h.add(f"b{i}") for i in range(5)]  # hints keep coming from here on
    seen = []
    for i in range(60):  # 30 s: an add and a fetch every half second
        await h.add(f"n{i}")
        got = await h.fetch("w")
        assert got is not None, "a hint was always there"
        seen.append(got.task_id)
        assert await h.ack("w", got) is True
        if got.task_id == lost:
            break
        await h.advance(500)
    assert lost in seen, f"never handed out in {len(seen)} fetches while hints kept coming"
    assert seen.index(lost) <= (GRACE_MS + 5_000) // 500 + 2, "found within the grace and an interval"
    assert backlog[0] in seen


async def test_after_a_broker_restart_the_backlog_from_before_it_is_served_while_new_hints_come(
    hinted: Harness,
) -> None:
    """A broker restart loses every hint, and the bridge raises its alarm; but a queue was scanned
    only by fetches that found no hint, so under steady traffic (new adds bring new hints) the
    whole backlog from before the restart waited for the new one to drain. It is served first."""
    h = hinted
    assert h.hints is not None
    assert await h.fetch("w") is None  # the queue is known to this bridge
    before = [await h.add(f"old{i}") for i in range(5)]
    h.hints.drop(QueueKey(OWNER, h.service))  # the broker restarts ...
    h.reconciles[0].alarm(h.clock.now_ms())  # ... and the bridge's transport raises its alarm
    served = []
    for i in range(len(before) + 2):
        await h.add(f"new{i}")  # each with its hint
        got = await h.fetch("w")
        assert got is not None
        served.append(got.task_id)
        assert await h.ack("w", got) is True
    assert served[: len(before)] == before, "the backlog from before the restart, in order, first"


async def test_a_scan_spreading_its_picks_does_not_stop_at_a_young_pick(hinted: Harness) -> None:
    """A bridge that lost scan races picks at random among the first entries it read; a pick
    younger than the grace ended the scan, and the queue went quiet for an interval while older
    hintless tasks waited in the same buffer (36 times in 40 in the review's repro)."""
    from bridge.domain.records import LANE_FRESH

    h = hinted
    assert h.hints is not None
    q = QueueKey(OWNER, h.service)
    old = [await h.add(f"old{i}") for i in range(3)]
    h.hints.drop(q)  # their hints lost
    await h.advance(GRACE_MS + 1_000)  # older than the grace, in the same 10 s ready bucket
    for i in range(40):
        await h.add(f"young{i}")
    h.hints.drop(q)  # their hints went to other bridges' waiting fetches
    for _ in range(10):  # each round: this bridge has lost scan races lately
        h.queue.dispatcher._lane(q, LANE_FRESH).contention = 1.0
        got = await h.fetch("w", fresh=True)
        assert got is not None and got.task_id in old, "answered null with old hintless tasks ready"
        assert await h.ack("w", got) is True
        if not (remaining := [t for t in old if t != got.task_id]):
            break
        old = remaining


async def test_a_long_polls_own_claim_of_a_task_whose_life_ended_does_not_end_its_wait_unavailable(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long-poll claims a hinted task whose row reached its TTL as it was claimed (its payload
    read finds nothing): nothing to hand out, the wait goes on. Its own claim counted as a grant
    to another fetch of the worker, and at the next hint the wait resent that task, found no
    payload, and answered ``unavailable`` instead of the task the hint named (found by review,
    2026-12-06)."""
    h = hinted
    assert h.hints is not None
    waiting = asyncio.create_task(h.fetch("w", wait_ms=5_000))
    await wait_for(lambda: h.hints.waiting == 1, 10.0, what="the fetch waiting")  # type: ignore[union-attr]
    ended: set[uuid.UUID] = set()
    real_payload = h.store.payload

    async def payload(q: QueueKey, task_id: uuid.UUID) -> Any:
        return None if task_id in ended else await real_payload(q, task_id)

    monkeypatch.setattr(h.store, "payload", payload)
    # A token: its hint carries no value, the claim reads the payload (which is gone).
    gone = uuid.UUID(await h.add("its life ended", token={"processId": "p"}))
    ended.add(gone)
    await wait_for(lambda: h.metrics.total("deliveries_failed", reason="expired") >= 1, 10.0, what="the claim")
    await wait_for(lambda: h.hints.waiting == 1, 10.0, what="the fetch waiting again")  # type: ignore[union-attr]
    task_id = await h.add("next")
    got = await asyncio.wait_for(waiting, 4.5)
    assert got is not None and got.task_id == task_id


async def test_a_fetch_whose_caller_hangs_up_after_its_write_ahead_leaves_no_pointer_of_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch given up after its write-ahead (its client hung up, its worker gone, its deadline
    passed: ``_may_claim``) drops the pointer it wrote ahead. The drop was stamped after the
    pointer the fetch had read, not after the one it wrote (``max(now, last + 2)``, later), and
    lost to it: the worker's pointer went on naming a task it was never handed (found by review)."""
    h = harness
    q = QueueKey(OWNER, h.service)
    await h.add("first")
    first = await h.fetch("w")
    assert first is not None and await h.ack("w", first) is True  # the pointer names it, done
    h.clock.advance(1_000)  # the next write-ahead is stamped at the present, past that pointer's + 2
    task_id = await h.add("second")
    requester = Requester(lambda: True)
    real_write_ahead = h.store.write_ahead

    async def write_ahead(*args: Any, **kwargs: Any) -> None:
        await real_write_ahead(*args, **kwargs)
        requester.hang_up()  # the client hangs up as the pointer is written ahead of the claim

    monkeypatch.setattr(h.store, "write_ahead", write_ahead)
    req = parse(FetchRequest, {"serviceId": h.service, "workerId": "w"})
    with pytest.raises(RequestAbandoned):
        await h.queue.fetch(OWNER, req, still_wanted=requester)
    monkeypatch.setattr(h.store, "write_ahead", real_write_ahead)
    pointer = (await h.store.worker(q, "w")).pointer
    assert pointer is None or pointer.done, f"the pointer written ahead survived: {pointer}"
    assert await h.store.lease(q, uuid.UUID(task_id)) is None, "claimed for a caller that hung up"
    got = await h.fetch("w2")
    assert got is not None and got.task_id == task_id


async def test_a_hint_whose_claim_landed_before_its_key_lookup_failed_is_not_given_back(
    hinted: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim applied, then the task's key could not be looked up (the key server away): the
    task is let go, leased (it comes back, with a hint of its own, when its lease runs out). Its
    hint went back to the queue all the same (only a missing key marked it done): the next fetch
    paid a write-ahead and a claim the lease refused (found by review)."""
    h = hinted
    assert h.hints is not None
    q = QueueKey(OWNER, h.service)
    task_id = await h.add("sealed with a key nobody can look up now")

    async def by_id(owner: str, key_id: str) -> Any:
        raise KeysUnavailable("the key server is away (injected)")

    monkeypatch.setattr(h.queue.ctx.keys, "by_id", by_id)
    with pytest.raises(KeysUnavailable):
        await h.fetch("w")
    lease = await h.store.lease(q, uuid.UUID(task_id))
    assert lease is not None and lease.is_leased, "the claim applied"
    assert await h.hints.take(q, 0) is None, "the hint of a task claimed went back to the queue"
