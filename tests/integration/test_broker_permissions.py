"""Tenants are separated by the broker's permissions as shipped (issue 13.2), not only by the bridge.

Real users of the local stack (deploy/local/rabbitmq.sh, the same rules as ``queue-bridge
permissions``): every forbidden action below is refused by RabbitMQ itself (ACCESS_REFUSED).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused

from bridge.client import Engine, Worker
from tests.conftest import BRIDGE_USER, ENGINE_USER, OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def refused(url: str, action) -> bool:  # type: ignore[no-untyped-def]
    """True if the broker refuses ``action(channel)`` for the user of ``url``."""
    conn = await aio_pika.connect(url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        try:
            await action(channel)
        except ChannelAccessRefused:  # 403 ACCESS_REFUSED, and nothing else
            return True
        return False
    finally:
        await conn.close()


def consume(queue: str):  # type: ignore[no-untyped-def]
    async def action(ch: aio_pika.abc.AbstractChannel) -> None:
        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            return None

        q = await ch.get_queue(queue, ensure=False)
        await q.consume(ignore)

    return action


def publish(exchange: str, routing_key: str, body: bytes = b"{}", **props):  # type: ignore[no-untyped-def]
    async def action(ch: aio_pika.abc.AbstractChannel) -> None:
        ex = ch.default_exchange if exchange == "" else await ch.get_exchange(exchange, ensure=False)
        await ex.publish(aio_pika.Message(body, **props), routing_key=routing_key)

    return action


def bind_own_queue(exchange: str):  # type: ignore[no-untyped-def]
    async def action(ch: aio_pika.abc.AbstractChannel) -> None:
        q = await ch.declare_queue(exclusive=True)
        await q.bind(exchange, routing_key="#")

    return action


async def test_a_worker_can_do_nothing_but_talk_to_the_bridge(bridge, servers, names):
    worker = servers.amqp_url(OWNERS[0])
    prefix = names["queue_prefix"]
    for method in ("add", "fetch", "ack", "dead-letter", "results"):
        assert await refused(worker, consume(f"{prefix}.{method}")), f"a worker consumed {prefix}.{method}"
    assert await refused(worker, bind_own_queue(names["results_exchange"])), "a worker bound a queue to results"
    forged = b'{"token": "t", "serviceId": "s", "taskId": "x", "result": "forged"}'
    assert await refused(worker, publish(names["results_exchange"], "s", forged, headers={"x-owner": OWNERS[1]})), (
        "a worker published a result"
    )
    assert await refused(worker, publish("", "amq.rabbitmq.reply-to.abc", b"{}")), "a worker forged a reply"
    assert await refused(worker, publish(f"{names['exchange']}.dead", "", b"{}")), "a worker wrote to the DLX"
    # ...and what it must do still works: fetch and ack through the bridge's exchange.
    svc = service_id()
    async with Worker(worker, service=svc, worker_id="w", exchange=names["exchange"]) as w:
        assert await w.fetch() is None


async def test_an_engine_publishes_adds_and_reads_only_its_results_queue(bridge, servers, names, engine):
    url = servers.amqp_url(ENGINE_USER)
    prefix = names["queue_prefix"]
    for method in ("add", "fetch", "ack", "dead-letter"):
        assert await refused(url, consume(f"{prefix}.{method}")), f"an engine consumed {prefix}.{method}"
    assert await refused(url, bind_own_queue(names["results_exchange"])), "an engine declared a queue"
    assert await refused(url, publish(names["results_exchange"], "s", b"{}")), "an engine published a result"
    assert not await refused(url, consume(f"{prefix}.results")), "the engine cannot read its results queue"
    svc = service_id()
    assert await engine.add(svc, 1)


async def test_results_carry_the_bridges_validated_user_id(bridge, servers, names, engine, workers):
    received: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    conn = await aio_pika.connect(servers.amqp_url(ENGINE_USER))
    try:
        ch = await conn.channel()
        q = await ch.get_queue(f"{names['queue_prefix']}.results", ensure=False)
        await q.consume(received.put, no_ack=True)  # type: ignore[arg-type]
        svc = service_id()
        await engine.add(svc, 1, token={"t": 1})
        w = await workers(svc)
        task = await w.fetch()
        assert await task.ack("r") is True
        msg = await wait_for(lambda: None if received.empty() else received.get_nowait(), 15, what="the result")
        assert msg.user_id == BRIDGE_USER
    finally:
        await conn.close()


def declare_own_queue():  # type: ignore[no-untyped-def]
    async def action(ch: aio_pika.abc.AbstractChannel) -> None:
        await ch.declare_queue(exclusive=True)  # server-named (amq.gen-...): a reply queue of one's own

    return action


async def test_the_lifecycle_queue_and_the_bridges_own_queues_are_the_bridges_alone(
    bridge, servers, names, engine, workers
):
    """1.4: the lifecycle methods are routing keys of one queue, ``<prefix>.lifecycle``; like the
    bridge's internal queues (duty election, unrouted requests, hints), engines and workers may not
    consume it, nor declare queues of their own (direct reply-to needs no queue). They reach the
    bridge through its exchange, every method alike."""
    prefix = names["queue_prefix"]
    internal = ("lifecycle", "unrouted", "duty", "add-retry", "hints.p" + "0" * 24)
    for user in (OWNERS[0], ENGINE_USER):
        url = servers.amqp_url(user)
        for queue in internal:
            assert await refused(url, consume(f"{prefix}.{queue}")), f"{user} consumed {prefix}.{queue}"
        assert await refused(url, declare_own_queue()), f"{user} declared a queue"
    assert not await refused(servers.amqp_url("guest"), declare_own_queue()), "the check itself works"

    # What the roles must do with the 1.4 methods still works: a worker extends and reads stats, the
    # engine (acting for the worker's owner) reads stats and cancels.
    svc = service_id()
    await engine.add(svc, 1)
    w = await workers(svc)
    task = await w.fetch()
    assert task is not None and await task.extend()
    async with Engine(servers.amqp_url(OWNERS[0]), exchange=names["exchange"]) as own:
        assert [s.service_id for s in await own.stats(svc)] == [svc]
    assert [s.service_id for s in await engine.stats(svc)] == [svc]
    assert await engine.cancel(svc, task.id) is True
    assert await task.ack("late") is False, "cancelled: the worker's ack changes nothing"


async def _engine_binds_to_the_bridges_exchange(servers, names, source: str) -> bool:
    """Whether the shipped engine user may bind exchange ``source`` to the bridge's exchange."""
    conn = await aio_pika.connect(servers.amqp_url(ENGINE_USER))
    try:
        ch = await conn.channel()
        main = await ch.get_exchange(names["exchange"], ensure=False)
        try:
            await main.bind(source, routing_key="#")
        except ChannelAccessRefused:
            return False
        return True
    finally:
        await conn.close()


