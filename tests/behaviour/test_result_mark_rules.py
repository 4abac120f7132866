"""A result published whose mark could not be written (its bridge cut off from Cassandra just
after the broker confirmed it) is marked once Cassandra answers again, before the relay's
republish: a Cassandra blip on one bridge does not send the engine a second copy. Found by the
drill "a bridge cut off from Cassandra" (CI of stop 47: one result published twice)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.domain.records import OutboxEntry
from bridge.storage.errors import StorageNotSent
from tests.conftest import wait_for
from tests.queue_harness import Harness

pytestmark = pytest.mark.anyio


def _marks_failing_once(h: Harness, marks: list[OutboxEntry]) -> Any:
    """``mark_published`` whose first call fails unsent (the bridge cut off), the others land;
    every call recorded in ``marks``."""
    mark = h.store.mark_published

    async def cut_off_once(entry: OutboxEntry, *args: Any, **kwargs: Any) -> None:
        marks.append(entry)
        if len(marks) == 1:
            raise StorageNotSent("no host could take the request (cut off)")
        await mark(entry, *args, **kwargs)

    return cut_off_once


async def _owed_to_the_relay(h: Harness, pid: int) -> None:
    """A result whose publish beside its ack failed: the relay's to publish."""
    await h.scheduler.tick()
    await h.add("v", token={"pid": pid})
    got = await h.fetch("w")
    assert got is not None
    h.sink.down = True
    assert await h.ack("w", got) is True
    await h.queue.drain_background(5.0)
    h.sink.down = False


async def _next_holder_sweeps(h: Harness) -> None:
    """The duty moves to another bridge (a rolling deploy), whose relay sweeps for 40 s of clock."""
    _, next_holder = h.instance(h.clock)
    for _ in range(4):
        h.clock.advance(10_000)
        await next_holder.tick()


