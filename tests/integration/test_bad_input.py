"""Bad input gets a clear error reply, is dead-lettered (never requeued forever, never dropped),
and the bridge keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import orjson
import pytest

from bridge.transport import frames
from tests.conftest import ENGINE_USER, OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _error(client, method, body=None, raw=None):
    reply, _ = await client.call_raw(method, body, raw=raw)
    assert "error" in reply, reply
    return reply["error"]


@pytest.mark.parametrize(
    ("method", "raw", "code", "words"),
    [
        ("fetch", b"{not json", "bad_request", "not valid JSON"),
        ("fetch", b"[1, 2]", "bad_request", "JSON object"),
        ("fetch", b'{"serviceId": "s"}', "bad_request", "workerId"),
        ("fetch", b'{"serviceId": "s", "workerId": 5}', "bad_request", "workerId"),
        ("fetch", b'{"serviceId": "s", "workerId": "w", "timeToRecover": "soon"}', "bad_request", "timeToRecover"),
        ("fetch", b'{"serviceId": "s", "workerId": "w", "timeToRecover": true}', "bad_request", "timeToRecover"),
        ("fetch", b'{"serviceId": "", "workerId": "w"}', "bad_request", "serviceId"),
        ("ack", b'{"workerId": "w"}', "bad_request", "serviceId"),
        ("add", b'{"serviceId": "s"}', "bad_request", "value"),
        ("add", b'{"serviceId": 7, "value": 1}', "bad_request", "serviceId"),
        ("frobnicate", b'{"serviceId": "s"}', "bad_request", "unknown method"),
        # A gzipped body (content-encoding is not read): said as such, not "surrogates not allowed".
        ("add", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03", "bad_request", "not UTF-8 text"),
        # Refused with or without a long integer in it (Python's reader, taken for one, accepted it).
        ("add", b'\xef\xbb\xbf{"serviceId": "s", "value": 1}', "bad_request", "byte order mark"),
        ("add", b'\xef\xbb\xbf{"serviceId": "s", "value": 12345678901234567890123}', "bad_request", "byte order mark"),
        # Not advice to call sys.set_int_max_str_digits().
        ("add", b'{"serviceId": "s", "value": ' + b"7" * 5000 + b"}", "bad_request", "more than 4300 digits"),
    ],
)
async def test_bad_requests_get_an_error_and_are_dead_lettered(
    bridge, engine, workers, dead_letters, method, raw, code, words
):
    err = await _error(engine, method, raw=raw)
    assert err["code"] == code
    assert words in err["message"]
    dead = await dead_letters.drain(1)
    assert len(dead) == 1
    assert dead[0].body == raw, "the original message is kept, not dropped"
    # ...and the bridge still serves.
    svc = service_id()
    await engine.add(svc, "still alive")
    w = await workers(svc)
    assert (await w.fetch()).value == "still alive"


async def test_oversized_value_is_rejected(bridge, engine, dead_letters):
    big = "x" * (1_048_576 + 10)
    err = await _error(engine, "add", {"serviceId": "s", "value": big})
    assert err["code"] == "payload_too_large"
    assert len(await dead_letters.drain(1)) == 1


BROKER_MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # deploy/compose/rabbitmq.conf, deploy/local/rabbitmq.sh


async def _publish_refused(url: str, exchange: str, routing_key: str, body: bytes) -> BaseException | None:
    """Publish ``body`` with a confirm: what the broker refused it with (None: it took it)."""
    import aio_pika

    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        target = channel.default_exchange if not exchange else await channel.get_exchange(exchange, ensure=False)
        try:
            await asyncio.wait_for(target.publish(aio_pika.Message(body), routing_key=routing_key), 15)
        except Exception as exc:
            return exc
        return None
    finally:
        await connection.close()


async def test_a_body_above_the_brokers_bound_is_refused_by_the_broker_and_never_reaches_the_bridge(
    bridge, servers, names, engine, workers, monkeypatch
):
    """A bridge reads a whole delivery into memory before it can check its size (the AMQP library
    buffers the body), and RabbitMQ 3.x takes bodies up to 128 MiB: any tenant could have a bridge
    hold such messages, a few at once (and the next bridge, once that one was OOM-killed). The
    shipped broker configs bound them to 16 MiB (``max_message_size``): the broker refuses a larger
    one, closing the publisher's channel (406), and the bridge never receives it. Found by a review."""
    import aio_pika
    from aiormq.exceptions import ChannelPreconditionFailed

    from bridge.transport import amqp
    from bridge.transport.request import Delivery

    oversized = b"x" * (BROKER_MAX_MESSAGE_SIZE + 1)
    # A broker started before the bound was shipped: `deploy/local/stack.sh up` applies it live.
    probe = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        queue = await (await probe.channel()).declare_queue("", exclusive=True)
        if await _publish_refused(servers.amqp_url("guest"), "", queue.name, oversized) is None:
            pytest.skip("the running broker takes bodies over 16 MiB: run deploy/local/stack.sh up to bound it")
    finally:
        await probe.close()
    received: list[int] = []

    class _Recorded(Delivery):
        __slots__ = ()

        def __init__(self, delivered: Any) -> None:
            super().__init__(delivered)
            received.append(len(self.body))

    monkeypatch.setattr(amqp, "Delivery", _Recorded)
    body = b'{"serviceId": "s", "value": "' + oversized + b'"}'
    refused = await _publish_refused(servers.amqp_url(ENGINE_USER), names["exchange"], "add", body)
    assert isinstance(refused, ChannelPreconditionFailed), refused
    assert "message size" in str(refused) and "larger than configured max size" in str(refused)
    # The bridge still serves, and of all it was delivered meanwhile nothing came near the bound.
    svc = service_id()
    await engine.add(svc, "still alive")
    w = await workers(svc)
    assert (await w.fetch()).value == "still alive"
    assert received and max(received) < 1024 * 1024, received