async def test_an_engine_can_bind_the_results_exchange_only_while_it_shares_its_queues_name(bridge, servers, names):
    """RabbitMQ permissions name resources, not their kind, and exchange.bind needs only read on
    its source: with the default names (results queue and exchange both ``<prefix>.results``) the
    engine's read on its queue lets it bind the results exchange to the bridge's exchange (the
    documented gap, docs/security.md); a results exchange of a name of its own is out of its reach."""
    guest = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await guest.channel()
        own_name = await ch.declare_exchange(f"{names['exchange']}.results-x", aio_pika.ExchangeType.TOPIC)
        main = await ch.get_exchange(names["exchange"], ensure=False)
        try:
            assert await _engine_binds_to_the_bridges_exchange(servers, names, names["results_exchange"])
            await main.unbind(names["results_exchange"], routing_key="#")
            assert not await _engine_binds_to_the_bridges_exchange(servers, names, own_name.name)
        finally:
            await own_name.delete()
    finally:
        await guest.close()


async def test_no_tenant_reaches_the_add_retry_lane(bridge, servers, names):
    """The lane (``<prefix>.add-retry``) holds adds in clear, each naming its owner in ``x-owner``
    under the bridge's own ``user_id``: no engine or worker may read it, or write to it."""
    lane = f"{names['queue_prefix']}.add-retry"
    assert bridge.transport.handlers.lane.available, "the bridge declared it"
    for user in (OWNERS[0], ENGINE_USER):
        url = servers.amqp_url(user)
        assert await refused(url, consume(lane)), f"{user} consumed the lane"
        assert await refused(url, publish("", lane)), f"{user} published to the lane"


