"""The HTTP gateway without servers: API keys, the OpenAPI document, reply shapes, the error-to-status
mapping (against a stand-in queue that raises each error), and the ``gateway-key`` command.
The gateway on the real servers: tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bridge.config import ConfigError, Settings, load_settings
from bridge.domain.clock import ManualClock
from bridge.domain.errors import (
    BadRequest,
    IntegrityError,
    PayloadTooLarge,
    Unavailable,
    UnknownOwner,
)
from bridge.domain.lifecycle import Extended, Failed, ParkedTask
from bridge.domain.models import AddCommand, Delivery
from bridge.domain.stats import ServiceStats
from bridge.domain.timeline import ms_of
from bridge.errors import BridgeError, ErrorCode
from bridge.gateway import keys as gateway_keys
from bridge.gateway import replies
from bridge.gateway.endpoints import ENDPOINTS, STATS_ALL_PATH
from bridge.gateway.errors import STATUS, Unauthenticated
from bridge.gateway.keys import KeyFile, KeysUnavailable, hash_secret, new_key, parse_keys, split_key
from bridge.gateway.openapi import document, dumps
from bridge.gateway.server import GatewayServer
from bridge.transport import wire
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio


# -- keys ---------------------------------------------------------------------------------------------
class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def write_keys(path: Path, entries: list[dict[str, Any]]) -> None:
    tmp = path.with_name("tmp.json")
    tmp.write_text(json.dumps(entries))
    tmp.replace(path)  # a new inode: the change is seen whatever the clock's resolution


@pytest.fixture
def keyfile(tmp_path: Path) -> tuple[KeyFile, Path, dict[str, str], Monotonic]:
    keys: dict[str, str] = {}
    entries = []
    for name, trusted in (("w", False), ("e", True)):
        keys[name], entry = new_key(f"owner-{name}", trusted=trusted, key_id=f"id-{name}")
        entries.append(entry)
    path = tmp_path / "keys.json"
    write_keys(path, entries)
    clock = Monotonic()
    return KeyFile(path, monotonic=clock), path, keys, clock


def test_a_new_key_is_stored_as_the_hash_of_its_secret() -> None:
    key, entry = new_key("tenant-a", trusted=True, key_id="k-1")
    assert key.startswith("qb_k-1_")
    key_id, secret = split_key(key) or ("", "")
    assert key_id == "k-1" and len(secret) >= 32
    assert entry == {
        "id": "k-1",
        "owner": "tenant-a",
        "sha256": hashlib.sha256(secret.encode()).hexdigest(),
        "trusted": True,
    }
    assert secret not in json.dumps(entry)
    other, _ = new_key("tenant-a")
    assert split_key(other) is not None and other != key


def test_authenticate_finds_the_key_and_refuses_everything_else(keyfile) -> None:
    keys_file, _, keys, _ = keyfile
    found = keys_file.authenticate(f"Bearer {keys['w']}")
    assert (found.id, found.owner, found.trusted) == ("id-w", "owner-w", False)
    assert keys_file.authenticate(f"bearer   {keys['e']}  ").trusted is True
    _, secret = split_key(keys["w"]) or ("", "")
    refused = [
        None,
        "",
        keys["w"],  # no scheme
        f"Basic {keys['w']}",
        "Bearer",
        "Bearer qb_",
        "Bearer qb_id-w",
        "Bearer qb_id-w_",
        f"Bearer xx_id-w_{secret}",
        f"Bearer qb_id-x_{secret}",  # unknown id
        f"Bearer qb_id-e_{secret}",  # another key's id
        f"Bearer qb_id-w_{secret}x",  # wrong secret
        f"Bearer qb_id-w_{secret[:-1]}",
        f"Bearer qb_id-w_{secret} extra",
    ]
    for header in refused:
        with pytest.raises(Unauthenticated) as err:
            keys_file.authenticate(header)
        assert err.value.code == ErrorCode.UNAUTHORIZED
        assert secret not in err.value.message


def test_the_keys_file_is_reread_when_it_changes(keyfile) -> None:
    keys_file, path, keys, clock = keyfile
    added, entry = new_key("owner-n", key_id="id-n")
    doc = json.loads(path.read_text())
    write_keys(path, [e for e in doc if e["id"] != "id-w"] + [entry])  # revoke w, add n
    assert keys_file.authenticate(f"Bearer {keys['w']}").id == "id-w", "looked at most once a second"
    clock.now += 1.5
    assert keys_file.authenticate(f"Bearer {added}").owner == "owner-n"
    with pytest.raises(Unauthenticated):
        keys_file.authenticate(f"Bearer {keys['w']}")
    # A broken or missing file fails closed: no key until it is fixed (keeping the keys read
    # before kept a revoked key in force after a slip of the revocation). Answered ``unavailable``
    # (503, retried), not ``unauthorized`` (401, which clients do not retry): an editor's write
    # read half done (truncated, then written) stopped every worker for good.
    fixed = path.read_text()
    for broken in ("[{not json", ""):
        path.write_text(broken)
        clock.now += 1.5
        with pytest.raises(KeysUnavailable) as err:
            keys_file.authenticate(f"Bearer {added}")
        assert err.value.code == ErrorCode.UNAVAILABLE
        assert str(path) not in err.value.message and "id-" not in err.value.message  # nothing of the file
    path.unlink()
    clock.now += 1.5
    with pytest.raises(KeysUnavailable):
        keys_file.authenticate(f"Bearer {added}")
    with pytest.raises(Unauthenticated):  # credentials that are malformed are the caller's mistake still
        keys_file.authenticate("Bearer qb_")
    path.write_text(fixed)
    clock.now += 1.5
    assert keys_file.authenticate(f"Bearer {added}").owner == "owner-n"


def test_a_keys_file_changed_while_it_is_read_at_start_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyFile read the file, then took its stamp: a change made in between (a key revoked as the
    bridge starts) carried that stamp and was never read, the revoked key accepted until the next."""
    revoked, entry_revoked = new_key("owner-r", key_id="revoked")
    kept, entry_kept = new_key("owner-k", key_id="kept")
    path = tmp_path / "keys.json"
    write_keys(path, [entry_revoked, entry_kept])
    real = gateway_keys.read_keys_file

    def read_then_revoke(p: Path) -> Any:
        keys = real(p)
        write_keys(path, [entry_kept])  # the operator revokes "revoked" just as the bridge starts
        return keys

    monkeypatch.setattr(gateway_keys, "read_keys_file", read_then_revoke)
    keys_file = KeyFile(path, recheck_s=0.0)  # every request looks at the file
    monkeypatch.setattr(gateway_keys, "read_keys_file", real)
    assert keys_file.authenticate(f"Bearer {kept}").id == "kept"
    with pytest.raises(Unauthenticated):
        keys_file.authenticate(f"Bearer {revoked}")


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({}, "JSON list"),
        (["k"], "must be an object"),
        ([{"id": "a_b", "owner": "o", "sha256": "0" * 64}], "id must be"),
        ([{"id": "a", "owner": "", "sha256": "0" * 64}], "owner"),
        ([{"id": "a", "owner": "o", "sha256": "abc"}], "sha256"),
        ([{"id": "a", "owner": "o", "sha256": "0" * 64, "trusted": "yes"}], "trusted"),
        ([{"id": "a", "owner": "o", "sha256": "0" * 64, "secret": "s"}], "unknown fields"),
        ([{"id": "a", "owner": "o", "sha256": "0" * 64}, {"id": "a", "owner": "p", "sha256": "1" * 64}], "twice"),
    ],
)
def test_invalid_keys_documents_are_refused(doc: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_keys(doc)


def test_a_missing_or_invalid_keys_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="BRIDGE_GATEWAY_KEYS_FILE"):
        KeyFile(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"id": 1}')
    with pytest.raises(ConfigError, match="BRIDGE_GATEWAY_KEYS_FILE"):
        KeyFile(bad)


