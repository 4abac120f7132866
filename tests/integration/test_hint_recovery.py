"""Hints and long-poll through broker trouble (real servers): a reconnection, a hint queue
deleted, a consumer start that fails, many queues (BRIDGE_MAX_QUEUES_IN_MEMORY)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from bridge.domain.records import QueueKey
from bridge.transport.hints import hint_queue_name
from tests.conftest import OWNERS, consumers_on, queue_exists, service_id, wait_for
from tests.integration.test_client_resilience import _close_connection_named
from tests.integration.test_long_poll import slow_consumer_start_once

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _waiters(b: Any) -> int:
    return sum(len(x.waiters) for x in b.hints._waiting.values())


async def _reconnected(b: Any, before: Any) -> None:
    """Wait until the bridge's robust connection is back with new channels."""

    def back() -> bool:
        conn = b.transport.connection
        return conn is not None and not conn.is_closed and b.transport.is_ready() and conn.transport is not before

    await wait_for(back, 30.0, what="the bridge reconnected")


async def test_long_poll_works_again_after_the_broker_closed_the_bridges_connection(
    named_bridge, engine, workers, servers
):
    """A fetch long-polls; the broker closes the bridge's connection; the robust connection comes
    back without the hint consumer (aio-pika restores only the queues its robust channel keeps),
    and the bridge still held its tag: every fetch joining that queue waited on no consumer, so a
    task added was handed out only by the next fetch's basic.get. Now the fetch that waited across
    the reconnection is answered null at once, and the next long-poll is woken by a new task."""
    b, conn_name = await named_bridge()
    svc = service_id()
    w1, w2 = await workers(svc, "w1"), await workers(svc, "w2")
    first = asyncio.create_task(w1.fetch(wait_ms=25_000))
    await wait_for(lambda: _waiters(b) == 1, 10.0, what="the first long-poll waiting")
    before = b.transport.connection.transport
    await asyncio.to_thread(_close_connection_named, conn_name)
    await _reconnected(b, before)
    assert await asyncio.wait_for(first, 10.0) is None  # answered at the reconnection, not after 25 s
    # While the hint channel is still being restored a fetch may be answered null at once (it
    # could not wait): the worker fetches again, as Worker.run does.
    second = asyncio.create_task(w2.fetch(wait_ms=25_000))

    def waiting_again() -> bool:
        nonlocal second
        if second.done():
            assert second.result() is None
            second = asyncio.create_task(w2.fetch(wait_ms=25_000))
        return _waiters(b) == 1

    await wait_for(waiting_again, 20.0, what="a long-poll waiting after the reconnection")
    added = time.monotonic()
    task_id = await engine.add(svc, {"n": 1})
    got = await asyncio.wait_for(second, 5.0)
    assert got is not None and got.id == task_id and time.monotonic() - added < 5


