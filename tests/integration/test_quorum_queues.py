"""BRIDGE_QUEUE_TYPE=quorum: the bridge's durable queues as quorum queues (real RabbitMQ).

On a RabbitMQ cluster a classic queue lives on one node: while that node is down, the adds routed
to it, the requests of every worker and the results waiting for the engine are out of reach (and
a classic duty queue there leaves the fleet without recovery scheduler and result relay). Quorum
queues are replicated. These tests run on one node: they check that every queue the bridge
declares takes the type, that the contract works through them end to end (quorum queues accept
only some arguments: the duty's single active consumer and drop-head, the add retry lane's TTL,
the dead-letter queue's limits), and that a queue of the other type is refused at start with a
message naming the setting's argument. A node lost under load: test_rabbitmq_cluster.py (a 3-node cluster)."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any

import aio_pika
import orjson
import pytest

from bridge.transport.errors import BrokerUnreachable
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]


def queue_types(prefix: str, vhost: str = "/") -> dict[str, str]:
    """Every queue whose name starts with ``prefix``, and its type, as the broker lists them."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = (line.split("\t") for line in out.splitlines() if line.startswith(prefix + "."))
    return {name.removeprefix(prefix + "."): kind for name, kind in rows}


async def message_count(url: str, queue: str) -> int:
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)
    finally:
        await conn.close()


async def take_results(url: str, queue: str) -> list[dict[str, Any]]:
    conn = await aio_pika.connect(url)
    got = []
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(queue, passive=True)
        while (m := await q.get(fail=False, no_ack=True)) is not None:
            got.append(orjson.loads(m.body))
    finally:
        await conn.close()
    return got


async def test_every_durable_queue_is_a_quorum_queue_and_the_contract_runs_through_them(
    make_bridge, engine, workers, servers, names
):
    b1 = await make_bridge(queue_type="quorum")
    b2 = await make_bridge(queue_type="quorum")
    prefix = names["queue_prefix"]
    svc = service_id()

    # A task with a token, fetched, extended, acked: its result reaches the engine's queue.
    task_id = await engine.add(svc, {"n": 1}, token={"wf": 1})
    w = await workers(svc, "w1")
    task = await w.fetch(60_000)
    assert task is not None and task.id == task_id and task.value == {"n": 1}
    assert await task.extend(60_000) is True  # the lifecycle queue
    assert await task.ack({"done": 1}) is True
    results_queue = prefix + ".results"

    async def result_arrived() -> list[dict[str, Any]]:
        # This service's: the relays also publish there what earlier tests left owed in the keyspace.
        got.extend(r for r in await take_results(servers.amqp_url("guest"), results_queue) if r["serviceId"] == svc)
        return got

    got: list[dict[str, Any]] = []
    await wait_for(result_arrived, 15, what="the task's result on the quorum results queue")
    assert [(r["taskId"], r["result"], r["token"]) for r in got] == [(task_id, {"done": 1}, {"wf": 1})]

    # Bad input is answered and dead-lettered into the (bounded) quorum dead-letter queue.
    reply, _ = await engine.call_raw("add", None, raw=b"{not json")
    assert reply["error"]["code"] == "bad_request"
    dead = prefix + ".dead-letter"
    await wait_for(
        lambda: message_count(servers.amqp_url("guest"), dead),
        10,
        what="the malformed add in the dead-letter queue",
    )
    # A request no method takes goes through the alternate exchange to the unrouted queue.
    reply, _ = await engine.call_raw("frobnicate", {"serviceId": svc})
    assert reply["error"]["code"] == "bad_request" and "unknown method" in reply["error"]["message"]

    # The duty (a single active consumer on a quorum queue) is held by one bridge, and handed
    # over when it stops.
    await wait_for(lambda: b1.duty.held or b2.duty.held, 15, what="the duty held")
    holder, other = (b1, b2) if b1.duty.held else (b2, b1)
    assert not other.duty.held
    await make_bridge.stop(holder)
    await wait_for(lambda: other.duty.held, 30, what="the duty handed over")

    types = queue_types(prefix)
    durable = ["add", "fetch", "ack", "lifecycle", "unrouted", "add-retry", "dead-letter", "results", "duty"]
    assert {q: types.get(q) for q in durable} == dict.fromkeys(durable, "quorum"), types
    # Hint queues keep priorities (two lanes), which quorum queues of RabbitMQ 3.10 lack: classic.
    hints = {q: t for q, t in types.items() if q.startswith("hints.")}
    assert hints and set(hints.values()) == {"classic"}, types


