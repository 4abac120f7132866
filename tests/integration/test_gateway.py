"""The HTTP gateway (issue 11) on the real servers: every endpoint, its identity rules, bad input
through HTTP, long-poll, and HTTP and AMQP workers sharing one queue.

The bridge runs in-process with ``BRIDGE_GATEWAY_PORT`` set; requests go over loopback HTTP with
aiohttp, AMQP requests with the Python client (the wire contract itself, ``Worker.call``).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bridge.client.rpc import results_consumer
from bridge.gateway.keys import new_key
from tests import raw_http
from tests.conftest import ENGINE_USER, OWNERS, free_port, requests_counted, service_id, wait_for
from tests.integration.test_security import flip_stored_value
from tests.keyserver import KeyServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

MAX_VALUE_BYTES = 4096  # small, so that "too large" is cheap to send
ALLOWANCE = 65_536  # a body may be this much larger than the value limit (as on AMQP)


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def code(self) -> str | None:
        return self.body["error"]["code"] if isinstance(self.body, dict) and "error" in self.body else None


class Gateway:
    """An HTTP client of one bridge's gateway, with the test's keys."""

    def __init__(self, port: int, keys: dict[str, str], session: aiohttp.ClientSession) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.keys = keys
        self.session = session

    def auth(self, key: str | None) -> dict[str, str]:
        return {} if key is None else {"Authorization": f"Bearer {self.keys.get(key, key)}"}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = "a",
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        h = {**self.auth(key), **(headers or {})}
        data = raw
        if data is None and body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            h.setdefault("Content-Type", content_type)
        async with self.session.request(method, self.base + path, data=data, headers=h) as resp:
            text = await resp.read()
            try:
                parsed = json.loads(text) if text else None
            except ValueError:
                parsed = text
            return Reply(resp.status, parsed, resp.headers)

    async def post(self, svc: str, name: str, body: Any = None, **kw: Any) -> Reply:
        return await self.request("POST", f"/api/queue/{svc}/{name}", {} if body is None else body, **kw)

    async def ok(self, svc: str, name: str, body: Any = None, **kw: Any) -> dict[str, Any]:
        reply = await self.post(svc, name, body, **kw)
        assert reply.status == 200, (reply.status, reply.body)
        assert reply.headers["Content-Type"].startswith("application/json")
        return dict(reply.body)


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read the answer until the server closes (requests say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


@pytest.fixture
def gateway_keys(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A keys file: ``a``/``b`` (workers of OWNERS[0]/[1]), ``engine`` (trusted), ``nobody`` (an owner
    without an encryption key)."""
    keys: dict[str, str] = {}
    entries = []
    for name, owner, trusted in (
        ("a", OWNERS[0], False),
        ("b", OWNERS[1], False),
        ("engine", ENGINE_USER, True),
        ("nobody", "nobody-has-a-key", False),
    ):
        key, entry = new_key(owner, trusted=trusted, key_id=f"test-{name}")
        keys[name] = key
        entries.append(entry)
    path = tmp_path / "gateway-keys.json"
    path.write_text(json.dumps(entries))
    return path, keys


@pytest.fixture
async def start_gateway(make_bridge, gateway_keys) -> AsyncIterator[Any]:
    path, keys = gateway_keys
    sessions: list[aiohttp.ClientSession] = []

    async def start(**overrides: Any) -> tuple[Any, Gateway]:
        settings = {"gateway_port": free_port(), "gateway_keys_file": path, "max_value_bytes": MAX_VALUE_BYTES}
        b = await make_bridge(**{**settings, **overrides})
        session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=40))
        sessions.append(session)
        return b, Gateway(b.gateway_port, keys, session)

    yield start
    for s in sessions:
        await s.close()


@pytest.fixture
async def gw(start_gateway) -> Gateway:
    _, gateway = await start_gateway(clock_skew_margin=0.2)
    return gateway


# -- every endpoint ---------------------------------------------------------------------------------
async def test_add_fetch_extend_fail_ack_cancel_purge_through_http(gw):
    svc = service_id()
    added = await gw.ok(svc, "tasks", {"value": {"n": 1}, "token": "t-1"}, key="engine", headers={"X-Owner": OWNERS[0]})
    assert added["result"] is True
    task_id = added["task"]["id"]
    assert uuid.UUID(task_id) and "notBefore" not in added["task"]

    got = await gw.ok(svc, "fetch", {"workerId": "h1", "timeToRecover": 5000})
    assert got["result"] == {"n": 1}
    task = got["task"]
    assert task["id"] == task_id and task["epoch"] >= 1 and task["deliveries"] == 1 and task["hasToken"] is True
    assert task["leaseExpiresAt"].endswith("Z")

    named = {"workerId": "h1", "taskId": task_id, "epoch": task["epoch"]}
    ext = await gw.ok(svc, "extend", {**named, "timeToRecover": 10_000})
    assert ext["result"] is True and ext["task"]["id"] == task_id and ext["task"]["epoch"] == task["epoch"]
    assert ext["task"]["leaseExpiresAt"] > task["leaseExpiresAt"]

    failed = await gw.ok(svc, "fail", {**named, "error": {"why": "flaky"}, "retryInMs": 0})
    assert failed["result"] is True
    assert failed["task"] == {"id": task_id, "deliveries": 1, "parked": False, "retryAt": failed["task"]["retryAt"]}

    async def fetched_again() -> dict[str, Any] | None:
        reply = await gw.ok(svc, "fetch", {"workerId": "h1"})
        return reply if reply["result"] is not None else None

    again = await wait_for(fetched_again, 10, what="the failed task back")
    assert again["task"]["id"] == task_id and again["task"]["deliveries"] == 2
    ack = {"workerId": "h1", "taskId": task_id, "epoch": again["task"]["epoch"], "hasToken": True, "result": "done"}
    assert (await gw.ok(svc, "ack", ack))["result"] is True
    assert (await gw.ok(svc, "ack", ack))["result"] is True, "a repeated ack answers true again"
    stale = {**ack, "epoch": task["epoch"]}
    assert (await gw.ok(svc, "ack", stale))["result"] is False

    # cancel (engine) and purge: the ready tasks are gone.
    keep = (await gw.ok(svc, "tasks", {"value": "to cancel"}))["task"]["id"]
    assert (await gw.ok(svc, "cancel", {"taskId": keep}))["result"] is True
    for i in range(3):
        await gw.ok(svc, "tasks", {"value": i})
    purged = await gw.ok(svc, "purge")
    assert purged["result"]["purged"] == 3 and purged["result"]["more"] is False
    assert (await gw.ok(svc, "fetch", {"workerId": "h1"}))["result"] is None


async def test_a_task_whose_value_is_null_is_fetched_with_its_task_object(gw):
    """The OpenAPI said `result` is null when no task is ready and `task` absent then: an HTTP
    worker written from it took a task whose value is null for none (its pointer then handed it
    again at every fetch, or it was parked unworked). A task comes with `task` whatever its value,
    and the document says to test for it (found by review, 2026-12-07)."""
    svc = service_id()
    added = await gw.ok(svc, "tasks", {"value": None}, key="engine", headers={"X-Owner": OWNERS[0]})
    got = await gw.ok(svc, "fetch", {"workerId": "n1"})
    assert got["result"] is None and got["task"]["id"] == added["task"]["id"]
    assert "task" not in await gw.ok(svc, "fetch", {"workerId": "n2"}), "nothing ready: no task"
    from bridge.gateway.openapi import document

    fetch_reply = document()["components"]["schemas"]["FetchReply"]["properties"]
    assert "test for `task`" in fetch_reply["result"]["description"].lower()


async def test_stats_of_every_queue_answer_partially_over_http_only_when_asked(start_gateway, monkeypatch):
    """Contract 1.10: `GET /api/queue/stats?partial=true` answers the queues that can be read and
    names the others in `unavailable`; without it one such queue makes the request 503 (as in
    1.9, which clients retry). The GET had no way to ask (a re-review, 2026-12-07)."""
    from tests.conftest import fail_parked_reads_of

    b, gw = await start_gateway()
    healthy, broken = service_id(), service_id()
    for svc in (healthy, broken):
        await gw.ok(svc, "tasks", {"value": 1}, key="engine", headers={"X-Owner": OWNERS[0]})
    fail_parked_reads_of(monkeypatch, b.store, broken)
    whole = await gw.request("GET", "/api/queue/stats")
    assert whole.status == 503, (whole.status, whole.body)
    partial = await gw.request("GET", "/api/queue/stats?partial=true")
    assert partial.status == 200, (partial.status, partial.body)
    assert partial.body["result"]["unavailable"] == [broken]
    assert healthy in {s["serviceId"] for s in partial.body["result"]["services"]}


