"""What the scheduler reports to its gauges when its passes fail or the duty leaves: pure logic,
on the memory store (the gauges' wiring to /metrics is in tests/integration/test_metrics_semantics.py)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from bridge.crypto import KeyringFileProvider, generate_keyring, write_keyring
from bridge.domain.clock import ManualClock
from bridge.storage.memory import MemoryTaskStore
from tests.conftest import wait_for
from tests.queue_harness import OWNER, TTL_S, Harness

pytestmark = pytest.mark.anyio


@pytest.fixture
async def h(tmp_path: Path) -> Harness:
    path = tmp_path / "keyring.json"
    write_keyring(path, generate_keyring([OWNER]))
    clock = ManualClock(1_700_000_000_000)
    harness = Harness(MemoryTaskStore(clock.now_ms, TTL_S), KeyringFileProvider(path), clock, prefix="")
    yield harness
    await harness.close()


async def test_the_lag_grows_while_every_pass_fails(h: Harness) -> None:
    """The lag was set only after a bucket was read: with an expiry partition that cannot be read
    (a timeout, too many tombstones) every tick failed and the gauge kept its last healthy value,
    so an alert on the lag never fired for a scheduler stuck for good."""
    await h.scheduler.tick(relay=False)
    h.clock.advance(100)
    await h.scheduler.tick(relay=False)
    assert h.scheduler.state.lag_ms < 1_000

    async def unreadable(*_a: object, **_k: object) -> object:
        raise TimeoutError("expiry partition read timed out")

    h.store.expiries = unreadable  # type: ignore[method-assign]
    h.store.marked_expiry_buckets = unreadable  # type: ignore[method-assign]
    failed = 0
    for _ in range(100):  # 10 s of ticks
        h.clock.advance(100)
        try:
            await h.scheduler.tick(relay=False)
        except TimeoutError:
            failed += 1
    assert failed >= 90, "the passes did fail"
    assert h.scheduler.state.lag_ms >= 9_000


async def test_a_bridge_that_lost_the_duty_reports_only_its_own_pending_results(h: Harness) -> None:
    """Only the holder's relay set the pending-results gauge: once the duty had gone, the last
    figure stayed in it for good (an alert on pending results fired until the pod restarted)."""
    reported: list[int] = []
    scheduler = h.scheduler
    scheduler.report_pending = reported.append

    class Duty:
        held = False

    h.queue.relay.publishing = 400  # its own publishes, waiting for their confirms
    reported.append(403)  # what it reported last as the holder (3 stuck at the relay)
    stop = asyncio.Event()
    relay = asyncio.create_task(scheduler._run_relay(stop, Duty()))  # type: ignore[arg-type]
    try:
        for _ in range(50):
            await asyncio.sleep(0.01)
            if reported[-1] == 400:
                break
        h.queue.relay.publishing = 0  # every publish confirmed
        for _ in range(300):
            await asyncio.sleep(0.01)
            if reported[-1] == 0:
                break
    finally:
        stop.set()
        await relay
    assert reported[-1] == 0, f"the gauge stayed at {reported[-1]} with nothing pending on this bridge"


async def test_the_duty_holder_whose_ticks_fail_stays_ready_while_its_loop_turns(h: Harness) -> None:
    """Readiness asked whether the last tick succeeded: ticks run on the duty holder alone, so a
    tick failing there (an expiry partition that cannot be read) made that one pod unready, for
    as long as it lasted, while it served requests as well as any and kept the duty. It asks now
    whether the loop turns; the failing ticks show in the last tick's age (and the lag)."""
    from bridge.app import Bridge
    from bridge.domain.errors import Unavailable

    async def unreadable(*_a: object, **_k: object) -> object:
        raise Unavailable("expiry partition read timed out")

    h.store.scheduler_cursor = unreadable  # type: ignore[method-assign]
    bridge = SimpleNamespace(settings=SimpleNamespace(scheduler_interval=0.1), scheduler=h.scheduler)
    state = h.scheduler.state
    state.last_tick_monotonic -= 600  # ten minutes of failing ticks
    state.loop_alive_monotonic -= 600
    stop = asyncio.Event()
    loop = asyncio.create_task(h.scheduler.run(stop))
    try:
        await wait_for(lambda: time.monotonic() - state.loop_alive_monotonic < 1, 5.0, what="the loop turning")
        assert await Bridge._scheduler_ready(bridge)  # type: ignore[arg-type]
        assert time.monotonic() - state.last_tick_monotonic > 590  # no tick succeeded meanwhile
    finally:
        stop.set()
        await loop
    state.loop_alive_monotonic -= 600  # a loop that stopped turning (hung) is unready
    assert not await Bridge._scheduler_ready(bridge)  # type: ignore[arg-type]


def test_the_gauges_queues_are_shared_out_among_their_owners() -> None:
    """The first 1,000 queues in Cassandra's token order (the owner is the partition key) were
    exported: a tenant whose token sorts first and who has 1,000 services pushed every other
    tenant's series out, and alerts on absent series never fired. Found by review."""
    from bridge.domain.records import QueueKey
    from bridge.domain.stats import fair_share

    listed = [QueueKey("a", f"s{i}") for i in range(1001)] + [QueueKey("b", "x"), QueueKey("c", "y")]
    chosen = fair_share(listed, 1000)
    assert len(chosen) == 1000
    assert QueueKey("b", "x") in chosen and QueueKey("c", "y") in chosen
    assert chosen[:3] == [QueueKey("a", "s0"), QueueKey("b", "x"), QueueKey("c", "y")]
    assert fair_share(listed[:5], 1000) == listed[:5], "under the bound, every queue, in order"
