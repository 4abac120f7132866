"""One behaviour suite of the queue's rules, run against both adapters of the store port.

``harness`` is parametrized: ``memory`` (bridge.storage.memory, no servers, milliseconds) and
``cassandra`` (the real adapter on the local Cassandra, marked ``integration``). Both run on a
``ManualClock``: tests advance time instead of sleeping, and the Cassandra half is as free of fixed
sleeps as the memory half. Each Cassandra test gets its own queue and its own stretch of time
(clock start days ahead, scheduler progress under its own name), so tests never see each other's
expiries or outbox entries in the shared keyspace.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.crypto import KeyringFileProvider
from bridge.domain.clock import ManualClock
from bridge.domain.models import AckRequest, AddCommand, Delivery, FetchRequest, parse
from bridge.domain.queue import Limits, ResultMessage, WorkQueue
from bridge.domain.scheduler import RecoveryScheduler
from bridge.domain.store import TaskStore
from bridge.storage.memory import MemoryTaskStore

OWNER = "worker-a"
MARGIN_MS = 1_000
TTL_S = 7 * 24 * 3600


@dataclass
class Sink:
    """Where results go: a list, or failures while ``down`` (a broker outage)."""

    messages: list[ResultMessage] = field(default_factory=list)
    down: bool = False

    async def publish_result(self, message: ResultMessage) -> None:
        if self.down:
            raise ConnectionError("results exchange unreachable")
        self.messages.append(message)


class Harness:
    """A bridge's domain on one store: queue, scheduler and clock, driven step by step."""

    def __init__(self, store: TaskStore, keys: KeyringFileProvider, clock: ManualClock, prefix: str) -> None:
        self.store = store
        self.keys = keys
        self.clock = clock
        self.prefix = prefix
        self.service = f"svc-{uuid.uuid4().hex[:10]}"
        self.sink = Sink()
        self.queue, self.scheduler = self.instance(clock)

    def instance(self, clock: ManualClock) -> tuple[WorkQueue, RecoveryScheduler]:
        """Another bridge process on the same store (its own clock, dispatcher and caches)."""
        limits = Limits(max_value_bytes=64 * 1024, default_ttr_ms=60_000, max_ttr_ms=3_600_000, skew_margin_ms=MARGIN_MS)
        queue = WorkQueue(self.store, self.keys, clock, limits=limits, settle_ms=MARGIN_MS, results=self.sink)
        scheduler = RecoveryScheduler(
            queue, interval_s=0.1, late_ms=5_000, republish_after_ms=5_000, progress_prefix=self.prefix
        )
        return queue, scheduler

    async def add(self, value: Any, *, token: Any = None, message_id: str | None = None, tp: str | None = None) -> str:
        body: dict[str, Any] = {"serviceId": self.service, "value": value}
        if token is not None:
            body["token"] = token
        task_id = await self.queue.add(OWNER, parse(AddCommand, body), message_id=message_id, traceparent=tp)
        # An add takes a millisecond of clock time: ids within one millisecond have no FIFO order.
        self.clock.advance(1)
        return task_id

    async def fetch(self, worker: str, ttr_ms: int | None = None, queue: WorkQueue | None = None) -> Delivery | None:
        body: dict[str, Any] = {"serviceId": self.service, "workerId": worker}
        if ttr_ms is not None:
            body["timeToRecover"] = ttr_ms
        return await (queue or self.queue).fetch(OWNER, parse(FetchRequest, body))

    async def ack(
        self,
        worker: str,
        delivery: Delivery | None = None,
        *,
        result: Any = "ok",
        error: Any = None,
        queue: WorkQueue | None = None,
    ) -> bool:
        body: dict[str, Any] = {"serviceId": self.service, "workerId": worker}
        if error is not None:
            body["error"] = error
        else:
            body["result"] = result
        if delivery is not None:
            body["taskId"] = delivery.task_id
            body["epoch"] = delivery.epoch
        return await (queue or self.queue).ack(OWNER, parse(AckRequest, body))

    async def advance(self, ms: int, *, ticks: int = 1) -> None:
        """Let time pass and let the recovery scheduler see it (as its loop would)."""
        self.clock.advance(ms)
        for _ in range(ticks):
            await self.scheduler.tick()
        await self.queue.drain_background(5.0)

    async def fetch_until(self, worker: str, *, step_ms: int = 100, limit_ms: int = 10_000, **kw: Any) -> Delivery:
        """Fetch, advancing the clock by ``step_ms`` between tries: how long it took is ``clock`` time."""
        waited = 0
        while True:
            got = await self.fetch(worker, **kw)
            if got is not None:
                return got
            if waited >= limit_ms:
                raise AssertionError(f"{worker} got nothing within {limit_ms} ms of clock time")
            await self.advance(step_ms)
            waited += step_ms


@pytest.fixture(scope="session")
def cassandra_store_session(servers: Any) -> Iterator[Any]:
    """One driver session for the whole run: schema created and statements prepared once."""
    from bridge.config import Settings
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.repository import CassandraTaskStore
    from bridge.storage.schema import create_schema

    settings = Settings(
        cassandra_hosts=servers.cassandra_hosts,
        cassandra_port=servers.cassandra_port,
        cassandra_keyspace=servers.keyspace,
        keyring=None,
        key_server_url=None,
    )
    db = CassandraSession(settings)

    async def setup() -> None:
        await db.connect()
        await create_schema(db, settings)
        await CassandraTaskStore(db, lambda: 0, TTL_S).prepare()

    # Requested lazily from inside a running test loop: set up on a thread with a loop of its own.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, setup()).result()
        yield db
        pool.submit(asyncio.run, db.close()).result()


def _memory(clock: ManualClock) -> TaskStore:
    return MemoryTaskStore(clock.now_ms, TTL_S)


@pytest.fixture(params=["memory", pytest.param("cassandra", marks=pytest.mark.integration)])
async def harness(request: pytest.FixtureRequest, keyring_path: Path) -> AsyncIterator[Harness]:
    keys = KeyringFileProvider(keyring_path)
    if request.param == "memory":
        clock = ManualClock(1_700_000_000_000)
        store = _memory(clock)
    else:
        from bridge.storage.repository import CassandraTaskStore

        # Days ahead of real time, different for every test: its expiry and outbox buckets are its own.
        clock = ManualClock(int(time.time() * 1000) + random.randrange(1, 30 * 86_400) * 1000)  # noqa: S311
        db = request.getfixturevalue("cassandra_store_session")
        store = CassandraTaskStore(db, clock.now_ms, TTL_S)
    h = Harness(store, keys, clock, prefix=f"test-{uuid.uuid4().hex[:8]}-")
    await h.scheduler.tick()  # the scheduler starts before any lease exists, as in a bridge
    yield h
    await h.queue.drain_background(5.0)