def test_a_gateway_port_needs_a_keys_file() -> None:
    with pytest.raises(ConfigError, match="BRIDGE_GATEWAY_KEYS_FILE"):
        load_settings(gateway_port=8081, keyring=None)
    assert Settings(keyring=None).gateway_port == 0, "off by default"


# -- the OpenAPI document --------------------------------------------------------------------------------
def test_the_committed_openapi_document_is_the_generated_one() -> None:
    committed = (ROOT / "docs" / "openapi.json").read_bytes()
    assert committed == dumps(document()), "regenerate: python -m bridge.gateway.openapi > docs/openapi.json"


def test_the_openapi_document_has_every_method_with_its_model_and_errors() -> None:
    doc = document()
    assert doc["openapi"] == "3.1.0"
    schemas = doc["components"]["schemas"]
    for ep in ENDPOINTS:
        op = doc["paths"][ep.path]["post"]
        assert op["operationId"] == ep.method
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        body = schemas[ref.rsplit("/", 1)[1]]
        model = ep.model.model_json_schema(by_alias=True)
        assert set(body["properties"]) == set(model["properties"]), "the AMQP model's fields, all of them"
        assert "serviceId" not in body.get("required", []), "serviceId comes from the path"
        assert set(body.get("required", [])) == set(model.get("required", [])) - {"serviceId"}
        assert {"200", "400", "401", "403", "413", "415", "422", "500", "503"} <= set(op["responses"])
        assert op["parameters"][0] == {**op["parameters"][0], "name": "serviceId", "in": "path", "required": True}
    assert doc["paths"][STATS_ALL_PATH]["get"]["operationId"] == "statsAll"
    assert set(schemas["ErrorCode"]["enum"]) == {str(c) for c in ErrorCode}
    assert doc["security"] == [{"apiKey": []}] and doc["paths"]["/openapi.json"]["get"]["security"] == []