async def test_a_cancel_sent_again_with_its_idempotency_key_answers_true_again(gw):
    """A cancel whose reply was lost (a 503 after its write landed, a proxy's 502, the client's own
    timeout) and that the engine sends again: over AMQP its message-id makes the copy answer true
    again; over HTTP the gateway passed no request id, the copy answered false ("it had finished
    or does not exist") and the engine waited for a result that never came. Its Idempotency-Key
    names the request now; another key's cancel of the cancelled task is still false (found by
    review, 2026-12-07)."""
    svc = service_id()
    task_id = (await gw.ok(svc, "tasks", {"value": "to cancel"}))["task"]["id"]
    once = {"headers": {"Idempotency-Key": "cancel-1"}}
    assert (await gw.ok(svc, "cancel", {"taskId": task_id}, **once))["result"] is True
    assert (await gw.ok(svc, "cancel", {"taskId": task_id}, **once))["result"] is True, "the same request, again"
    other = {"headers": {"Idempotency-Key": "cancel-2"}}
    assert (await gw.ok(svc, "cancel", {"taskId": task_id}, **other))["result"] is False, "another request"
    assert (await gw.ok(svc, "cancel", {"taskId": task_id}))["result"] is False, "no key: as before"
    bad = await gw.post(svc, "cancel", {"taskId": task_id}, headers={"Idempotency-Key": "k" * 256})
    assert bad.status == 400 and bad.code == "bad_request"


async def test_stats_parked_redrive_discard_and_delayed_adds_through_http(gw):
    svc = service_id()
    for i in range(2):
        await gw.ok(svc, "tasks", {"value": i, "maxDeliveries": 1})
    delayed = await gw.ok(svc, "tasks", {"value": "later", "delayMs": 60_000})
    assert delayed["task"]["notBefore"].endswith("Z")
    ids = []
    for _ in range(2):  # fail each at its only delivery: parked
        got = await gw.ok(svc, "fetch", {"workerId": "p"})
        ids.append(got["task"]["id"])
        body = {"workerId": "p", "taskId": got["task"]["id"], "epoch": got["task"]["epoch"], "error": "boom"}
        failed = await gw.ok(svc, "fail", body)
        assert failed["task"]["parked"] is True and failed["task"]["retryAt"] is None
    parked = (await gw.ok(svc, "parked", {"limit": 10}))["result"]["tasks"]
    assert sorted(t["id"] for t in parked) == sorted(ids)
    # A page at a time (1.11): the first page says where the next starts, the last says nothing.
    first = (await gw.ok(svc, "parked", {"limit": 1}))["result"]
    assert len(first["tasks"]) == 1 and first["after"] == first["tasks"][0]["id"], first
    rest = (await gw.ok(svc, "parked", {"limit": 10, "after": first["after"]}))["result"]
    assert [t["id"] for t in first["tasks"] + rest["tasks"]] == [t["id"] for t in parked] and rest["after"] is None
    assert all(t["reason"] == "failed" and t["lastError"] == "boom" and t["deliveries"] == 1 for t in parked)

    async def counted() -> dict[str, Any] | None:
        services = (await gw.ok(svc, "stats"))["result"]["services"]
        return services[0] if services and services[0]["parked"] == 2 and services[0]["delayed"] == 1 else None

    mine = await wait_for(counted, 10, what="stats counting the parked and delayed tasks")
    assert mine["serviceId"] == svc and mine["ready"] == 0 and mine["inFlight"] == 0
    everything = await gw.request("GET", "/api/queue/stats")
    assert everything.status == 200
    assert svc in [s["serviceId"] for s in everything.body["result"]["services"]]

    assert (await gw.ok(svc, "redrive", {"taskIds": [ids[0]]}))["result"] == {"redriven": 1}
    back = await wait_for(lambda: _fetch_task(gw, svc, "p2"), 10, what="the redriven task")
    assert back["task"]["id"] == ids[0]
    assert (await gw.ok(svc, "discard", {"taskIds": [ids[1]]}))["result"] == {"discarded": 1}
    assert (await gw.ok(svc, "parked"))["result"]["tasks"] == []
    redriven = (await gw.ok(svc, "redrive", {"all": True}))["result"]
    assert redriven["redriven"] == 0 and "after" not in redriven  # nothing put back, nothing left to scan


async def _fetch_task(gw: Gateway, svc: str, worker: str, key: str = "a") -> dict[str, Any] | None:
    reply = await gw.ok(svc, "fetch", {"workerId": worker}, key=key)
    return reply if reply["result"] is not None or "task" in reply else None


async def test_idempotency_key_and_traceparent_are_the_amqp_message_id_and_traceparent(gw):
    svc = service_id()
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"Idempotency-Key": "order-42", "traceparent": parent}
    first = await gw.ok(svc, "tasks", {"value": 1}, headers=headers)
    second = await gw.ok(svc, "tasks", {"value": 1}, headers=headers)
    assert first["task"]["id"] == second["task"]["id"], "one task for one idempotency key"
    reply = await gw.post(svc, "fetch", {"workerId": "t"})
    assert reply.body["task"]["id"] == first["task"]["id"]
    child = reply.headers["traceparent"]
    assert child.split("-")[1] == parent.split("-")[1] and child != parent, "the same trace, a new span"
    assert (await gw.ok(svc, "fetch", {"workerId": "t2"}))["result"] is None, "no second task"


async def test_an_add_whose_write_failed_once_is_retried_in_place_not_refused_for_30_s(start_gateway, monkeypatch):
    """An add with an Idempotency-Key records its key (a compare-and-set) before it writes its
    task; a write that failed once (a node restarting: "no host available") answered 503, and
    the client's retry with the same key prepared another task id, found the key naming the
    first (never stored), and was refused for 30 s as "still being stored", on every gateway.
    The gateway retries in place, with the same task, as the AMQP handler does (found by
    review, 2026-12-06)."""
    from bridge.storage.errors import StorageNotSent

    bridge, gw = await start_gateway()
    svc = service_id()
    store = bridge.queue.ctx.store
    real = store.store_task
    failed: list[Any] = []

    async def fails_once(*args: Any, **kwargs: Any) -> None:
        if not failed:
            failed.append(args[1])
            raise StorageNotSent("no host available (injected)")
        await real(*args, **kwargs)

    monkeypatch.setattr(store, "store_task", fails_once)
    added = await gw.ok(svc, "tasks", {"value": 1}, headers={"Idempotency-Key": "k-once"})
    assert [str(t) for t in failed] == [added["task"]["id"]]  # the same task, stored by the retry
    again = await gw.ok(svc, "tasks", {"value": 1}, headers={"Idempotency-Key": "k-once"})
    assert again["task"]["id"] == added["task"]["id"]
    assert (await _fetch_task(gw, svc, "t"))["task"]["id"] == added["task"]["id"]  # type: ignore[index]
    assert await _fetch_task(gw, svc, "t2") is None  # one task


# -- identity ---------------------------------------------------------------------------------------
async def test_requests_without_valid_credentials_are_401(gw):
    svc = service_id()
    good = gw.keys["a"]
    key_id, secret = good[3:].split("_", 1)
    cases = {
        "no header": {},
        "not bearer": {"Authorization": f"Basic {good}"},
        "empty bearer": {"Authorization": "Bearer "},
        "malformed key": {"Authorization": "Bearer not-a-key"},
        "no secret": {"Authorization": f"Bearer qb_{key_id}_"},
        "unknown id": {"Authorization": f"Bearer qb_nosuchkey_{secret}"},
        "wrong secret": {"Authorization": f"Bearer qb_{key_id}_{secret[:-1]}x"},
    }
    for what, headers in cases.items():
        for method, path in (("POST", f"/api/queue/{svc}/fetch"), ("GET", "/api/queue/stats"), ("GET", "/nope")):
            reply = await gw.request(method, path, {"workerId": "w"}, key=None, headers=headers)
            assert reply.status == 401, (what, path, reply.body)
            assert reply.code == "unauthorized" and "Traceback" not in json.dumps(reply.body)
            assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    # The one public path.
    doc = await gw.request("GET", "/openapi.json", key=None)
    assert doc.status == 200 and doc.body["openapi"].startswith("3.1")


