"""Waiting fetches of a queue whose hint queue cannot be used (its RabbitMQ node down) poll the
store: pure logic on the memory store, counting its operations."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from bridge.crypto import KeyringFileProvider, generate_keyring, write_keyring
from bridge.domain.clock import ManualClock
from bridge.domain.fetching import HINTLESS_POLL_MS
from bridge.domain.hints import HintsUnavailable, MemoryHints
from bridge.storage.memory import MemoryTaskStore
from tests.queue_harness import OWNER, TTL_S, Harness

pytestmark = pytest.mark.anyio


class UnusableHints(MemoryHints):
    """Every take refused: the node holding the queue's hint queue is down. Closed (the bridge
    stops), a take answers None, as ``AmqpHints.take`` does."""

    async def take(self, q: Any, wait_ms: int) -> Any:
        if self.closed:
            return None
        raise HintsUnavailable("node down")


async def _store_operations_while_waiting(tmp_path: Path, waiters: int, wait_ms: int) -> int:
    path = tmp_path / f"keyring-{waiters}-{wait_ms}.json"
    write_keyring(path, generate_keyring([OWNER]))
    clock = ManualClock(1_700_000_000_000)
    h = Harness(MemoryTaskStore(clock.now_ms, TTL_S), KeyringFileProvider(path), clock, "", hints=UnusableHints())
    try:
        await h.fetch("warm")
        before = h.store.operations  # type: ignore[attr-defined]
        got = await asyncio.gather(*(h.fetch(f"w{i}", wait_ms=wait_ms, fresh=True) for i in range(waiters)))
        assert got == [None] * waiters
        return int(h.store.operations) - before  # type: ignore[attr-defined]
    finally:
        await h.close()


async def test_the_store_reads_do_not_grow_with_the_waiting_fetches(tmp_path: Path) -> None:
    """Each waiting fetch scanned the store every second on its own: 1 waiter cost about 1 read a
    second, 100 waiters 133, 1,000 waiters 1,333 (for as long as the node was down, on every
    bridge)."""
    # What two more seconds of waiting cost 50 waiters (each fetch's own first look is the same).
    short = await _store_operations_while_waiting(tmp_path, 50, 1_500)
    long = await _store_operations_while_waiting(tmp_path, 50, 3_500)
    assert long - short <= 10, f"two more seconds of 50 waiting fetches cost {long - short} store operations"


async def test_a_waiting_fetch_whose_poll_was_skipped_still_sees_its_workers_grant(tmp_path: Path) -> None:
    """A worker's long-poll F1 polls the store (its hint queue unusable); its retry F2 on the same
    bridge claims a task while F1's poll of that second is skipped (another waiter of the queue
    had just looked). F1 took the worker's grant count afresh at each poll, so its next poll did
    not see that grant, scanned, and claimed a second task for the worker: the one it worked on
    was not the one its pointer named, and the other waited out its whole lease (found by review,
    2026-12-06). F1 hands out the task granted meanwhile instead."""
    path = tmp_path / "keyring.json"
    write_keyring(path, generate_keyring([OWNER]))
    clock = ManualClock(1_700_000_000_000)
    h = Harness(MemoryTaskStore(clock.now_ms, TTL_S), KeyringFileProvider(path), clock, "", hints=UnusableHints())
    try:
        fetcher = h.queue._fetcher
        real_poll = fetcher._poll_store
        polls = 0
        granted: list[Any] = []

        async def poll(a: Any, *args: Any) -> Any:
            nonlocal polls
            polls += 1
            if polls == 1:
                # F2, the worker's retry, claims the first task; this poll is then skipped, as
                # when another waiter of the queue has just looked.
                await h.add("first")
                granted.append(await h.fetch("w"))
                # (It sleeps a poll interval first: the other waiter looks just before it wakes.)
                fetcher._hintless_polls[a.q] = asyncio.get_running_loop().time() + 0.9 * HINTLESS_POLL_MS / 1000
            elif polls == 2:
                await h.add("second")
            return await real_poll(a, *args)

        fetcher._poll_store = poll  # type: ignore[method-assign]
        got = await asyncio.wait_for(h.fetch("w", wait_ms=10_000), 15)
        assert polls >= 2
        assert granted[0] is not None
        assert got is not None and got.task_id == granted[0].task_id, "a second task claimed for the worker"
    finally:
        await h.close()


async def test_a_stop_answers_a_fetch_polling_the_store_now_not_after_its_poll_interval(tmp_path: Path) -> None:
    """SIGTERM answers waiting fetches null at once (the hints close). One polling the store
    instead (its hint queue unusable) slept out the rest of its second first, then scanned and
    could claim a task for a worker whose bridge was stopping (found by review, 2026-12-07)."""
    path = tmp_path / "keyring.json"
    write_keyring(path, generate_keyring([OWNER]))
    clock = ManualClock(1_700_000_000_000)
    hints = UnusableHints()
    h = Harness(MemoryTaskStore(clock.now_ms, TTL_S), KeyringFileProvider(path), clock, "", hints=hints)
    try:
        fetcher = h.queue._fetcher
        real_poll = fetcher._poll_store
        polled = asyncio.Event()

        async def poll(a: Any, *args: Any) -> Any:
            polled.set()
            return await real_poll(a, *args)

        fetcher._poll_store = poll  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(h.fetch("w", wait_ms=30_000))
        await asyncio.wait_for(polled.wait(), 5)  # in its poll interval now (it polled once)
        await h.add("added as the bridge stops")  # a scan at its next poll would claim it
        hints.close()
        closed_at = loop.time()
        got = await asyncio.wait_for(waiting, 5)
        took = loop.time() - closed_at
        assert got is None, "a task claimed for a worker of a stopping bridge"
        assert took < HINTLESS_POLL_MS / 1000 / 2, f"answered {took:.2f} s after the stop"
    finally:
        await h.close()
