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
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bridge.crypto import KeyringFileProvider
from bridge.domain.clock import ManualClock
from bridge.domain.hints import MemoryHints
from bridge.domain.store import TaskStore
from bridge.storage.memory import MemoryTaskStore
from tests.queue_harness import TTL_S, Harness


@pytest.fixture(scope="session")
def datastax_store_session(cassandra_settings: Any) -> Iterator[Any]:
    """cassandra-driver: one session for the whole run (it connects in about a second, and its
    I/O thread serves any event loop)."""
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.repository import CassandraTaskStore

    db = CassandraSession(cassandra_settings)

    async def setup() -> None:
        await db.connect()
        await CassandraTaskStore(db, lambda: 0, TTL_S).prepare()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, setup()).result()
        yield db
        pool.submit(asyncio.run, db.close()).result()


async def _cassandra_session(request: pytest.FixtureRequest) -> tuple[Any, bool]:
    """The test's session, and whether the test owns it (closes it at the end). acsylla's session
    belongs to the event loop that opened it: one per test, opened in the test's loop (50 ms)."""
    from bridge.storage.repository import CassandraTaskStore
    from bridge.storage.session import open_session

    settings = request.getfixturevalue("cassandra_settings")
    if settings.cassandra_driver == "datastax":
        return request.getfixturevalue("datastax_store_session"), False
    db = open_session(settings)
    await db.connect()
    await CassandraTaskStore(db, lambda: 0, TTL_S).prepare()
    return db, True


AHEAD_DAYS_MAX = 1_000


def _memory(clock: ManualClock) -> TaskStore:
    return MemoryTaskStore(clock.now_ms, TTL_S)


async def _harness(
    request: pytest.FixtureRequest, keyring_path: Path, *, hinted: bool, start: Callable[[int], int] | None = None
) -> AsyncIterator[Harness]:
    """``start``: the clock's start from the one chosen here (forward only), before the first tick."""
    keys = KeyringFileProvider(keyring_path)
    db, owned = None, False
    if request.param == "memory":
        clock = ManualClock(1_700_000_000_000)
        store = _memory(clock)
    else:
        from bridge.storage.repository import CassandraTaskStore

        # Days ahead of real time, different for every test: its expiry and outbox buckets are its own.
        # The duty holder of a test reads every queue's buckets of its stretch of time, so another
        # test's leftovers there (owed results, held leases) reach it: drawn from 1,000 days, not
        # 30, two tests' stretches (some 10 minutes each) overlap once in ~30,000 runs, not ~1,000.
        clock = ManualClock(int(time.time() * 1000) + random.randrange(1, AHEAD_DAYS_MAX * 86_400) * 1000)
        db, owned = await _cassandra_session(request)
        store = CassandraTaskStore(db, clock.now_ms, TTL_S)
    if start is not None:
        clock.advance(start(clock.now_ms()) - clock.now_ms())
    hints = MemoryHints() if hinted else None
    h = Harness(store, keys, clock, prefix=f"test-{uuid.uuid4().hex[:8]}-", hints=hints)
    await h.scheduler.tick()  # the scheduler starts before any lease exists, as in a bridge
    yield h
    await h.close()
    if hints is not None:
        hints.close()
    await h.queue.stop_background(5.0)  # as a bridge that stops
    if owned:
        await db.close()


STORES = ["memory", pytest.param("cassandra", marks=pytest.mark.integration)]


@pytest.fixture(params=STORES)
async def harness(request: pytest.FixtureRequest, keyring_path: Path) -> AsyncIterator[Harness]:
    """Scan mode (no hints): every fetch reads the ready index."""
    async for h in _harness(request, keyring_path, hinted=False):
        yield h


@pytest.fixture(params=STORES)
async def hinted(request: pytest.FixtureRequest, keyring_path: Path) -> AsyncIterator[Harness]:
    """Hint mode: fetches claim what hints name (a broker's, modelled in memory) and wait for them."""
    async for h in _harness(request, keyring_path, hinted=True):
        yield h
