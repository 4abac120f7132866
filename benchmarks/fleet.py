"""W-fleet: what a fleet of bridges costs Cassandra when idle and when its workers wait.

    python -m benchmarks.fleet [--idle-bridges 32] [--waiters 16,64] [--wait-ms 30000] [--seconds 20]
                               [--phases ...]

Cassandra requests per second (phases 1 and 2) are counted by Cassandra: ``request_count`` of each
of the bridges' connections in ``system_views.clients``, read at the window's start and end
(``benchmarks.serverside``). That includes what the drivers send on their own (a heartbeat on every
idle connection every 10 s, the control connection's metadata queries), which the bridges' own
counter (``queue_bridge_cassandra_requests_total``, reported beside it) never sees, and leaves out
the benchmark's own session and any other client of the server.

0. Per task: one bridge, adds then 16 workers fetching and acking; Cassandra requests and
   statements (a batch's members counted; LWTs apart) per task by name, and bridge CPU per task
   (background loops included).
1. Idle fleet: N bridge processes, no traffic at all. Cassandra requests per second from all of
   them together, and CPU per bridge. Every bridge must answer its /metrics and be alive.
2. Waiting workers: 4 bridges, W workers on one empty queue, at each of ``--waiters`` (16 and 64:
   does the cost grow with the number of waiting workers?). Cassandra requests per second while
   they long-poll with ``waitMs`` ``--wait-ms`` (30,000 by default, the Python Worker's own; their
   first waits are staggered over one waitMs, so the null replies and re-fetches are spread
   evenly), over a window of ``--seconds`` but at least 2 x waitMs (60 s by default): it holds
   whole wait cycles, so what each wait's end costs (the null reply, the re-fetch, clearing the
   worker) is counted; with a 20 s window and 30 s waits no wait ended inside it. ``--wait-ms
   5000`` is the harder case: six times as many wait ends a second. And, measured in the same run
   as the baseline, at the largest count while they poll the old way (a fetch every 100 ms, over
   ``--seconds``).
3. Latency: add-to-fetch-reply of a waiting worker, against B-rpc (a bare AMQP RPC round trip
   through RabbitMQ, same run), and against the same round trip after the same 50 ms idle gap that
   precedes each add (like for like).
4. Burst (``--phases burst``): one bridge, 32 workers long-polling one empty queue, 32 tasks added
   at once: time to the last worker's reply (and each reply), over 20 bursts.
5. Spread (``--phases spread``): one bridge, adds at c=1 alternately to one queue and to each of
   ``--spread-services`` queues in turn (each add the first the bridge makes in that queue's 10 s
   bucket, as a quiet queue's adds are in a fleet of sidecars): add p50 of each, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import serverside
from benchmarks.baselines import b_rpc, key
from benchmarks.context import CASSANDRA_REQUESTS, ENGINE_USER, OWNER, Bench, Plan
from benchmarks.procs import CpuMeter
from benchmarks.progress import say
from benchmarks.run import run_locked
from benchmarks.stats import Sample, percentile
from benchmarks.workloads import close_all, open_workers
from bridge.client import Engine, RpcClient
from bridge.config import Settings
from bridge.storage.statements import STATEMENTS

SETTLE_S = 10.0  # idle fleet: first ticks, clock probes, the duty election, before the window
RAMP_S = 2.0  # waiting workers: every worker's fetch on its way before the window
WAIT_MS = 30_000  # waiting workers: each long-poll's waitMs (the Python Worker's default; the window holds two)


async def measure_requests(bench: Bench, seconds: float) -> dict[str, Any]:
    """Cassandra requests per second from the running bridges over a window of ``seconds``, as
    Cassandra counted them on the bridges' connections (the figure), and as the bridges' own
    counter did (their statements, without the drivers' own requests). Fails if a bridge exited,
    did not answer its /metrics, or has no connection Cassandra lists (its requests would be
    missing from the sum)."""
    bench.check_processes()
    first = await bench.cassandra_clients()
    before = await bench.scrape()
    t0 = time.monotonic()
    await asyncio.sleep(seconds)  # the measurement window
    after = await bench.scrape()
    t1 = time.monotonic()
    last = await bench.cassandra_clients()
    bench.check_processes()
    names = {b.name for b in bench.bridges}
    window = serverside.between(first, last)
    unseen = sorted(names - set(window.connections))
    if unseen:
        raise RuntimeError(
            f"no Cassandra connection of {', '.join(unseen)} found in system_views.clients: "
            "its requests cannot be counted"
        )
    server = window.total(names)
    own = after.total(CASSANDRA_REQUESTS) - before.total(CASSANDRA_REQUESTS)
    return {
        "cassandra_requests_per_s": round(server / window.seconds, 2),  # the figure
        "bridge_counter_requests_per_s": round(own / (t1 - t0), 2),
        "bridges_answered": after.answered,
        "bridge_connections": sum(window.connections[n] for n in names),
        # Connections of the bridges opened (counted whole) or closed (requests since missed) meanwhile.
        "connections_opened": sum(window.opened.get(n, 0) for n in names),
        "connections_closed": sum(window.closed.get(n, 0) for n in names),
        "benchmark_requests_per_s": round(window.by_owner.get("benchmark", 0) / window.seconds, 2),
        "other_clients_requests_per_s": round(window.other / window.seconds, 2),
    }


def _max(values: Sequence[float]) -> float:
    """max() that a NaN (a process whose CPU could not be read) does not vanish from."""
    if not values or any(math.isnan(v) for v in values):
        return math.nan
    return max(values)


async def idle_fleet(bench: Bench, n: int, seconds: float) -> dict[str, Any]:
    await bench.ensure_bridges(n)
    say(f"idle fleet: {n} bridges up; settling {SETTLE_S:.0f} s")
    await asyncio.sleep(SETTLE_S)  # first ticks, clock probes, the duty election
    bench.check_processes()
    meter = CpuMeter({b.name: [b.pid] for b in bench.bridges}).start()
    requests = await measure_requests(bench, seconds)
    cpu = meter.stop()
    bench.check_processes()
    values = list(cpu.values())
    return {
        "bridges": len(bench.bridges),
        **requests,
        "cpu_percent_max": _max(values),
        "cpu_percent_mean": round(sum(values) / len(values), 2) if values else math.nan,
        "cpu_unread": sorted(name for name, v in cpu.items() if math.isnan(v)),
    }


async def _poll(workers: list[Any], until: float, wait_ms: int, ended: list[float]) -> None:
    """Each worker fetches until ``until`` (time.monotonic()); ``ended``: when each fetch came back.
    Long-polls: worker i's first wait is i+1 n-ths of ``wait_ms``, so the waits end spread over
    each cycle (all at once, a window would hold a whole number of cycles or miss one); none
    outlasts ``until``."""

    async def one(w: Any, first_ms: int) -> None:
        wait = first_ms
        while (left := until - time.monotonic()) > 0:
            await w.fetch(wait_ms=min(max(wait, 1), max(int(left * 1000), 1)) if wait_ms else 0)
            ended.append(time.monotonic())
            wait = wait_ms
            if not wait_ms:
                await asyncio.sleep(0.1)  # the old way: poll every 100 ms

    n = len(workers)
    await asyncio.gather(*(one(w, wait_ms * (i + 1) // n) for i, w in enumerate(workers)))


async def _waiting_window(bench: Bench, workers: list[Any], wait_ms: int, window: float) -> dict[str, Any]:
    ended: list[float] = []
    until = time.monotonic() + RAMP_S + window + min(2.0, window / 2)
    load = asyncio.create_task(_poll(workers, until, wait_ms, ended))
    try:
        await asyncio.sleep(RAMP_S)  # every worker under way
        t0 = time.monotonic()
        rates = await measure_requests(bench, window)
        t1 = time.monotonic()
        if t1 > until:
            raise RuntimeError(f"the load stopped {t1 - until:.1f} s before the window's end")
    finally:
        await load
    return {"workers": len(workers), **rates, "long_polls_ended_in_window": sum(t0 <= t <= t1 for t in ended)}


async def waiting_workers(
    bench: Bench, waiters: Sequence[int], seconds: float, *, wait_ms: int = WAIT_MS
) -> dict[str, Any]:
    """4 bridges, workers waiting on one empty queue: Cassandra requests per second while
    ``waiters`` workers (each count in turn) long-poll with ``wait_ms``, over a window of
    ``seconds`` but at least two whole wait cycles; and, as the baseline, while the most of them
    poll the old way (over ``seconds``)."""
    await bench.ensure_bridges(4)
    svc = bench.service("fleet-wait")
    counts = sorted(set(waiters))
    window = max(seconds, 2 * wait_ms / 1000)
    workers = await open_workers(bench, svc, counts[-1], "fw")
    out: dict[str, Any] = {"bridges": 4, "wait_ms": wait_ms, "window_s": window, "long_poll": []}
    try:
        out["polling"] = await _waiting_window(bench, workers, 0, seconds)
        say(f"{counts[-1]} workers polling every 100 ms (waitMs 0): {out['polling']}")
        for n in counts:
            point = await _waiting_window(bench, workers[:n], wait_ms, window)
            out["long_poll"].append(point)
            say(f"{n} workers long-polling (waitMs {wait_ms}): {point}")
    finally:
        await close_all(workers)
    few, most = out["long_poll"][0], out["long_poll"][-1]
    # Does it grow with the number of waiting workers? Ratio, and requests/s per extra waiter.
    out["growth"] = round(most["cassandra_requests_per_s"] / max(few["cassandra_requests_per_s"], 1e-9), 2)
    if most["workers"] > few["workers"]:
        extra = (most["cassandra_requests_per_s"] - few["cassandra_requests_per_s"]) / (
            most["workers"] - few["workers"]
        )
        out["requests_per_s_per_extra_waiter"] = round(extra, 4)
    return out


async def _timed_fetch(w: Any, wait_ms: int) -> tuple[Any, float]:
    """A fetch and when its own reply came (not when the caller next looked)."""
    task = await w.fetch(wait_ms=wait_ms)
    return task, time.perf_counter()


async def add_to_reply(bench: Bench, samples: int, waiters: int = 1) -> dict[str, Any]:
    """Add-to-fetch-reply of a waiting worker: ``waiters`` workers long-poll one empty queue (on
    whichever bridges their fetches land), one task is added after an idle gap, and the time runs
    from the add's publish to the first worker's reply with the task. One waiter alone is the worst
    case for a fleet: the add lands on a bridge without the waiting fetch (3 times in 4 with 4
    bridges), and its hint goes through the broker. With many waiters, as in figure 4's 64 across
    4 bridges, every bridge has waiters of the queue."""
    svc = bench.service(f"fleet-latency-{waiters}")
    workers = await open_workers(bench, svc, waiters, f"fl{waiters}")
    for w in workers:
        w.time_to_recover_ms = TTR_MS  # deadlines met before the next phase measures
    lat: list[float] = []
    fetching: dict[asyncio.Task[Any], Any] = {}

    def wait_on(w: Any) -> None:
        fetching[asyncio.create_task(_timed_fetch(w, 30_000))] = w

    for w in workers:
        wait_on(w)
    await asyncio.sleep(1.0 if waiters > 1 else 0)  # every fetch waiting on a bridge
    async with Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange) as engine:
        for i in range(samples):
            await asyncio.sleep(IDLE_GAP_S)  # the fetches are waiting on their bridges
            start = time.perf_counter()
            await engine.add(svc, i)
            got = None
            while got is None:
                # The add's reply is awaited first: the fetch's may come before it, and its own
                # arrival time is what counts (``_timed_fetch``), not when this loop looks.
                done, _ = await asyncio.wait(fetching, return_when=asyncio.FIRST_COMPLETED)
                for t in sorted(done, key=lambda t: t.result()[1]):
                    w = fetching.pop(t)
                    task, replied = t.result()
                    if task is not None:
                        if got is None:
                            got = task
                            lat.append((replied - start) * 1000)
                        # Before its worker fetches again: a fetch before the ack gets this task back.
                        await task.ack(None)
                    wait_on(w)
    for t in fetching:
        t.cancel()
    await asyncio.gather(*fetching, return_exceptions=True)
    await close_all(workers)
    lat.sort()
    return {  # interpolated, as B-rpc's p50 (Sample.p) it is divided by
        "add_to_fetch_reply_p50_ms": round(percentile(lat, 50), 2),
        "p25_ms": round(percentile(lat, 25), 2),
        "p75_ms": round(percentile(lat, 75), 2),
        "samples": samples,
        "waiters": waiters,
    }


async def burst(bench: Bench, waiters: int, rounds: int) -> dict[str, Any]:
    """One bridge, ``waiters`` workers long-polling one empty queue; ``waiters`` tasks added at once
    (an engine starting a batch, a bucket of delayed tasks coming due): from the burst's first
    add to the last worker's reply, and to each reply, over ``rounds`` bursts."""
    svc = bench.service("fleet-burst")
    workers = await open_workers(bench, svc, waiters, "fb")
    for w in workers:
        w.time_to_recover_ms = TTR_MS
    last: list[float] = []
    each: list[float] = []
    try:
        async with Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange) as engine:
            for _ in range(rounds):
                waits = [asyncio.create_task(w.fetch(wait_ms=10_000)) for w in workers]
                await asyncio.sleep(0.3)  # every fetch is waiting on the bridge
                start = time.perf_counter()
                replied: list[float] = []

                async def timed(t: asyncio.Task[Any], start: float = start, replied: list[float] = replied) -> Any:
                    task = await t
                    replied.append((time.perf_counter() - start) * 1000)
                    return task

                adds = asyncio.gather(*(engine.add(svc, i) for i in range(waiters)))
                got = await asyncio.gather(*(timed(t) for t in waits))
                await adds
                assert all(g is not None for g in got)
                last.append(max(replied))
                each.extend(replied)
                await asyncio.gather(*(g.ack(None) for g in got))
    finally:
        await close_all(workers)
    last.sort()
    each.sort()
    return {
        "waiters": waiters,
        "rounds": rounds,
        "last_reply_p50_ms": round(percentile(last, 50), 1),
        "reply_p50_ms": round(percentile(each, 50), 1),
        "reply_p90_ms": round(percentile(each, 90), 1),
    }