# -- reply shapes: what wire builds is what the document says ---------------------------------------------
def test_the_wire_replies_match_the_documented_reply_models() -> None:
    task = uuid.uuid1()
    now = ms_of(task)
    delivery = Delivery(str(task), b'{"n": 1}', 2, 3, now + 5000, None, has_token=True)
    checks: list[tuple[type[Any], wire.Body]] = [
        (replies.AddReply, wire.added(str(task), AddCommand.model_validate({"serviceId": "s", "value": 1}))),
        (
            replies.AddReply,
            wire.added(str(task), AddCommand.model_validate({"serviceId": "s", "value": 1, "delayMs": 9})),
        ),
        (replies.FetchReply, wire.fetched(delivery)),
        (replies.FetchReply, wire.fetched(None)),
        (replies.BoolReply, wire.acked(True)),
        (replies.BoolReply, wire.cancelled(False)),
        (replies.ExtendReply, wire.extended(Extended(task, 3, now))),
        (replies.ExtendReply, wire.extended(None)),
        (replies.FailReply, wire.failed(Failed(task, 2, False, now))),
        (replies.FailReply, wire.failed(Failed(task, 2, True, None))),
        (replies.FailReply, wire.failed(None)),
        (replies.PurgeReply, wire.purged(3, True)),
        (replies.StatsReply, wire.stats([ServiceStats("s", 1, 2, 3, 4, None), ServiceStats("t", 0, 0, 0, 0, 7)])),
        (replies.ParkedReply, wire.parked([ParkedTask(task, 4, "failed", now, False, b'{"why": 1}')])),
        (replies.ParkedReply, wire.parked([ParkedTask(task, 4, "delivery_limit", now, True, None)])),
        (replies.RedriveReply, wire.redriven(2)),
        (replies.DiscardReply, wire.discarded(0)),
        (replies.ErrorReply, wire.error(BadRequest("no"))),
    ]
    for model, body in checks:
        model.model_validate(orjson.loads(wire.encode(body)))
    assert orjson.loads(wire.encode(wire.fetched(delivery)))["result"] == {"n": 1}


# -- statuses, against a stand-in queue ------------------------------------------------------------------
class StandInQueue:
    """Answers every call with ``answer`` or raises ``error``: the gateway's mapping, without servers."""

    def __init__(self) -> None:
        self.clock = ManualClock(1_700_000_000_000)
        self.error: BaseException | None = None
        self.calls: list[tuple[str, str, Any]] = []
        self.hold: asyncio.Event | None = None  # set: calls wait for it before they answer
        self.held = 0  # calls waiting for ``hold`` now
        self.cut = 0  # calls cancelled while they waited

    async def _held(self) -> None:
        if self.hold is None:
            return
        self.held += 1
        try:
            await self.hold.wait()
        except asyncio.CancelledError:
            self.cut += 1
            raise
        finally:
            self.held -= 1

    def _call(self, method: str, owner: str, req: Any, answer: Any) -> Any:
        self.calls.append((method, owner, req))
        if self.error is not None:
            raise self.error
        return answer

    async def prepare_add(self, owner: str, cmd: Any, *, traceparent: str | None) -> Any:
        return (owner, cmd, traceparent)  # the stand-in's prepared add

    async def store_add(self, add: Any, *, message_id: str | None) -> str:
        owner, cmd, traceparent = add
        await self._held()
        return str(self._call("add", owner, (cmd, message_id, traceparent), str(uuid.uuid1())))

    async def fetch(self, owner: str, req: Any, *, still_wanted: Any = None) -> None:
        await self._held()
        return self._call("fetch", owner, req, None)  # type: ignore[no-any-return]

    async def ack(self, owner: str, req: Any, *, sent_before_ms: int | None = None) -> bool:
        return bool(self._call("ack", owner, (req, sent_before_ms), True))

    async def stats(self, owner: str, service: str | None, *, partial: bool = False) -> list[Any]:
        return list(self._call("stats", owner, service, []))


