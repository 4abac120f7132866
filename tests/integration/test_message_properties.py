"""What real AMQP clients may put in a request's content header (properties, application headers)
and what the bridge's replies and results carry (real servers). The deeply nested header and the
gone server-named reply queue failed before their fixes; the others guard the documented
properties."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import orjson
import pytest

from bridge.transport import frames
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# Basic.Properties flags; their values follow each other in this (descending) order.
_CONTENT_TYPE, _CONTENT_ENCODING, _HEADERS, _DELIVERY_MODE = 0x8000, 0x4000, 0x2000, 0x1000
_PRIORITY, _CORRELATION_ID, _REPLY_TO, _EXPIRATION = 0x0800, 0x0400, 0x0200, 0x0100
_MESSAGE_ID, _TIMESTAMP, _TYPE, _USER_ID, _APP_ID = 0x0080, 0x0040, 0x0020, 0x0010, 0x0008


def _table(entries: bytes) -> bytes:
    return struct.pack(">I", len(entries)) + entries


def _nested_table_header(depth: int) -> bytes:
    """An application header ``n`` holding a table nested ``depth`` levels deep: {"a": {"a": ...}}
    (the Java, .NET and Go clients encode a map inside a map this way)."""
    value = b"F" + _table(b"")
    for _ in range(depth):
        value = b"F" + _table(b"\x01a" + value)
    return _table(b"\x01n" + value)


class RawClient:
    """A requester speaking raw frames: any content header a client library may produce."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url, self.exchange = url, exchange

    async def __aenter__(self) -> RawClient:
        import aiormq

        self.conn = await aiormq.connect(self.url)
        self.ch = await self.conn.channel()
        self.replies: asyncio.Queue[Any] = asyncio.Queue()
        await self.ch.basic_consume("amq.rabbitmq.reply-to", self.replies.put, no_ack=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.close()

    async def send(self, method: str, body: bytes, props: dict[int, bytes], *, user: str = OWNERS[0]) -> None:
        props = {
            _REPLY_TO: frames.short_string("amq.rabbitmq.reply-to"),
            _USER_ID: frames.short_string(user),
            **props,
        }
        flags = sum(props)
        values = b"".join(props[flag] for flag in sorted(props, reverse=True))
        raw = frames.publish(
            self.ch.number,
            method,
            body,
            (flags, values),
            frame_max=self.conn.connection_tune.frame_max,
            exchange=self.exchange,
        )
        await frames.write(self.ch, raw)

    async def reply(self, timeout: float = 15) -> tuple[Any, Any]:
        got = await asyncio.wait_for(self.replies.get(), timeout)
        return got.header.properties, orjson.loads(got.body)


# -- 1. an application header holding nested tables ----------------------------------------------
async def test_a_deeply_nested_header_table_is_answered_and_does_not_close_the_bridges_connection(
    bridge, servers, names, workers, dead_letters
):
    """A header whose value nests tables 600 deep (3.5 kB; RabbitMQ passes it on) made pamqp's
    recursive field-table decoder raise RecursionError in aiormq's frame reader: the bridge's
    whole connection closed, every in-flight reply with it, and the request, still unacked, was
    delivered again at every reconnection, for ever (to every bridge of the fleet)."""
    lost: list[object] = []
    bridge.transport.connection.close_callbacks.add(lambda *args: lost.append(args))
    body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
    async with RawClient(servers.amqp_url(OWNERS[0]), names["exchange"]) as client:
        await client.send(
            "fetch", body, {_CORRELATION_ID: frames.short_string("deep"), _HEADERS: _nested_table_header(600)}
        )
        try:
            props, reply = await client.reply(15)
        except TimeoutError:
            props, reply = None, None
    assert lost == [], "one request closed the bridge's AMQP connection"
    assert reply is not None, "no reply: the request was never handled"
    assert props.correlation_id == "deep"
    # Either served (the header is not the bridge's) or refused as the caller's mistake.
    assert reply == {"result": None} or reply["error"]["code"] == "bad_request", reply
    w = await workers(service_id())
    assert await w.fetch() is None
    assert bridge.transport.is_ready()


# -- 2. what the bridge publishes: results and replies carry what docs/asyncapi.yaml says ---------
async def test_a_result_carries_the_documented_properties(bridge, engine, workers, servers, names):
    """ResultProperties: message-id `<taskId>:<completionId>`, type result, content-type JSON,
    delivery-mode 2 (persistent), user-id the bridge's user; headers x-owner (and traceparent)."""
    import re

    import aio_pika

    from tests.conftest import BRIDGE_USER

    svc = service_id()
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    await engine.call(
        "add", {"serviceId": svc, "value": 1, "token": {"p": 1}}, owner=OWNERS[0], headers={"traceparent": trace}
    )
    w = await workers(svc)
    task = await w.fetch()
    assert await task.ack({"ok": True})
    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(names["queue_prefix"] + ".results", passive=True)

        async def one() -> Any:
            # This task's: the bridge's relay also publishes results earlier tests left owed in
            # the keyspace (to this test's results exchange).
            while (m := await q.get(fail=False, no_ack=True)) is not None:
                if orjson.loads(m.body)["taskId"] == task.id:
                    return m
            return None

        msg = await wait_for(one, 15, what="the result")
    finally:
        await conn.close()
    assert re.fullmatch(r"[0-9a-f-]{36}:[0-9a-f-]{36}", msg.message_id or ""), msg.message_id
    assert msg.message_id.startswith(task.id + ":")
    assert msg.type == "result"
    assert msg.content_type == "application/json"
    assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert msg.user_id == BRIDGE_USER
    assert msg.routing_key == svc
    assert msg.headers["x-owner"] == OWNERS[0]
    assert msg.headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    body = orjson.loads(msg.body)
    assert body["taskId"] == task.id and body["result"] == {"ok": True} and body["token"] == {"p": 1}


async def test_replies_to_a_server_named_queue_carry_the_documented_properties(bridge, servers, names):
    """ReplyProperties, with reply-to an exclusive server-named queue (amq.gen-...), and requests
    carrying what other clients set: content-type text, content-encoding, priority, expiration,
    type, app-id, a timestamp from 1970, delivery-mode 1, mandatory is irrelevant."""
    import aio_pika

    from tests.conftest import BRIDGE_USER

    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        replies = await ch.declare_queue(exclusive=True)
        assert replies.name.startswith("amq.gen-")
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
        from datetime import UTC, datetime

        await ex.publish(
            aio_pika.Message(
                body,
                user_id="guest",
                reply_to=replies.name,
                correlation_id="c-1",
                content_type="text/plain",
                content_encoding="identity",
                priority=9,
                expiration=60,
                type="fetch",
                app_id="java-app",
                timestamp=datetime.fromtimestamp(1, tz=UTC),
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            routing_key="fetch",
            mandatory=True,
        )

        async def one() -> Any:
            return await replies.get(fail=False, no_ack=True)

        msg = await wait_for(one, 15, what="the reply")
    finally:
        await conn.close()
    assert orjson.loads(msg.body) == {"result": None}
    assert msg.correlation_id == "c-1"
    assert msg.type == "result"
    assert msg.content_type == "application/json"
    assert msg.delivery_mode == aio_pika.DeliveryMode.NOT_PERSISTENT
    assert msg.user_id == BRIDGE_USER
    assert len(msg.message_id or "") == 32


# -- 3. reply_to a server-named queue: a long-poll whose requester is gone ------------------------
async def long_poll_replying_to_a_server_named_queue(servers: Any, names: dict[str, str], svc: str) -> Any:
    """A long-poll (25 s) of guest's queue ``svc`` whose reply-to is an exclusive server-named
    queue of a connection of its own (returned: closing it makes the requester gone). guest may
    declare one; a tenant may not (the broker permissions as shipped)."""
    import aio_pika

    conn = await aio_pika.connect(servers.amqp_url("guest"))
    ch = await conn.channel()
    replies = await ch.declare_queue(exclusive=True)
    ex = await ch.get_exchange(names["exchange"], ensure=False)
    body = orjson.dumps({"serviceId": svc, "workerId": "gone", "waitMs": 25_000, "timeToRecover": 60_000})
    await ex.publish(
        aio_pika.Message(body, user_id="guest", reply_to=replies.name, correlation_id="gone-1"), routing_key="fetch"
    )
    return conn


async def test_a_long_poll_replying_to_a_server_named_queue_that_is_gone_does_not_take_a_live_workers_task(
    bridge, servers, names
):
    """docs/asyncapi.yaml offers two reply-to forms: direct reply-to, and an exclusive server-named
    queue (``amq.gen-...``). A long-poll whose requester is gone must not claim the next task
    (docs/storage.md, the requester probe): for direct reply-to the bridge asks the broker first
    (passive ``queue.declare``: 404 once the channel is gone). A server-named exclusive queue
    vanishes with its connection just the same (passive declare: 404; 405 while it lives), but
    the probe counts every name that is not direct reply-to as alive: the gone requester's fetch,
    the oldest waiter, claims the task, its reply goes nowhere, and the live worker waits out the
    whole lease (``timeToRecover``)."""

    from bridge.client import Engine, Worker
    from tests.conftest import ENGINE_USER

    svc, owner = service_id(), "guest"
    conn = await long_poll_replying_to_a_server_named_queue(servers, names, svc)
    waiting = lambda: sum(len(x.waiters) for x in bridge.hints._waiting.values())  # noqa: E731
    await wait_for(lambda: waiting() == 1, 10.0, what="the first requester's long-poll waiting")
    await conn.close()  # the requester is gone, its exclusive reply queue with it

    live = Worker(
        servers.amqp_url("guest"), service=svc, worker_id="alive", exchange=names["exchange"], time_to_recover_ms=60_000
    )
    await live.open()
    try:
        async with Engine(servers.amqp_url(ENGINE_USER), owner=owner, exchange=names["exchange"]) as engine:
            fetching = asyncio.create_task(live.fetch(wait_ms=8_000))
            await wait_for(lambda: waiting() == 2, 10.0, what="the live worker's long-poll waiting")
            task_id = await engine.add(svc, {"n": 1})
            got = await asyncio.wait_for(fetching, 20.0)
            if got is None:
                got = await live.fetch()
            assert got is not None and got.id == task_id, (
                "the task was claimed for a requester whose server-named reply queue was gone: the live "
                "worker gets it only when that lease (60 s) runs out"
            )
            assert await got.ack("ok")
    finally:
        await live.close()


async def test_error_replies_through_direct_reply_to_carry_the_documented_properties(bridge, servers, names):
    """The first reply to a broker node goes through the probation connection (aiormq's publish),
    later ones as frames on the main channel: both carry ReplyProperties."""
    from tests.conftest import BRIDGE_USER

    async with RawClient(servers.amqp_url(OWNERS[0]), names["exchange"]) as client:
        for i in range(3):
            await client.send("fetch", b'{"serviceId": "s"}', {_CORRELATION_ID: frames.short_string(f"e{i}")})
            props, reply = await client.reply()
            assert reply["error"]["code"] == "bad_request"
            assert props.correlation_id == f"e{i}"
            assert props.message_type == "error"
            assert props.content_type == "application/json"
            assert props.delivery_mode == 1
            assert props.user_id == BRIDGE_USER
            assert len(props.message_id or "") == 32


async def test_an_add_with_every_property_other_clients_set_is_stored_and_its_headers_of_every_type_are_ignored(
    bridge, servers, names, workers
):
    """An add as the Java/.NET/Go clients, a shovel or the management UI may send it: transient,
    an AMQP priority, a per-message TTL, a content type and encoding that are not JSON's, type,
    app-id, a far-future timestamp, and application headers of every field type (decimal,
    timestamp, byte array, nested table and array, float, void, x-death and x-shovelled as the
    broker writes them)."""
    from datetime import UTC, datetime
    from decimal import Decimal

    import aio_pika

    from tests.conftest import ENGINE_USER

    svc = service_id()
    headers = {
        "x-owner": OWNERS[0],
        "x-idempotency-key": "",
        "price": Decimal("12.34"),
        "when": datetime(2030, 1, 1, tzinfo=UTC),
        "blob": bytearray(b"\x00\xff"),
        "nested": {"a": {"b": [1, "two", {"c": None}]}},
        "ratio": 0.5,
        "x-death": [
            {
                "queue": "elsewhere",
                "reason": "expired",
                "count": 1,
                "routing-keys": ["add"],
                "time": datetime(2024, 1, 1, tzinfo=UTC),
                "exchange": "",
            }
        ],
        "x-shovelled": [{"shovel-name": "s", "shovel-type": "dynamic", "src-queue": "q"}],
    }
    conn = await aio_pika.connect(servers.amqp_url(ENGINE_USER))
    try:
        ch = await conn.channel()
        replies: asyncio.Queue[Any] = asyncio.Queue()
        rq = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await rq.consume(replies.put, no_ack=True)
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        await ex.publish(
            aio_pika.Message(
                orjson.dumps({"serviceId": svc, "value": {"v": 1}}),
                user_id=ENGINE_USER,
                reply_to="amq.rabbitmq.reply-to",
                correlation_id="add-1",
                message_id="m" * 255,
                headers=headers,
                content_type="text/plain; charset=utf-8",
                content_encoding="identity",
                priority=7,
                expiration=60,
                type="add",
                app_id="shovel",
                timestamp=datetime(2999, 1, 1, tzinfo=UTC),
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            routing_key="add",
            mandatory=True,
        )
        reply = await asyncio.wait_for(replies.get(), 15)
    finally:
        await conn.close()
    assert reply.correlation_id == "add-1"
    body = orjson.loads(reply.body)
    assert body["result"] is True, body
    w = await workers(svc)
    task = await w.fetch()
    assert task is not None and task.id == body["task"]["id"] and task.value == {"v": 1}