IDLE_GAP_S = 0.05  # add_to_reply sleeps this long before each add (its worker must be waiting)


async def b_rpc_after_idle(bench: Bench, samples: int) -> float:
    """B-rpc p50 (ms) under add_to_reply's conditions: one echo round trip after the same idle gap.

    The hot baseline (B-rpc, calls back to back) keeps every thread on the path awake; after
    50 ms of nothing, each hop pays to wake the broker's, the driver's and the loop's threads again
    (a plain Cassandra write measured here: 0.53 ms back to back, 1.95 ms after 50 ms idle)."""
    await bench.ensure_echo()
    lat: list[float] = []
    async with RpcClient(bench.amqp_url(OWNER), exchange=bench.echo_exchange) as client:
        body = {"serviceId": "bench-echo", "workerId": "echo-worker"}
        await client.call("echo", body)
        for _ in range(samples):
            await asyncio.sleep(IDLE_GAP_S)
            start = time.perf_counter()
            await client.call("echo", body)
            lat.append((time.perf_counter() - start) * 1000)
    lat.sort()
    return percentile(lat, 50)  # interpolated, as B-rpc's (Sample.p) and add_to_reply's


TTR_MS = 2_000  # leases of the per-task and latency phases
# deadline + skew margin (the default) + the scheduler's second pass (5 s) + a tick, after the last claim
SCHEDULER_TAIL_S = TTR_MS / 1000 + float(Settings.model_fields["clock_skew_margin"].default) + 5 + 1
# Every conditional statement (a Paxos round each), from the statements themselves: a list kept
# by hand missed the lifecycle's (release, park, unpark, cancel) and each one added later.
LWT_NAMES = tuple(name for name, spec in STATEMENTS.items() if " IF " in spec[0])