async def _broker_bounds_messages(servers: Any) -> None:
    import aio_pika

    probe = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        queue = await (await probe.channel()).declare_queue("", exclusive=True)
        taken = await _publish_refused(servers.amqp_url("guest"), "", queue.name, b"x" * (BROKER_MAX_MESSAGE_SIZE + 1))
        if taken is None:
            pytest.skip("the running broker takes bodies over 16 MiB: run deploy/local/stack.sh up to bound it")
    finally:
        await probe.close()


@pytest.mark.parametrize("wait", [True, False], ids=["replied", "confirmed"])
async def test_an_add_over_the_brokers_bound_raises_payload_too_large_not_connection_lost(
    bridge, servers, engine, wait
):
    """The broker refuses a body over its ``max_message_size`` by closing the channel (406). The
    client took that for a lost connection (``ConnectionLost``), which callers retry: an engine
    retried such an add for ever. It is ``PayloadTooLargeError`` now, as the bridge's own refusal
    of a value over ``BRIDGE_MAX_VALUE_BYTES`` is; requests in flight beside it on the channel
    are failed as lost (sent again, they are answered)."""
    from bridge.client.errors import ConnectionLost, PayloadTooLargeError
    from tests.conftest import wait_for

    await _broker_bounds_messages(servers)
    svc = service_id()
    small = asyncio.ensure_future(engine.call("fetch", {"serviceId": svc, "workerId": "w", "waitMs": 3_000}))
    await wait_for(lambda: bool(engine._pending), 5, what="the long-poll in flight on the channel")
    with pytest.raises(PayloadTooLargeError, match="max"):
        await engine.add(svc, "x" * (BROKER_MAX_MESSAGE_SIZE + 1), wait=wait)
    with contextlib.suppress(ConnectionLost):
        await small
    assert await engine.add(svc, "fits") is not None  # and the client goes on


