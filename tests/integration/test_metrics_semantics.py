"""Metrics and counts mean what README.md promises (real servers): one exporter of the queue
gauges, a paused series per consumed queue, long-polls in finite buckets, and a completion counted
once even when its outcome was unknown."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from bridge.app import Bridge
from tests.conftest import OWNERS, free_port, metric, service_id, settings_from, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _metrics_text(port: int) -> str:
    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/metrics") as resp:
        return await resp.text()


@pytest.fixture
async def cassandra_proxy(servers):
    proxy = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    yield proxy
    await proxy.stop()


async def test_queue_gauges_are_dropped_by_a_bridge_that_lost_the_duty(
    bridge_env, cassandra_proxy, make_bridge, engine, workers
):
    """README: the per-queue gauges are "exported by the one bridge holding the scheduler duty".
    The duty holder is cut off from Cassandra and hands the duty over (Duty.follow_storage); the
    healthy bridge now exports the gauges. The ex-holder must stop exporting them: otherwise the
    fleet exports every queue twice (a sum over the fleet doubles) and the ex-holder's copy is
    frozen at its last refresh for as long as the process lives."""
    old_port, new_port = free_port(), free_port()
    cut_off = Bridge(
        settings_from(
            bridge_env,
            cassandra_port=cassandra_proxy.port,
            cassandra_timeout=1.0,
            http_port=old_port,
            stats_interval=0.3,
        )
    )
    await cut_off.start()
    try:
        await wait_for(lambda: cut_off.duty.held, 10, what="the first bridge holding the duty")
        healthy = await make_bridge(http_port=new_port, stats_interval=0.3)
        svc = service_id()
        for i in range(3):
            await engine.add(svc, i)
        ready = f'queue_bridge_queue_tasks{{owner="{OWNERS[0]}",service="{svc}",state="ready"}}'

        async def old_exports_three() -> bool:
            return await metric(old_port, ready) == 3

        await wait_for(old_exports_three, 15, what="the duty holder exporting ready=3")

        cassandra_proxy.cut()
        await wait_for(lambda: healthy.duty.held, 15, what="the healthy bridge taking the duty over")
        # The queue is drained through the healthy bridge.
        w = await workers(svc, "w")
        for _ in range(3):
            task = await wait_for(w.fetch, 10, what="a task")
            assert await task.ack("done")

        async def new_exports_zero() -> bool:
            text = await _metrics_text(new_port)
            return any(line.startswith(ready) and line.endswith(" 0.0") for line in text.splitlines())

        await wait_for(new_exports_zero, 15, what="the new duty holder exporting ready=0")

        async def old_stopped_exporting() -> bool:
            return ready not in await _metrics_text(old_port)

        try:
            await wait_for(old_stopped_exporting, 5, what="the ex-holder dropping its queue gauges")
        except AssertionError:
            stale = await metric(old_port, ready)
            pytest.fail(
                f"the bridge that lost the duty still exports {ready} = {stale} (the queue is empty; "
                "the new holder exports 0): the fleet exports the queue twice, one copy frozen"
            )
    finally:
        cassandra_proxy.restore()
        await cut_off.stop()


async def test_queue_gauges_go_with_the_duty_at_once_not_at_the_next_refresh(make_bridge, engine):
    """The holder's per-queue gauges carry its pod's labels; when the duty moves, the new holder
    exports them. The old one dropped its copy only at its next refresh (up to
    BRIDGE_STATS_INTERVAL later): meanwhile the fleet exported every queue twice and a sum over
    the fleet doubled. Now they go as the duty goes."""
    port = free_port()
    b = await make_bridge(http_port=port, stats_interval=0.3)
    await wait_for(lambda: b.duty.held, 10, what="the bridge holding the duty")
    svc = service_id()
    await engine.add(svc, "counted")
    ready = f'queue_bridge_queue_tasks{{owner="{OWNERS[0]}",service="{svc}",state="ready"}}'

    async def exported() -> bool:
        return await metric(port, ready) == 1

    await wait_for(exported, 30, what="the holder exporting the queue")
    # Its next refresh now far away (the interval is read at each wait, after a refresh): once a
    # refresh has returned its rows after this change, the exporter sets them and waits 60 s.
    # Counted from before the change: a refresh under way as it was made is counted too (one that
    # read its rows before the counter was in place left it at 0 for good, a red CI).
    refreshes = [0]
    rows_of = b._queue_gauge_rows

    async def counted(*args: Any) -> Any:
        rows = await rows_of(*args)
        refreshes[0] += 1
        return rows

    b._queue_gauge_rows = counted
    await wait_for(lambda: refreshes[0] >= 1, 30, what="a counted refresh")
    b.settings = b.settings.model_copy(update={"stats_interval": 60.0})
    before = refreshes[0]
    await wait_for(lambda: refreshes[0] > before, 30, what="a refresh returned with the long interval set")
    await wait_for(exported, 5, what="its rows exported")
    await b.duty.release()  # the duty goes (as at a lost channel)

    async def dropped() -> bool:
        return ready not in await _metrics_text(port)

    await wait_for(dropped, 3, what="the gauges dropped with the duty, not a refresh later")


async def test_a_long_poll_fetch_duration_lands_in_a_finite_bucket(make_bridge, workers):
    """The request-duration histogram counts a fetch from its receipt to its ack, long-poll wait
    included (up to waitMs 30,000; the Python worker long-polls 30 s by default), but its buckets
    stop at 5 s: every idle long-poll falls into +Inf only, and histogram_quantile on fetch reports
    the top finite bucket (5 s) for an idle, healthy fleet."""
    port = free_port()
    await make_bridge(http_port=port)
    w = await workers(service_id(), "idle")
    assert await w.fetch(wait_ms=5_600) is None  # an empty queue: the long-poll waits it out
    fetches = 'queue_bridge_request_duration_seconds_count{method="fetch"}'
    # Observed once the request is settled, which may come a moment after the reply.
    await wait_for(lambda: _metric_at_least(port, fetches, 1), 10, what="the fetch observed")
    text = await _metrics_text(port)

    def sample(name: str) -> float:
        line = next(ln for ln in text.splitlines() if ln.startswith(name))
        return float(line.rsplit(" ", 1)[1])

    total = sample('queue_bridge_request_duration_seconds_count{method="fetch"}')
    finite = [
        ln
        for ln in text.splitlines()
        if ln.startswith("queue_bridge_request_duration_seconds_bucket{le=")
        and 'method="fetch"' in ln
        and 'le="+Inf"' not in ln
    ]
    largest_finite = max(finite, key=lambda ln: float(ln.split('le="', 1)[1].split('"', 1)[0]))
    in_finite = float(largest_finite.rsplit(" ", 1)[1])
    assert total == 1  # this one fetch (the queue is the test's own, the bridge too)
    assert in_finite == total, (
        f"a {5.6:.1f} s long-poll fetch is in no finite bucket ({largest_finite!r}): "
        "the fetch histogram cannot show long-poll waits"
    )


async def test_the_paused_gauge_covers_the_lifecycle_queue(bridge_env, cassandra_proxy):
    """A bridge cut off from Cassandra stops consuming every request queue (ServingGate: ALL =
    add, fetch, ack, lifecycle, unrouted). queue_bridge_consumers_paused is "1 for each request
    queue this bridge stopped consuming", but BridgeMetrics.set_paused only knows add, fetch, ack
    and unrouted: the lifecycle queue (extend, fail, cancel, purge, stats, parked, redrive,
    discard) is paused with no series saying so."""
    from bridge.transport.topology import CONSUMED

    port = free_port()
    b = Bridge(settings_from(bridge_env, cassandra_port=cassandra_proxy.port, cassandra_timeout=1.0, http_port=port))
    await b.start()
    try:
        cassandra_proxy.cut()
        await wait_for(lambda: not b.transport.consuming(), 15, what="every consumer paused")

        async def paused_gauges() -> dict[str, float]:
            text = await _metrics_text(port)
            found = {}
            for line in text.splitlines():
                if line.startswith("queue_bridge_consumers_paused{"):
                    queue = line.split('queue="', 1)[1].split('"', 1)[0]
                    found[queue] = float(line.rsplit(" ", 1)[1])
            return found

        await wait_for(lambda: paused_gauges(), 5, what="the paused gauges")
        found = await paused_gauges()
        assert found == dict.fromkeys(CONSUMED, 1.0), f"paused: {sorted(CONSUMED)}; the gauge says {found}"
    finally:
        cassandra_proxy.restore()
        await b.stop()


async def test_an_ack_retried_after_an_unknown_outcome_leaves_no_task_in_flight(
    make_bridge, engine, workers, monkeypatch
):
    """The ack's completing compare-and-set lands but its outcome stays unknown (the LWT timed out
    and the adapter's SERIAL read failed too: UnknownOutcome escapes), so the worker is answered
    `unavailable` and sends the ack again. The retry finds the task completed by this worker and
    answers true, but neither attempt moved the queue counts (in_flight -1) nor counted
    tasks_completed: stats (and the queue_tasks gauge) report the task in flight for the task's
    whole TTL."""
    from bridge.storage.errors import UnknownOutcome

    b = await make_bridge()
    store = b.queue.ctx.store
    real = store.complete
    injected = []

    async def complete(*args, **kwargs):
        res = await real(*args, **kwargs)
        if not injected:
            injected.append(res)
            raise UnknownOutcome("lightweight transaction timed out (injected after it applied)")
        return res

    monkeypatch.setattr(store, "complete", complete)
    svc, w, body = await _a_task_held(engine, workers)
    try:
        first = await w.call("ack", body)
    except Exception as exc:  # answered unavailable
        first = exc
    assert injected and injected[0].applied, f"the first ack's CAS applied ({first!r})"
    again = await w.call("ack", body)
    assert again["result"] is True, again
    # The bridge looks the first attempt's outcome up again, off the request's path.
    await wait_for(lambda: b.metrics.counter_value("tasks_completed") >= 1, 10, what="the completion counted")
    completed = b.metrics.counter_value("tasks_completed")
    # Every delta of this bridge written (the add, the claim, and a completion if one was counted).
    await wait_for(lambda: b.counts.pending == 0, 10, what="the queue-count deltas flushed")
    await b.counts.flush(b.store)
    s = await counts_now(engine, svc)
    assert (s["ready"], s["inFlight"], completed) == (0, 0, 1), (
        f"the task was acked (true), yet stats say ready={s['ready']}, inFlight={s['inFlight']} and "
        f"tasks_completed_total = {completed}"
    )


async def _a_task_held(engine: Any, workers: Any) -> tuple[str, Any, dict[str, Any]]:
    """A new queue's one task, fetched by worker ``w``; the body of its ack."""
    svc = service_id()
    await engine.add(svc, "v")
    w = await workers(svc, "w")
    task = await wait_for(w.fetch, 10, what="the task")
    return svc, w, {"serviceId": svc, "workerId": "w", "taskId": task.id, "epoch": task.epoch, "result": 1}


