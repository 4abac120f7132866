"""``Engine.add(wait=False)``: what it guarantees (RabbitMQ accepted the add), against the real
broker. It used to publish on a channel without publisher confirms and return once the frames
were written: an add nobody's queue took (no bridge had declared the add queue: RabbitMQ returns
a mandatory message, and the client had no return callback), an add to an exchange that does not
exist (RabbitMQ closes the channel after the publish) and an add the broker nacks were all lost
without a word. Now such an add goes in confirm mode and raises ``BrokerRefused``."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from bridge.client import BrokerRefused, Engine, RequestTimeout
from tests.conftest import ENGINE_USER, OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _engine(servers: Any, names: dict[str, str], exchange: str | None = None) -> Engine:
    return Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=exchange or names["exchange"], timeout=5.0)


async def _declare(servers: Any, names: dict[str, str], *, add_queue_args: dict[str, Any] | None = None) -> None:
    """The test's exchange as a bridge declares it (direct, durable), with no bridge consuming;
    with ``add_queue_args`` also the add queue, bound for ``add``, with those arguments."""
    admin = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await admin.channel()
        exchange = await ch.declare_exchange(names["exchange"], aio_pika.ExchangeType.DIRECT, durable=True)
        if add_queue_args is not None:
            queue = await ch.declare_queue(f"{names['queue_prefix']}.add", durable=True, arguments=add_queue_args)
            await queue.bind(exchange, routing_key="add")
    finally:
        await admin.close()


async def test_an_add_without_wait_that_no_queue_takes_raises_broker_refused(servers, names):
    """The exchange exists but no bridge ever declared its add queue: RabbitMQ returns the
    (mandatory) message. Before: add(wait=False) returned None and the task was gone."""
    await _declare(servers, names)
    async with _engine(servers, names) as engine:
        with pytest.raises(BrokerRefused, match="no queue is bound"):
            await asyncio.wait_for(engine.add(service_id(), {"n": 1}, wait=False, message_id="m-1"), 10.0)
        # The engine goes on: the next add is refused again, not stuck behind the first.
        with pytest.raises(BrokerRefused):
            await asyncio.wait_for(engine.add(service_id(), {"n": 2}, wait=False), 10.0)


async def test_an_add_without_wait_to_a_missing_exchange_raises_broker_refused(servers, names):
    """No such exchange (no bridge ever declared it): RabbitMQ closes the channel (404) after the
    publish. Before: the add returned None (only the engine's next request failed)."""
    async with _engine(servers, names) as engine:
        with pytest.raises(BrokerRefused, match="NOT_FOUND"):
            await asyncio.wait_for(engine.add(service_id(), {"n": 1}, wait=False), 10.0)
        # Only the confirm channel was closed: the RPC channel (and its reply consumer) lives on.
        assert engine.channel is not None and not engine.channel.is_closed


async def test_an_add_without_wait_the_broker_nacks_raises_broker_refused(servers, names):
    """A full add queue that rejects publishes (``x-overflow: reject-publish``, here of length 0)
    nacks the add. Before: add(wait=False) returned None."""
    await _declare(servers, names, add_queue_args={"x-max-length": 0, "x-overflow": "reject-publish"})
    async with _engine(servers, names) as engine:
        with pytest.raises(BrokerRefused, match="nacked"):
            await asyncio.wait_for(engine.add(service_id(), {"n": 1}, wait=False), 10.0)


async def test_an_add_without_wait_returns_once_accepted_and_is_stored(bridge, engine, workers):
    """The ordinary case: accepted by the broker, then stored by the bridge and handed out."""
    svc = service_id()
    assert await engine.add(svc, {"n": 1}, wait=False, message_id="accepted-1") is None
    w = await workers(svc)
    task = await w.fetch(wait_ms=5_000)
    assert task is not None and task.value == {"n": 1}
    assert await task.ack("done") is True


async def test_a_published_request_whose_reply_never_comes_is_forgotten_at_its_deadline(servers, names):
    """``publish(reply=True)`` registered the reply's future and nothing took it out when no reply
    came (nobody consumes here: no bridge): one entry a request for the life of the connection.
    Now it is taken out at the request's deadline and its future fails with RequestTimeout."""
    await _declare(servers, names)
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=0.5) as e:
        fut = await e.publish("stats", {})
        assert fut is not None and len(e._pending) == 1
        with pytest.raises(RequestTimeout):
            await asyncio.wait_for(fut, 5.0)
        assert e._pending == {} and e._pending_method == {}
