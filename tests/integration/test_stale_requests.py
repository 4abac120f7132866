"""Requests served late or twice (each test failed before its fix): a request the broker redelivers
after its bridge died is a retry (``fresh`` does not hold for it), and a fetch stalled past its
caller's deadline claims nothing.

A bridge whose Cassandra replies come late (a user-space proxy that delays every reply, in order,
while requests go through at once) lets a test see a claim land in Cassandra well before the bridge
learns it, and stop (SIGSTOP) or kill (SIGKILL) the bridge in that window, deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.client import RequestTimeout, TransportError, Worker
from tests.conftest import OWNERS, service_id, wait_bridges, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow]

OWNER = OWNERS[0]


class SlowReplies(TcpProxy):
    """A TCP proxy whose server replies arrive ``delay_s`` late (in order; 0: at once). Requests
    are forwarded at once: Cassandra applies a write long before the bridge hears of it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__(target_host, target_port)
        self.delay_s = 0.0

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool) -> None:
        if not replies:
            await super()._pipe(reader, writer, replies=False)
            return
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await pending.get()) is not None:
                due, data = item
                if (left := due - loop.time()) > 0:
                    await asyncio.sleep(left)  # the fault itself: latency on the way back
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(65536):
                pending.put_nowait((loop.time() + self.delay_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            pending.put_nowait(None)
            with contextlib.suppress(Exception):
                await sender
            with contextlib.suppress(Exception):
                writer.close()


@pytest.fixture
async def slow_cassandra(servers: Any) -> AsyncIterator[SlowReplies]:
    proxy = SlowReplies(servers.cassandra_hosts[0], servers.cassandra_port)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def lease_of(cql: Any, keyspace: str, svc: str, task_id: str) -> dict[str, Any] | None:
    row = await asyncio.to_thread(
        lambda: cql.execute(
            f"SELECT state, epoch, worker, lease_until FROM {keyspace}.leases "
            "WHERE owner = %s AND service = %s AND task_id = %s",
            (OWNER, svc, uuid.UUID(task_id)),
        ).one()
    )
    return dict(row) if row is not None else None


async def pointer_of(cql: Any, keyspace: str, svc: str, worker: str) -> dict[str, Any] | None:
    row = await asyncio.to_thread(
        lambda: cql.execute(
            f"SELECT task_id, epoch, done_task FROM {keyspace}.workers "
            "WHERE owner = %s AND service = %s AND worker = %s",
            (OWNER, svc, worker),
        ).one()
    )
    return dict(row) if row is not None else None


async def leased_to(cql: Any, keyspace: str, svc: str, ids: list[str], worker: str) -> set[str]:
    held = set()
    for task_id in ids:
        lease = await lease_of(cql, keyspace, svc, task_id)
        if lease is not None and lease["state"] == "leased" and lease["worker"] == worker:
            held.add(task_id)
    return held


@pytest.mark.parametrize("method", ["fetch", "ack_with_next"])
async def test_a_request_redelivered_after_its_bridge_died_hands_the_task_its_first_delivery_claimed(
    method, bridge_processes, make_bridge, servers, names, engine, cql, slow_cassandra
):
    """A worker's ``fresh`` fetch (or ack with ``next: {fresh: true}``) is taken by bridge A, which
    claims a task for it and is killed (-9) before it answers and acks the request. RabbitMQ
    redelivers the request (``redelivered`` set) to bridge B while the worker still waits. B
    honours ``fresh`` (skips the worker's pointer) and claims a second task: the worker gets that
    one, and the task A claimed stays leased to a worker that was never handed it, out of every
    other worker's reach until its whole lease (60 s here) runs out. ``fresh`` is documented as
    "not a retry of a request whose reply was lost"; a broker redelivery is exactly such a retry,
    one the client cannot see, and the bridge knows it (the redelivered flag)."""
    ks = servers.keyspace
    a = bridge_processes(BRIDGE_CASSANDRA_PORT=str(slow_cassandra.port), BRIDGE_PREFETCH="1")
    await wait_bridges(servers, names, 1)
    svc = service_id()
    ids = [await engine.add(svc, f"task-{n}") for n in range(3)]
    url = servers.amqp_url(OWNER)
    async with (
        Worker(url, service=svc, worker_id="w1", exchange=names["exchange"], timeout=30.0) as w1,
        Worker(url, service=svc, worker_id="w2", exchange=names["exchange"], timeout=30.0) as w2,
    ):
        if method == "fetch":
            body: dict[str, Any] = {"serviceId": svc, "workerId": "w1", "fresh": True, "timeToRecover": 60_000}
            candidates = ids
        else:
            held = await w1.fetch(time_to_recover_ms=60_000)
            assert held is not None and held.id == ids[0]
            body = {
                "serviceId": svc,
                "workerId": "w1",
                "taskId": held.id,
                "epoch": held.epoch,
                "hasToken": held.has_token,
                "result": "done",
                "next": {"fresh": True, "timeToRecover": 60_000},
            }
            candidates = ids[1:]
        slow_cassandra.delay_s = 1.5
        call = asyncio.create_task(w1.call_raw("ack" if method == "ack_with_next" else "fetch", body))

        async def claimed_by_a() -> set[str]:
            return await leased_to(cql, ks, svc, candidates, "w1")

        first = await wait_for(claimed_by_a, 20, interval=0.02, what="bridge A's claim applied in Cassandra")
        a.kill()  # before A hears of its claim (1.5 s): it never answers nor acks the request
        await make_bridge()  # bridge B: RabbitMQ redelivers the request to it
        reply, _ = await asyncio.wait_for(call, 30)
        fetched = reply if method == "fetch" else reply["next"]
        handed = fetched["task"]["id"] if fetched.get("task") else None
        stranded = await leased_to(cql, ks, svc, ids, "w1") - {handed}
        other = await w2.fetch(time_to_recover_ms=60_000)
        assert not stranded and other is not None, (
            f"bridge A claimed {sorted(first)} for w1 and died; the redelivered {method} was served "
            f"fresh by bridge B, which handed w1 {handed}: {sorted(stranded)} stays leased to w1, which "
            f"never saw it, for its 60 s lease, and w2 asking now gets {other and other.id}"
        )


async def test_a_fetch_stalled_past_its_deadline_claims_no_task_for_the_caller_that_gave_up(
    bridge_processes, make_bridge, servers, names, engine, cql, slow_cassandra
):
    """The x-deadline is checked only when the request is received. A fetch that passed that check
    and then stalls (the bridge is paused: GC, CPU starvation, a VM stall, here SIGSTOP; or its
    Cassandra is slow) goes on to claim a task long after its caller gave up. The task is then
    leased to a worker that never sees it, and no live worker gets it until the lease runs out
    (30 s here), although one asks the whole time. The docs promise the opposite: "a request
    received after it is dropped unexecuted"; the client counts on "a fetch whose reply was lost
    may still claim a task at the bridge until its deadline" (and a second for clocks)."""
    ks = servers.keyspace
    a = bridge_processes(BRIDGE_CASSANDRA_PORT=str(slow_cassandra.port), BRIDGE_PREFETCH="1")
    await wait_bridges(servers, names, 1)
    svc = service_id()
    task_id = await engine.add(svc, "T")
    url = servers.amqp_url(OWNER)
    async with (
        Worker(url, service=svc, worker_id="w1", exchange=names["exchange"], timeout=1.0) as w1,
        Worker(url, service=svc, worker_id="w2", exchange=names["exchange"], timeout=5.0) as w2,
    ):
        slow_cassandra.delay_s = 1.0
        sent_ms = time.time() * 1000
        fetch = asyncio.create_task(w1.fetch(time_to_recover_ms=30_000))

        async def written_ahead() -> bool:
            p = await pointer_of(cql, ks, svc, "w1")
            return p is not None and str(p["task_id"]) == task_id

        # A received the fetch in time, read w1's pointer, took T's hint and wrote ahead its
        # claim: the claim's compare-and-set comes once A hears of that write (1 s later).
        await wait_for(written_ahead, 20, interval=0.02, what="bridge A's write-ahead for T")
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RequestTimeout):
                await fetch  # w1 gives up at its deadline (sent + 1 s)
            # The rest of the fleet serves meanwhile (its reconciliation scans leave T to its hint).
            await make_bridge(hint_grace=60)
            deadline_ms = sent_ms + 1000
            await wait_for(lambda: time.time() * 1000 > deadline_ms + 1500, 10, what="the caller's deadline long past")
        finally:
            slow_cassandra.delay_s = 0.0  # A's Cassandra is quick again: only the pause stalled it
            os.kill(a.proc.pid, signal.SIGCONT)
        resumed_ms = time.time() * 1000

        got: list[Any] = []

        async def w2_gets_t() -> bool:
            try:
                t = await w2.fetch(time_to_recover_ms=30_000)
            except TransportError:
                return False
            if t is not None:
                got.append(t)
            return bool(got)

        with contextlib.suppress(AssertionError):
            await wait_for(w2_gets_t, 10, interval=0.2, what="a live worker handed T")
        lease = await lease_of(cql, ks, svc, task_id)
        assert got and got[0].id == task_id, (
            f"bridge A resumed {resumed_ms - deadline_ms:.0f} ms after w1's fetch deadline and claimed T "
            f"for w1 anyway (lease now {lease}); w2 asked for 10 s and got nothing: T comes back only "
            "when w1's 30 s lease runs out"
        )