async def per_task(bench: Bench, tasks: int, concurrency: int, *, ack_next: bool = False) -> dict[str, Any]:
    """One bridge; ``tasks`` adds (the Python client: with a message_id, no token), then
    ``concurrency`` workers fetch and ack them (``ack_next``: each ack fetches the next task, one
    request a task, contract 1.6). Cassandra requests and statements (each member of a batch
    counted: ``add.recorded`` is one request, two statements), LWTs apart, and bridge CPU per
    task, background loops included, and the fetch-and-ack phase's throughput."""
    await bench.ensure_bridges(1)
    svc = bench.service("per-task")
    workers = await open_workers(bench, svc, concurrency, "pt")
    for w in workers:
        # Short leases: the scheduler meets their deadlines (both passes) within this phase, so its
        # reads are counted here and do not leak into the next phase's measurement.
        w.time_to_recover_ms = TTR_MS
    for w in workers:  # first fetch of each worker: it learns it holds nothing (then it says "fresh")
        assert await w.fetch() is None
    bridge = bench.bridges[0]
    before = await bench.statements()
    before_executed = await bench.executed_statements()
    meter = CpuMeter({"bridge": [bridge.pid]}).start()
    start = time.monotonic()
    async with Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange) as engine:
        pending = iter(range(tasks))

        async def adder() -> None:
            for i in pending:
                await engine.add(svc, {"n": i})

        await asyncio.gather(*(adder() for _ in range(concurrency)))
    done = 0

    async def worker(w: Any) -> None:
        nonlocal done
        if ack_next:
            task = await w.fetch()
            while task is not None:
                acked, task = await w.ack_and_fetch("ok")
                assert acked
                done += 1
            return
        while (task := await w.fetch()) is not None:
            assert await task.ack("ok")
            done += 1

    consuming = time.monotonic()
    await asyncio.gather(*(worker(w) for w in workers))
    consumed_s = time.monotonic() - consuming
    wall = time.monotonic() - start
    await asyncio.sleep(SCHEDULER_TAIL_S)  # the holder's passes over these claims' deadlines count too
    cpu = meter.stop()
    after = await bench.statements()
    after_executed = await bench.executed_statements()
    await close_all(workers)
    per = _per_task(before, after, done)  # requests: a batch once, under its own name
    executed = _per_task(before_executed, after_executed, done)  # statements: each batch member
    # LWTs are never batched (the sessions refuse it): one request, one statement each.
    lwts = sum(v for k, v in (executed or per).items() if k.startswith(LWT_NAMES))
    bridge_cpu_s = cpu.get("bridge", 0.0) / 100.0 * (wall + SCHEDULER_TAIL_S)
    return {
        "tasks": done,
        "requests_per_task": round(sum(per.values()), 2),
        # NaN from bridges without queue_bridge_cassandra_statements_total
        "statements_per_task": round(sum(executed.values()), 2) if executed else math.nan,
        "lwts_per_task": round(lwts, 2),
        "bridge_cpu_ms_per_task": round(1000.0 * bridge_cpu_s / max(done, 1), 2),
        "fetch_ack_tasks_per_s": round(done / consumed_s, 1),
        "ack_next": ack_next,
        "by_request": per,
        "by_statement": executed,
    }


