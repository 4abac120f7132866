"""Bad input gets a clear error reply, is dead-lettered (never requeued forever, never dropped),
and the bridge keeps serving."""

from __future__ import annotations

import pytest

from tests.conftest import service_id

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