async def test_a_result_over_the_brokers_bound_gives_the_task_back_at_once(bridge, servers, engine, workers):
    """A handler's result over the broker's ``max_message_size``: the ack's channel closed (406),
    the client took it for a lost connection and ``Worker.run`` sent the ack again and again until
    the lease ended; the next fetch handed the task back and the handler ran again, every lease,
    until the delivery limit parked it. The result is refused now, and the task given back at once
    (``ResultRefused``), as one over the bridge's own limit is."""
    import time

    await _broker_bounds_messages(servers)
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1}, max_deliveries=1)
    w = await workers(svc)
    w.wait_ms = 1_000
    w.time_to_recover_ms = 60_000
    stop = asyncio.Event()
    runs = 0

    async def handler(task):  # type: ignore[no-untyped-def]
        nonlocal runs
        runs += 1
        stop.set()
        return "x" * (BROKER_MAX_MESSAGE_SIZE + 1)

    started = time.monotonic()
    assert await asyncio.wait_for(w.run(handler, stop=stop), 30.0) == 1
    assert time.monotonic() - started < 15, "the ack was sent again until the lease ended"
    (parked,) = await engine.parked(svc)
    assert parked.id == task_id and parked.last_error["type"] == "ResultRefused", parked
    assert runs == 1


async def test_rpc_without_reply_to_is_dead_lettered(bridge, engine, dead_letters):
    await engine.publish("fetch", {"serviceId": "s", "workerId": "w"}, reply=False)
    dead = await dead_letters.drain(1)
    assert len(dead) == 1
    assert dead[0].routing_key == "fetch"


async def test_add_without_reply_to_is_stored(bridge, engine, workers):
    svc = service_id()
    await engine.add(svc, {"fire": "and forget"}, wait=False)
    w = await workers(svc)
    from tests.conftest import wait_for

    task = await wait_for(w.fetch, 10, what="the add to be stored")
    assert task.value == {"fire": "and forget"}


def _send_raw_header_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test client send a header value as an AMQP long string of arbitrary bytes (invalid
    UTF-8 included), as any AMQP client can; pamqp only encodes str."""
    import pamqp.encode

    original = pamqp.encode.encode_table_value

    def encode(value):  # type: ignore[no-untyped-def]
        if isinstance(value, bytes):
            return b"S" + len(value).to_bytes(4, "big") + value
        return original(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", encode)


async def test_messages_that_used_to_stall_the_queue_are_answered_and_dead_lettered(
    bridge, engine, workers, dead_letters, monkeypatch
):
    """Issue 13.1: an x-owner of invalid UTF-8 or a value nested 300 deep raised past the handler,
    the delivery was never settled, and 64 of them (the prefetch) stopped the queue for everyone.
    Here twice the prefetch of each kind, then the queues still serve."""
    _send_raw_header_bytes(monkeypatch)
    n = 2 * bridge.settings.prefetch
    deep = b'{"serviceId": "s", "value": ' + b"[" * 300 + b"]" * 300 + b"}"
    replies = []
    for i in range(n):
        replies.append(await engine.call_raw("add", None, headers={"x-owner": b"\xff\xfe"}, raw=b'{"serviceId": "s"}'))
        replies.append(await engine.call_raw("add", None, raw=deep))
        replies.append(
            await engine.call_raw("fetch", {"serviceId": "s", "workerId": f"w{i}"}, headers={"x-owner": "o" * 70_000})
        )
    codes = {r[0]["error"]["code"] for r in replies}
    assert codes == {"bad_request"}, codes
    assert len(await dead_letters.drain(3 * n, timeout=30)) == 3 * n
    svc = service_id()
    await engine.add(svc, "still alive")
    w = await workers(svc)
    assert (await w.fetch()).value == "still alive"


# Content-header properties as raw bytes, as any AMQP client can send them (pamqp only encodes
# well-formed values): property flag -> its encoded value. Values follow each other in flag order.
_HEADERS, _CORRELATION_ID, _REPLY_TO, _TIMESTAMP, _USER_ID = 0x2000, 0x0400, 0x0200, 0x0040, 0x0010
UNDECODABLE = {
    # a correlation-id (shortstr) that is not UTF-8: refused, and echoed as it was sent
    "correlation-id": ({_CORRELATION_ID: b"\x03\xff\xfe\xfd"}, "bad_request"),
    # an application header whose name (shortstr) is not UTF-8: refused
    "header-name": ({_HEADERS: (6).to_bytes(4, "big") + b"\x03\xff\xfe\xfdt\x01"}, "bad_request"),
    # a timestamp past the year 9999 (datetime cannot hold it): clamped, and a fetch ignores it
    "timestamp": ({_TIMESTAMP: (2**64 - 1).to_bytes(8, "big")}, None),
}


async def _call_with_raw_properties(
    url: str, exchange: str, method: str, body: bytes, props: dict[int, bytes]
) -> tuple[Any, Any]:
    """Send a request whose content header is ``props`` (plus direct reply-to and user-id) and
    return the reply's properties and body."""
    import aiormq

    conn = await aiormq.connect(url)
    try:
        ch = await conn.channel()
        replies: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
        await ch.basic_consume("amq.rabbitmq.reply-to", replies.put, no_ack=True)
        props = {
            **props,
            _REPLY_TO: frames.short_string("amq.rabbitmq.reply-to"),
            _USER_ID: frames.short_string(OWNERS[0]),
        }
        flags = sum(props)
        values = b"".join(props[flag] for flag in sorted(props, reverse=True))
        raw = frames.publish(
            ch.number, method, body, (flags, values), frame_max=conn.connection_tune.frame_max, exchange=exchange
        )
        await frames.write(ch, raw)
        reply = await asyncio.wait_for(replies.get(), 15)
        return reply.header.properties, orjson.loads(reply.body)
    finally:
        await conn.close()


