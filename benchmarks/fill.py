"""Filling a queue fast, without going through AMQP: the bridge's own ``WorkQueue.add``, run in the
load generator against the same keyspace with the same key-ring.

The rows are exactly what a bridge writes for an add without a message_id (sealed value, one
``ready`` insert; the bucket registration is cached), so a bridge serves them like any other task.
Used where the adds themselves are not what is measured: W-cycle's queue when W-add did not run,
W-recover, W-scale and the Memory backlog. W-add measures adds through the bridge.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.clients import closed_loop, task_value
from benchmarks.context import HOST, KEYSPACE, OWNER, Bench
from benchmarks.progress import Progress, say
from bridge.config import Settings
from bridge.domain.models import AddCommand, parse

CONCURRENCY = 64


class DirectFiller:
    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self._bridge: Any = None
        self._amqp: Any = None
        self._next = 0

    async def open(self) -> None:
        from bridge.app import Bridge  # the same wiring as a bridge process; never started
        from bridge.storage.schema import create_schema

        settings = Settings(
            cassandra_hosts=[HOST],
            cassandra_port=9042,
            cassandra_keyspace=KEYSPACE,
            keyring=self.bench.keyring,
            key_server_url=None,
            exchange=self.bench.exchange,
            queue_prefix=self.bench.queue_prefix,
            results_exchange=self.bench.results_exchange,
            http_port=0,
            amqp_url=self.bench.amqp_url("guest"),
        )
        bridge = Bridge(settings)
        await bridge.db.connect()
        if bridge.hints is not None:  # every stored task gets its hint, as a bridge's add does
            import aio_pika

            self._amqp = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
            await bridge.hints.attach(self._amqp)
        await create_schema(bridge.db, settings)  # idempotent; what a bridge process does at start
        await bridge.store.prepare()
        self._bridge = bridge

    async def close(self) -> None:
        if self._bridge is not None:
            await self._bridge.db.close()
            self._bridge = None
        if self._amqp is not None:
            await self._amqp.close()
            self._amqp = None

    async def fill(self, service: str, count: int, label: str, cap_s: float) -> int:
        if self._bridge is None:
            await self.open()
        queue = self._bridge.queue
        first = self._next
        self._next += count

        async def op(_slot: int, i: int) -> None:
            cmd = parse(AddCommand, {"serviceId": service, "value": task_value(first + i)})
            await queue.add(OWNER, cmd, message_id=None, traceparent=None)

        async with Progress(f"{label}: filling the queue (direct)", total=count, unit="tasks") as p:
            s = await closed_loop(
                op, concurrency=CONCURRENCY, count=count, progress=p, deadline=time.monotonic() + cap_s
            )
        if s.errors:
            say(f"{label}: {s.errors} direct adds failed")
        if s.count < count:
            say(f"{label}: time cap reached, {s.count:,} of {count:,} tasks stored")
        return s.count