async def spread_adds(bench: Bench, services: int, samples: int) -> dict[str, Any]:
    """One bridge; adds at concurrency 1, alternately to one queue (its 10 s ready bucket indexed
    by the bridge's first add in it) and to the next of ``services`` queues in turn, each visited
    again only after more than 10 s: every such add is the first the bridge makes in its queue's
    bucket, as nearly every add of a quiet queue is in a fleet of sidecars (every bridge takes
    every queue's adds). Each queue is added to once before (its registration). p50 of each and
    their ratio, in the same run: what writing a bucket's index row costs an add."""
    await bench.ensure_bridges(1)
    names = [bench.service(f"spread{i}") for i in range(services)]
    hot = bench.service("spread-hot")
    same, spread = Sample(), Sample()
    async with Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange) as engine:
        todo = iter([hot, *names])

        async def warm() -> None:
            for svc in todo:
                await engine.add(svc, {"warm": True})

        await asyncio.gather(*(warm() for _ in range(8)))
        await asyncio.sleep(10.5)  # a new 10 s bucket: none of the queues indexed in it yet
        started = time.monotonic()
        for i in range(samples):
            for svc, sample in ((hot, same), (names[i % services], spread)):
                t = time.perf_counter()
                await engine.add(svc, {"n": i})
                sample.add(time.perf_counter() - t)
        elapsed = time.monotonic() - started
    revisit_s = elapsed / samples * services
    if samples > services and revisit_s < 10:
        say(f"spread: queues revisited after {revisit_s:.1f} s (within a bucket): raise --spread-services")
    return {
        "samples": samples,
        "services": services,
        "revisited_after_s": round(revisit_s, 1) if samples > services else None,
        "same_queue_add_p50_ms": round(same.p(50), 3),
        "spread_add_p50_ms": round(spread.p(50), 3),
        "same_queue_add_p99_ms": round(same.p(99), 3),
        "spread_add_p99_ms": round(spread.p(99), 3),
        "ratio_p50": round(spread.p(50) / same.p(50), 3),
    }


