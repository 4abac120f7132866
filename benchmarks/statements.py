"""``python -m benchmarks.statements``: CPU and latency of each Cassandra statement on the fetch/ack path.

One statement type at a time, through the bridge's own ``CassandraTaskStore``, 16 in flight, in the
keyspace ``qb_bench`` (dropped and re-created first; it takes the benchmark run lock). Reports
ops/s, p50, and ms of CPU per statement for Cassandra and for this (client) process, which is
what the Python driver costs a bridge per statement. See docs/performance.md.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.clients import closed_loop
from benchmarks.context import HOST, KEYSPACE, OWNER
from benchmarks.procs import CpuMeter, server_pids
from benchmarks.progress import say
from bridge.config import Settings
from bridge.crypto import Sealed
from bridge.domain.records import ExpiryEntry, Payload, QueueKey, WorkerPointer
from bridge.domain.timeline import expiry_bucket, new_task_id
from bridge.storage.repository import CassandraTaskStore
from bridge.storage.schema import create_schema
from bridge.storage.session import open_session

COUNT = 3000
CONCURRENCY = 16


async def measure() -> None:
    settings = Settings(cassandra_hosts=[HOST], cassandra_keyspace=KEYSPACE, keyring=None, key_server_url=None)
    db = open_session(settings)
    await db.connect()
    try:
        await db.execute_raw(f"DROP KEYSPACE IF EXISTS {KEYSPACE}")
        repo = CassandraTaskStore(db, lambda: int(time.time() * 1000), 3600)
        await create_schema(db, settings)
        await repo.prepare()
        q = QueueKey(OWNER, "bench-statements")
        now = int(time.time() * 1000)
        tids = [new_task_id(now + i) for i in range(COUNT)]
        payload = Payload(Sealed("k1", os.urandom(12), os.urandom(112)), None, None, now)
        until = now + 60_000
        cases: list[tuple[str, Callable[[int], Awaitable[Any]]]] = [
            ("ready.insert (W)", lambda i: repo.store_task(q, tids[i], payload)),
            ("ready.payload (R)", lambda i: repo.payload(q, tids[i])),
            (
                "worker.set (W)",
                lambda i: repo.set_worker(q, f"w{i % 16}", WorkerPointer(tids[i], 1, False), now * 1000 + i),
            ),
            ("worker.get (R)", lambda i: repo.worker(q, f"w{i % 16}")),
            (
                "expiry.insert (W)",
                lambda i: repo.watch_expiry(expiry_bucket(now + 60_000), ExpiryEntry(until, q, tids[i], 1, False)),
            ),
            ("lease.claim_new (LWT)", lambda i: repo.claim_new(q, tids[i], f"w{i % 16}", until, uuid.uuid4())),
            (
                "lease.complete (LWT)",
                lambda i: repo.complete(q, tids[i], 1, f"w{i % 16}", now, uuid.uuid4()),
            ),
            ("lease.get (R, scheduler)", lambda i: repo.lease(q, tids[i], serial=False)),
        ]
        pids = {name: [pid] for name, pid in server_pids().items() if name == "cassandra"}
        pids["client"] = [os.getpid()]
        print(f"{'statement':26s} {'ops/s':>7s} {'p50 ms':>7s} {'cassandra ms':>13s} {'client ms':>10s} errors")
        for name, fn in cases:
            meter = CpuMeter(pids).start()
            sample = await closed_loop(lambda _s, i, fn=fn: fn(i), concurrency=CONCURRENCY, count=COUNT)
            cpu = meter.stop()
            rate = sample.throughput
            print(
                f"{name:26s} {rate:7.0f} {sample.p(50):7.2f} {cpu.get('cassandra', float('nan')) * 10 / rate:13.3f} "
                f"{cpu['client'] * 10 / rate:10.3f} {sample.errors}",
                flush=True,
            )
    finally:
        await db.close()


def main() -> int:
    from benchmarks.run import LOCK, take_run_lock

    lock = take_run_lock()
    if lock is None:
        say(f"error: a benchmark run still holds {LOCK}")
        return 3
    try:
        try:
            import uvloop

            uvloop.run(measure())
        except ImportError:
            asyncio.run(measure())
    finally:
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
