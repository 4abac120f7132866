"""B-drivers: what one statement costs the bridge's process on each CQL driver it supports.

    python -m benchmarks.drivers [--statements 4000] [--rounds 2] [--concurrency 1,16]

Both drivers are driven through the bridge's own session classes (``bridge.storage.session``:
prepared statements, dict rows, the same error mapping), one after the other, in alternating
rounds, on a scratch table of a scratch keyspace: a plain write, a read by key and an LWT
(``INSERT ... IF NOT EXISTS``). Reported per driver, statement and concurrency: statements/s, the
process's CPU per statement (all threads: the drivers' I/O threads included) and latency p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
import uuid
from typing import Any

from benchmarks.progress import say
from bridge.config import Settings
from bridge.storage.session import CqlSession, open_session

KEYSPACE = "qb_bench_drivers"
DRIVERS = ("datastax", "acsylla")
KINDS = ("write", "read", "lwt")
WARMUP = 200


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _prepared(driver: str, hosts: list[str], port: int) -> CqlSession:
    settings = Settings(
        cassandra_hosts=hosts,
        cassandra_port=port,
        cassandra_keyspace=KEYSPACE,
        cassandra_driver=driver,  # type: ignore[arg-type]
        keyring=None,
        key_server_url=None,
    )
    db = open_session(settings)
    await db.connect()
    await db.execute_raw(
        "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {'class': 'SimpleStrategy', 'replication_factor': 1}"
    )
    await db.execute_raw("CREATE TABLE IF NOT EXISTS {ks}.tasks (task_id uuid PRIMARY KEY, v text)")
    await db.prepare("write", "INSERT INTO {ks}.tasks (task_id, v) VALUES (?, ?)", idempotent=True)
    await db.prepare("read", "SELECT task_id, v FROM {ks}.tasks WHERE task_id = ?", idempotent=True)
    await db.prepare("lwt", "INSERT INTO {ks}.tasks (task_id, v) VALUES (?, ?) IF NOT EXISTS", idempotent=False)
    return db


async def _measure(db: CqlSession, kind: str, statements: int, concurrency: int) -> dict[str, Any]:
    key = uuid.uuid4()
    await db.execute("write", (key, "read me"))

    async def one() -> None:
        if kind == "read":
            rows = await db.execute("read", (key,))
            assert rows and rows[0]["task_id"] == key, "a read returns its row, with its uuid as a UUID"
        else:
            await db.execute(kind, (uuid.uuid4(), "value"))

    for _ in range(WARMUP):
        await one()
    sent = 0
    latencies: list[float] = []

    async def worker() -> None:
        nonlocal sent
        while sent < statements:
            sent += 1
            started = time.perf_counter()
            await one()
            latencies.append(time.perf_counter() - started)

    cpu0, t0 = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu1, t1 = _cpu_s(), time.perf_counter()
    latencies.sort()
    return {
        "per_s": round(statements / (t1 - t0)),
        "cpu_us": round((cpu1 - cpu0) / statements * 1e6, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 3),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9042)
    ap.add_argument("--statements", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", default="1,16")
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for driver in DRIVERS:  # alternated: a slow minute of the machine hits both
            db = await _prepared(driver, args.hosts.split(","), args.port)
            try:
                for c in levels:
                    for kind in KINDS:
                        n = args.statements if c > 1 else args.statements // 3
                        row = {"round": r + 1, "c": c, "kind": kind, **await _measure(db, kind, n, c)}
                        results.setdefault(driver, []).append(row)
                        say(f"{driver:8} {json.dumps(row)}")
            finally:
                await db.close()
    print("B-drivers", json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
