"""Waiting fetches and hint queues under churn (each test failed before its fix): a waiting fetch
whose worker is gone claims nothing, and a hint queue declared by a bridge with another task TTL
still serves long-polls."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from bridge.client import Worker
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _waiters(bridge: Any) -> int:
    return sum(len(x.waiters) for x in bridge.hints._waiting.values())


def _lease(cql: Any, keyspace: str, svc: str, task_id: str) -> dict[str, Any] | None:
    row = cql.execute(
        f"SELECT state, worker, lease_until FROM {keyspace}.leases WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()
    return row


async def test_a_long_poll_whose_worker_is_gone_does_not_take_the_next_task_from_a_live_worker(
    bridge, engine, servers, names, cql
):
    """A worker long-polls (``waitMs`` 25 s, as ``async for task in worker`` does) and goes away:
    its fetch is cancelled and its connection closed (a crash, an OOM kill, a task group torn
    down). The bridge keeps the fetch waiting until its deadline, as the oldest waiter of the
    queue. Another worker, alive, long-polls on the same bridge; a task is added. The hint goes to
    the dead fetch, which claims the task for the gone worker (its reply goes nowhere); the live
    worker's long-poll ends with null, and the task reaches it only once the gone worker's lease
    (``timeToRecover``) has run out. The HTTP gateway drops a long-poll whose client hung up
    precisely to avoid this (``GatewayServer.start``); over AMQP the bridge can tell the same
    thing (a passive ``queue.declare`` of a direct reply-to name whose channel is gone answers
    404) before claiming for a waiter."""
    svc = service_id()
    url = servers.amqp_url(OWNERS[0])
    gone = Worker(url, service=svc, worker_id="gone", exchange=names["exchange"], time_to_recover_ms=60_000)
    await gone.open()
    orphan = asyncio.create_task(gone.fetch(wait_ms=25_000))
    await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the first worker's long-poll waiting")
    orphan.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await orphan
    await gone.close()  # the worker is gone: its channel, and its reply-to with it

    live = Worker(url, service=svc, worker_id="alive", exchange=names["exchange"], time_to_recover_ms=60_000)
    await live.open()
    try:
        before = _waiters(bridge)
        waiting = asyncio.create_task(live.fetch(wait_ms=8_000))
        await wait_for(lambda: _waiters(bridge) > before, 10.0, what="the live worker's long-poll waiting")
        task_id = await engine.add(svc, {"n": 1})
        got = await asyncio.wait_for(waiting, 20.0)
        if got is None:
            got = await live.fetch()  # not a timing accident: the task is not to be had now
        lease = _lease(cql, servers.keyspace, svc, task_id)
        assert got is not None and got.id == task_id, (
            f"the task added while a live worker long-polled was claimed by the long-poll of a worker "
            f"whose connection had closed (lease: {lease}); the live worker gets it only when that "
            f"lease (timeToRecover, 60 s here) runs out"
        )
        assert await got.ack("ok") is True
    finally:
        await live.close()
        from bridge.domain.records import QueueKey
        from bridge.transport.hints import hint_queue_name

        await _delete_queue(servers.amqp_url("guest"), hint_queue_name(names["queue_prefix"], QueueKey(OWNERS[0], svc)))


async def _declare_hint_queue(url: str, name: str, ttl_s: int) -> None:
    import aio_pika

    from bridge.transport.hints import RECOVERED_PRIORITY

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        args = {"x-max-priority": RECOVERED_PRIORITY, "x-expires": (ttl_s + 86_400) * 1000}
        await ch.declare_queue(name, durable=True, arguments=args)
    finally:
        await conn.close()


async def _delete_queue(url: str, name: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        with contextlib.suppress(Exception):
            await ch.queue_delete(name)
    finally:
        await conn.close()


async def test_long_poll_still_waits_on_a_bridge_whose_task_ttl_differs_from_the_one_that_declared_the_hint_queue(
    make_bridge, engine, servers, names, workers
):
    """Hint queues are durable and per service, declared with ``x-expires`` derived from
    ``BRIDGE_TASK_TTL`` (TTL + 1 day). They live for as long as the service is used: weeks. An
    operator raises the TTL (7 -> 14 days) and rolls the fleet: every new bridge's
    ``queue.declare`` of an existing service's hint queue now differs in ``x-expires`` and the
    broker refuses it (406 PRECONDITION_FAILED, closing the bridge's hint channel each time).
    ``AmqpHints.take`` answers None at once: a long-poll no longer waits (the Worker's
    ``async for`` turns into a hot loop of fetches, each closing the hint channel), every hint of
    the queue is lost (tasks come only through reconciliation scans), and it stays so until the
    queue expires, which it never does while it is used. The dead-letter queue handles the same
    situation (``topology._declare_dead_letter_queue``); the hint queues do not."""
    from datetime import timedelta

    from bridge.domain.records import QueueKey
    from bridge.transport.hints import hint_queue_name

    svc = service_id()
    name = hint_queue_name(names["queue_prefix"], QueueKey(OWNERS[0], svc))
    admin = servers.amqp_url("guest")
    # Declared by the fleet before the change (default TTL, 7 days), as a bridge declares it.
    await _declare_hint_queue(admin, name, 7 * 86_400)
    try:
        b = await make_bridge(task_ttl=timedelta(days=14))
        w = await workers(svc, "w")
        started = time.monotonic()
        got = await w.fetch(wait_ms=3_000)
        waited = time.monotonic() - started
        assert got is None
        assert waited >= 2.5, (
            f"a fetch with waitMs=3000 on an empty queue was answered after {waited:.3f}s: the bridge "
            f"(BRIDGE_TASK_TTL changed) cannot declare the service's existing hint queue "
            f"(x-expires differs: 406), so it never waits for hints (hints lost: {b.hints.lost})"
        )
    finally:
        await _delete_queue(admin, name)
