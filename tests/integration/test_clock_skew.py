"""Leases and acks under clock skew between bridges (issue 12, and issue 9's redelivery figure).

``BRIDGE_CLOCK_OFFSET_MS`` shifts the host's clock inside the bridge process, as a host with a
skewed clock would.

- ``BRIDGE_CLOCK_SOURCE=host``: the bridge keeps the host's time (its lease deadlines, task ids and
  Cassandra write timestamps alike). Within ``BRIDGE_CLOCK_SKEW_MARGIN`` nothing may go wrong;
  beyond half of it (measured against Cassandra's clock) a bridge must refuse to grant leases.
- ``cassandra`` (the default): the bridge keeps Cassandra's time, carried by its monotonic clock;
  the host's offset must change nothing, under a margin of milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from bridge.client import Engine
from bridge.domain.errors import ClockOff, Unavailable
from bridge.domain.models import AddCommand, FetchRequest, parse
from tests.conftest import ENGINE_USER, OWNERS, consumers_on, service_id, wait_bridges, wait_for
from tests.history import History, lease_rows, run_workers

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow]


async def skew_drill(bridge_processes, servers, names, cql, offsets_ms: tuple[int, int], **env: str) -> History:
    """Two bridge processes whose hosts' clocks are ``offsets_ms`` off; 12 workers, a tenth of the
    leases abandoned and taken back while the clocks disagree. Every worker's fetches and acks spread
    over both bridges (RabbitMQ round-robin). Checks attribution and overlap in true time."""
    for offset in offsets_ms:
        bridge_processes(BRIDGE_CLOCK_OFFSET_MS=str(offset), **env)
    await wait_bridges(servers, names, 2)
    svc = service_id()
    total = 400  # about 40 abandoned leases taken back; 600 ran close to the 60 s limit on CI's 2 cores
    history = History()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"]) as engine:
        for start in range(0, total, 100):
            ids = [await engine.add(svc, i) for i in range(start, start + 100)]
            history.values.update(zip(ids, range(start, start + 100), strict=True))
    await run_workers(servers.amqp_url(OWNERS[0]), names["exchange"], svc, history, 12, total, abandon=0.1, ttr_ms=1000)
    assert len(history.held) > total, "abandoned leases were taken back"
    rows = lease_rows(cql, servers.keyspace, OWNERS[0], svc, list(history.values))
    # Includes: every ack answering true completed its own lease (on acbe38a a pointer write lost
    # to skew made acks answer true and complete nothing), and every ack answering false was a
    # lease taken over after its deadline + margin (a slow worker), never one still held.
    history.check(rows, None, tolerance_s=0.05)
    return history


def takeover_gaps_s(history: History) -> list[float]:
    """For each lease taken over: from the end of the earlier holding (its fetch sent + timeToRecover,
    at or before the lease's deadline) to the next worker receiving the task."""
    by_task: dict[str, list[Any]] = {}
    for h in history.held:
        by_task.setdefault(h.task, []).append(h)
    gaps = []
    for items in by_task.values():
        items.sort(key=lambda h: h.start)
        gaps += [b.start - a.end for a, b in itertools.pairwise(items) if a.worker != b.worker]
    return gaps


async def test_host_time_two_bridges_400ms_apart_each_way_attribute_every_ack_and_never_overlap(
    bridge_processes, servers, names, cql
):
    # The drill checks attribution and overlap, not latency: a recovered task that a claimer 800 ms
    # behind the scheduler's bridge cannot take yet may still wait for a reconciliation scan (a
    # latency issue found at the end of the 2026-12-01 session, see the closing note), so the scan
    # interval is short here to keep the drill within its time limit.
    host_mode = {"BRIDGE_CLOCK_SOURCE": "host", "BRIDGE_CLOCK_SKEW_MARGIN": "1.0", "BRIDGE_RECONCILE_INTERVAL": "3"}
    await skew_drill(bridge_processes, servers, names, cql, (400, -400), **host_mode)


async def test_cassandra_time_two_hosts_3s_apart_each_way_with_a_25ms_margin_never_overlap(
    bridge_processes, servers, names, cql
):
    """The default clock: the hosts' clocks are 6 s apart, far beyond any margin host time could
    work with, and the margin is 25 ms; nothing may overlap and every ack is attributed, and a lease
    is taken back promptly after its deadline (host time's margin alone was 1 s)."""
    history = await skew_drill(bridge_processes, servers, names, cql, (3000, -3000))
    gaps = sorted(takeover_gaps_s(history))
    assert len(gaps) >= 20, f"only {len(gaps)} leases taken over"
    # Under 1 s (host time's margin alone): the gap includes the requests' own latency on a loaded CI.
    assert statistics.median(gaps) < 0.9, f"takeover gaps (s): {gaps}"


async def test_a_cassandra_time_bridge_on_a_host_3s_ahead_grants_leases_on_cassandras_time(
    make_bridge, engine, workers, servers, names
):
    skewed = await make_bridge(clock_offset_ms=3000)  # the default: BRIDGE_CLOCK_SOURCE=cassandra
    reading = skewed.skew.reading
    assert reading is not None and 2800 <= reading.offset_ms <= 3200  # the host's offset, measured...
    assert 2.8 <= skewed.metrics.clock_skew._value.get() <= 3.2  # ... and reported
    assert skewed.skew.ok and await skewed._clock_ready()
    uncertainty = skewed.anchor.uncertainty_ms()
    assert uncertainty is not None and uncertainty <= skewed.skew.limit_ms
    assert "fetch" in skewed.transport.consuming()
    svc = service_id()
    await engine.add(svc, "on time")
    delivery = await skewed.queue.fetch(
        OWNERS[0], parse(FetchRequest, {"serviceId": svc, "workerId": "w", "timeToRecover": 10_000})
    )
    now_ms = time.time() * 1000  # this test's process: the host's true clock
    assert delivery is not None
    # The deadline is Cassandra's time (this host's, here) + 10 s: not 3 s later.
    assert abs(delivery.lease_expires_at_ms - (now_ms + 10_000)) < 500


async def test_a_host_mode_bridge_3s_ahead_reports_the_skew_and_refuses_leases(
    make_bridge, engine, workers, servers, names
):
    skewed = await make_bridge(clock_source="host", clock_offset_ms=3000, clock_check_interval=0.2)
    reading = await wait_for(lambda: skewed.skew.reading, 10, what="a clock reading")
    assert 2800 <= reading.offset_ms <= 3200
    assert not skewed.skew.ok
    assert not await skewed._clock_ready()
    assert 2.8 <= skewed.metrics.clock_skew._value.get() <= 3.2  # queue_bridge_clock_skew_seconds
    # It stops taking fetches (the requests that grant leases) so that healthy bridges serve them...
    fetch_queue = f"{names['queue_prefix']}.fetch"
    await wait_for(lambda: "fetch" not in skewed.transport.consuming(), 5, what="fetches paused")
    assert await consumers_on(servers.amqp_url("guest"), fetch_queue) == 0
    assert "ack" in skewed.transport.consuming()  # acks grant no lease and place nothing
    # Off by over a second, adds too: an add's id is this clock's present, its place in the queue
    # (found by review, 2026-12-07); a healthy bridge takes them.
    assert "add" not in skewed.transport.consuming()
    with pytest.raises(Unavailable, match="clock"):
        await skewed.queue.add(
            OWNERS[0], parse(AddCommand, {"serviceId": "x", "value": 1}), message_id=None, traceparent=None
        )
    healthy = await make_bridge(clock_source="host")
    assert healthy.skew.ok
    svc = service_id()
    await engine.add(svc, "held back")
    # ... and a fetch that reaches it anyway is refused without touching a lease.
    with pytest.raises(Unavailable, match="clock"):
        await skewed.queue.fetch(OWNERS[0], parse(FetchRequest, {"serviceId": svc, "workerId": "w"}))
    # A bridge within the limit hands the task out: nothing was leased.
    w = await workers(svc, "w")
    task = await w.fetch()
    assert task is not None and task.value == "held back" and task.deliveries == 1
    assert await task.ack("ok") is True


# -- Times set on one host, acted on by another (bridges within half the margin of each other's
# reference). Host time with the 1 s margin the docs give for it, bridges 400 ms ahead or behind:
# each of these went wrong before (a due time, a backoff's end and a grant time were compared with
# another bridge's clock without the margin).
HOST_TIME: dict[str, Any] = {"clock_source": "host", "clock_skew_margin": 1.0}


async def test_a_delayed_task_is_not_handed_out_before_its_not_before_by_a_bridge_400ms_ahead(
    make_bridge: Any, engine: Any, workers: Any
) -> None:
    """docs/asyncapi.yaml, notBefore: "Do not hand the task out before this time"; "stores a task
    that is never handed out before its due time". A bridge whose clock is 400 ms ahead (within
    half the 1 s margin: it serves, as the host-time skew drill does) announces the due task and
    lets it be claimed on its own clock, with no margin: 400 ms before notBefore in true time."""
    b = await make_bridge(clock_offset_ms=400, **HOST_TIME)
    assert b.skew.ok, b.skew.describe()
    svc = service_id()
    not_before = datetime.now(UTC) + timedelta(seconds=3)
    await engine.add(svc, "not before its time", not_before=not_before)
    w = await workers(svc, "w")

    async def handed() -> Any:
        return await w.fetch(wait_ms=2_000)

    task = await wait_for(handed, 15, interval=0, what="the delayed task handed out")
    received = time.time()  # after the reply arrived: the hand-out happened before this
    assert task.value == "not before its time"
    early_s = not_before.timestamp() - received
    assert early_s <= 0, f"a task due at {not_before.isoformat()} was handed out {early_s * 1000:.0f} ms before it"


async def _skewed_then_healthy(make_bridge: Any) -> Any:
    """A host-time bridge 3 s ahead (beyond half the 1 s margin: it refuses leases), started first
    so that it is the first to compete for the duty, then a healthy one; returns the skewed one
    once the duty is with the healthy one and the skewed one's fetches are paused."""
    skewed = await make_bridge(clock_offset_ms=3000, clock_check_interval=0.2, **HOST_TIME)
    await wait_for(lambda: skewed.skew.reading is not None and not skewed.skew.ok, 10, what="skew known")
    healthy = await make_bridge(**HOST_TIME)
    assert healthy.skew.ok, healthy.skew.describe()
    await wait_for(lambda: healthy.duty.held and not skewed.duty.held, 10, what="the duty with the good clock")
    await wait_for(lambda: "fetch" not in skewed.transport.consuming(), 5, what="skewed bridge's fetches paused")
    return skewed


async def test_a_bridge_refusing_leases_for_its_clock_hands_over_the_duty_and_announces_no_delayed_task_early(
    make_bridge: Any, engine: Any, workers: Any
) -> None:
    """A host-time bridge 3 s ahead refuses leases (its clock is beyond half the margin). It used
    to keep the fleet's scheduler duty: its passes announced a delayed task on its own clock, and a
    healthy bridge's fetch claimed it (a claim of a due task has no time condition), ~2 s before its
    notBefore. It hands the duty over now, and acts on no deadline while its clock is off."""
    from datetime import UTC, datetime, timedelta

    skewed = await _skewed_then_healthy(make_bridge)
    svc = service_id()
    w = await workers(svc, "w")
    not_before = datetime.now(UTC) + timedelta(seconds=6)
    await engine.add(svc, "not before its time", not_before=not_before)

    async def handed() -> Any:
        return await w.fetch(wait_ms=2_000)

    task = await wait_for(handed, 20, interval=0, what="the delayed task handed out")
    received = time.time()
    assert task.value == "not before its time"
    early_s = not_before.timestamp() - received
    assert early_s <= 0, (
        f"handed out {early_s * 1000:.0f} ms before its notBefore; duty held by skewed={skewed.duty.held}"
    )


async def test_a_bridge_refusing_leases_for_its_clock_hands_over_the_duty_and_parks_no_lease_still_held(
    make_bridge: Any, engine: Any, workers: Any
) -> None:
    """The same skewed bridge (host time, 3 s ahead, margin 1 s: it refuses to grant leases), when
    it kept the duty, judged leases on its own clock: a task at its delivery limit whose worker still
    held a valid lease was parked ~2 s before its deadline, and the worker's ack, sent before the
    deadline, refused (the engine got a delivery_limit error for a task being worked on)."""
    skewed = await _skewed_then_healthy(make_bridge)
    svc = service_id()
    await engine.add(svc, "one delivery only", max_deliveries=1)
    w = await workers(svc, "w")
    task = await w.fetch(time_to_recover_ms=5_000)
    assert task is not None and task.deliveries == 1
    # The worker works for 4 s of its 5 s lease (simulated work, not a wait for a condition),
    # then acks a full second before its deadline.
    from datetime import datetime

    deadline_s = datetime.fromisoformat(task.lease_expires_at.replace("Z", "+00:00")).timestamp()
    work_s = deadline_s - 1.0 - time.time()
    assert work_s > 2.5
    await asyncio.sleep(work_s)
    assert time.time() < deadline_s - 0.5
    assert await task.ack("done in time") is True, f"ack before the deadline refused; skewed holds={skewed.duty.held}"


async def test_a_bridge_whose_monotonic_clock_stood_still_takes_cassandras_time_at_its_next_probe(make_bridge):
    """A host suspended, or its VM paused or live-migrated, does not count that time on the guest's
    monotonic clock, by which a bridge carries Cassandra's time between probes: afterwards its
    time is behind by the pause, its bound still a millisecond. Its next probe saw the gap and was
    thrown away for bounding the time worse than the old anchor did (a slower round trip), so the
    bridge kept granting leases that had already expired on every other bridge's clock, and filing
    deadlines in buckets the recovery passes had read. Found by review. Here the pause is played
    by setting the anchor back 10 s (what a pause leaves: Cassandra's time and the world moved on,
    the monotonic clock did not), and the probe after it is slowed by 5 ms."""
    import dataclasses

    b = await make_bridge()
    assert b.anchor is not None
    await b.skew.measure()
    anchor = b.anchor.anchor
    assert anchor is not None
    b.anchor.anchor = dataclasses.replace(anchor, reference_ms=anchor.reference_ms - 10_000)
    b.anchor._last = -(2**62)
    behind = await b.store.server_time_ms() - b.anchor.now_ms()
    assert behind >= 9_000, behind
    probe = b.skew.probe

    async def slow_probe() -> int:
        await asyncio.sleep(0.005)
        return await probe()

    b.skew.probe = slow_probe
    await b.skew.measure()
    cassandra = await b.store.server_time_ms()
    assert abs(cassandra - b.anchor.now_ms()) < 100, f"{cassandra - b.anchor.now_ms()} ms off after the probe"


def _first_clock_probes_fail(monkeypatch: Any, n: int) -> Callable[[], int]:
    """The next ``n`` clock probes (``server_time_ms``) fail as a node going away would; returns
    how many are still to fail."""
    from bridge.storage.errors import StorageUnavailable
    from bridge.storage.repository import CassandraTaskStore

    real = CassandraTaskStore.server_time_ms
    left = [n]

    async def flaky(self: Any) -> int:
        if left[0]:
            left[0] -= 1
            raise StorageUnavailable("the clock probe's node went away")
        return await real(self)

    monkeypatch.setattr(CassandraTaskStore, "server_time_ms", flaky)
    return lambda: left[0]


async def test_a_bridge_whose_first_clock_probes_fail_takes_no_request_before_it_reads_cassandras_time(
    make_bridge, monkeypatch
):
    """With ``BRIDGE_CLOCK_SOURCE=cassandra`` the bridge's time is Cassandra's, read by a probe; a
    start whose probe failed went on serving on the host's clock (only fetches were held back):
    adds and acks took task ids, write stamps and outbox buckets from a host that may be minutes
    off. Found by review. The start now tries the probe again, as it does Cassandra itself."""
    failures = _first_clock_probes_fail(monkeypatch, 2)
    b = await make_bridge(start_timeout=30)
    assert failures() == 0
    assert b.anchor is not None and b.anchor.anchor is not None, "serving before Cassandra's time was read"


async def test_a_host_mode_bridge_whose_first_clock_probes_fail_serves_only_once_its_clock_is_measured(
    make_bridge, monkeypatch
):
    """With ``BRIDGE_CLOCK_SOURCE=host`` the host's clock is the bridge's, trusted only once
    measured against Cassandra's. A start whose probe failed was suppressed, and with no reading
    the skew guard said ok: a host seconds off served adds, fetches and the duty on its own clock
    until the next probe, a whole ``BRIDGE_CLOCK_CHECK_INTERVAL`` later (30 s by default; found by
    review, 2026-12-07). The start now tries the probe again, as in Cassandra mode."""
    failures = _first_clock_probes_fail(monkeypatch, 2)
    b = await make_bridge(clock_source="host", clock_check_interval=3600, start_timeout=30)
    assert failures() == 0
    assert b.skew.reading is not None, "serving on a host clock never measured"


async def test_adds_taken_by_a_bridge_whose_clock_is_far_off_are_requeued_not_held(
    make_bridge, servers, names, workers, monkeypatch
):
    """Adds a bridge took as its clock went far off (its prefetch window, the moment before its add
    consumer pauses) were refused (``unavailable``) and retried in place for 30 s, each failing the
    same way, before they were requeued: the engine waited although every other bridge could
    store them. Requeued at once now; the bridge that takes the copy waits, as for any redelivery,
    until a first copy could have stored it (two store timeouts: 10 s), and stores it (a
    re-review, 2026-12-07)."""
    from bridge.client import Engine

    healthy = await make_bridge(clock_source="host")
    skewed = await make_bridge(clock_source="host", clock_offset_ms=3000, clock_check_interval=0.2)
    await wait_for(lambda: not skewed.skew.ok, 10, what="the skewed bridge's clock judged off")
    # The moment before its consumer pauses, made longer: it takes adds until the gate's next step.
    real_wanted = skewed.gate.wanted_paused
    monkeypatch.setattr(skewed.gate, "wanted_paused", lambda: frozenset())
    await wait_for(lambda: "add" in skewed.transport.consuming(), 5, what="the skewed bridge taking adds")
    # Which adds the skewed bridge refused for its clock: the path under test runs only if one did.
    refused: list[BaseException] = []
    prepare_add = skewed.queue.prepare_add

    async def recording_prepare_add(*args: Any, **kwargs: Any) -> Any:
        try:
            return await prepare_add(*args, **kwargs)
        except ClockOff as exc:
            refused.append(exc)
            raise

    monkeypatch.setattr(skewed.queue, "prepare_add", recording_prepare_add)
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=40) as eng:
        started = time.monotonic()
        adding = asyncio.gather(*(eng.add(svc, i) for i in range(8)))
        await wait_for(lambda: refused, 10, what="an add reaching the skewed bridge")
        monkeypatch.setattr(skewed.gate, "wanted_paused", real_wanted)
        ids = await adding
        took = time.monotonic() - started
    # Stored by the other bridge once a first copy could have been (two store timeouts), not after
    # the 30 s of retries in place.
    assert len(set(ids)) == 8 and took < 20.0, f"8 adds took {took:.1f} s (held 30 s before)"
    w = await workers(svc, "w")
    got: set[str] = set()
    for _ in range(8):
        task = await wait_for(w.fetch, 15, what="the next stored add handed out")
        assert await task.ack("ok")
        got.add(task.id)
    assert got == set(ids)
    assert healthy.skew.ok