async def counts_now(engine, svc):
    return (await engine.call("stats", {"serviceId": svc}, owner=OWNERS[0]))["result"]["services"][0]


async def test_an_ack_whose_unknown_outcome_did_not_land_is_counted_once_by_its_retry(
    make_bridge, engine, workers, monkeypatch
):
    """The other side of an unknown outcome: the first attempt never landed, the retry applied
    and counted itself. The later look-up of the first attempt finds another completion id and
    counts nothing: one completion, in flight back to 0 (not -1)."""
    from bridge.client.errors import UnavailableError
    from bridge.domain import acking
    from bridge.storage.errors import UnknownOutcome

    monkeypatch.setattr(acking, "UNCERTAIN_COMPLETION_LOOKUPS_S", (1.0,))  # after the retry
    b = await make_bridge()
    store = b.queue.ctx.store
    real = store.complete
    looked_up = []

    async def complete(*args, **kwargs):
        if not looked_up:
            looked_up.append(True)
            raise UnknownOutcome("lightweight transaction timed out (injected; it never reached a replica)")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "complete", complete)
    svc, w, body = await _a_task_held(engine, workers)
    with pytest.raises(UnavailableError):
        await w.call("ack", body)
    again = await w.call("ack", body)
    assert again["result"] is True, again
    await b.queue.drain_background(10)  # the look-up of the first attempt's outcome, among others
    await wait_for(lambda: b.counts.pending == 0, 10, what="the queue-count deltas flushed")
    await b.counts.flush(b.store)
    s = await counts_now(engine, svc)
    assert (s["ready"], s["inFlight"], b.metrics.counter_value("tasks_completed")) == (0, 0, 1)


