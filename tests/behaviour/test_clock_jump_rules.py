"""A duty holder whose clock jumped forward saved its positions ahead of the present: on both
stores (the Cassandra adapter keeps its positions in day partitions, read from the present's day
backwards), with a manual clock set back as an NTP step (or a corrected anchor) would. The jump
crosses a UTC midnight, so the positions saved ahead land in the next day's partition.

The saved positions are read greatest-first, so a position saved an hour ahead was where every
later holder started: once the clock was right again, they waited there for an hour and never
read the buckets in between (leases of dead workers stayed leased, owed results stayed owed)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bridge.domain.scheduler import RecoveryScheduler
from bridge.domain.timeline import EXPIRY_BUCKET_MS, OUTBOX_BUCKET_MS, outbox_bucket
from tests.behaviour.conftest import STORES, _harness
from tests.queue_harness import Harness

pytestmark = pytest.mark.anyio

START_MS = 1_700_000_000_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def _before_a_midnight(now_ms: int) -> int:
    """Half an hour before the first UTC midnight still half an hour away: the jump an hour ahead
    crosses it, and the clock only moves forward to it (a start in the last half hour of a day
    takes the next day's: a CI run's random start fell there once)."""
    at = (now_ms // DAY_MS + 1) * DAY_MS - HOUR_MS // 2
    return at if at >= now_ms else at + DAY_MS


@pytest.fixture(params=STORES)
async def h(request: pytest.FixtureRequest, keyring_path: Path) -> AsyncIterator[Harness]:
    global START_MS
    async for harness in _harness(request, keyring_path, hinted=False, start=_before_a_midnight):
        START_MS = harness.clock.now_ms()
        yield harness


async def _run_an_hour_ahead(h: Harness) -> None:
    """The holder ticks, its clock jumps an hour ahead, it ticks until it has caught up with that
    time (its positions saved there), then its clock is set right again."""
    await h.scheduler.tick()
    h.clock.ms += HOUR_MS  # a step forward (a ManualClock only moves forward when advanced)
    ahead = START_MS + HOUR_MS - 60_000
    for _ in range(1_000):  # up to 100 s of its clock: the relay's saved position waits for second reads
        h.clock.advance(100)
        await h.scheduler.tick()
        jumped = h.clock.now_ms()
        saved = await h.store.scheduler_cursor(h.scheduler._expiry_cursor, jumped)
        saved_outbox = await h.store.scheduler_cursor(h.scheduler._outbox_cursor, jumped)
        if (
            saved is not None
            and saved_outbox is not None
            and min(saved_outbox * OUTBOX_BUCKET_MS, saved * EXPIRY_BUCKET_MS) > ahead
        ):
            break
    else:
        raise AssertionError("the positions were never saved ahead")
    h.clock.ms = START_MS + 5_000  # the clock is right again


async def _tick_until(scheduler: RecoveryScheduler, h: Harness, done: object, *, clock_ms: int) -> bool:
    """Tick ``scheduler`` 100 ms of clock at a time, up to ``clock_ms``, until ``done()``."""
    waited = 0
    while waited <= clock_ms:
        if await done():  # type: ignore[operator]
            return True
        h.clock.advance(100)
        waited += 100
        await scheduler.tick()
        await h.queue.drain_background(5.0)
    return False


async def test_a_lease_is_taken_back_after_a_holder_saved_its_position_an_hour_ahead(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    await _run_an_hour_ahead(h)
    # The next holder, its clock right, on the same store.
    queue, scheduler = h.instance(h.clock)
    await h.add("abandoned")
    lost = await h.fetch("lost", ttr_ms=5_000, queue=queue)  # not "soon": no timer of its own
    assert lost is not None
    with caplog.at_level(logging.WARNING, logger="bridge.scheduler"):

        async def re_exposed() -> bool:
            got = await h.fetch("second", queue=queue)
            return got is not None and got.task_id == lost.task_id and got.epoch == lost.epoch + 1

        assert await _tick_until(scheduler, h, re_exposed, clock_ms=10_000), "the lease was never taken back"
    # Said once, not at every tick.
    warnings = [r.getMessage() for r in caplog.records if "ahead of the present" in r.getMessage()]
    assert len([w for w in warnings if w.startswith("recovery scheduler")]) == 1, warnings
    assert scheduler.state.lag_ms < 1_000


async def test_a_running_holder_whose_clock_is_set_back_reads_the_present_again(h: Harness) -> None:
    """The holder itself, its clock set back while it runs: its position in memory was as far ahead."""
    await _run_an_hour_ahead(h)
    await h.add("abandoned")
    lost = await h.fetch("lost", ttr_ms=5_000)
    assert lost is not None

    async def re_exposed() -> bool:
        got = await h.fetch("second")
        return got is not None and got.task_id == lost.task_id

    assert await _tick_until(h.scheduler, h, re_exposed, clock_ms=10_000), "the lease was never taken back"


async def test_an_owed_result_is_relayed_after_a_holder_saved_its_relay_position_an_hour_ahead(h: Harness) -> None:
    await _run_an_hour_ahead(h)
    queue, scheduler = h.instance(h.clock)
    await h.add("done", token="t")
    got = await h.fetch("w", ttr_ms=60_000, queue=queue)
    assert got is not None
    h.sink.down = True  # its own publish fails: the result is owed, in the present's outbox bucket
    assert await h.ack("w", got, result="owed", queue=queue) is True
    await queue.drain_background(5.0)
    assert h.sink.messages == []
    owed_bucket = outbox_bucket(h.clock.now_ms())
    h.sink.down = False

    async def relayed() -> bool:
        return [m.task_id for m in h.sink.messages] == [got.task_id]

    # Swept once its bucket is old enough (republish_after_ms: 5 s), a sweep a second.
    assert await _tick_until(scheduler, h, relayed, clock_ms=30_000), (
        f"the result owed in bucket {owed_bucket} was never relayed"
    )


@pytest.mark.parametrize("minutes_to_midnight", [31, 30, 29, 1])
def test_the_start_before_a_midnight_is_never_behind_the_clock(minutes_to_midnight: int) -> None:
    now = 20 * DAY_MS - minutes_to_midnight * 60_000
    at = _before_a_midnight(now)
    assert now <= at < now + DAY_MS
    assert (at + HOUR_MS) // DAY_MS == at // DAY_MS + 1  # the jump crosses a midnight