async def test_a_result_whose_mark_failed_once_is_not_published_again(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    marks: list[OutboxEntry] = []
    cut_off_once = _marks_failing_once(h, marks)
    monkeypatch.setattr(h.store, "mark_published", cut_off_once)
    await h.scheduler.tick()
    await h.add("v", token={"pid": 7})
    got = await h.fetch("w")
    assert got is not None
    assert await h.ack("w", got) is True
    await wait_for(lambda: len(h.sink.messages) == 1, 10.0, what="the result published beside the ack")
    await wait_for(lambda: len(marks) >= 2, 10.0, what="its mark tried again")
    await h.queue.drain_background(5.0)
    for _ in range(4):  # past the harness's republish delay (5 s) and both sweeps of its bucket
        await h.advance(10_000, ticks=2)
    assert len(h.sink.messages) == 1, "the engine was sent the result twice"


async def test_a_result_the_relay_published_whose_mark_failed_is_only_marked_next(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's own publish (the one beside the ack failed) whose mark failed: its next try
    marks it, and does not send it again (found by review: sent again a second later)."""
    h = harness
    marks: list[OutboxEntry] = []
    cut_off_once = _marks_failing_once(h, marks)
    await _owed_to_the_relay(h, 8)
    monkeypatch.setattr(h.store, "mark_published", cut_off_once)
    for _ in range(8):  # past the republish delay, the relay's publish, and its retries
        await h.advance(10_000, ticks=2)
    assert len(h.sink.messages) == 1, "the engine was sent the result again"
    assert len(marks) >= 2, "its mark was never tried again"


async def test_a_mark_is_tried_again_until_the_relay_would_read_its_bucket(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A result written at the start of its 10 s bucket is read by the relay's sweep 10 s + the
    republish delay (5 s here) later: a mark failing for 12 s lands before that, no second copy
    (found by review: the retries stopped the republish delay after the publish)."""
    import bridge.domain.relay as relay

    h = harness
    monkeypatch.setattr(relay, "MARK_RETRY_FIRST_S", 0.01)
    monkeypatch.setattr(relay, "MARK_RETRY_MAX_S", 0.01)
    await h.scheduler.tick()
    await h.add("v", token={"pid": 9})
    got = await h.fetch("w")
    assert got is not None
    h.clock.advance(10_000 - h.clock.now_ms() % 10_000)  # the start of an outbox bucket
    started = h.clock.now_ms()
    mark = h.store.mark_published
    tried_at: list[int] = []

    async def cut_off_for_12_s(entry: OutboxEntry, *args: Any, **kwargs: Any) -> None:
        tried_at.append(h.clock.now_ms())
        if h.clock.now_ms() < started + 12_000:
            raise StorageNotSent("no host could take the request (cut off)")
        await mark(entry, *args, **kwargs)

    monkeypatch.setattr(h.store, "mark_published", cut_off_for_12_s)
    assert await h.ack("w", got) is True
    await wait_for(lambda: len(h.sink.messages) == 1 and tried_at, 10.0, what="the result published, its mark tried")
    for second in range(1, 13):
        h.clock.advance(1_000)
        await wait_for(
            lambda s=second: any(t >= started + s * 1000 for t in tried_at), 10.0, what=f"a mark tried at {second} s"
        )
    await wait_for(lambda: tried_at[-1] >= started + 12_000, 10.0, what="the mark landed")
    await h.queue.drain_background(5.0)
    for _ in range(4):  # past the relay's sweep of the bucket
        await h.advance(10_000, ticks=2)
    assert len(h.sink.messages) == 1, "the engine was sent the result again"


async def test_a_stop_lets_the_relays_sweep_under_way_mark_what_it_published(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The duty holder stops while its relay publishes an owed result: the sweep ends (its
    publish confirmed, marked) before the loops do. Cancelled mid-sweep, the publish (shielded,
    as the AMQP sink's is) was confirmed unmarked, and the next holder sent it again (found by
    review, 2026-12-07)."""
    h = harness
    await _owed_to_the_relay(h, 10)
    gate, publishing = asyncio.Event(), asyncio.Event()
    real = h.sink.publish_result

    async def confirmed_later(message: Any) -> None:
        await gate.wait()
        await real(message)

    async def held(message: Any) -> None:
        publishing.set()
        await asyncio.shield(confirmed_later(message))

    monkeypatch.setattr(h.sink, "publish_result", held)
    h.clock.advance(30_000)  # past the republish delay
    stop = asyncio.Event()
    run = asyncio.create_task(h.scheduler.run(stop))
    await wait_for(publishing.is_set, 10.0, what="the relay publishing the owed result")
    stop.set()
    # The loops wait for the sweep (the gate holds its publish): not done within half a second.
    done, _ = await asyncio.wait({run}, timeout=0.5)
    gate.set()
    await asyncio.wait_for(run, 10.0)
    await wait_for(lambda: len(h.sink.messages) == 1, 10.0, what="the publish confirmed")
    assert not done, "the loops ended with the relay's publish under way"
    await _next_holder_sweeps(h)
    assert len(h.sink.messages) == 1, "the next holder sent the result again"


async def test_the_relay_remembers_a_bounded_number_of_owed_keys_and_still_sends_them_all(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results nobody can take for days (an engine whose queue was deleted) kept up to 256 keys
    per 10 s bucket in the duty holder's memory, for every bucket of their life (found by review,
    2026-12-07: gigabytes). Past the bound a bucket's retry reads its keys; all still go out."""
    import bridge.domain.scheduler as scheduler

    h = harness
    monkeypatch.setattr(scheduler, "RELAY_KEYS_KEPT_MAX", 2)
    await h.scheduler.tick()
    h.sink.down = True
    owed: list[str] = []
    for i in range(5):  # one owed result in each of five outbox buckets
        await h.add(i, token={"i": i})
        got = await h.fetch("w")
        assert got is not None
        assert await h.ack("w", got) is True
        owed.append(got.task_id)
        await h.advance(10_000)
    for _ in range(4):
        await h.advance(10_000, ticks=2)
    retries = h.scheduler._outbox_retry
    assert len(retries) == 5, retries
    assert sum(len(r.owed or ()) for r in retries.values()) <= 2
    h.sink.down = False
    for _ in range(10):
        await h.advance(60_000, ticks=2)
        if len(h.sink.messages) >= 5:
            break
    assert sorted(m.task_id for m in h.sink.messages) == sorted(owed)


async def _owed_in_retry(h: Harness) -> None:
    """A result whose publishes all failed for 80 s: its bucket is in the relay's retries, past
    its second read."""
    await h.scheduler.tick()
    await h.add("v", token={"pid": 11})
    got = await h.fetch("w")
    assert got is not None
    h.sink.down = True
    assert await h.ack("w", got) is True
    await h.queue.drain_background(5.0)
    for _ in range(8):
        await h.advance(10_000, ticks=2)
    assert h.scheduler._outbox_retry and not h.sink.messages
    h.sink.down = False


async def test_a_retried_buckets_result_whose_mark_failed_stays_owed_until_marked(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Published from a bucket's retry, its mark failed: the bucket was taken for settled (a mark
    owed counted as nothing owed), the mark never tried again, and with the owed record's removal
    failing too, the next duty holder sent the result again (found by re-review, 2026-12-07)."""
    h = harness
    await _owed_in_retry(h)
    mark, forget = h.store.mark_published, h.store.forget_owed
    tried = {"mark": 0, "forget": 0}

    async def cut_mark_once(entry: OutboxEntry, *args: Any, **kwargs: Any) -> None:
        tried["mark"] += 1
        if tried["mark"] == 1:
            raise StorageNotSent("no host could take the request (cut off)")
        await mark(entry, *args, **kwargs)

    async def cut_forget_once(*args: Any, **kwargs: Any) -> None:
        tried["forget"] += 1
        if tried["forget"] == 1:
            raise StorageNotSent("no host could take the request (cut off)")
        await forget(*args, **kwargs)

    monkeypatch.setattr(h.store, "mark_published", cut_mark_once)
    monkeypatch.setattr(h.store, "forget_owed", cut_forget_once)
    for _ in range(10):
        await h.advance(10_000, ticks=2)
    assert len(h.sink.messages) == 1
    assert tried["mark"] >= 2, "the mark was never tried again"
    await _next_holder_sweeps(h)
    assert len(h.sink.messages) == 1, "the next holder sent the result again"


async def test_a_published_results_mark_owed_survives_a_full_cache_of_decided_results(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay remembers results read as decided in a bounded cache, oldest out first; a result
    published whose mark failed was remembered there too, and results nobody takes churning the
    cache pushed it out: its next retry published it again (found by re-review, 2026-12-07)."""
    import bridge.domain.scheduler as scheduler

    h = harness
    monkeypatch.setattr(scheduler, "OWED_DECIDED_KEPT", 2)
    await h.scheduler.tick()
    refused: set[str] = set()
    publish = h.sink.publish_result

    async def nobody_takes_some(message: Any) -> None:
        if message.task_id in refused:
            raise ConnectionError("no queue bound")
        await publish(message)

    monkeypatch.setattr(h.sink, "publish_result", nobody_takes_some)
    ids = []
    for i in range(4):  # three results nobody takes, and A
        await h.add(i, token={"i": i})
        got = await h.fetch("w")
        assert got is not None
        refused.add(got.task_id)
        assert await h.ack("w", got) is True
        ids.append(got.task_id)
    a = ids[-1]
    for _ in range(4):
        await h.advance(10_000, ticks=2)
    mark = h.store.mark_published
    failures = {"left": 5}

    async def a_mark_fails_a_while(entry: OutboxEntry, *args: Any, **kwargs: Any) -> None:
        if str(entry.task_id) == a and failures["left"] > 0:
            failures["left"] -= 1
            raise StorageNotSent("no host could take the request (cut off)")
        await mark(entry, *args, **kwargs)

    monkeypatch.setattr(h.store, "mark_published", a_mark_fails_a_while)
    refused.discard(a)
    for _ in range(20):
        await h.advance(10_000, ticks=2)
    assert failures["left"] == 0, "A's mark was not tried again"
    assert [m.task_id for m in h.sink.messages].count(a) == 1, "A was sent again"


async def test_an_outbox_row_keeps_its_result_as_long_as_its_token(harness: Harness) -> None:
    """A result whose publish failed gets the task's token copied into its outbox row, under the
    TTL the relay computes then; the result's own cells kept the TTL the acking bridge gave them.
    Where those were shorter (a fleet changing its TTL, or a second's rounding), the row lived on
    as a token without a result: read with a null key id (the owner's current key), the engine
    was sent an integrity_error instead of its result (found by review, 2026-12-07). The token's
    write gives the result's cells the same TTL, and a row without a result is not sent."""
    import uuid as uuid_

    from bridge.crypto import Sealed
    from bridge.domain.records import OutboxEntry, QueueKey
    from bridge.domain.timeline import OUTBOX_SHARDS, outbox_bucket, shard_of, timeuuid_from_ms
    from tests.queue_harness import OWNER

    h = harness
    if not hasattr(h.store, "db"):
        pytest.skip("cell lifetimes are Cassandra's")
    db, ks = h.store.db, h.store.db.keyspace
    q = QueueKey(OWNER, h.service)
    now = h.clock.now_ms()
    task_id, done_id, bucket = timeuuid_from_ms(now), uuid_.uuid4(), outbox_bucket(now)
    entry = OutboxEntry(bucket, q, task_id, done_id, Sealed("k1", b"n" * 12, b"result"), False)
    await h.store.insert_outbox(entry)
    await h.store.keep_token(entry, Sealed("k1", b"t" * 12, b"token"), None)
    shard = shard_of(task_id, OUTBOX_SHARDS)
    where = (
        f"WHERE bucket = {bucket} AND shard = {shard} AND owner = '{OWNER}' AND service = '{h.service}' "
        f"AND task_id = {task_id} AND completion_id = {done_id}"
    )
    [row] = await db.execute_raw(f"SELECT TTL(result_ct) AS r, TTL(token_ct) AS t FROM {ks}.outbox_shards {where}")
    assert abs(row["r"] - row["t"]) <= 1, f"the result's cells end apart from the token's: {row}"

    # A row as a bridge before the fix left it: the result's cells about to end, the token's not.
    other_task, other_done = timeuuid_from_ms(now + 1), uuid_.uuid4()
    other_shard = shard_of(other_task, OUTBOX_SHARDS)
    await db.execute_raw(
        f"INSERT INTO {ks}.outbox_shards (bucket, shard, owner, service, task_id, completion_id, key_id, "
        f"result_nonce, result_ct, published) VALUES ({bucket}, {other_shard}, '{OWNER}', '{h.service}', "
        f"{other_task}, {other_done}, 'k1', 0x6e, 0x72, false) USING TTL 1"
    )
    await db.execute_raw(
        f"UPDATE {ks}.outbox_shards USING TTL 300 SET token_key = 'k1', token_nonce = 0x74, token_ct = 0x74 "
        f"WHERE bucket = {bucket} AND shard = {other_shard} AND owner = '{OWNER}' AND service = '{h.service}' "
        f"AND task_id = {other_task} AND completion_id = {other_done}"
    )

    async def result_cells_ended() -> bool:  # Cassandra's TTL runs on real time
        rows = await db.execute_raw(
            f"SELECT result_ct FROM {ks}.outbox_shards WHERE bucket = {bucket} AND shard = {other_shard} "
            f"AND owner = '{OWNER}' AND service = '{h.service}' AND task_id = {other_task} "
            f"AND completion_id = {other_done}"
        )
        return bool(rows) and rows[0]["result_ct"] is None

    await wait_for(result_cells_ended, 10, interval=0.1, what="the result's cells ended")
    owed = {e.task_id for e in await h.store.outbox(bucket)}
    assert other_task not in owed, "a token without its result read as a result owed"
    assert task_id in owed
