"""Every ack completes exactly the task it was meant for (issue 12), whatever copies of it arrive late.

The drill: a worker fetches A from bridge b0; b0 is paused (SIGSTOP) holding a copy of the ack of
A; the worker's client gives up, retries the ack on b1 (A completed) and fetches B; b0 resumes and
handles its stale copy. B must keep its own lease and get its own result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest

from bridge.client import TransportError, Worker
from tests.conftest import OWNERS, free_port, metric, own_results, service_id, wait_bridges, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.slow]


async def queue_depth(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def raw_rpc(url: str, exchange: str) -> AsyncIterator[Any]:
    """Publish hand-made requests (properties and headers exactly as given); replies land in a queue."""
    conn = await aio_pika.connect(url)
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    try:
        ch = await conn.channel()
        reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await replies.put(orjson.loads(message.body))

        await reply_q.consume(on_reply, no_ack=True)
        ex = await ch.get_exchange(exchange, ensure=False)

        async def send(method: str, body: dict[str, Any], **props: Any) -> None:
            user = url.split("//")[1].split(":")[0]
            message = aio_pika.Message(
                orjson.dumps(body),
                reply_to="amq.rabbitmq.reply-to",
                correlation_id=uuid.uuid4().hex,
                user_id=user,
                content_type="application/json",
                **props,
            )
            await ex.publish(message, routing_key=method)

        yield send, replies
    finally:
        await conn.close()


async def fetch_until(w: Worker) -> Any:
    """Fetch, retrying requests that got stuck on the paused bridge (they carry a deadline)."""
    while True:
        try:
            return await w.fetch(time_to_recover_ms=60_000)
        except TransportError:
            continue


async def legacy_ack(w: Worker, result: Any) -> bool:
    """An ack as a client of contract 1.0 sends it: no taskId."""
    reply = await w.call("ack", {"serviceId": w.service, "workerId": w.worker_id, "result": result})
    return bool(reply["result"])


@pytest.mark.parametrize("variant", ["named", "legacy_timestamped", "legacy_with_deadline"])
async def test_a_late_copy_of_an_ack_never_completes_the_next_task(
    variant, bridge_processes, servers, names, engine, cql
):
    port = free_port()
    # Prefetch 1: once b0 holds the stale ack, RabbitMQ sends every later ack to b1.
    b0 = bridge_processes(BRIDGE_PREFETCH="1", BRIDGE_HTTP_PORT=str(port), BRIDGE_HTTP_HOST="127.0.0.1")
    await wait_bridges(servers, names, 1)
    svc = service_id()
    url = servers.amqp_url(OWNERS[0])
    async with (
        own_results(servers, names, svc) as results,
        Worker(url, service=svc, worker_id="w1", exchange=names["exchange"], timeout=2.0) as w,
        raw_rpc(url, names["exchange"]) as (send, stale_replies),
    ):
        a_id = await engine.add(svc, "A", token={"t": "A"})
        b_id = await engine.add(svc, "B", token={"t": "B"})
        a = await w.fetch(time_to_recover_ms=60_000)
        assert a is not None and a.id == a_id
        os.kill(b0.proc.pid, signal.SIGSTOP)
        try:
            body: dict[str, Any] = {"serviceId": svc, "workerId": "w1", "result": {"task": "A"}}
            props: dict[str, Any] = {}
            deadline_ms = 0
            if variant == "named":
                body |= {"taskId": a.id, "epoch": a.epoch}  # and no deadline: only the task id protects
            elif variant == "legacy_timestamped":
                props["timestamp"] = datetime.now(tz=UTC)
            else:
                deadline_ms = int(time.time() * 1000) + 1500
                props["headers"] = {"x-deadline": deadline_ms}
            await send("ack", body, **props)  # confirmed: it is in the queue or on its way to b0
            ack_queue = f"{names['queue_prefix']}.ack"
            await wait_for(
                _delivered(servers.amqp_url("guest"), ack_queue), 10, what="the ack copy delivered to paused b0"
            )
            # The client gives up on it and retries on another bridge: A is completed there.
            bridge_processes()
            await wait_bridges(servers, names, 2)
            if variant == "named":
                assert await a.ack({"task": "A"}) is True
            else:
                assert await legacy_ack(w, {"task": "A"}) is True
            b = await fetch_until(w)
            assert b is not None and b.id == b_id
            if variant == "legacy_with_deadline":
                # The copy is stale only once its deadline has passed: b0 must not resume before
                # (a fast restart of the client's retries could take less than the 1.5 s).
                await wait_for(lambda: time.time() * 1000 > deadline_ms + 200, 5, what="the stale copy's deadline")
        finally:
            os.kill(b0.proc.pid, signal.SIGCONT)
        # b0 handles its stale copy now.
        if variant == "legacy_with_deadline":
            # Answered ``unavailable`` (past its deadline, not executed) and counted as expired.
            stale = await asyncio.wait_for(stale_replies.get(), 15)
            assert stale["error"]["code"] == "unavailable" and "x-deadline" in stale["error"]["message"], stale
            assert await _metric_at_least(port, 'queue_bridge_requests_expired_total{method="ack"}', 1)
        else:
            stale = await asyncio.wait_for(stale_replies.get(), 15)
            # A repeat of A's completion (same worker, same lease) answers true; a legacy copy
            # older than B's lease is refused. Either way B is untouched.
            assert stale == {"result": variant == "named"}
        row = cql.execute(
            f"SELECT state, epoch, worker FROM {servers.keyspace}.leases WHERE owner = %s AND service = %s "
            "AND task_id = %s",
            (OWNERS[0], svc, uuid.UUID(b_id)),
        ).one()
        assert (row["state"], row["worker"], row["epoch"]) == ("leased", "w1", 1), "B was completed by A's ack"
        assert await b.ack({"task": "B"}) is True
        msgs: list[dict[str, Any]] = []

        def both() -> bool:
            while not results.empty():
                msgs.append(results.get_nowait())
            return len(msgs) >= 2

        await wait_for(both, 15, what="two results")
        assert sorted((m["taskId"], m["result"]["task"], m["token"]["t"]) for m in msgs) == sorted(
            [(a_id, "A", "A"), (b_id, "B", "B")]
        )


def _delivered(url: str, queue: str) -> Any:
    async def check() -> bool:
        return await queue_depth(url, queue) == 0

    return check


async def _metric_at_least(port: int, name: str, value: float) -> bool:
    return await metric(port, name) >= value