async def test_x_owner_is_for_trusted_keys(gw):
    svc = service_id()
    # A worker's key naming another owner: 403; naming its own: as if it named none.
    refused = await gw.post(svc, "tasks", {"value": 1}, key="a", headers={"X-Owner": OWNERS[1]})
    assert refused.status == 403 and refused.code == "unauthorized"
    assert OWNERS[1] in refused.body["error"]["message"]
    await gw.ok(svc, "tasks", {"value": "mine"}, key="a", headers={"X-Owner": OWNERS[0]})
    # The trusted (engine) key acts for the owner it names.
    await gw.ok(svc, "tasks", {"value": "for b"}, key="engine", headers={"X-Owner": OWNERS[1]})
    got_b = await gw.ok(svc, "fetch", {"workerId": "wb"}, key="b")
    assert got_b["result"] == "for b"
    got_a = await gw.ok(svc, "fetch", {"workerId": "wa"}, key="a")
    assert got_a["result"] == "mine"
    bad = await gw.post(svc, "fetch", {"workerId": "w"}, key="engine", headers={"X-Owner": "o" * 256})
    assert bad.status == 400 and bad.code == "bad_request"


async def test_an_x_owner_that_is_not_utf8_is_a_bad_request(start_gateway, gateway_keys):
    """aiohttp surrogate-escapes a header's undecodable bytes: such an X-Owner passed the owner
    pattern, then made the key server client's quote() raise UnicodeEncodeError, a 500."""
    _, keys = gateway_keys
    async with KeyServer() as ks:
        for owner in (*OWNERS, ENGINE_USER):
            ks.add_owner(owner)
        _, gw = await start_gateway(keyring=None, key_server_url=ks.url)
        request = (
            f"GET /api/queue/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {keys['engine']}\r\n"
        ).encode() + b"X-Owner: caf\xff\xfe\r\nConnection: close\r\n\r\n"
        answer = await asyncio.to_thread(raw_exchange, gw.port, request)
        assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
        assert b'"bad_request"' in answer


async def test_an_owner_reaches_only_its_own_queue(gw, engine, workers):
    svc = service_id()
    task_id = await engine.add(svc, {"secret": "of a"})  # AMQP, for OWNERS[0]
    # Owner b, same service name: its own empty queue, whatever it asks.
    assert (await gw.ok(svc, "fetch", {"workerId": "thief"}, key="b"))["result"] is None
    assert (await gw.ok(svc, "cancel", {"taskId": task_id}, key="b"))["result"] is False
    assert (await gw.ok(svc, "purge", key="b"))["result"]["purged"] == 0
    assert (await gw.ok(svc, "parked", key="b"))["result"]["tasks"] == []
    assert (await gw.ok(svc, "discard", {"taskIds": [task_id]}, key="b"))["result"] == {"discarded": 0}
    stats_b = (await gw.request("GET", "/api/queue/stats", key="b")).body["result"]["services"]
    assert svc not in [s["serviceId"] for s in stats_b]
    ack = {"workerId": "thief", "taskId": task_id, "epoch": 1, "result": "stolen"}
    assert (await gw.ok(svc, "ack", ack, key="b"))["result"] is False
    # Owner a still has its task, untouched.
    got = await gw.ok(svc, "fetch", {"workerId": "rightful"}, key="a")
    assert got["task"]["id"] == task_id and got["result"] == {"secret": "of a"} and got["task"]["deliveries"] == 1


async def test_an_owner_without_an_encryption_key_is_403_unknown_owner(gw):
    reply = await gw.post(service_id(), "tasks", {"value": 1}, key="nobody")
    assert reply.status == 403 and reply.code == "unknown_owner"


class ChunkedKeyServer(KeyServer):
    """The test key server, answering in two HTTP chunks (as a proxy or a streaming server may)."""

    async def _handle_key(self, request: web.Request) -> web.StreamResponse:
        whole = await super()._handle_key(request)
        body = whole.body
        assert isinstance(body, bytes)
        resp = web.StreamResponse(status=whole.status, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)  # the two halves arrive apart: provokes the defect, hides no race
        await resp.write(body[len(body) // 2 :])
        await resp.write_eof()
        return resp


async def test_a_key_server_answer_in_two_pieces_is_read_whole(start_gateway):
    """The key server client read its answer with one read(n), which returns what is buffered: an
    answer in two pieces was cut, "not JSON", and every request of the owner a 503."""
    async with ChunkedKeyServer() as ks:
        for owner in (*OWNERS, ENGINE_USER):
            ks.add_owner(owner)
        _, gw = await start_gateway(keyring=None, key_server_url=ks.url)
        reply = await gw.post(service_id(), "tasks", {"value": "sealed with the key server's key"})
        assert reply.status == 200, reply.body


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "raw", "status", "words"),
    [
        ("fetch", b"{not json", 400, "not valid JSON"),
        ("fetch", b"[1, 2]", 400, "JSON object"),
        ("fetch", b'"just a string"', 400, "JSON object"),
        ("fetch", b"{}", 400, "workerId"),
        ("fetch", b'{"workerId": 5}', 400, "workerId"),
        ("fetch", b'{"workerId": "w", "timeToRecover": "soon"}', 400, "timeToRecover"),
        ("fetch", b'{"workerId": "w", "waitMs": 30001}', 400, "waitMs"),
        ("fetch", b'{"workerId": "w", "serviceId": "another"}', 400, "serviceId"),
        ("ack", b'{"workerId": "w", "taskId": 12}', 400, "taskId"),
        ("tasks", b'{"token": "t"}', 400, "value"),
        ("tasks", b'{"value": 1, "delayMs": 5, "notBefore": "2030-01-01T00:00:00Z"}', 400, "not both"),
        ("tasks", b'{"value": 1, "priority": 9}', 400, "priority"),
        ("redrive", b"{}", 400, "taskIds or all"),
        ("discard", b'{"taskIds": ["not-a-uuid"]}', 400, "taskIds"),
        ("tasks", b'{"value": "' + b"x" * (MAX_VALUE_BYTES + 10) + b'"}', 413, "value"),
    ],
)
async def test_bad_bodies_get_the_right_status(gw, name, raw, status, words):
    svc = service_id()
    reply = await gw.post(svc, name, raw=raw)
    assert reply.status == status, reply.body
    assert reply.code == {400: "bad_request", 413: "payload_too_large"}[status]
    assert words in reply.body["error"]["message"]
    assert "Traceback" not in reply.body["error"]["message"]
    # ...and the gateway still serves.
    assert (await gw.ok(svc, "fetch", {"workerId": "after"}))["result"] is None


def _timeuuid(ms: int) -> str:
    from bridge.domain.timeline import timeuuid_from_ms

    return str(timeuuid_from_ms(ms))


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("cancel", {"taskId": str(uuid.uuid4())}),
        ("discard", {"taskIds": [str(uuid.uuid4())]}),
        ("redrive", {"taskIds": ["8f0e1c2a-0000-8000-8000-000000000000"]}),
        ("ack", {"workerId": "w", "taskId": str(uuid.uuid4()), "epoch": 1, "hasToken": False}),
        ("extend", {"workerId": "w", "taskId": str(uuid.uuid4()), "epoch": 1}),
        ("fail", {"workerId": "w", "taskId": str(uuid.uuid4()), "epoch": 1}),
    ],
)
async def test_task_ids_no_bridge_makes_are_bad_requests(gw, name, body):
    """Found by the schemathesis run (tests/integration/test_gateway_schema.py): such ids reached
    Cassandra, which refused them (or their TTL overflowed): an internal error."""
    reply = await gw.post(service_id(), name, body)
    assert reply.status == 400 and reply.code == "bad_request", reply.body
    assert "is not a task id" in reply.body["error"]["message"]


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("extend", {"workerId": "w", "taskId": _timeuuid(10**14), "epoch": 1}),
        ("cancel", {"taskId": _timeuuid(10**14)}),
    ],
)
async def test_a_time_uuid_centuries_ahead_names_no_task(gw, name, body):
    """Shaped like a task id, but no task can have it: answered as on AMQP (false), never a 5xx
    (its TTL overflowed Cassandra's before storage capped it)."""
    reply = await gw.post(service_id(), name, body)
    assert reply.status == 200 and reply.body["result"] is False, reply.body