async def _delete_queue(url: str, name: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.queue_delete(name)
    finally:
        await conn.close()


async def test_long_poll_works_again_after_an_operator_deleted_the_hint_queue(bridge, engine, workers, servers):
    """A fetch long-polls; an operator deletes the queue's hint queue (the broker cancels the
    bridge's consumer of it). A second worker's long-poll makes the bridge declare the hint queue
    again; a task added then must wake one of the two waiting fetches."""
    svc = service_id()
    ours = hint_queue_name(bridge.settings.queue_prefix, QueueKey(OWNERS[0], svc))
    url = servers.amqp_url("guest")
    w1, w2 = await workers(svc, "w1"), await workers(svc, "w2")
    first = asyncio.create_task(w1.fetch(wait_ms=25_000))
    await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the first long-poll waiting")
    await wait_for(lambda: consumers_on(url, ours), 5.0, interval=0.2, what="the bridge consuming the hint queue")
    await _delete_queue(url, ours)
    # The waiting fetch is answered null at the broker's cancel of its consumer; the first fetches
    # after the deletion find the hint channel closed (404) and are answered null at once; the
    # bridge's robust channel comes back and declares the hint queue again. Each worker long-polls
    # again, as its loop would.
    assert await asyncio.wait_for(first, 10.0) is None, "answered at the cancel of its consumer"
    first = asyncio.create_task(w1.fetch(wait_ms=25_000))
    second = asyncio.create_task(w2.fetch(wait_ms=25_000))
    deadline = time.monotonic() + 20
    while _waiters(bridge) < 2:
        assert time.monotonic() < deadline, "the long-polls never waited again"
        for n, (w, t) in enumerate(((w1, first), (w2, second))):
            if t.done():
                assert t.result() is None
                again = asyncio.create_task(w.fetch(wait_ms=25_000))
                first, second = (again, second) if n == 0 else (first, again)
        await asyncio.sleep(0.05)

    await wait_for(lambda: queue_exists(url, ours), 10.0, interval=0.2, what="the bridge declared the hint queue again")
    consumers = await consumers_on(url, ours)
    task_id = await engine.add(svc, {"n": 1})
    done, _ = await asyncio.wait([first, second], timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
    assert done, (
        f"no waiting fetch was woken within 5 s of the add after the hint queue was deleted and declared "
        f"again (consumers on it: {consumers}; "
        f"bridge thinks: {[x.consumer_tag for x in bridge.hints._waiting.values()]})"
    )
    got = done.pop().result()
    assert got is not None and got.id == task_id
    for t in (first, second):
        if not t.done():
            t.cancel()


async def _hint_queues_of_new_services(bridge: Any, n: int) -> list[str]:
    """One hint offered in each of ``n`` new service queues (the bridge declares their hint queues)."""
    from bridge.domain.hints import Hint

    names = []
    for i in range(n):
        q = QueueKey(OWNERS[0], f"svc-hints-{uuid.uuid4().hex[:8]}-{i}")
        tid = uuid.uuid4()
        await bridge.hints.offer(q, Hint(tid, 1, tid, None, False))
        names.append(hint_queue_name(bridge.settings.queue_prefix, q))
    return names


async def test_the_declared_hint_queues_stay_bounded(bridge, servers, monkeypatch):
    """BRIDGE_MAX_QUEUES_IN_MEMORY bounds the hint queues a bridge keeps declared objects of (any caller can name
    new services). The robust channel they are declared on keeps every queue it declared, for
    ever, and declares them all again at each reconnection."""
    h = bridge.hints
    monkeypatch.setattr(h, "_max_declared", 10)
    names = await _hint_queues_of_new_services(bridge, 100)
    kept = sum(len(s) for s in h._channel._queues.values())
    for name in names:
        await _delete_queue(servers.amqp_url("guest"), name)
    assert len(h._declared) <= 10
    assert kept <= 10, f"the hint channel keeps {kept} declared queues (the bound is 10)"


async def test_a_waiter_that_joined_a_consumer_start_that_failed_is_still_woken(bridge, engine, workers, monkeypatch):
    """Two fetches of one queue wait; the first starts the queue's hint consumer, the second joins
    while it is starting. The start runs out of time (the broker is slow once): the first fetch was
    answered null and the second left waiting on no consumer for its whole waitMs. Now the one
    that joined is answered at once, and the starter, whose wait could not start, scans the store
    and waits again (answered null at once, its worker sent it again at once: a spin for as long as
    the hints could not be used, docs/storage.md, "Long-poll"): a new task wakes it."""
    svc = service_id()
    w1, w2 = await workers(svc, "w1"), await workers(svc, "w2")
    slow_once = slow_consumer_start_once(bridge, monkeypatch)
    first = asyncio.create_task(w1.fetch(wait_ms=20_000))
    await wait_for(slow_once.is_set, 5.0, what="the consumer starting")
    second = asyncio.create_task(w2.fetch(wait_ms=20_000))
    await wait_for(lambda: _waiters(bridge) == 2, 5.0, what="the second fetch joining the start")
    # The one that joined waits on no consumer: answered when the start fails, not after its 20 s.
    assert await asyncio.wait_for(second, 10.0) is None
    await wait_for(lambda: _waiters(bridge) == 1, 5.0, what="the starter waiting again")
    assert not first.done()
    task_id = await engine.add(svc, {"n": 1})
    got = await asyncio.wait_for(first, 5.0)
    assert got is not None and got.id == task_id


async def test_a_reconnection_does_not_declare_again_hint_queues_the_bridge_no_longer_keeps(
    named_bridge, servers, monkeypatch
):
    """Hint queues expire when unused (x-expires). A bridge forgets the queues past its bound,
    but its robust channel declares every hint queue it ever declared again at each reconnection
    (and at each channel error): expired queues come back, and the restore takes one round trip
    per queue ever touched by the process."""
    import aio_pika

    b, conn_name = await named_bridge()
    h = b.hints
    monkeypatch.setattr(h, "_max_declared", 5)
    queues = await _hint_queues_of_new_services(b, 30)
    url = servers.amqp_url("guest")
    for name in queues:  # as if they had expired
        await _delete_queue(url, name)
    before = b.transport.connection.transport
    await asyncio.to_thread(_close_connection_named, conn_name)
    await _reconnected(b, before)
    await wait_for(lambda: not h._channel.is_closed, 10.0, what="the hint channel back")
    conn = await aio_pika.connect(url)
    back = 0
    try:
        for name in queues:
            ch = await conn.channel()
            try:
                await ch.declare_queue(name, passive=True)
                back += 1
            except aio_pika.exceptions.ChannelClosed:
                pass
    finally:
        for name in queues:
            ch = await conn.channel()
            with contextlib.suppress(Exception):
                await ch.queue_delete(name)
        await conn.close()
    assert back <= 5, f"{back} of 30 deleted hint queues declared again by the reconnection (a bound of 5)"


async def test_a_lone_long_poll_whose_hint_consumer_the_broker_cancelled_gets_the_next_task(
    make_bridge, engine, workers, servers
):
    """The broker cancels a hint consumer when its queue is deleted or the node holding it goes
    down; the consuming channel stays open. Nothing answered the fetches waiting on it: with no
    other worker arriving to start a consumer again, a worker waited out its whole long-poll (30 s
    by the client's default) while tasks were added. They are now answered at the cancel, and the
    worker's next long-poll gets the task."""
    bridge = await make_bridge()
    await make_bridge()  # the add is stored by another bridge (no local hand-off)
    await bridge.transport.pause(["add"])
    svc = service_id()
    ours = hint_queue_name(bridge.settings.queue_prefix, QueueKey(OWNERS[0], svc))
    url = servers.amqp_url("guest")
    w = await workers(svc)

    async def loop() -> Any:  # a worker's loop: long-poll again until a task comes
        while True:
            got = await w.fetch(wait_ms=25_000)
            if got is not None:
                return got

    polling = asyncio.create_task(loop())
    await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the long-poll waiting")
    await wait_for(lambda: consumers_on(url, ours), 5.0, interval=0.2, what="the bridge consuming the hint queue")
    await _delete_queue(url, ours)
    added = time.monotonic()
    task_id = await engine.add(svc, {"n": 1})
    try:
        got = await asyncio.wait_for(polling, 10.0)
    finally:
        polling.cancel()
    assert got.id == task_id and time.monotonic() - added < 10


async def test_concurrent_first_declarations_open_one_declaring_channel(bridge, servers):
    """Concurrent first uses of hint queues (a bridge's start, prefetch 64; every refusal closes
    the declaring channel) each opened a channel of their own and kept the last: 20 at once left
    19 channels open, unused, on the bridge's connection (a broker process each, against its
    channel_max)."""
    h = bridge.hints
    connection = h._connection.transport.connection
    channels_before = len(connection.channels)
    queues = [QueueKey(OWNERS[0], service_id()) for _ in range(20)]
    await asyncio.gather(*(h._queue(q) for q in queues))
    opened = len(connection.channels) - channels_before
    for q in queues:
        await _delete_queue(servers.amqp_url("guest"), hint_queue_name(bridge.settings.queue_prefix, q))
    assert opened <= 1, f"{opened} channels opened for 20 concurrent first declarations"


async def test_a_stopping_bridge_cancels_its_hint_consumers_before_its_connection_closes(make_bridge, workers, servers):
    """A stop answers the waiting long-polls first and closes the connection only at its end (up
    to the grace later). Their hint consumers were left registered meanwhile: each took every hint
    published to its queue and gave it back at once, round and round, while the other bridges'
    fetches of that queue found it empty. Found by review, 2026-12-06."""
    b = await make_bridge()
    svc = service_id()
    hints = hint_queue_name(b.settings.queue_prefix, QueueKey(OWNERS[0], svc))
    url = servers.amqp_url("guest")
    w = await workers(svc, "w")
    waiting = asyncio.create_task(w.fetch(wait_ms=25_000))

    async def consumed(n: int) -> bool:
        return await consumers_on(url, hints) == n

    await wait_for(lambda: consumed(1), 15, interval=0.2, what="a long-poll consuming the hint queue")
    b.hints.close()  # the stop's first step: the waiting fetches are answered (null)
    await wait_for(lambda: consumed(0), 10, interval=0.2, what="its consumer cancelled, the connection still open")
    assert b.transport.connection is not None and not b.transport.connection.is_closed
    with contextlib.suppress(Exception):
        await asyncio.wait_for(waiting, 10)


async def test_the_hints_of_tasks_whose_life_ended_leave_their_hint_queue(make_bridge, engine, servers):
    """Hints had no expiration: a tenant adding to a queue nobody fetched from piled up one hint
    a task (kilobytes each in the broker's memory) for ever, past its tasks' TTL, and workers that
    came back took the oldest first, each a claim of a task long gone (found by review,
    2026-12-06). A hint now expires with its task."""
    from tests.conftest import _queue_counts

    b = await make_bridge(task_ttl=2)
    svc = service_id()
    name = hint_queue_name(b.settings.queue_prefix, QueueKey(OWNERS[0], svc))
    for n in range(5):
        await engine.add(svc, {"n": n}, token={"p": n})  # a token: the hint carries no value
    guest = servers.amqp_url("guest")
    assert (await _queue_counts(guest, name))[1] == 5, "a hint a task, nobody fetching"

    async def gone() -> bool:
        return (await _queue_counts(guest, name))[1] == 0

    await wait_for(gone, 20, interval=0.5, what="the hints gone with their tasks (a 2 s TTL)")