async def test_a_claim_refused_on_a_cancelled_tasks_hint_is_no_conflict(bridge, engine, workers):
    """README: ``claim_conflicts`` counts "claims lost to a concurrent claim". A cancelled task's
    hint stays in the broker (it cannot be taken back); the fetch that takes it is refused by the
    claim's compare-and-set because the task finished, not because another claim won. Counted as
    a conflict, cancels and purges showed up as claim races on the fleet's dashboards (issue 9's
    figure 1 is read from this counter)."""
    svc = service_id()
    task_id = await engine.add(svc, "gone")
    assert await engine.cancel(svc, task_id) is True
    w = await workers(svc, "w")
    assert await w.fetch() is None
    await wait_for(lambda: bridge.metrics.counter_value("claims_stale") >= 1, 10, what="the stale claim counted")
    assert bridge.metrics.counter_value("claim_conflicts") == 0


async def _metric_at_least(port: int, name: str, value: float) -> bool:
    return await metric(port, name) >= value


async def test_a_bridge_taking_the_duty_exports_the_queue_gauges_at_once_not_an_interval_later(make_bridge, engine):
    """The bridge the duty leaves drops its gauges at once; the one taking it exported them only
    after its exporter's sleep (up to BRIDGE_STATS_INTERVAL): meanwhile no bridge of the fleet
    exported them, dashboards went blank and alerts' `for:` started over at every move (each
    rolling deploy). Found by review, 2026-12-06."""
    first_port, second_port = free_port(), free_port()
    first = await make_bridge(http_port=first_port, stats_interval=0.3)
    await wait_for(lambda: first.duty.held, 10, what="the first bridge holding the duty")
    second = await make_bridge(http_port=second_port, stats_interval=60)
    svc = service_id()
    await engine.add(svc, "counted")
    ready = f'queue_bridge_queue_tasks{{owner="{OWNERS[0]}",service="{svc}",state="ready"}}'

    async def exports(port: int) -> bool:
        return await metric(port, ready) == 1

    await wait_for(lambda: exports(first_port), 15, what="the holder exporting the queue")
    await make_bridge.stop(first)  # its release hands the duty over
    await wait_for(lambda: second.duty.held, 15, what="the second bridge taking the duty")
    await wait_for(lambda: exports(second_port), 10, what="the new holder exporting the queue (its interval is 60 s)")