async def test_http_level_errors(gw):
    svc = service_id()
    not_json = await gw.post(svc, "fetch", raw=b"workerId=w", content_type="application/x-www-form-urlencoded")
    assert not_json.status == 415 and not_json.code == "bad_request"
    missing = await gw.request("POST", f"/api/queue/{svc}/frobnicate", {})
    assert missing.status == 404 and missing.code == "bad_request"
    wrong = await gw.request("GET", f"/api/queue/{svc}/fetch")
    assert wrong.status == 405 and wrong.code == "bad_request" and wrong.headers["Allow"] == "POST"
    # An empty body is {}: purge needs nothing else.
    empty = await gw.request("POST", f"/api/queue/{svc}/purge", raw=b"")
    assert empty.status == 200 and empty.body["result"]["purged"] == 0
    # +json media types are JSON.
    ok = await gw.post(svc, "fetch", raw=b'{"workerId": "w"}', content_type="application/merge-patch+json")
    assert ok.status == 200


async def test_stats_of_every_service_reads_no_body_and_answers_only_documented_statuses(gw):
    """GET /api/queue/stats parsed a body as the POSTs do: it answered 415 or 413, which its
    OpenAPI operation does not list, and a body's serviceId narrowed the result to one service."""
    doc = (await gw.request("GET", "/openapi.json", key=None)).body
    documented = set(doc["paths"]["/api/queue/stats"]["get"]["responses"])
    reply = await gw.request("GET", "/api/queue/stats", raw=b"hello", content_type="text/plain")
    assert str(reply.status) in documented, (reply.status, sorted(documented), reply.body)
    assert reply.status == 200, reply.body
    one, other = service_id(), service_id()
    for svc in (one, other):
        await gw.ok(svc, "tasks", {"value": 1})
    reply = await gw.request("GET", "/api/queue/stats", {"serviceId": one})
    assert reply.status == 200, reply.body
    assert {one, other} <= {s["serviceId"] for s in reply.body["result"]["services"]}


async def test_an_oversized_body_is_refused_before_it_is_read(gw):
    """Content-Length over the limit: 413 at once, with none of the body sent."""
    svc = service_id()
    head = (
        f"POST /api/queue/{svc}/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {gw.keys['a']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10 * 1024 * 1024 * 1024}\r\n\r\n"
    ).encode()

    def exchange() -> bytes:
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
            sock.sendall(head + b'{"value": "')  # the first bytes of 10 GiB
            data = b""
            while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    started = time.monotonic()
    data = await asyncio.to_thread(exchange)
    assert data.startswith(b"HTTP/1.1 413"), data[:200]
    assert b'"payload_too_large"' in data
    assert time.monotonic() - started < 5
    # A chunked body (no Content-Length) is cut off as soon as it passes the limit.
    too_big = b'{"value": "' + b"x" * (MAX_VALUE_BYTES + ALLOWANCE) + b'"}'

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(too_big), 8192):
            yield too_big[i : i + 8192]

    headers = {**gw.auth("a"), "Content-Type": "application/json"}
    async with gw.session.post(f"{gw.base}/api/queue/{svc}/tasks", data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("tail", "then"),
    [
        # The client stops sending and closes the connection.
        pytest.param(b'Content-Length: 1000\r\n\r\n{"value": "abc', b"", id="disconnect-mid-body"),
        # A broken chunk size: aiohttp answers 400 itself and drops the connection under the handler.
        pytest.param(b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"val\r\n', b"zz\r\nue\r\n", id="malformed-chunked-body"),
    ],
)
async def test_a_body_the_client_never_finishes_is_a_bad_request_not_an_internal_error(
    start_gateway, gateway_keys, tail, then
):
    """The read's ConnectionResetError (or aiohttp's error for a malformed chunked body) was
    counted as requests_total{outcome=internal} and logged at ERROR with a traceback, as a bug."""
    _, keys = gateway_keys
    bridge, gw = await start_gateway()

    def observed(outcome: str | None = None) -> float:
        total = 0.0
        for family in bridge.metrics.requests.collect():
            for s in family.samples:
                add = s.name.endswith("_total") and s.labels["method"] == "add"
                if add and (outcome is None or s.labels["outcome"] == outcome):
                    total += s.value
        return total

    writer = await raw_http.send(gw.port, raw_http.post(f"/api/queue/{service_id()}/tasks", keys["a"]) + tail)

    def reading() -> bool:  # the gateway's handler is waiting for the rest of the body
        server = bridge.gateway._runner.server
        return any(getattr(h, "_current_request", None) is not None for h in server.connections)

    await wait_for(reading, 10, what="the request being read")
    if then:
        writer.write(then)
        await writer.drain()
    writer.close()
    await wait_for(lambda: observed() >= 1, 10, what="the request observed")
    assert observed("internal") == 0, "a client's broken upload counted as requests_total{outcome=internal}"
    assert observed("bad_request") == 1


async def test_tampered_data_is_422_integrity_error(gw, cql, servers):
    svc = service_id()
    # With a token: a hint never carries its value, the fetch reads the stored (tampered) row.
    bad = (await gw.ok(svc, "tasks", {"value": {"n": 1}, "token": "t"}))["task"]["id"]
    flip_stored_value(cql, servers.keyspace, svc, bad)
    reply = await gw.post(svc, "fetch", {"workerId": "w"})
    assert reply.status == 422 and reply.code == "integrity_error" and bad in reply.body["error"]["message"]


# -- long-poll ---------------------------------------------------------------------------------------
async def test_a_long_poll_through_http_gets_a_task_added_later(start_gateway, engine):
    bridge, gw = await start_gateway(clock_skew_margin=0.2)
    svc = service_id()
    assert (await gw.ok(svc, "fetch", {"workerId": "lp"}))["result"] is None  # the queue exists, empty
    waiting = asyncio.create_task(gw.ok(svc, "fetch", {"workerId": "lp", "waitMs": 20_000}))
    # Waiting on the bridge before the add (a sleep let the add come first on a loaded machine:
    # the fetch then took the task at once, and no long-poll was tested).
    await wait_for(lambda: _waiters(bridge) == 1, 10, what="the fetch waiting")
    assert not waiting.done()
    added_at = time.monotonic()
    task_id = await engine.add(svc, "worth the wait")
    got = await asyncio.wait_for(waiting, 15)
    assert got["result"] == "worth the wait" and got["task"]["id"] == task_id
    assert time.monotonic() - added_at < 5, "answered when the task came, not at the end of the wait"


async def test_a_waiting_http_fetch_is_answered_when_the_bridge_stops(start_gateway):
    bridge, gw = await start_gateway()
    svc = service_id()
    waiting = asyncio.create_task(gw.ok(svc, "fetch", {"workerId": "lp", "waitMs": 30_000}))
    await wait_for(lambda: _waiters(bridge) == 1, 10, what="the fetch waiting")
    started = time.monotonic()
    await bridge.stop()
    assert (await asyncio.wait_for(waiting, 15))["result"] is None
    assert time.monotonic() - started < 10
    with pytest.raises(aiohttp.ClientConnectionError):
        await gw.request("POST", f"/api/queue/{svc}/fetch", {"workerId": "late"})


# -- HTTP and AMQP on one queue ----------------------------------------------------------------------
async def test_http_and_amqp_workers_share_a_queue_and_ack_across(gw, engine, workers, servers, names):
    svc = service_id()
    async with results_consumer(servers.amqp_url("guest"), exchange=names["results_exchange"]) as results:
        ids = [await engine.add(svc, {"n": i}, token=f"tok-{i}") for i in range(6)]
        amqp = await workers(svc, "amqp-w")
        seen: dict[str, str] = {}
        for _ in range(3):
            via_http = await gw.ok(svc, "fetch", {"workerId": "http-w"})
            via_amqp = await amqp.call("fetch", {"serviceId": svc, "workerId": "amqp-w"})
            held = []
            for door, reply in (("http", via_http), ("amqp", via_amqp)):
                tid = reply["task"]["id"]
                assert tid not in seen, f"{tid} handed out twice ({seen.get(tid)} and {door})"
                seen[tid] = door
                held.append((door, tid, reply["task"]["epoch"]))
            # Each acked through the other door: the lease is the worker's, whatever carried the fetch.
            for door, tid, epoch in held:
                worker = f"{door}-w"
                body = {"serviceId": svc, "workerId": worker, "taskId": tid, "epoch": epoch, "result": f"by {door}"}
                if door == "http":
                    assert (await amqp.call("ack", body))["result"] is True
                else:
                    assert (await gw.ok(svc, "ack", body))["result"] is True
        assert sorted(seen) == sorted(ids)
        assert list(seen.values()).count("http") == 3
        assert (await gw.ok(svc, "fetch", {"workerId": "http-w"}))["result"] is None
        # The engine gets every result, each from the worker that fetched its task.
        got: dict[str, Any] = {}
        deadline = time.monotonic() + 15
        while len(got) < 6 and time.monotonic() < deadline:
            msg = await asyncio.wait_for(results.get(), max(0.1, deadline - time.monotonic()))
            if msg["serviceId"] == svc:
                got[msg["taskId"]] = msg["result"]
    assert got == {tid: f"by {seen[tid]}" for tid in ids}


async def test_gateway_requests_are_counted_like_amqp_ones(start_gateway):
    bridge, gw = await start_gateway()
    svc = service_id()
    await gw.ok(svc, "fetch", {"workerId": "m"})
    await gw.post(svc, "fetch", raw=b"{")

    def count(outcome: str) -> float:
        value = bridge.metrics.registry.get_sample_value(
            "queue_bridge_requests_total", {"method": "fetch", "outcome": outcome}
        )
        return value or 0.0

    assert count("ok") >= 1 and count("bad_request") >= 1


async def test_stats_of_every_service_reads_at_most_the_services_it_answers(start_gateway, cql, servers, monkeypatch):
    """``GET /api/queue/stats`` answers at most 1,000 services, but read every service row of the
    owner first (``services.of`` had no LIMIT), and the console polls it every 2 s. The read now
    asks Cassandra for at most what the reply can hold."""
    from cassandra.concurrent import execute_concurrent_with_args

    bridge, gw = await start_gateway()
    owner = OWNERS[1]  # key "b"
    insert = cql.prepare(f"INSERT INTO {servers.keyspace}.services (owner, service) VALUES (?, ?) USING TTL 3600")
    # Sorted before every other test's services ("svc-..."), and deleted after: other tests look
    # for their own service in this owner's list of 1,000.
    execute_concurrent_with_args(cql, insert, [(owner, f"AAmany-{i:05d}") for i in range(2500)], concurrency=100)
    read: list[int] = []
    store = bridge.queue.ctx.store
    real = store.services

    async def services(o: str, limit: int) -> list[str]:
        rows = await real(o, limit)
        read.append(len(rows))
        return rows[:3]  # keep the test fast: only the read's size matters here

    monkeypatch.setattr(store, "services", services)
    try:
        reply = await gw.request("GET", "/api/queue/stats", key="b")
        assert reply.status == 200, reply.body
        assert read == [1000], read
    finally:
        cql.execute(
            f"DELETE FROM {servers.keyspace}.services "
            "WHERE owner = %s AND service >= 'AAmany-' AND service < 'AAmany.'",
            (owner,),
        )


def _waiters(bridge: Any) -> int:
    return sum(len(w.waiters) for w in bridge.hints._waiting.values())


def _serving(bridge: Any, svc: str) -> list[Any]:
    """The gateway's connections serving a request of ``svc`` now."""
    server = bridge.gateway._runner.server
    found = []
    for h in server.connections:
        r = getattr(h, "_current_request", None)
        if r is not None and f"/{svc}/" in r.path:
            found.append(h)
    return found


async def test_a_long_poll_whose_client_hung_up_does_not_claim_the_next_task(start_gateway, gateway_keys):
    """A waiting HTTP fetch whose client disconnected keeps waiting (aiohttp does not cancel the
    handler) and claims the next task for a reply nobody reads: the task stays leased to a gone
    worker for its whole lease while a live worker polls an empty queue. The AMQP transport trims
    a wait to the caller's deadline for exactly this reason (handlers.py: "a wait past it would
    only claim a task for a reply nobody reads")."""
    _, keys = gateway_keys
    bridge, gw = await start_gateway()
    svc = service_id()
    assert (await gw.ok(svc, "fetch", {"workerId": "live"}))["result"] is None  # the queue exists

    body = json.dumps({"workerId": "gone", "waitMs": 30_000, "timeToRecover": 600_000}).encode()
    writer = await raw_http.send(gw.port, raw_http.post(f"/api/queue/{svc}/fetch", keys["a"], body))
    await wait_for(lambda: _waiters(bridge) == 1, 10, what="the HTTP fetch waiting for a hint")
    (waiting,) = _serving(bridge, svc)
    writer.close()  # the worker hangs up (its client timed out, the pod went away...)
    await writer.wait_closed()
    await wait_for(lambda: waiting._manager is None, 10, what="the gateway seeing the connection closed")

    task_id = (await gw.ok(svc, "tasks", {"value": "for a live worker"}))["task"]["id"]
    got = await gw.ok(svc, "fetch", {"workerId": "live", "waitMs": 3000})
    info = await bridge.queue.task_info(OWNERS[0], svc, uuid.UUID(task_id))
    assert got["result"] == "for a live worker", (
        f"the task went to the hung-up long-poll: state={info.state} worker={info.worker} "
        f"lease until {info.lease_expires_at_ms} (now {bridge.queue.clock.now_ms()})"
    )


async def _long_poll_then_hang_up_later(gw: Gateway, svc: str, worker: str) -> asyncio.StreamWriter:
    """A long-poll fetch on a raw connection, left open: the caller closes it (hangs up)."""
    body = json.dumps({"workerId": worker, "waitMs": 30_000, "timeToRecover": 600_000}).encode()
    return await raw_http.send(gw.port, raw_http.post(f"/api/queue/{svc}/fetch", gw.keys["a"], body))


def _fetches(bridge: Any, outcome: str) -> float:
    value = bridge.metrics.registry.get_sample_value(
        "queue_bridge_requests_total", {"method": "fetch", "outcome": outcome}
    )
    return value or 0.0


async def test_a_long_poll_whose_client_hangs_up_while_it_waits_stops_and_is_counted_client_gone(start_gateway):
    """A waiting fetch cut short by its client's hang-up was counted ``bad_request`` (the client's
    error, alerting as one); it is ``client_gone``, and it stops waiting at once."""
    bridge, gw = await start_gateway()
    svc = service_id()
    assert (await gw.ok(svc, "fetch", {"workerId": "live"}))["result"] is None  # the queue exists
    bad_before = _fetches(bridge, "bad_request")
    writer = await _long_poll_then_hang_up_later(gw, svc, "gone")
    await wait_for(lambda: _waiters(bridge) == 1, 10, what="the HTTP fetch waiting for a hint")
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: _waiters(bridge) == 0, 10, what="the wait cut short")
    await wait_for(lambda: _fetches(bridge, "client_gone") == 1, 10, what="the fetch counted client_gone")
    assert _fetches(bridge, "bad_request") == bad_before
    assert not bridge.gateway._shielded and bridge.gateway._in_flight == {}


