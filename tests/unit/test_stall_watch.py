"""The store judged stalled from the statements a bridge sends anyway (``bridge.storage.stall``),
and the serving gate's probe while it is paused for the store (``bridge.serving``)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.serving import ALL, ServingGate
from bridge.storage.stall import StallWatch, stall_after_s


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_an_idle_store_is_never_stalled() -> None:
    clock = Clock()
    watch = StallWatch(2.0, clock)
    clock.now += 3600
    assert not watch.stalled()


def test_a_statement_waiting_past_the_limit_with_nothing_answered_is_a_stall() -> None:
    clock = Clock()
    watch = StallWatch(2.0, clock)
    with watch.track():
        clock.now += 1.9
        assert not watch.stalled()
        clock.now += 0.2
        assert watch.stalled()


def test_a_slow_statement_is_no_stall_while_others_are_answered() -> None:
    clock = Clock()
    watch = StallWatch(2.0, clock)
    slow = watch.track()
    slow.__enter__()
    for _ in range(10):
        clock.now += 0.5
        with watch.track():
            pass
    assert not watch.stalled()  # the oldest waits 5 s, but the store answered 0 s ago
    slow.__exit__(None, None, None)


def test_a_stall_lasts_until_a_statement_is_answered_not_until_its_statements_time_out() -> None:
    clock = Clock()
    watch = StallWatch(2.0, clock)

    def times_out() -> None:
        with watch.track():
            clock.now += 2.5
            assert watch.stalled()
            raise TimeoutError  # the driver's timeout: not an answer

    with pytest.raises(TimeoutError):
        times_out()
    clock.now += 10
    assert watch.stalled(), "nothing pending any more, but nothing was answered either"
    with watch.track():
        clock.now += 0.01
    assert not watch.stalled()


def test_the_limit_is_half_the_request_timeout_and_at_least_a_second() -> None:
    assert stall_after_s(5.0) == 2.5
    assert stall_after_s(1.0) == 1.0


class Consumers:
    def __init__(self) -> None:
        self.paused: frozenset[str] = frozenset()

    async def pause(self, methods: frozenset[str] | None = None) -> None:
        self.paused |= methods or ALL

    async def resume(self, methods: frozenset[str] | None = None) -> None:
        self.paused -= methods or ALL

    def consuming(self) -> frozenset[str]:
        return ALL - self.paused


@pytest.mark.anyio
async def test_the_gate_probes_the_store_only_while_paused_for_it_and_resumes_when_it_answers() -> None:
    up = {"store": True}
    probes: list[float] = []

    async def probe() -> None:
        probes.append(asyncio.get_running_loop().time())
        up["store"] = True  # the store answered the probe: the watch clears

    consumers = Consumers()
    gate = ServingGate(
        consumers, storage_up=lambda: up["store"], clock_ok=lambda: True, probe_storage=probe, probe_every_s=0.05
    )
    await gate.step()
    assert not probes and consumers.consuming() == ALL  # healthy: no probe, no I/O of its own
    up["store"] = False
    await gate.step()
    assert consumers.consuming() == frozenset()
    await asyncio.sleep(0)  # the probe task runs
    assert len(probes) == 1
    await gate.step()
    assert consumers.consuming() == ALL


@pytest.mark.anyio
async def test_the_gate_outlives_a_resume_cut_by_its_connections_close() -> None:
    """aiormq ends a stuck connection's pending calls with a CancelledError in tasks nobody
    cancelled: a resume cut so ended the gate's loop, silently; the bridge stayed paused
    (unready) for good and never paused for a store outage again. Found by review, 2026-12-06."""
    up = {"store": False}
    cut = {"resume": 1}

    class CutOnce(Consumers):
        async def resume(self, methods: frozenset[str] | None = None) -> None:
            if cut["resume"]:
                cut["resume"] -= 1
                raise asyncio.CancelledError()  # as aiormq's close(CancelledError) raises it
            await super().resume(methods)

    consumers = CutOnce()
    gate = ServingGate(consumers, storage_up=lambda: up["store"], clock_ok=lambda: True, interval_s=0.01)
    stop = asyncio.Event()
    running = asyncio.ensure_future(gate.run(stop))
    try:
        for _ in range(200):
            if consumers.consuming() == frozenset():
                break
            await asyncio.sleep(0.01)
        assert consumers.consuming() == frozenset()
        up["store"] = True  # back: the first resume is cut, the next one goes through
        for _ in range(200):
            if consumers.consuming() == ALL or running.done():
                break
            await asyncio.sleep(0.01)
        assert not running.done(), "the gate's loop ended"
        assert consumers.consuming() == ALL and cut["resume"] == 0
        up["store"] = False  # and it still pauses for an outage
        for _ in range(200):
            if consumers.consuming() == frozenset():
                break
            await asyncio.sleep(0.01)
        assert consumers.consuming() == frozenset()
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)


@pytest.mark.anyio
async def test_a_clock_far_off_pauses_the_lifecycle_queue_a_merely_uncertain_one_does_not() -> None:
    """Beyond the skew limit fetches stop; off by over a second (or not known) the lifecycle queue
    too, whose fails, redrives and purges the lifecycle would refuse (answered, not left to a
    healthy bridge). Merely uncertain (a Cassandra slow for the whole fleet), it goes on: paused,
    every heartbeat of the fleet stopped (a re-review, 2026-12-06)."""
    from bridge.serving import LEASING, ServingGate
    from bridge.transport.topology import LIFECYCLE_QUEUE

    far = {"off": False}
    consumers = Consumers()
    gate = ServingGate(consumers, storage_up=lambda: True, clock_ok=lambda: False, clock_far_off=lambda: far["off"])
    await gate.step()
    assert gate.paused == LEASING and LIFECYCLE_QUEUE in consumers.consuming()
    far["off"] = True
    await gate.step()
    assert LIFECYCLE_QUEUE not in consumers.consuming() and "fetch" not in consumers.consuming()
    # Adds too: their ids are this clock's present (found by review, 2026-12-07). Acks go on.
    assert "add" not in consumers.consuming() and "ack" in consumers.consuming()