def _per_task(before: dict[str, float], after: dict[str, float], done: int) -> dict[str, float]:
    spent = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    return {k: round(v / max(done, 1), 3) for k, v in sorted(spent.items())}


async def main(args: argparse.Namespace) -> int:
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(Plan.quick_plan(), bridges=1, metrics=True, profile_dir=profile_dir, profile_clock="cpu")
    await bench.setup()
    report: dict[str, Any] = {}
    phases = set(args.phases.split(","))
    # Other bridges, benchmarks or tests on the machine while it measures: said with the report
    # (the figures are then not to be used).
    watcher = asyncio.create_task(bench.watch_others())
    try:
        if "waiting" in phases:  # first: no deadlines of earlier phases to meet while it measures
            report["waiting"] = await waiting_workers(bench, args.waiters, args.seconds, wait_ms=args.wait_ms)
        if "per-task" in phases:
            report["per_task"] = await per_task(bench, args.tasks, 16, ack_next=args.ack_next)
            say(f"per task: {report['per_task']}")
        if "spread" in phases:
            report["spread"] = await spread_adds(bench, args.spread_services, args.spread_samples)
            say(f"spread: {report['spread']}")
        if "burst" in phases:
            await bench.ensure_bridges(1)
            report["burst"] = await burst(bench, args.burst_waiters, args.burst_rounds)
            say(f"burst: {report['burst']}")
        if "latency" in phases:
            await bench.ensure_echo()
            await b_rpc(bench, [1])
            brpc = bench.baselines[key("B-rpc", 1)].p(50)
            await bench.ensure_bridges(4)
            for n in args.latency_waiters:
                name = "latency" if n == 1 else f"latency_{n}_waiting"
                report[name] = await add_to_reply(bench, args.samples, n)
            idle = await b_rpc_after_idle(bench, args.samples)
            for n in args.latency_waiters:
                lat = report["latency" if n == 1 else f"latency_{n}_waiting"]
                lat["b_rpc_p50_ms"] = round(brpc, 3)
                lat["ratio"] = round(lat["add_to_fetch_reply_p50_ms"] / brpc, 2)  # the figure
                # Like for like: against an echo round trip after the same idle gap.
                lat["b_rpc_after_idle_p50_ms"] = round(idle, 3)
                lat["ratio_after_idle"] = round(lat["add_to_fetch_reply_p50_ms"] / idle, 2)
                say(f"latency, {n} waiting: {lat}")
        if "idle" in phases:
            report["idle"] = await idle_fleet(bench, args.idle_bridges, args.seconds)
            say(f"idle: {report['idle']}")
    finally:
        watcher.cancel()
        await bench.teardown()
    if bench.disturbances:
        report["disturbed"] = {phase: sorted(others) for phase, others in bench.disturbances.items()}
        say(f"DISTURBED (other processes ran while it measured; do not use these figures): {report['disturbed']}")
    print("W-fleet", report)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.splitlines()[0])
    ap.add_argument("--idle-bridges", type=int, default=32)
    ap.add_argument(
        "--waiters",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[16, 64],
        help="waiting phase: workers waiting, one measurement each (figure 4: 64 across 4 bridges; two counts: "
        "does the cost grow with them?)",
    )
    ap.add_argument(
        "--wait-ms",
        type=int,
        default=WAIT_MS,
        help="waiting phase: each long-poll's waitMs (default: the Python Worker's; the window is at least 2 x this; "
        "5000: six times as many wait ends a second)",
    )
    ap.add_argument(
        "--seconds", type=float, default=20.0, help="measurement window (idle; waiting: at least 2 x --wait-ms)"
    )
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument(
        "--latency-waiters",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 64],
        help="latency phase: workers waiting on the queue, one measurement each (figure 4: 64 across 4 bridges)",
    )
    ap.add_argument("--ack-next", action="store_true", help="per-task phase: acks fetch the next task (1.6)")
    ap.add_argument("--burst-waiters", type=int, default=32, help="burst phase: workers waiting, and tasks per burst")
    ap.add_argument("--burst-rounds", type=int, default=20)
    ap.add_argument("--spread-services", type=int, default=3000, help="spread phase: queues the adds go round")
    ap.add_argument("--spread-samples", type=int, default=1500, help="spread phase: adds of each kind")
    ap.add_argument("--profile", metavar="DIR", help="bridges under cProfile timed by CPU (benchmarks.cpuprofile)")
    ap.add_argument("--tasks", type=int, default=2000, help="per-task phase: tasks added, fetched and acked")
    ap.add_argument(
        "--phases",
        default="waiting,per-task,latency,idle",
        help="which phases (run in this order): waiting (4 bridges), per-task (1), spread (1), burst (1), "
        "latency (4), idle (N)",
    )
    # Under the benchmarks' run lock: its setup drops and re-creates the keyspace qb_bench, which
    # a run under way (``benchmarks.run``, ``lifecycle``, ``redelivery``) was using.
    sys.exit(run_locked(main(ap.parse_args())))