async def test_a_claim_under_way_when_the_client_hangs_up_is_finished_with_its_bookkeeping(start_gateway, monkeypatch):
    """aiohttp cancels a handler whose client hangs up; the fetch was not shielded, so a hang-up
    while its claim was in flight (the compare-and-set sent, its answer on the way) cut it there:
    the claim applied, but it was never counted (stats kept the task ready, not in flight), its
    short-lease timer and slow-claim refile were skipped, and its hint went back to the queue
    though the task was leased. Now the claim ends as any other; the worker, which got no answer,
    is handed the task by its next fetch (not ``fresh``)."""
    bridge, gw = await start_gateway()
    svc = service_id()
    assert (await gw.ok(svc, "fetch", {"workerId": "live"}))["result"] is None
    writer = await _long_poll_then_hang_up_later(gw, svc, "gone")
    await wait_for(lambda: _waiters(bridge) == 1, 10, what="the HTTP fetch waiting for a hint")
    (serving,) = _serving(bridge, svc)
    store = bridge.queue.ctx.store
    real = store.claim_new
    claimed, release = asyncio.Event(), asyncio.Event()

    async def claim_new(*args: Any, **kwargs: Any) -> Any:
        res = await real(*args, **kwargs)  # applied in Cassandra; its answer is "on the way"
        claimed.set()
        await release.wait()
        return res

    monkeypatch.setattr(store, "claim_new", claim_new)
    ok_before = _fetches(bridge, "ok")
    task_id = (await gw.ok(svc, "tasks", {"value": "claimed as the worker left"}))["task"]["id"]
    await asyncio.wait_for(claimed.wait(), 10)
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: serving._manager is None, 10, what="the gateway seeing the connection closed")
    release.set()

    async def counted() -> dict[str, Any] | None:
        (row,) = (await gw.ok(svc, "stats"))["result"]["services"]
        return row if row["inFlight"] == 1 and row["ready"] == 0 else None

    await wait_for(counted, 10, what="the claim counted: in flight 1, ready 0")
    await wait_for(lambda: _fetches(bridge, "ok") == ok_before + 1, 10, what="the hung-up fetch counted ok")
    monkeypatch.setattr(store, "claim_new", real)
    # Nobody else gets the leased task; the worker's next fetch (not fresh) gets it again.
    assert (await gw.ok(svc, "fetch", {"workerId": "live"}))["result"] is None
    again = await gw.ok(svc, "fetch", {"workerId": "gone"})
    assert again["task"]["id"] == task_id and again["result"] == "claimed as the worker left"