async def test_a_new_duty_holder_exports_queue_gauges_as_it_reads_them(make_bridge, engine, monkeypatch):
    """The duty's new holder exported the per-queue gauges only once its first refresh had read
    every queue (8-25 s for 1,000 queues, a read after another): for that long after every move
    the fleet had no series, and an alert's `for:` started over. The first refresh after the duty
    comes exports them a batch at a time (found by review, 2026-12-07)."""
    import asyncio

    import bridge.app

    holder = await make_bridge()  # holds the duty while the queues fill
    await wait_for(lambda: holder.duty.held, 10, what="the first bridge holding the duty")
    services = [service_id() for _ in range(bridge.app.GAUGE_EXPORT_BATCH + 5)]
    for svc in services:
        await engine.add(svc, "counted")
    real, slow = bridge.app.service_stats, asyncio.Event()
    seen: list[str] = []

    async def service_stats(store: Any, q: Any, *args: Any, **kwargs: Any) -> Any:
        # Slow once a batch was read (with the other tests' queues of the keyspace). Counted as
        # read, not as asked: a read that failed under load (a queue of another test) is no row,
        # and the batch was one row short of its export when the rest went slow.
        if len(seen) >= bridge.app.GAUGE_EXPORT_BATCH:
            await slow.wait()  # the rest of the first refresh is slow
        stats = await real(store, q, *args, **kwargs)
        seen.append(q.service)
        return stats

    monkeypatch.setattr(bridge.app, "service_stats", service_stats)
    port = free_port()
    b = await make_bridge(http_port=port, stats_interval=0.3)
    try:
        await holder.stop()  # the duty moves to ``b``
        await wait_for(lambda: b.duty.held, 20, what="the duty moved to the exporting bridge")
        await wait_for(lambda: len(seen) >= bridge.app.GAUGE_EXPORT_BATCH, 30, what="the refresh past a batch")

        async def some_exported() -> bool:
            text = await _metrics_text(port)
            series = [line for line in text.splitlines() if line.startswith("queue_bridge_queue_tasks{")]
            # Queues, not service names: the keyspace's other queues (earlier tests') include one
            # service name under two owners, and a batch of 50 queues read as 49 names for ever.
            queues = {(_label(line, "owner"), _label(line, "service")) for line in series}
            return len(queues) >= bridge.app.GAUGE_EXPORT_BATCH

        await wait_for(some_exported, 30, what="a batch exported before the refresh ended")
    finally:
        slow.set()