async def test_a_queue_declared_with_the_other_type_is_refused_at_start_and_left_as_it_is(
    make_bridge, engine, workers, servers, names
):
    """A queue keeps the type it was declared with: switching BRIDGE_QUEUE_TYPE on a running
    deployment cannot convert it, so the bridge refuses to start with the broker's reason (it names
    x-queue-type) instead of serving through a mix, and the queues and their tasks are untouched."""
    first = await make_bridge(queue_type="classic")  # as every bridge before the setting
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    await make_bridge.stop(first)

    with pytest.raises(BrokerUnreachable, match="x-queue-type"):
        await make_bridge(queue_type="quorum")
    assert queue_types(names["queue_prefix"])["add"] == "classic"

    await make_bridge(queue_type="classic")  # it serves the task added before
    w = await workers(svc, "w1")
    task = await asyncio.wait_for(w.fetch(60_000), 10)
    assert task is not None and task.id == task_id


async def test_a_vhost_whose_default_queue_type_is_quorum_gives_a_classic_bridge_quorum_queues_that_work(
    make_bridge, servers, names
):
    """RabbitMQ 3.10+ lets a vhost default to quorum queues (RabbitMQ 4 recommends it): a queue
    declared without ``x-queue-type`` there is a quorum queue if it is durable. A bridge left at
    ``BRIDGE_QUEUE_TYPE=classic`` declares its durable queues without the argument, so on such a
    vhost they are quorum queues: it must start, and the contract must work through them (the
    classic-mode arguments are all ones quorum queues accept); its hint queues (not durable, two
    priorities) stay classic."""
    from bridge.client import Engine, Worker
    from tests.conftest import BRIDGE_USER, ENGINE_USER
    from tests.integration.test_operator_broker_actions import rabbitmqctl

    vhost = f"qb-test-dqt-{names['queue_prefix'].rsplit('-', 1)[-1]}"
    prefix = names["queue_prefix"]
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost, "--default-queue-type", "quorum")
    try:
        # The users' permissions on "/" (least privilege, as shipped), granted on the vhost too.
        listed = await asyncio.to_thread(rabbitmqctl, "list_permissions", "-p", "/")
        for line in listed.splitlines():
            user, *perms = line.split("\t")
            if user in (BRIDGE_USER, ENGINE_USER, OWNER, "guest"):
                await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, *perms)

        def url(user: str) -> str:
            return f"amqp://{user}:{user}@{servers.amqp_host}:{servers.amqp_port}/{vhost}"

        b = await make_bridge(amqp_url=url(BRIDGE_USER))
        try:
            svc, ex = service_id(), names["exchange"]
            async with (
                Engine(url(ENGINE_USER), owner=OWNER, exchange=ex) as engine,
                Worker(url(OWNER), service=svc, worker_id="w", exchange=ex) as worker,
            ):
                task_id = await engine.add(svc, {"n": 1}, token={"wf": 1})
                task = await worker.fetch(60_000)
                assert task is not None and task.id == task_id
                assert await task.ack({"done": 1}) is True
            got: list[dict[str, Any]] = []

            async def result_arrived() -> bool:
                got.extend(r for r in await take_results(url("guest"), prefix + ".results") if r["serviceId"] == svc)
                return bool(got)

            await wait_for(result_arrived, 15, what="the result on the vhost's results queue")
            assert [(r["taskId"], r["result"]) for r in got] == [(task_id, {"done": 1})]
            types = await asyncio.to_thread(queue_types, prefix, vhost)
            durable = {k: v for k, v in types.items() if not k.startswith("hints.")}
            hints = {k: v for k, v in types.items() if k.startswith("hints.")}
            assert {"add", "fetch", "ack", "duty", "dead-letter", "results"} <= set(durable), types
            assert set(durable.values()) == {"quorum"}, types
            assert hints and set(hints.values()) == {"classic"}, types
        finally:
            await make_bridge.stop(b)
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)