async def test_a_hang_up_after_the_still_wanted_check_claims_nothing(start_gateway, monkeypatch):
    """A long-poll that takes a hint asks whether its caller is still there beside the
    write-ahead, and the claim waited for that answer only. A client that hung up after it was
    answered (during the write-ahead, the turn wait, the wait for the add's write) was claimed for
    all the same: the task leased to a gone worker for its whole timeToRecover (an ephemeral
    workerId never fetches it back). The hang-up is looked at again just before the claim."""
    bridge, gw = await start_gateway()
    svc = service_id()
    writer = await _long_poll_then_hang_up_later(gw, svc, "gone")
    await wait_for(lambda: _waiters(bridge) == 1, 10, what="the HTTP fetch waiting for a hint")
    (serving,) = _serving(bridge, svc)
    store = bridge.queue.ctx.store
    real = store.write_ahead
    written, release = asyncio.Event(), asyncio.Event()

    async def write_ahead(*args: Any, **kwargs: Any) -> Any:
        res = await real(*args, **kwargs)
        written.set()
        await release.wait()  # the caller hangs up here: after "still wanted" was answered
        return res

    monkeypatch.setattr(store, "write_ahead", write_ahead)
    ended = _fetches(bridge, "ok") + _fetches(bridge, "client_gone")
    task_id = (await gw.ok(svc, "tasks", {"value": "for a live worker"}))["task"]["id"]
    await asyncio.wait_for(written.wait(), 10)
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: serving._manager is None, 10, what="the gateway seeing the connection closed")
    release.set()
    await wait_for(
        lambda: _fetches(bridge, "ok") + _fetches(bridge, "client_gone") > ended, 10, what="the hung-up fetch ended"
    )
    monkeypatch.setattr(store, "write_ahead", real)
    got = await gw.ok(svc, "fetch", {"workerId": "live"})
    assert got.get("task", {}).get("id") == task_id, f"the task was leased to the worker that hung up: {got}"
    assert _fetches(bridge, "client_gone") >= 1


async def test_a_fetch_that_does_not_wait_claims_nothing_once_its_client_hung_up(start_gateway, monkeypatch):
    """The hang-up was looked at before the claim only by a fetch that had waited (its "still
    wanted" question is asked beside a long-poll's write-ahead): a fetch that found a task at once
    (waitMs 0, or a task ready when a long-poll began) whose client hung up during its write-ahead
    or its turn (a slow Cassandra, the client's own timeout) claimed the task all the same, leased
    to a gone worker for its whole timeToRecover while a live worker found the queue empty."""
    bridge, gw = await start_gateway()
    svc = service_id()
    task_id = (await gw.ok(svc, "tasks", {"value": "for a live worker"}))["task"]["id"]
    store = bridge.queue.ctx.store
    real = store.write_ahead
    written, release = asyncio.Event(), asyncio.Event()

    async def write_ahead(*args: Any, **kwargs: Any) -> Any:
        res = await real(*args, **kwargs)
        written.set()
        await release.wait()  # the caller hangs up here, before the claim
        return res

    monkeypatch.setattr(store, "write_ahead", write_ahead)
    ended = _fetches(bridge, "ok") + _fetches(bridge, "client_gone")
    body = json.dumps({"workerId": "gone", "timeToRecover": 600_000}).encode()
    writer = await raw_http.send(gw.port, raw_http.post(f"/api/queue/{svc}/fetch", gw.keys["a"], body))
    await asyncio.wait_for(written.wait(), 10)
    (serving,) = _serving(bridge, svc)
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: serving._manager is None, 10, what="the gateway seeing the connection closed")
    release.set()
    await wait_for(
        lambda: _fetches(bridge, "ok") + _fetches(bridge, "client_gone") > ended, 10, what="the hung-up fetch ended"
    )
    monkeypatch.setattr(store, "write_ahead", real)
    got = await gw.ok(svc, "fetch", {"workerId": "live"})
    info = await bridge.queue.task_info(OWNERS[0], svc, uuid.UUID(task_id))
    assert got.get("task", {}).get("id") == task_id, (
        f"the task was leased to the worker that hung up: {got}, state={info.state} worker={info.worker}"
    )
    assert _fetches(bridge, "client_gone") >= 1


async def test_long_lifecycle_requests_through_http_and_amqp_share_the_bridges_bound(
    start_gateway, engine, monkeypatch
):
    """A purge, stats, parked or discard may run for seconds on the store; one bridge runs at most
    MAX_LONG_REQUESTS of them (2 here) and answers the next ``unavailable`` with nothing done. The
    bound was the AMQP handlers' only: the gateway ran as many as its per-key bound allows (256 a
    key) beside AMQP's, so one tenant's flood of purges through HTTP took the store from every
    tenant of the bridge. Now it is the bridge's, whichever way the requests come."""
    import bridge.transport.capacity as capacity
    from bridge.domain import lifecycle

    monkeypatch.setattr(capacity, "MAX_LONG_REQUESTS", 2)
    monkeypatch.setattr(capacity, "OWNER_SHARE_DIVISOR", 1)  # one owner may take them all here
    gate = asyncio.Event()
    started: list[str] = []
    real_purge = lifecycle.Lifecycle.purge

    async def purge(self: Any, owner: str, service: str) -> tuple[int, bool]:
        started.append(service)
        await gate.wait()
        return await real_purge(self, owner, service)

    monkeypatch.setattr(lifecycle.Lifecycle, "purge", purge)
    bridge, gw = await start_gateway()
    svc = service_id()
    await gw.ok(svc, "tasks", {"value": 1})
    running = [
        asyncio.create_task(engine.call("purge", {"serviceId": svc}, owner=OWNERS[0])),
        asyncio.create_task(gw.post(svc, "purge")),
    ]
    try:
        await wait_for(lambda: len(started) == 2, 10, what="one purge through AMQP, one through HTTP, running")
        refused = await gw.post(svc, "purge")
        assert refused.status == 503 and refused.code == "unavailable", (refused.status, refused.body)
        assert "at most 2 at once" in refused.body["error"]["message"], refused.body
        reply, _ = await engine.call_raw("purge", {"serviceId": svc}, owner=OWNERS[0])
        assert reply.get("error", {}).get("code") == "unavailable", reply
        assert len(started) == 2, "a purge past the bound ran"
        assert bridge.capacity.long_requests == 2
    finally:
        gate.set()
    amqp_reply, http_reply = await asyncio.gather(*running)
    assert http_reply.status == 200, (http_reply.status, http_reply.body)
    assert amqp_reply["result"]["purged"] + http_reply.body["result"]["purged"] == 1
    assert bridge.capacity.long_requests == 0


async def test_one_owner_holds_at_most_its_share_of_the_long_request_slots(start_gateway, gateway_keys, monkeypatch):
    """One owner's key held every long-request slot of the bridge (32 purges of big queues, about
    200 s each): every other tenant's stats, purges, listings and console pages were answered 503
    meanwhile, though the docs say one key cannot take the whole bridge (found by review,
    2026-12-06). An owner holds at most a quarter of them; the others are served."""
    import bridge.transport.capacity as capacity
    from bridge.domain import lifecycle

    monkeypatch.setattr(capacity, "MAX_LONG_REQUESTS", 8)  # a share of 2
    gate = asyncio.Event()
    started: list[str] = []
    real_purge = lifecycle.Lifecycle.purge

    async def purge(self: Any, owner: str, service: str) -> tuple[int, bool]:
        started.append(owner)
        if owner == OWNERS[0]:
            await gate.wait()
        return await real_purge(self, owner, service)

    monkeypatch.setattr(lifecycle.Lifecycle, "purge", purge)
    bridge, gw = await start_gateway()
    svc = service_id()
    running = [asyncio.create_task(gw.post(svc, "purge", key="a")) for _ in range(2)]
    try:
        await wait_for(lambda: len(started) == 2, 10, what="two purges of one owner running")
        refused = await gw.post(svc, "purge", key="a")
        assert refused.status == 503 and "of this owner" in refused.body["error"]["message"], refused.body
        other = await gw.post(svc, "purge", key="b")  # another owner (OWNERS[1]) is served meanwhile
        assert other.status == 200, (other.status, other.body)
        stats = await gw.request("GET", "/console/api/services", key="b")
        assert stats.status == 200, (stats.status, stats.body)
        assert started.count(OWNERS[0]) == 2 and started.count(OWNERS[1]) == 1
    finally:
        gate.set()
    assert [r.status for r in await asyncio.gather(*running)] == [200, 200]
    assert bridge.capacity.long_requests == 0


