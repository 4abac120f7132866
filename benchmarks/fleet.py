"""W-fleet: what a fleet of bridges costs Cassandra when idle and when its workers wait.

    python -m benchmarks.fleet [--idle-bridges 32] [--waiters 64] [--seconds 20] [--phases ...]

0. Per task: one bridge, adds then 16 workers fetching and acking; Cassandra statements (and
   LWTs) per task by name, and bridge CPU per task (background loops included).
1. Idle fleet: N bridge processes, no traffic at all. Cassandra requests per second sent by all of
   them together (their own ``queue_bridge_cassandra_requests_total``) and CPU per bridge.
2. Waiting workers: 4 bridges, W workers on one empty queue. Cassandra requests per second while
   they long-poll (``waitMs`` 20 s), and, measured in the same run as the baseline, while they poll
   the old way (a fetch every 100 ms). Then add-to-fetch-reply latency of a waiting worker, against
   B-rpc (a bare AMQP RPC round trip through RabbitMQ, same run), and against the same round
   trip after the same 50 ms idle gap that precedes each add (like for like).
3. Burst (``--phases burst``): one bridge, 32 workers long-polling one empty queue, 32 tasks added
   at once: time to the last worker's reply (and each reply), over 20 bursts.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from benchmarks.baselines import b_rpc, key
from benchmarks.context import ENGINE_USER, OWNER, Bench, Plan
from benchmarks.procs import CpuMeter
from benchmarks.progress import say
from benchmarks.workloads import close_all, open_workers
from bridge.client import Engine, RpcClient
from bridge.config import Settings
from bridge.storage.statements import STATEMENTS

REQUESTS = "queue_bridge_cassandra_requests"


async def _rate(bench: Bench, seconds: float) -> float:
    before = (await bench.counters()).get(REQUESTS, 0.0)
    await asyncio.sleep(seconds)  # the measurement window
    return ((await bench.counters()).get(REQUESTS, 0.0) - before) / seconds


async def idle_fleet(bench: Bench, n: int, seconds: float) -> dict[str, Any]:
    await bench.ensure_bridges(n)
    say(f"idle fleet: {n} bridges up; settling 10 s")
    await asyncio.sleep(10)  # first ticks, clock probes, the duty election
    meter = CpuMeter({b.name: [b.pid] for b in bench.bridges}).start()
    rate = await _rate(bench, seconds)
    cpu = meter.stop()
    return {
        "bridges": n,
        "cassandra_requests_per_s": round(rate, 2),
        "cpu_percent_max": max(cpu.values()),
        "cpu_percent_mean": round(sum(cpu.values()) / len(cpu), 2),
    }


async def _poll(workers: list[Any], until: float, wait_ms: int) -> None:
    async def one(w: Any) -> None:
        while time.monotonic() < until:
            await w.fetch(wait_ms=wait_ms)
            if not wait_ms:
                await asyncio.sleep(0.1)  # the old way: poll every 100 ms

    await asyncio.gather(*(one(w) for w in workers))


async def waiting_workers(bench: Bench, waiters: int, seconds: float) -> dict[str, Any]:
    await bench.ensure_bridges(4)
    svc = bench.service("fleet-wait")
    workers = await open_workers(bench, svc, waiters, "fw")
    out: dict[str, Any] = {"bridges": 4, "workers": waiters}
    try:
        for label, wait_ms in (("polling every 100 ms (waitMs 0)", 0), ("long-poll (waitMs 30000)", 30_000)):
            until = time.monotonic() + seconds + 3
            load = asyncio.create_task(_poll(workers, until, wait_ms))
            await asyncio.sleep(2)  # every worker under way
            out[label] = round(await _rate(bench, seconds), 2)
            say(f"{waiters} workers {label}: {out[label]} Cassandra requests/s")
            await load
    finally:
        await close_all(workers)
    return out


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
        fetching[asyncio.create_task(w.fetch(wait_ms=30_000))] = w

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
                done, _ = await asyncio.wait(fetching, return_when=asyncio.FIRST_COMPLETED)
                replied = time.perf_counter()
                for t in done:
                    w = fetching.pop(t)
                    task = t.result()
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
    return {
        "add_to_fetch_reply_p50_ms": round(lat[len(lat) // 2], 2),
        "p25_ms": round(lat[len(lat) // 4], 2),
        "p75_ms": round(lat[len(lat) * 3 // 4], 2),
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
        "last_reply_p50_ms": round(last[len(last) // 2], 1),
        "reply_p50_ms": round(each[len(each) // 2], 1),
        "reply_p90_ms": round(each[int(len(each) * 0.9)], 1),
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
    return lat[len(lat) // 2]


TTR_MS = 2_000  # leases of the per-task and latency phases
# deadline + skew margin (the default) + the scheduler's second pass (5 s) + a tick, after the last claim
SCHEDULER_TAIL_S = TTR_MS / 1000 + float(Settings.model_fields["clock_skew_margin"].default) + 5 + 1
# Every conditional statement (a Paxos round each), from the statements themselves: a list kept
# by hand missed the lifecycle's (release, park, unpark, cancel) and each one added later.
LWT_NAMES = tuple(name for name, spec in STATEMENTS.items() if " IF " in spec[0])


async def per_task(bench: Bench, tasks: int, concurrency: int, *, ack_next: bool = False) -> dict[str, Any]:
    """One bridge; ``tasks`` adds (the Python client: with a message_id, no token), then
    ``concurrency`` workers fetch and ack them (``ack_next``: each ack fetches the next task, one
    request a task, contract 1.6). Cassandra statements (LWTs apart) and bridge CPU per task,
    background loops included, and the fetch-and-ack phase's throughput."""
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
    await close_all(workers)
    spent = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    per = {k: round(v / max(done, 1), 3) for k, v in sorted(spent.items())}
    lwts = sum(v for k, v in per.items() if k.startswith(LWT_NAMES))
    bridge_cpu_s = cpu.get("bridge", 0.0) / 100.0 * (wall + SCHEDULER_TAIL_S)
    return {
        "tasks": done,
        "statements_per_task": round(sum(per.values()), 2),
        "lwts_per_task": round(lwts, 2),
        "bridge_cpu_ms_per_task": round(1000.0 * bridge_cpu_s / max(done, 1), 2),
        "fetch_ack_tasks_per_s": round(done / consumed_s, 1),
        "ack_next": ack_next,
        "by_statement": per,
    }


