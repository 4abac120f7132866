"""W-gateway: a fetch through the HTTP gateway against a fetch through AMQP, same bridge, same run.

    python -m benchmarks.gateway [--samples 300] [--out benchmarks/results/gateway.json]

One bridge process with its gateway on a loopback port (``BRIDGE_GATEWAY_PORT``) and a keys file
of one worker key. Two clients of the same owner: ``bridge.client.RpcClient`` (AMQP, direct
reply-to, as every Worker) and aiohttp (HTTP/1.1, one keep-alive connection). One request in flight
at a time: this is latency, not throughput.

1. empty: fetches of an empty queue (``fresh``: the bridge reads nothing), the two doors in
   alternation: what each door costs on its own.
2. task: the queue is filled (engine adds over AMQP), then each round fetches one task through
   each door (which door goes first alternates) and acks it through the same door; each fetch is
   timed from its request to its parsed reply, each ack too.

Goal: HTTP fetch p50 <= 1.5 x AMQP fetch p50 (the task phase). Printed, and written as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.context import ENGINE_USER, HOST, OWNER, Bench, Plan
from benchmarks.procs import ROOT
from benchmarks.progress import say
from benchmarks.report import git_commit, machine, now_iso, write_json
from benchmarks.run import run_locked
from benchmarks.stats import Sample
from bridge.client import Engine
from bridge.client.rpc import RpcClient
from bridge.gateway.keys import new_key

GOAL_RATIO = 1.5
WARMUP = 30


class GatewayBench(Bench):
    """A benchmark run whose bridges also serve the HTTP gateway (one worker key)."""

    def __init__(self, plan: Plan) -> None:
        super().__init__(plan, bridges=1)
        self.key, entry = new_key(OWNER, key_id="bench")
        self.keys_file = self.workdir / "gateway-keys.json"
        self.keys_file.write_text(json.dumps([entry]))
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            self.gateway_port = int(sock.getsockname()[1])

    def bridge_env(self, name: str) -> dict[str, str]:
        return {
            **super().bridge_env(name),
            "BRIDGE_GATEWAY_HOST": HOST,
            "BRIDGE_GATEWAY_PORT": str(self.gateway_port),
            "BRIDGE_GATEWAY_KEYS_FILE": str(self.keys_file),
        }


class Doors:
    """The same request through each door; each call returns the reply body."""

    def __init__(self, bench: GatewayBench, rpc: RpcClient, http: aiohttp.ClientSession) -> None:
        self.rpc = rpc
        self.http = http
        self.base = f"http://{HOST}:{bench.gateway_port}/api/queue"
        self.headers = {"Authorization": f"Bearer {bench.key}", "Content-Type": "application/json"}

    async def amqp(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.rpc.call(method, body)

    async def gateway(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        svc = body["serviceId"]
        data = json.dumps({k: v for k, v in body.items() if k != "serviceId"}).encode()
        async with self.http.post(f"{self.base}/{svc}/{method}", data=data, headers=self.headers) as resp:
            reply = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"gateway {method}: {resp.status} {reply}")
            return dict(reply)


Call = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


async def _timed(sample: Sample, call: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    started = time.perf_counter()
    reply = await call
    sample.add(time.perf_counter() - started)
    return reply


async def empty_fetches(bench: GatewayBench, doors: Doors, samples: int) -> dict[str, Sample]:
    svc = bench.service("gw-empty")
    out = {"amqp": Sample(), "http": Sample()}
    calls: dict[str, Call] = {"amqp": doors.amqp, "http": doors.gateway}
    for i in range(WARMUP + samples):
        order = ("amqp", "http") if i % 2 == 0 else ("http", "amqp")
        for door in order:
            body = {"serviceId": svc, "workerId": f"{door}-empty", "fresh": True}
            if i < WARMUP:
                await calls[door]("fetch", body)
                continue
            reply = await _timed(out[door], calls[door]("fetch", body))
            assert reply["result"] is None, reply
    return out


async def task_fetches(bench: GatewayBench, doors: Doors, samples: int) -> dict[str, Sample]:
    svc = bench.service("gw-task")
    total = 2 * (WARMUP + samples)
    say(f"task: adding {total} tasks")
    async with Engine(bench.amqp_url(ENGINE_USER), owner=OWNER, exchange=bench.exchange) as engine:
        for start in range(0, total, 64):
            await asyncio.gather(*(engine.add(svc, {"n": i}) for i in range(start, min(total, start + 64))))
    out = {"amqp": Sample(), "http": Sample(), "amqp ack": Sample(), "http ack": Sample()}
    calls: dict[str, Call] = {"amqp": doors.amqp, "http": doors.gateway}
    seen: set[str] = set()
    for i in range(WARMUP + samples):
        order = ("amqp", "http") if i % 2 == 0 else ("http", "amqp")
        for door in order:
            worker = f"{door}-task"
            body = {"serviceId": svc, "workerId": worker, "fresh": True}
            fetch_sample = out[door] if i >= WARMUP else Sample()
            reply = await _timed(fetch_sample, calls[door]("fetch", body))
            task = reply.get("task")
            assert task is not None and task["id"] not in seen, f"{door} fetch {i}: {reply}"
            seen.add(task["id"])
            ack = {**body, "taskId": task["id"], "epoch": task["epoch"], "hasToken": task["hasToken"], "result": i}
            ack.pop("fresh")
            ack_sample = out[f"{door} ack"] if i >= WARMUP else Sample()
            assert (await _timed(ack_sample, calls[door]("ack", ack)))["result"] is True
    return out


def _summary(sample: Sample) -> dict[str, Any]:
    return {
        "samples": sample.count,
        "p50_ms": round(sample.p(50), 3),
        "p90_ms": round(sample.p(90), 3),
        "p99_ms": round(sample.p(99), 3),
    }


async def run(args: argparse.Namespace) -> int:
    bench = GatewayBench(Plan.quick_plan())
    started = time.monotonic()
    date = now_iso()
    await bench.setup()
    watcher = asyncio.create_task(bench.watch_others())
    phases: dict[str, Any] = {}
    rpc = RpcClient(bench.amqp_url(OWNER), exchange=bench.exchange)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=30))
    try:
        await rpc.open()
        doors = Doors(bench, rpc, http)
        for name, measure in (("empty", empty_fetches), ("task", task_fetches)):
            bench.phase = name
            say(f"{name}: {args.samples} fetches through each door")
            samples = await measure(bench, doors, args.samples)
            summary: dict[str, Any] = {door: _summary(s) for door, s in samples.items()}
            summary["http_over_amqp_p50"] = round(samples["http"].p(50) / samples["amqp"].p(50), 2)
            phases[name] = summary
            bench.check_processes()
    except BaseException:
        bench.failed = True
        raise
    finally:
        watcher.cancel()
        await http.close()
        await rpc.close()
        await bench.teardown()
    ratio = phases["task"]["http_over_amqp_p50"]
    doc = {
        "benchmark": "W-gateway",
        "date": date,
        "run_id": bench.run_id,
        "commit": git_commit(),
        "machine": machine(),
        "elapsed_s": round(time.monotonic() - started, 1),
        "command": " ".join(["python -m benchmarks.gateway", *sys.argv[1:]]),
        "samples": args.samples,
        "phases": phases,
        "goal": {"http_over_amqp_fetch_p50_max": GOAL_RATIO, "measured": ratio, "met": ratio <= GOAL_RATIO},
        "disturbed": {phase: sorted(procs) for phase, procs in bench.disturbances.items()},
    }
    write_json(args.out, doc)
    print(f"W-gateway (run {bench.run_id}, {doc['commit']}, {date}), {args.samples} samples per door", flush=True)
    print(f"{'phase':<7} {'door':<9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}", flush=True)
    for name, summary in phases.items():
        for door, s in summary.items():
            if isinstance(s, dict):
                print(f"{name:<7} {door:<9} {s['p50_ms']:>8} {s['p90_ms']:>8} {s['p99_ms']:>8}", flush=True)
        print(f"{name:<7} HTTP/AMQP fetch p50: {summary['http_over_amqp_p50']}x", flush=True)
    verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
    print(f"goal: HTTP fetch p50 <= {GOAL_RATIO} x AMQP fetch p50 (task phase): {ratio}x, {verdict}", flush=True)
    if bench.disturbances:
        print("other processes seen meanwhile (shared CPUs and servers):", flush=True)
        for phase, procs in sorted(bench.disturbances.items()):
            print(f"  {phase}: {len(procs)} ({', '.join(sorted(procs)[:3])}...)", flush=True)
    say(f"results written to {args.out}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gateway",
        description=doc.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=doc.split("\n\n", 1)[-1],
    )
    ap.add_argument("--samples", type=int, default=300, help="timed fetches per door and phase")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gateway.json")
    args = ap.parse_args(argv)
    if args.samples < 1:
        ap.error("--samples must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="[%(asctime)s] load generator: %(name)s %(levelname)s: %(message)s"
    )
    return run_locked(run(args))


if __name__ == "__main__":
    sys.exit(main())
