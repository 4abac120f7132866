"""The baselines every workload is compared with, measured in the same run on the same servers.

- B-rpc: an AMQP RPC round trip through ``bridge.client.RpcClient`` (direct reply-to) to the echo
  server (``benchmarks.echo``): the floor of any fetch or ack.
- B-lwt: one ``INSERT ... IF NOT EXISTS`` (the shape of the bridge's claim), and
- B-write: one plain prepared INSERT (the shape of the bridge's ``ready`` row),
  both through the bridges' own session (``bridge.storage.session``, the driver of
  ``BRIDGE_CASSANDRA_DRIVER``): the bare round trip of the client the bridges use.

Each is measured sequentially (single-request latency) and at the concurrency of the workload it
is compared with (throughput, and latency under that load).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime, timedelta

from benchmarks.clients import closed_loop
from benchmarks.context import OWNER, Bench
from benchmarks.progress import Progress, say
from benchmarks.stats import Figure, Sample
from bridge.client.rpc import RpcClient
from bridge.domain.timeline import new_task_id

WARMUP = 50


def key(name: str, concurrency: int) -> str:
    return f"{name} c={concurrency}"


async def b_rpc(bench: Bench, concurrencies: list[int]) -> None:
    await bench.ensure_echo()
    # One connection per concurrent caller, as every Worker has its own.
    clients = [RpcClient(bench.amqp_url(OWNER), exchange=bench.echo_exchange) for _ in range(max(concurrencies))]
    await asyncio.gather(*(c.open() for c in clients))
    body = {"serviceId": "bench-echo", "workerId": "echo-worker"}
    try:
        await closed_loop(lambda s, _i: clients[s].call("echo", body), concurrency=1, count=WARMUP)
        for c in concurrencies:
            await _measure(bench, "B-rpc", c, lambda s, _i: clients[s].call("echo", body))
    finally:
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def b_cassandra(bench: Bench, name: str, concurrencies: list[int]) -> None:
    db = bench.db
    ks = "qb_bench"
    ttl = 3600
    if name == "B-lwt":
        await db.prepare(
            "bench.lwt",
            f"INSERT INTO {ks}.bench_lwt (owner, service, task_id, state, epoch, worker, lease_until, claim_id) "
            "VALUES (?, ?, ?, 'leased', 1, ?, ?, ?) IF NOT EXISTS USING TTL ?",
            idempotent=False,
        )

        async def op(_slot: int, _i: int) -> None:
            now = datetime.now(UTC).replace(tzinfo=None)
            task_id = new_task_id(int(now.timestamp() * 1000))
            until = now + timedelta(seconds=60)
            rows = await db.execute("bench.lwt", (OWNER, "bench-lwt", task_id, "w", until, uuid.uuid4(), ttl))
            if not rows or not rows[0].get("[applied]"):
                raise RuntimeError("LWT not applied")

    else:
        await db.prepare(
            "bench.write",
            f"INSERT INTO {ks}.bench_write (owner, service, lane, bucket, seq, task_id, key_id, value_nonce, value_ct, "
            "created_at) VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?) USING TTL ?",
            idempotent=True,
        )
        value_ct = os.urandom(112)  # a sealed ~80-byte task value plus its GCM tag

        async def op(_slot: int, i: int) -> None:
            now = datetime.now(UTC).replace(tzinfo=None)
            tid = new_task_id(int(now.timestamp() * 1000))
            await db.execute(
                "bench.write",
                (OWNER, "bench-write", i // 1000, tid, tid, "k1", os.urandom(12), value_ct, now, ttl),
            )

    await closed_loop(op, concurrency=1, count=WARMUP)
    for c in concurrencies:
        await _measure(bench, name, c, op)


async def _measure(bench: Bench, name: str, concurrency: int, op: object) -> Sample:
    plan = bench.plan
    count = plan.base_seq if concurrency == 1 else plan.base_conc
    meter = bench.cpu_meter()
    async with Progress(f"{name} c={concurrency}", total=count) as p:
        sample = await closed_loop(op, concurrency=concurrency, count=count, progress=p)  # type: ignore[arg-type]
    bench.record_cpu(key(name, concurrency), meter, sample.throughput)
    if sample.errors:
        say(f"{name} c={concurrency}: {sample.errors} errors")
    bench.baselines[key(name, concurrency)] = sample
    what = "single request" if concurrency == 1 else f"{concurrency} in flight"
    bench.figure(Figure.of(f"{name} ({what})", name, sample))
    return sample