async def _standin_server(
    tmp_path: Path, **settings: Any
) -> tuple[GatewayServer, StandInQueue, str, dict[str, str], list[tuple[str, str]]]:
    keys: dict[str, str] = {}
    entries = []
    for name, trusted in (("w", False), ("e", True)):
        keys[name], entry = new_key(f"owner-{name}", trusted=trusted, key_id=f"id-{name}")
        entries.append(entry)
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(entries))
    queue = StandInQueue()
    observed: list[tuple[str, str]] = []
    config = Settings(keyring=None, gateway_keys_file=path, max_value_bytes=1000, **{"shutdown_grace": 1, **settings})
    server = GatewayServer(config, queue, lambda m, o, s: observed.append((m, o)))  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    return server, queue, f"http://127.0.0.1:{port}", keys, observed


@pytest.fixture
async def standin(tmp_path: Path) -> AsyncIterator[tuple[StandInQueue, str, dict[str, str], list[tuple[str, str]]]]:
    server, queue, base, keys, observed = await _standin_server(tmp_path)
    yield queue, base, keys, observed
    await server.stop()


async def _post(base: str, path: str, key: str | None, body: bytes, **headers: str) -> tuple[int, Any, Any]:
    h = {"Content-Type": "application/json", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    async with aiohttp.ClientSession() as s, s.post(base + path, data=body, headers=h) as resp:
        return resp.status, json.loads(await resp.read()), resp.headers


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (BadRequest("bad"), 400, "bad_request"),
        (UnknownOwner("who?"), 403, "unknown_owner"),
        (PayloadTooLarge("big"), 413, "payload_too_large"),
        (IntegrityError("tampered"), 422, "integrity_error"),
        (Unavailable("cassandra down"), 503, "unavailable"),
        (RuntimeError("a bug with a secret in it"), 500, "internal"),
        (BridgeError("a bridge error without a wire code", "config"), 500, "internal"),
    ],
)
async def test_each_error_code_has_its_status(standin, error: BaseException, status: int, code: str) -> None:
    queue, base, keys, observed = standin
    queue.error = error
    got, body, headers = await _post(base, "/api/queue/s/fetch", keys["w"], b'{"workerId": "w"}')
    assert (got, body["error"]["code"]) == (status, code)
    assert headers["Content-Type"].startswith("application/json")
    text = json.dumps(body)
    assert "Traceback" not in text and "secret" not in text
    if status == 503:
        assert headers["Retry-After"] == "1"
    assert observed[-1] == ("fetch", code)


def test_every_error_code_has_a_status() -> None:
    assert set(STATUS) == set(ErrorCode)


async def test_the_request_reaches_the_queue_as_on_amqp(standin) -> None:
    queue, base, keys, observed = standin
    status, body, _ = await _post(
        base, "/api/queue/svc%20one/tasks", keys["e"], b'{"value": [1]}', **{"X-Owner": "t-9", "Idempotency-Key": "k-1"}
    )
    assert status == 200 and body["result"] is True
    method, owner, (cmd, message_id, traceparent) = queue.calls[-1]
    assert (method, owner, cmd.service_id, cmd.value, message_id, traceparent) == (
        "add",
        "t-9",
        "svc one",
        [1],
        "k-1",
        None,
    )
    status, body, _ = await _post(base, "/api/queue/s/ack", keys["w"], b'{"workerId": "w", "serviceId": "s"}')
    assert status == 200 and body == {"result": True}
    _, owner, (req, sent_before) = queue.calls[-1]
    assert owner == "owner-w" and req.service_id == "s" and sent_before == queue.clock.now_ms()
    # Idempotency-Key as AMQP's x-idempotency-key: printable Unicode, up to 255 characters; empty is
    # no key; control characters are refused. (Printable ASCII only before: "clé" was a 400.)
    status, body, _ = await _post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}', **{"Idempotency-Key": "clé"})
    assert status == 200, body
    assert queue.calls[-1][2][1] == "clé"
    status, body, _ = await _post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}', **{"Idempotency-Key": ""})
    assert status == 200 and queue.calls[-1][2][1] is None
    status, body, _ = await _post(
        base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}', **{"Idempotency-Key": "é" * 256}
    )
    assert status == 400 and "Idempotency-Key" in body["error"]["message"]
    # An empty X-Owner names nobody: the key's own owner (as an empty x-owner on AMQP), not a 400.
    status, body, _ = await _post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}', **{"X-Owner": ""})
    assert status == 200 and queue.calls[-1][1] == "owner-w", body
    assert [o for m, o in observed] == ["ok", "ok", "ok", "ok", "bad_request", "ok"]