async def test_a_bridge_whose_user_may_not_declare_the_add_retry_lane_still_starts_and_takes_adds(
    bridge_env, servers, names, engine
):
    """Permissions granted before the lane existed do not name it: RabbitMQ refuses its declaration
    (403, which closes the channel). The bridge declares it on a channel of its own, logs the
    permission to grant, and retries such adds in place, as before the lane."""
    import subprocess
    import uuid

    from bridge.app import Bridge
    from tests.conftest import settings_from

    def rabbitmqctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True).stdout

    user = f"qb-old-perms-{uuid.uuid4().hex[:6]}"
    lines = (await asyncio.to_thread(rabbitmqctl, "list_user_permissions", BRIDGE_USER)).splitlines()
    vhost, configure, write, read = next(line.split("\t") for line in lines if line.startswith("/\t"))
    old = [p.replace("|add-retry", "") for p in (configure, write, read)]
    assert old != [configure, write, read], "the local stack grants the lane"
    await asyncio.to_thread(rabbitmqctl, "add_user", user, user)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, user, *old)
        b = Bridge(settings_from(bridge_env, amqp_url=servers.amqp_url(user)))
        await b.start()
        try:
            assert b.transport.is_ready()
            assert not b.transport.handlers.lane.available, "no lane: every add retried in place"
            assert await engine.add(service_id(), "taken")
        finally:
            await b.stop()
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)


async def test_a_bridge_granted_what_permissions_prints_binds_a_results_queue_of_its_own_name_it_cannot_read(
    bridge_env, servers, names
):
    """The results queue is the engine's: the bridge declares it and binds it to the results
    exchange, and never consumes it. `queue-bridge permissions` granted the bridge read on it when
    it had a name of its own (not the results exchange's): the bridge's user could take the
    engine's results. Granted exactly what it prints now, the bridge starts (declare and bind
    work) and the broker refuses it the queue."""
    import subprocess
    import uuid

    from bridge.app import Bridge
    from bridge.transport.permissions import role_permissions
    from tests.conftest import settings_from

    def rabbitmqctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True).stdout

    results_queue = f"{names['queue_prefix']}.engine-results"
    role = role_permissions(names["exchange"], names["results_exchange"], names["queue_prefix"], results_queue)
    user = f"qb-printed-perms-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(rabbitmqctl, "add_user", user, user)
    try:
        await asyncio.to_thread(
            rabbitmqctl, "set_permissions", "-p", "/", user, role["bridge"].configure, role["bridge"].write,
            role["bridge"].read,
        )  # fmt: skip
        b = Bridge(settings_from(bridge_env, amqp_url=servers.amqp_url(user), results_queue=results_queue))
        await b.start()
        try:
            assert b.transport.is_ready()
        finally:
            await b.stop()
        assert await refused(servers.amqp_url(user), consume(results_queue)), "the bridge's user read the results"
        assert await refused(servers.amqp_url(user), consume(f"{names['queue_prefix']}.fetch")) is False
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)
        guest = await aio_pika.connect(servers.amqp_url("guest"))
        try:
            ch = await guest.channel()
            await ch.queue_delete(results_queue)
        finally:
            await guest.close()


async def test_an_engine_granted_as_documented_for_its_own_queue_takes_results_with_results_consumer(
    bridge, engine, workers, servers, names
):
    """docs/asyncapi.yaml grants an engine that binds a server-named queue of its own configure on
    ``amq.gen-*`` only (not on the results exchange), and README points engines at
    ``results_consumer``, which declared the exchange (non-passive: configure on it): the broker
    refused that engine (ACCESS_REFUSED) before any result came. It binds to the exchange as it is."""
    import re
    import subprocess
    import uuid

    from bridge.client.results import results_consumer

    def rabbitmqctl(*args: str) -> str:
        return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True).stdout

    # The documented grant, for this test's names (the doc's are the defaults, queue-bridge...).
    doc = (Path(__file__).parents[2] / "docs" / "asyncapi.yaml").read_text()
    documented = re.search(r"set_permissions -p / engine '([^']*)' '([^']*)' '([^']*)'", doc)
    assert documented is not None, "the documented grant is gone from docs/asyncapi.yaml"
    grant = [
        p.replace(r"queue-bridge\.results", re.escape(names["results_exchange"])).replace(
            "queue-bridge", re.escape(names["exchange"])
        )
        for p in documented.groups()
    ]
    user = f"qb-engine-own-queue-{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(rabbitmqctl, "add_user", user, user)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", "/", user, *grant)
        svc = service_id()
        async with results_consumer(servers.amqp_url(user), exchange=names["results_exchange"]) as incoming:
            task_id = await engine.add(svc, {"n": 1}, token={"wf": 1})
            w = await workers(svc, "w")
            task = await wait_for(w.fetch, 10, what="the task")
            assert await task.ack({"ok": True})
            result = await asyncio.wait_for(incoming.get(), 15)
        assert result["taskId"] == task_id and result["result"] == {"ok": True}, result
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)