# -- Clock skew between the bridge that granted a lease and the one a request goes through: host
# time with the 1 s margin the docs give for it, bridges 400 ms ahead and behind (within half the
# margin: both serve). Both went wrong before (compared across clocks without the margin).
HOST_TIME: dict[str, Any] = {"clock_source": "host", "clock_skew_margin": 1.0}


async def test_a_legacy_ack_through_a_bridge_400ms_behind_completes_the_task_granted_by_one_400ms_ahead(
    start_gateway: Any, engine: Any
) -> None:
    """docs/asyncapi.yaml: an ack without taskId "completes the task the worker holds, unless it
    was sent before that lease was granted"; the gateway takes "received now, so sent before now".
    The worker fetches through bridge A (400 ms ahead) and acks, after the fetch's reply, through
    bridge B (400 ms behind): both within half the margin. B compares its receive time (its clock)
    with A's grant time (A's clock), 800 ms apart, without the skew margin, and refuses the ack."""
    a, gw_a = await start_gateway(clock_offset_ms=400, **HOST_TIME)
    b, gw_b = await start_gateway(clock_offset_ms=-400, **HOST_TIME)
    assert a.skew.ok and b.skew.ok, (a.skew.describe(), b.skew.describe())
    svc = service_id()
    task_id = await engine.add(svc, "legacy")
    got = await gw_a.ok(svc, "fetch", {"workerId": "h1", "timeToRecover": 60_000})
    assert got["task"]["id"] == task_id
    # A 1.0 client: no taskId. Sent after the fetch's reply came back, i.e. after the grant.
    acked = await gw_b.ok(svc, "ack", {"workerId": "h1", "result": "done"})
    assert acked["result"] is True, "a legitimate ack of the held task was refused as older than the lease"


async def test_a_failed_task_is_not_handed_out_before_its_retry_in_ms_by_a_bridge_800ms_ahead_of_the_failing_one(
    start_gateway: Any, engine: Any
) -> None:
    """docs/asyncapi.yaml, fail.retryInMs: "Hand the task out again after this many milliseconds";
    the reply's retryAt: "When the task is handed out again". The worker fails its task through
    bridge B (400 ms behind) with retryInMs 3000; bridge A (400 ms ahead, holding the scheduler
    duty) takes it back on its own clock: ``fail`` files the lease as ``due - margin``
    (lifecycle.py), cancelling out the very margin that protects leases, so A's claim compares
    B's due time with A's clock with no margin and the task comes back 800 ms early."""
    a, gw_a = await start_gateway(clock_offset_ms=400, **HOST_TIME)  # first: it takes the duty
    b, gw_b = await start_gateway(clock_offset_ms=-400, **HOST_TIME)
    assert a.skew.ok and b.skew.ok, (a.skew.describe(), b.skew.describe())
    await wait_for(lambda: a.duty.held, 10, what="bridge A holds the scheduler duty")
    svc = service_id()
    task_id = await engine.add(svc, "retry me")
    got = await gw_a.ok(svc, "fetch", {"workerId": "h1", "timeToRecover": 60_000})
    named = {"workerId": "h1", "taskId": task_id, "epoch": got["task"]["epoch"]}
    sent = time.time()
    failed = await gw_b.ok(svc, "fail", {**named, "retryInMs": 3_000})
    assert failed["result"] is True and failed["task"]["parked"] is False

    async def back() -> Any:
        reply = await gw_a.ok(svc, "fetch", {"workerId": "h2", "waitMs": 2_000})
        return reply if reply["result"] is not None else None

    again = await wait_for(back, 15, interval=0, what="the failed task back")
    received = time.time()  # after the reply: the hand-out happened before this
    assert again["task"]["id"] == task_id
    after_s = received - sent  # at most the true time between the fail and the hand-out
    assert after_s >= 3.0, f"retryInMs 3000, handed out again {after_s * 1000:.0f} ms after the fail was sent"