async def test_a_body_over_the_limit_is_413_and_the_limit_is_the_amqp_one(standin) -> None:
    _queue, base, keys, _ = standin
    limit = 1000 + 65_536
    body = b'{"workerId": "w", "pad": "' + b"x" * (limit - 30) + b'"}'
    assert len(body) <= limit
    status, _, _ = await _post(base, "/api/queue/s/fetch", keys["w"], body)
    assert status == 200
    status, reply, headers = await _post(base, "/api/queue/s/fetch", keys["w"], body + b" " * (limit - len(body) + 1))
    assert status == 413 and reply["error"]["code"] == "payload_too_large"
    assert headers.get("Connection", "").lower() == "close"


# -- the command line ---------------------------------------------------------------------------------------
def test_gateway_key_prints_a_key_and_its_entry(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bridge.cli import app

    runner = CliRunner()
    made = runner.invoke(app, ["gateway-key", "--owner", "tenant-a", "--trusted", "--id", "engine-1"])
    assert made.exit_code == 0, made.output
    key = next(line for line in made.output.splitlines() if line.startswith("qb_"))
    entry = json.loads(made.output.strip().splitlines()[-1])
    _key_id, secret = split_key(key) or ("", "")
    assert entry == {"id": "engine-1", "owner": "tenant-a", "sha256": hash_secret(secret), "trusted": True}

    path = tmp_path / "keys.json"
    for owner in ("a", "b"):
        appended = runner.invoke(app, ["gateway-key", "--owner", owner, "--keys-file", str(path)])
        assert appended.exit_code == 0, appended.output
    assert path.stat().st_mode & 0o777 == 0o600
    keys = KeyFile(path)
    assert len(keys) == 2
    again = runner.invoke(
        app, ["gateway-key", "--owner", "c", "--id", json.loads(path.read_text())[0]["id"], "--keys-file", str(path)]
    )
    assert again.exit_code == 1 and "already has" in again.output
    bad = runner.invoke(app, ["gateway-key", "--owner", "c", "--id", "has_underscore"])
    assert bad.exit_code == 2


def test_gateway_key_revoke_removes_only_the_named_keys(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from bridge.cli import app

    runner = CliRunner()
    path = tmp_path / "keys.json"
    made = {}
    for owner in ("a", "b", "c"):
        out = runner.invoke(app, ["gateway-key", "--owner", owner, "--id", f"id-{owner}", "--keys-file", str(path)])
        assert out.exit_code == 0, out.output
        made[owner] = next(line for line in out.output.splitlines() if line.startswith("qb_"))
    unknown = runner.invoke(app, ["gateway-key-revoke", "id-a", "id-x", "--keys-file", str(path)])
    assert unknown.exit_code == 1 and "id-x" in unknown.output and "nothing revoked" in unknown.output
    assert len(KeyFile(path)) == 3
    revoked = runner.invoke(app, ["gateway-key-revoke", "id-a", "id-c", "--keys-file", str(path)])
    assert revoked.exit_code == 0, revoked.output
    keys = KeyFile(path)
    assert keys.authenticate(f"Bearer {made['b']}").owner == "b"
    for gone in ("a", "c"):
        with pytest.raises(Unauthenticated):
            keys.authenticate(f"Bearer {made[gone]}")
    assert path.stat().st_mode & 0o777 == 0o600


def test_gateway_key_waits_for_a_command_holding_the_file(tmp_path: Path) -> None:
    # Two runs at once each read the list and wrote it back with their own entry: one was lost.
    import threading

    from typer.testing import CliRunner

    from bridge.cli import app
    from bridge.cli.keyring import locked

    path = tmp_path / "keys.json"
    runner = CliRunner()
    assert runner.invoke(app, ["gateway-key", "--owner", "a", "--id", "id-a", "--keys-file", str(path)]).exit_code == 0
    done = threading.Event()
    with locked(path):
        worker = threading.Thread(
            target=lambda: (
                runner.invoke(app, ["gateway-key", "--owner", "b", "--id", "id-b", "--keys-file", str(path)]),
                done.set(),
            )
        )
        worker.start()
        assert not done.wait(0.5), "gateway-key wrote the file while another command held it"
        path.write_text(json.dumps([*json.loads(path.read_text()), new_key("c", key_id="id-c")[1]]))
    assert done.wait(10)
    worker.join()
    assert {e["id"] for e in json.loads(path.read_text())} == {"id-a", "id-b", "id-c"}


def test_run_with_an_invalid_keys_file_exits_2_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text("[{}]")
    keyring = tmp_path / "ring.json"
    from bridge.crypto import generate_keyring, write_keyring

    write_keyring(keyring, generate_keyring(["a"]))
    env = {
        "PATH": "/usr/bin:/bin",
        "BRIDGE_KEYRING": str(keyring),
        "BRIDGE_GATEWAY_PORT": "1",
        "BRIDGE_GATEWAY_KEYS_FILE": str(bad),
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_CASSANDRA_PORT": "1",
        "BRIDGE_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bridge", "run"], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 2, proc.stderr
    assert "BRIDGE_GATEWAY_KEYS_FILE" in proc.stderr and "Traceback" not in proc.stderr


# -- response headers, per-key limits, stop ------------------------------------------------------------------
async def test_every_json_answer_is_not_cached_nor_sniffed(standin) -> None:
    """The console's JSON said ``Cache-Control: no-store`` and ``nosniff``; the gateway's, the same
    owners' data, said neither (a shared cache or a browser could keep or reinterpret it)."""
    queue, base, keys, _ = standin
    answers = [
        await _post(base, "/api/queue/s/fetch", keys["w"], b'{"workerId": "w"}'),  # 200
        await _post(base, "/api/queue/s/fetch", keys["w"], b"{"),  # 400
        await _post(base, "/api/queue/s/fetch", None, b"{}"),  # 401
        await _post(base, "/api/queue/s/nope", keys["w"], b"{}"),  # 404
    ]
    queue.error = Unavailable("down")
    answers.append(await _post(base, "/api/queue/s/fetch", keys["w"], b'{"workerId": "w"}'))  # 503
    assert [status for status, _, _ in answers] == [200, 400, 401, 404, 503]
    for status, _, headers in answers:
        assert headers.get("Cache-Control") == "no-store", status
        assert headers.get("X-Content-Type-Options") == "nosniff", status


async def test_a_key_past_its_in_flight_limit_is_answered_503_with_retry_after(tmp_path: Path) -> None:
    """Nothing bounded what one API key could hold open: a runaway client (or a stolen key) took
    every connection and task of the bridge from the other keys."""
    server, queue, base, keys, _observed = await _standin_server(tmp_path, gateway_max_in_flight_per_key=2)
    try:
        queue.hold = asyncio.Event()
        body = b'{"workerId": "w", "waitMs": 20000}'
        waiting = [asyncio.create_task(_post(base, "/api/queue/s/fetch", keys["w"], body)) for _ in range(2)]
        for _ in range(500):  # both in the stand-in's fetch (no sleep-for-a-while: a condition, bounded)
            if queue.held == 2:
                break
            await asyncio.sleep(0.01)
        assert queue.held == 2
        # Answered at once (bounded here: before the limit it waited with the others).
        status, reply, headers = await asyncio.wait_for(_post(base, "/api/queue/s/fetch", keys["w"], body), 5)
        assert status == 503 and reply["error"]["code"] == "unavailable", reply
        assert "BRIDGE_GATEWAY_MAX_IN_FLIGHT_PER_KEY" in reply["error"]["message"]
        assert headers["Retry-After"] == "1"
        # Another key is not held back by this one's requests.
        queue.hold.set()
        assert (await _post(base, "/api/queue/s/fetch", keys["e"], body))[0] == 200
        assert [r[0] for r in await asyncio.gather(*waiting)] == [200, 200]
        # The slots are given back: the key is served again.
        assert (await _post(base, "/api/queue/s/fetch", keys["w"], body))[0] == 200
        assert server._in_flight == {}
    finally:
        await server.stop()


async def test_stop_ends_within_its_deadline_and_cancels_work_still_running(tmp_path: Path) -> None:
    """stop() waited the grace for the runner's handlers, then another grace for the shielded work
    of requests whose handler it had cut: twice the grace, and work still running after that kept
    going while the bridge closed the store under it."""
    server, queue, base, keys, observed = await _standin_server(tmp_path, shutdown_grace=1)
    queue.hold = asyncio.Event()  # never set: the add never ends by itself
    adding = asyncio.create_task(_post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}'))
    for _ in range(500):
        if queue.held == 1:
            break
        await asyncio.sleep(0.01)
    assert queue.held == 1
    loop = asyncio.get_running_loop()
    started = loop.time()
    await server.stop()
    took = loop.time() - started
    assert took < 1.5, f"stop took {took:.2f} s with a 1 s grace"
    assert queue.cut == 1 and queue.held == 0, "the add still ran after stop returned"
    assert not server._shielded
    with pytest.raises(aiohttp.ClientError):
        await adding
    assert ("add", "unavailable") in observed


async def test_answers_while_stopping_close_their_keep_alive_connection(tmp_path: Path) -> None:
    """While ``stop`` waits for work under way, requests on open keep-alive connections are
    answered 503; the connection stayed open, so its client (and a balancer's pool) kept coming
    back to the stopping bridge. Those answers say ``Connection: close`` now."""
    server, queue, base, keys, _observed = await _standin_server(tmp_path, shutdown_grace=5)
    queue.hold = asyncio.Event()
    headers = {"Authorization": f"Bearer {keys['w']}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/api/queue/stats", headers=headers) as resp:
            assert resp.status == 200 and resp.headers.get("Connection", "").lower() != "close"
        adding = asyncio.create_task(_post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}'))
        for _ in range(500):
            if queue.held == 1:
                break
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.stop())
        for _ in range(500):
            if server._closing:
                break
            await asyncio.sleep(0.01)
        async with session.get(f"{base}/api/queue/stats", headers=headers) as resp:  # the pooled connection
            assert resp.status == 503
            assert resp.headers.get("Connection", "").lower() == "close", dict(resp.headers)
        queue.hold.set()
        await stopping
        await adding


async def test_work_whose_body_arrives_after_stop_began_is_not_started(tmp_path: Path) -> None:
    """``stop`` waits for the work under way when it begins. A request whose body was still
    arriving then started its work afterwards: nobody waited for it, aiohttp cut its handler at
    half the time left, and the work ran on while the bridge closed the store under it. It is
    answered 503 now, nothing of it done."""
    server, queue, base, keys, _observed = await _standin_server(tmp_path, shutdown_grace=5)
    queue.hold = asyncio.Event()  # an add started waits here
    # An add under way when stop begins: stop waits for it.
    first = asyncio.create_task(_post(base, "/api/queue/s/tasks", keys["w"], b'{"value": 1}'))
    for _ in range(500):
        if queue.held == 1:
            break
        await asyncio.sleep(0.01)
    assert queue.held == 1
    port = int(base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"value": 12}'
    head = (
        f"POST /api/queue/s/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keys['w']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head + body[:5])
    await writer.drain()
    await asyncio.sleep(0.2)  # the handler is reading the body (no condition to wait on from outside)
    stopping = asyncio.create_task(server.stop())
    for _ in range(500):
        if server._closing:
            break
        await asyncio.sleep(0.01)
    writer.write(body[5:])
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    late_adds = queue.held - 1  # adds waiting besides the first
    queue.hold.set()
    await stopping
    (first_answer,) = await asyncio.gather(first, return_exceptions=True)
    writer.close()
    assert b"503" in status_line, f"answered {status_line!r}; adds started after stop began: {late_adds}"
    # The work under way when stop began was waited for, and answered.
    assert not isinstance(first_answer, BaseException) and first_answer[0] == 200, first_answer


def test_every_status_the_gateway_answers_a_body_request_with_is_documented() -> None:
    """408 (a body not received within BRIDGE_HTTP_READ_TIMEOUT) was answered and documented in
    the README, but missing from the OpenAPI document's responses. Found by review."""
    for path, item in document()["paths"].items():
        if "post" in item:
            assert {"400", "401", "403", "408", "413", "415", "503"} <= set(item["post"]["responses"]), path