async def test_queue_gauges_come_back_at_once_when_the_duty_comes_back_to_the_same_bridge(
    make_bridge, engine, monkeypatch
):
    """The duty let go and taken again by the same bridge (a renewed token the broker dropped: the
    bridge offers one and, as the duty queue's active consumer, receives it). Letting go dropped
    every queue's series, and the export loop, which had exported before, slept its whole
    interval without watching for the duty's return, then exported only once every queue was
    read: with BRIDGE_STATS_INTERVAL=60 and 1,000 queues, 60-85 s without series, and backlog
    alerts' `for:` started over (found by review, 2026-12-07)."""
    port = free_port()
    adder = await make_bridge()
    svc = service_id()
    await engine.add(svc, "counted")
    await adder.stop()  # its counts flushed: the next bridge's first export (as the duty comes) has the queue
    b = await make_bridge(http_port=port, stats_interval=60)
    ready = f'queue_bridge_queue_tasks{{owner="{OWNERS[0]}",service="{svc}",state="ready"}}'

    async def exported() -> bool:
        return await metric(port, ready) == 1

    await wait_for(lambda: b.duty.held, 10, what="the bridge holding the duty")
    await wait_for(exported, 15, what="the queue's gauge, exported as the duty came")
    # A renewal whose fresh token the broker dropped; the next renewal lets the duty go and offers
    # a token, which comes back to this bridge.
    publish = b.duty._publish_token

    async def dropped(channel: Any) -> None:
        return None

    monkeypatch.setattr(b.duty, "_publish_token", dropped)
    await b.duty.renew()
    monkeypatch.setattr(b.duty, "_publish_token", publish)
    renewals = b.duty.renewals
    await b.duty.renew()
    assert await metric(port, ready) == 0, "dropped as the duty went"
    await wait_for(lambda: b.duty.held, 10, what="the duty back on the same bridge")
    assert b.duty.renewals == renewals, "taken again, not renewed"
    await wait_for(exported, 10, what="the queue's gauge exported again, well within the 60 s interval")


async def test_queues_a_new_duty_holder_cannot_read_are_counted_not_left_out(make_bridge, engine, monkeypatch):
    """A queue whose counts cannot be read keeps its last ones only on the bridge that read them:
    the duty's new holder had none, exported no series for it, and a backlog alert on it resolved
    as if the queue were healthy (found by review, 2026-12-07). The holder says how many it could
    not read: `queue_bridge_queue_gauges_unread`."""
    import bridge.app
    from bridge.domain.errors import Unavailable

    adder = await make_bridge()
    svc = service_id()
    await engine.add(svc, "counted")
    await adder.stop()  # its registration of the queue written (in the background) before it stops
    real = bridge.app.service_stats

    async def service_stats(store: Any, q: Any, *args: Any, **kwargs: Any) -> Any:
        if q.service == svc:
            raise Unavailable("its parked index times out (injected)")
        return await real(store, q, *args, **kwargs)

    monkeypatch.setattr(bridge.app, "service_stats", service_stats)
    port = free_port()
    b = await make_bridge(http_port=port, stats_interval=0.3)
    await wait_for(lambda: b.duty.held, 20, what="the duty held")
    unread = "queue_bridge_queue_gauges_unread"

    async def counted() -> bool:
        return (await metric(port, unread) or 0) >= 1

    await wait_for(counted, 20, what="the unread queue counted")
    text = await _metrics_text(port)
    assert f'service="{svc}"' not in text, "no series for the queue (it was never read)"
    monkeypatch.setattr(bridge.app, "service_stats", real)

    async def read_now() -> bool:
        return await metric(port, unread) == 0 and f'service="{svc}"' in await _metrics_text(port)

    await wait_for(read_now, 20, what="the queue read and exported, nothing unread")


def _label(series: str, name: str) -> str:
    """The value of label ``name`` in one exposition line."""
    return series.split(f'{name}="', 1)[1].split('"', 1)[0]