@pytest.mark.parametrize("undecodable", sorted(UNDECODABLE))
async def test_a_content_header_the_amqp_library_cannot_decode_is_the_callers_fault_and_the_bridge_keeps_serving(
    bridge, servers, names, workers, dead_letters, undecodable
):
    """pamqp raised on a short string or a header name that is not UTF-8, or a timestamp past the
    year 9999, in aiormq's frame reader: that closed the bridge's whole connection, and the
    request, still unacknowledged, was delivered again at every reconnection, for ever."""
    lost: list[object] = []
    bridge.transport.connection.close_callbacks.add(lambda *args: lost.append(args))
    props, code = UNDECODABLE[undecodable]
    body = orjson.dumps({"serviceId": service_id(), "workerId": "w"})
    url = servers.amqp_url(OWNERS[0])
    reply_props, reply = await _call_with_raw_properties(url, names["exchange"], "fetch", body, props)
    if code is None:
        assert reply == {"result": None}
    else:
        assert reply["error"]["code"] == code and "UTF-8" in reply["error"]["message"], reply
        assert len(await dead_letters.drain(1)) == 1, "refused: dead-lettered, as any bad input"
    if undecodable == "correlation-id":
        echoed = reply_props.correlation_id.encode("utf-8", "surrogateescape")
        assert echoed == b"\xff\xfe\xfd", "the reply carries the very correlation-id the caller sent"
    w = await workers(service_id())
    for _ in range(3):
        assert await w.fetch() is None
    assert lost == [], "the bridge's AMQP connection was closed by one request"
    assert bridge.transport.is_ready()


async def test_nested_token_and_result_are_the_callers_fault(bridge, engine, workers):
    deep = b"[" * 300 + b"]" * 300
    err = await _error(engine, "add", raw=b'{"serviceId": "s", "value": 1, "token": ' + deep + b"}")
    assert err["code"] == "bad_request" and "nest" in err["message"]
    svc = service_id()
    await engine.add(svc, 1, token={"t": 1})
    w = await workers(svc)
    task = await w.fetch()
    ack = {"serviceId": svc, "workerId": w.worker_id, "taskId": task.id, "result": "x"}
    reply, _ = await w.call_raw("ack", None, raw=orjson.dumps(ack).replace(b'"x"', deep))
    assert reply["error"]["code"] == "bad_request"
    assert await task.ack("fine") is True  # nothing was completed by the refused ack


async def test_a_value_the_client_cannot_encode_fails_at_once_and_leaves_nothing_pending(bridge, engine, workers):
    """The client encoded a request after registering for its reply: a value JSON cannot carry
    raised, but the reply's future stayed pending until the connection closed (then failed with
    nobody to see it: "Future exception was never retrieved")."""
    from bridge.domain.jsonvalue import JsonError

    svc = service_id()
    with pytest.raises(JsonError, match="not JSON serializable") as raised:
        await engine.add(svc, {"when": object()})
    assert "nesting" not in str(raised.value)  # the reason given is the real one
    with pytest.raises(JsonError, match="nesting is limited"):
        await engine.add(svc, json.loads("[" * 300 + "]" * 300))
    assert engine._pending == {}
    task_id = await engine.add(svc, "next")  # the client goes on as before
    w = await workers(svc)
    assert (await w.fetch()).id == task_id