# -- slow clients (slowloris) ------------------------------------------------------------------------
async def test_a_request_sent_a_byte_at_a_time_is_cut_at_the_read_timeout_on_both_http_servers(start_gateway):
    """aiohttp's runner keeps a connection that never finishes its request for 3,630 s (its own
    default; only ``run_app`` sets 75 s), and a body may trickle in for ever: a few thousand such
    connections, opened without credentials, held the bridge's file descriptors (shared with its
    Cassandra and AMQP connections) and memory. Both servers now close a connection whose request
    does not arrive within ``BRIDGE_HTTP_READ_TIMEOUT``, and the gateway answers 408 to a body that
    does not."""
    b, gw = await start_gateway(http_port=free_port(), http_host="127.0.0.1", http_read_timeout=1.5)

    async def closed_by_the_server(port: int, head: bytes, *, until_closed: bool = True) -> tuple[float, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(head)  # never finished: no blank line, or not the whole body
        await writer.drain()
        try:
            # Until the server closes; or its first answer (after one, aiohttp may linger up to
            # 10 s reading what is left of the body before it closes: bounded too).
            answer = await asyncio.wait_for(reader.read() if until_closed else reader.read(4096), 10)
        finally:
            writer.close()
        return time.monotonic() - started, answer

    for port in (gw.port, b.http_port):
        took, answer = await closed_by_the_server(port, b"GET /health/live HTTP/1.1\r\nHost: x\r\n")
        assert answer == b"" and 1.0 < took < 8, (port, took, answer)
    head = (
        f"POST /api/queue/{service_id()}/fetch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.keys['a']}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    ).encode()
    took, answer = await closed_by_the_server(gw.port, head, until_closed=False)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"bad_request"' in answer and 1.0 < took < 8, (took, answer)


async def test_a_keys_file_broken_by_a_revocation_fails_closed(start_gateway, gateway_keys):
    # The slips of a revocation by hand (a trailing comma left, the file emptied or deleted) kept
    # every key read before in force, the revoked one with them, with only a warning to show.
    path, _ = gateway_keys
    _, gw = await start_gateway()
    entries = json.loads(path.read_text())
    kept = [e for e in entries if e["id"] != "test-a"]

    async def status(key: str) -> int:
        return (await gw.request("GET", "/api/queue/stats", key=key)).status

    assert await status("a") == 200 and await status("b") == 200
    broken_by_hand = json.dumps(kept)[:-1] + ",]"  # the last entry deleted, its comma left
    # Refused as unavailable (503, retried by clients), not unauthorized: the file, not the key,
    # is at fault, and may be a moment from fixed (an editor's write read half done).
    for version in (broken_by_hand, ""):
        path.write_text(version)
        await wait_for(lambda: _is(status("a"), 503), 10, what=f"the revoked key refused ({version[-3:]!r})")
        assert await status("b") == 503, "no key is accepted until the file is fixed"
    path.unlink()
    await wait_for(lambda: _is(status("b"), 503), 10, what="no key accepted once the file is gone")
    assert await status("a") == 503
    path.write_text(json.dumps(kept))
    await wait_for(lambda: _is(status("b"), 200), 10, what="the fixed file's keys accepted again")
    assert await status("a") == 401, "the revoked key stays revoked"


async def _is(value: Any, expected: Any) -> bool:
    return await value == expected


async def _expecting(port: int, head: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """``head`` (request line and headers, Expect included) sent alone; the first status line back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head.encode())
    await writer.drain()
    first = await asyncio.wait_for(reader.readline(), 10)
    return reader, writer, first


async def test_expect_100_continue_is_answered_only_for_a_good_key_and_size(start_gateway, gateway_keys):
    """aiohttp answers ``Expect`` before any middleware: an unauthenticated client announcing a
    gigabyte was told ``100 Continue`` (to upload it), and any other expectation got a plain-text
    417 the contract does not know. Found by review. Refused now as the request itself would be."""
    _, keys = gateway_keys
    _, gw = await start_gateway()
    svc = service_id()
    path = f"/api/queue/{svc}/tasks"
    base = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"

    _, writer, first = await _expecting(gw.port, base + "Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
    writer.close()
    assert first.startswith(b"HTTP/1.1 401"), first

    auth = f"Authorization: Bearer {keys['a']}\r\n"
    _, writer, first = await _expecting(
        gw.port, base + auth + "Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
    )
    writer.close()
    assert first.startswith(b"HTTP/1.1 413"), first

    reader, writer, first = await _expecting(gw.port, base + auth + "Content-Length: 2\r\nExpect: something\r\n\r\n")
    rest = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    assert first.startswith(b"HTTP/1.1 417"), first
    assert b'"bad_request"' in rest and b"application/json" in rest, rest

    body = json.dumps({"value": "sent after 100 Continue"}).encode()
    reader, writer, first = await _expecting(
        gw.port, base + auth + f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    assert first.startswith(b"HTTP/1.1 100"), first
    writer.write(body)
    await writer.drain()
    answer = b""
    while b'"result"' not in answer:
        chunk = await asyncio.wait_for(reader.read(4096), 10)
        assert chunk, answer
        answer += chunk
    writer.close()
    assert b"HTTP/1.1 200" in answer and b'"result":true' in answer.replace(b" ", b""), answer


async def test_expect_is_answered_by_the_gateway_on_every_route(start_gateway, gateway_keys):
    """The console's routes and ``GET /api/queue/stats`` kept aiohttp's own answer: ``100
    Continue`` to an unauthenticated client announcing a gigabyte, a plain-text 417 to any
    other expectation (found by review, 2026-12-06). The public page still takes none."""
    _, keys = gateway_keys
    _, gw = await start_gateway(console_write=True)
    svc = service_id()
    for method, path in (("POST", f"/console/api/queues/{svc}/redrive"), ("GET", "/api/queue/stats")):
        base = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        _, writer, first = await _expecting(
            gw.port, base + "Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n"
        )
        writer.close()
        assert first.startswith(b"HTTP/1.1 401"), (path, first)
        auth = f"Authorization: Bearer {keys['a']}\r\n"
        reader, writer, first = await _expecting(
            gw.port, base + auth + "Content-Length: 2\r\nExpect: something\r\n\r\n"
        )
        rest = await asyncio.wait_for(reader.read(4096), 10)
        writer.close()
        assert first.startswith(b"HTTP/1.1 417"), (path, first)
        assert b'"bad_request"' in rest and b"application/json" in rest, (path, rest)
    page = "GET /console HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\n\r\n"
    _, writer, first = await _expecting(gw.port, page)
    writer.close()
    assert first.startswith(b"HTTP/1.1 100"), first  # public: no key asked


async def test_an_add_held_up_by_the_store_keeps_its_sealed_value_not_its_parsed_json(start_gateway, monkeypatch):
    """An add's value is sealed before its write; the parsed JSON (dicts and lists, some 24 times
    the body's bytes for ``[{}, {}, ...]``) was still held through the write and its retries in
    place (up to 10 s while Cassandra is slow), 256 adds a key: gigabytes during a brownout, the
    bridge killed for memory in the middle of the store's incident. Found by review, 2026-12-07."""
    import gc

    bridge, gw = await start_gateway(max_value_bytes=1 << 20)
    svc = service_id()
    store = bridge.queue.ctx.store
    real = store.store_task
    writing, release = asyncio.Event(), asyncio.Event()

    async def store_task(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "store_task", store_task)
    marker = f"held-{uuid.uuid4().hex}"
    # Lists (the collector tracks them, not dicts of atoms), sent as bytes: none of them on this side.
    body = json.dumps({"value": [[marker, i] for i in range(20_000)]}).encode()
    adding = asyncio.create_task(gw.post(svc, "tasks", raw=body))
    await asyncio.wait_for(writing.wait(), 20)
    gc.collect()
    held = [o for o in gc.get_objects() if isinstance(o, list) and len(o) == 2 and o[0] == marker]
    release.set()
    reply = await adding
    assert reply.status == 200, reply.body
    assert len(held) < 100, f"{len(held)} of the value's 20,000 parsed objects held while the write waits"


async def test_a_response_its_client_never_reads_is_cut_at_the_read_timeout(start_gateway):
    """aiohttp writes a response after the handler returned and waits for the client to read it
    with no deadline; the keep-alive timer only closes a connection waiting for a request. A
    client that never read its answers (a parked listing of megabytes, a tiny receive window)
    held each response in the bridge's memory for ever, outside every limit (its key's in-flight
    slot was already freed). The answer must be taken within ``BRIDGE_HTTP_READ_TIMEOUT``, else
    the connection is cut (found by review, 2026-12-07)."""
    b, gw = await start_gateway(max_value_bytes=1 << 20, http_read_timeout=1.5)
    svc = service_id()
    big = {"blob": "x" * (1 << 19)}  # (a body over 1 MiB is a warning of aiohttp's client)
    for i in range(12):  # parked, each with an error of 512 KiB: a listing of about 6 MiB
        await gw.ok(svc, "tasks", {"value": i, "maxDeliveries": 1})
        got = await gw.ok(svc, "fetch", {"workerId": f"p{i}"})
        task = got["task"]
        named = {"workerId": f"p{i}", "taskId": task["id"], "epoch": task["epoch"], "error": big}
        assert (await gw.ok(svc, "fail", named))["task"]["parked"] is True
    runner = b.gateway._runner
    assert runner is not None and runner.server is not None
    before = set(map(id, runner.server.connections))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    body = json.dumps({"limit": 100}).encode()
    request = (
        f"POST /api/queue/{svc}/parked HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {gw.keys['a']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    sock.sendall(request * 3)  # pipelined: some 12 MiB of answers, past what the sockets buffer

    def stuck() -> list[Any]:
        return [
            c
            for c in runner.server.connections
            if id(c) not in before and c.transport is not None and c.transport.get_write_buffer_size() > 0
        ]

    try:
        (held,) = await wait_for(stuck, 10, what="an answer waiting for its client to read it")
        # Never read: cut within the read timeout, its buffered answer let go, not held for ever.
        await wait_for(
            lambda: held not in runner.server.connections and (held.transport is None or held.transport.is_closing()),
            15,
            what="the unread answer's connection cut",
        )
    finally:
        sock.close()


async def test_the_contract_document_is_no_request_of_an_unknown_method(start_gateway):
    """Every GET of the public /openapi.json (a browser, a scanner) was counted in
    `queue_bridge_requests_total{method="unknown"}`, where an alert looks for clients sending
    wrong routing keys (found by review, 2026-12-07)."""
    b, gw = await start_gateway()
    before = requests_counted(b, "unknown")
    for _ in range(3):
        doc = await gw.request("GET", "/openapi.json", key=None)
        assert doc.status == 200
    assert requests_counted(b, "unknown") == before


async def test_a_service_id_whose_escapes_are_not_utf8_is_refused_not_aliased(gw):
    """aiohttp keeps an escape that is not UTF-8 (`%ff`) as its text (`%FF`): the add went to the
    queue `%FF`, the one `/api/queue/%25FF/tasks` names, where AMQP refuses a body with those bytes
    (found by review, 2026-12-07)."""
    refused = await gw.request(
        "POST", "/api/queue/%ff/tasks", {"value": 1}, key="engine", headers={"X-Owner": OWNERS[0]}
    )
    assert refused.status == 400 and refused.body["error"]["code"] == "bad_request", refused
    literal = await gw.request(
        "POST", "/api/queue/%25FF/tasks", {"value": 1}, key="engine", headers={"X-Owner": OWNERS[0]}
    )
    assert literal.status == 200, literal
    spaced = await gw.request(
        "POST", "/api/queue/caf%C3%A9%20x/tasks", {"value": 1}, key="engine", headers={"X-Owner": OWNERS[0]}
    )
    assert spaced.status == 200, spaced


async def test_an_absolute_form_request_is_served(gw):
    """RFC 9112: a server accepts a target in absolute form (a client behind a proxy that passes
    it on). The path's serviceId check read the segment from the raw target, which then holds the
    scheme and host: every such request was refused 400 (the re-review, 2026-12-07)."""
    body = json.dumps({"workerId": "abs-1", "timeToRecover": 1000}).encode()
    svc = service_id()
    auth = gw.auth("a")["Authorization"]
    request = (
        f"POST http://127.0.0.1:{gw.port}/api/queue/{svc}/fetch HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{gw.port}\r\nAuthorization: {auth}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    answer = await asyncio.to_thread(raw_exchange, gw.port, request)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