async def main(args: argparse.Namespace) -> None:
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    bench = Bench(Plan.quick_plan(), bridges=1, metrics=True, profile_dir=profile_dir, profile_clock="cpu")
    await bench.setup()
    report: dict[str, Any] = {}
    phases = set(args.phases.split(","))
    try:
        if "waiting" in phases:  # first: no deadlines of earlier phases to meet while it measures
            report["waiting"] = await waiting_workers(bench, args.waiters, args.seconds)
        if "per-task" in phases:
            report["per_task"] = await per_task(bench, args.tasks, 16, ack_next=args.ack_next)
            say(f"per task: {report['per_task']}")
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
        await bench.teardown()
    print("W-fleet", report)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fleet", description=__doc__.splitlines()[0])
    ap.add_argument("--idle-bridges", type=int, default=32)
    ap.add_argument("--waiters", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=20.0)
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
    ap.add_argument("--profile", metavar="DIR", help="bridges under cProfile timed by CPU (benchmarks.cpuprofile)")
    ap.add_argument("--tasks", type=int, default=2000, help="per-task phase: tasks added, fetched and acked")
    ap.add_argument(
        "--phases",
        default="waiting,per-task,latency,idle",
        help="which phases (run in this order): waiting (4 bridges), per-task (1), burst (1), latency (4), idle (N)",
    )
    asyncio.run(main(ap.parse_args()))