async def test_values_come_back_exactly_as_added(bridge, engine, workers, servers, names):
    """Issue 13.7: integers beyond 64 bits came back as floats."""
    from bridge.client.rpc import results_consumer

    svc = service_id()
    value = {"big": 2**64 + 1, "neg": -(2**70), "max": 2**63 - 1, "f": 0.1, "s": "ü\u2028", "n": None}
    raw = (
        b'{"serviceId": "%s", "value": {"big": 18446744073709551617, "neg": -1180591620717411303424}, '
        b'"token": 36893488147419103232}' % svc.encode()
    )
    # This queue's results only: the duty holder relays every result owed in the shared keyspace,
    # another test's too, onto this test's exchange (a CI run got a result of the test before).
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:
        await engine.add(svc, value, token={"id": 2**65})
        added, _ = await engine.call_raw("add", None, raw=raw, owner=engine.owner)
        assert "task" in added, added
        w = await workers(svc)
        first = await w.fetch()
        assert first.value == value
        assert await first.ack({"sum": 2**80 + 3}) is True
        second = await w.fetch()
        assert second.value == {"big": 18446744073709551617, "neg": -1180591620717411303424}
        assert await second.ack(-(2**90)) is True
        from tests.conftest import wait_for

        await wait_for(lambda: results.qsize() >= 2, 15, what="two results")
        msgs = sorted((results.get_nowait() for _ in range(2)), key=lambda m: m["taskId"] != first.id)
    assert msgs[0]["token"] == {"id": 2**65} and msgs[0]["result"] == {"sum": 2**80 + 3}
    assert msgs[1]["token"] == 36893488147419103232 and msgs[1]["result"] == -(2**90)


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
async def test_a_result_holding_nan_is_refused_not_sent_as_null(bridge, engine, workers, servers, names, number):
    """A handler's score came out NaN (or infinite) and ``Worker.run`` acked it. NaN and Infinity
    are not JSON: the bridge refuses them in an ack body and the CLI refuses them, but the client
    encoded every request with ``jsonvalue.dumps``, i.e. orjson, which writes them as ``null``
    without a word: the ack was answered true and the engine was sent ``{"score": null}``, the
    worker's result silently changed (an add's value the same way). ``dumps`` now refuses them
    (JsonError, before anything is sent): the add raises, and ``run`` gives the task back as it
    does any result it cannot send (``ResultRefused``); here that parks it, its limit being 1."""
    from bridge.client.rpc import results_consumer
    from bridge.domain.jsonvalue import JsonError
    from tests.conftest import wait_for

    svc = service_id()
    with pytest.raises(JsonError, match="NaN and Infinity"):
        await engine.add(svc, {"score": number})
    assert engine._pending == {}
    consumer = results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=svc)
    async with consumer as results:  # this queue's results only (as above)
        task_id = await engine.add(svc, {"n": 1}, token={"p": 1}, max_deliveries=1)
        w = await workers(svc)
        w.wait_ms = 1_000
        stop = asyncio.Event()

        async def handler(task):  # type: ignore[no-untyped-def]
            stop.set()
            return {"score": number}

        assert await asyncio.wait_for(w.run(handler, stop=stop), 30.0) == 1
        got: list[dict[str, Any]] = []

        def _arrived() -> bool:
            while not results.empty():
                msg = results.get_nowait()
                if msg.get("taskId") == task_id:
                    got.append(msg)
            return bool(got)

        await wait_for(_arrived, 15, what="the engine's message about the task")
    assert "result" not in got[0] and got[0]["error"]["code"] == "delivery_limit", got[0]
    (parked,) = await engine.parked(svc)
    assert parked.id == task_id and parked.last_error["type"] == "ResultRefused", parked
    assert "NaN and Infinity" in parked.last_error["message"]


async def test_the_dead_letter_queue_is_bounded(make_bridge, engine, servers, names):
    """Issue 13.6: 100 oversized adds grew the dead-letter queue by 110 MB, without limit."""
    from tests.conftest import consumers_on

    b = await make_bridge(dead_letter_max_length=5, dead_letter_max_bytes=50_000)
    assert await consumers_on(servers.amqp_url("guest"), f"{names['queue_prefix']}.add") >= 1
    for _ in range(12):
        err = await _error(engine, "add", raw=b'{"serviceId": "s", "value": ' + b"x" * 20_000)  # not JSON
        assert err["code"] == "bad_request"
    import aio_pika

    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(b.transport.dead_letter_queue, passive=True)
        # 12 dead letters of 20 kB each, and at most 50 kB kept: the newest two.
        assert q.declaration_result.message_count == 2
    finally:
        await conn.close()


async def test_a_dead_letter_queue_declared_without_limits_still_works(make_bridge, engine, servers, names, caplog):
    """Queue arguments cannot change in place: an older bridge's unbounded queue is kept, with a
    warning that names the policy to set."""
    import aio_pika

    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        await ch.declare_queue(f"{names['queue_prefix']}.dead-letter", durable=True)
    finally:
        await conn.close()
    await make_bridge()
    assert "rabbitmqctl set_policy" in caplog.text
    err = await _error(engine, "add", raw=b"{not json")
    assert err["code"] == "bad_request"


async def test_a_dead_letter_queue_declared_with_other_limits_says_how_to_raise_them(
    make_bridge, engine, servers, names, caplog
):
    """A changed BRIDGE_DEAD_LETTER_MAX_LENGTH was kept out by the queue's own argument, and the
    warning offered a policy, which RabbitMQ applies only where it is lower than the argument."""
    import aio_pika

    conn = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        ch = await conn.channel()
        args = {"x-max-length": 10, "x-max-length-bytes": 1_000_000, "x-overflow": "drop-head"}
        await ch.declare_queue(f"{names['queue_prefix']}.dead-letter", durable=True, arguments=args)
    finally:
        await conn.close()
    await make_bridge()
    assert "a policy can only lower them" in caplog.text
    assert "delete it" in caplog.text
    err = await _error(engine, "add", raw=b"{not json")
    assert err["code"] == "bad_request"


async def test_a_number_too_large_is_refused_without_echoing_its_digits(bridge, engine, dead_letters, caplog):
    # A value's content stays out of replies and logs: a number too large for a float once came
    # back whole (up to the 1 MiB limit) in the error's message and in the bridge's warning.
    digits = "9" * 400
    raw = b'{"serviceId": "s", "value": {"big": 12345678901234567890, "huge": ' + digits.encode() + b".5}}"
    err = await _error(engine, "add", raw=raw)
    assert err["code"] == "bad_request"
    assert "too large" in err["message"]
    assert "9999999999" not in err["message"]
    assert len(await dead_letters.drain(1)) == 1
    assert "too large" in caplog.text, "the refusal is logged"
    assert "9999999999" not in caplog.text


async def test_a_void_owner_or_idempotency_header_is_refused_not_taken_for_absent(bridge, engine, dead_letters):
    """A void value (a Java client's null) of x-owner was taken for no header: the trusted engine's
    request acted for its own user, its tasks filed under the engine's name (or `unknown_owner`);
    of x-idempotency-key, the message id became the key. The contract: "present but not a string:
    bad_request" (found by review, 2026-12-07)."""
    body = {"serviceId": service_id(), "value": 1}
    owner_void, _ = await engine.call_raw("add", body, headers={"x-owner": None})
    key_void, _ = await engine.call_raw("add", body, headers={"x-owner": OWNERS[0], "x-idempotency-key": None})
    for reply in (owner_void, key_void):
        assert reply["error"]["code"] == "bad_request", reply
    assert "x-owner" in owner_void["error"]["message"] and "x-idempotency-key" in key_void["error"]["message"]
    assert len(await dead_letters.drain(2, timeout=30)) == 2
