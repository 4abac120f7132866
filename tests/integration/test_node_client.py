"""The Node.js client of examples/node (written from docs/asyncapi.yaml alone) against a real bridge.

Its scripts run as real ``node`` processes with this test's exchange and queue names: the engine's
tasks are fetched (long-poll) and acked by the Node worker, their results reach the Node results
consumer with the engine's tokens, and errors come back as the document says. ``make test`` (and so
CI) installs Node.js and the example's dependencies first (deploy/local/node.sh); the test never
skips: without ``node`` it fails, saying how to get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import uuid
from typing import Any

import pytest

from tests.conftest import ENGINE_USER, OWNERS, ROOT, DeadLetters, Servers, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

NODE_DIR = ROOT / "examples" / "node"
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's dependencies installed (``npm ci`` if they are not)."""
    found = shutil.which("node")
    if found is None:
        pytest.fail("node is not installed: run `bash deploy/local/node.sh` (make test does)", pytrace=False)
    if not (NODE_DIR / "node_modules" / "amqplib" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not installed: run `bash deploy/local/node.sh` (make test does)", pytrace=False)
        subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefix", str(NODE_DIR)], check=True, timeout=300)
    return found


class NodeScript:
    """One script of examples/node as a process; its stdout is one JSON object per line."""

    def __init__(self, node: str, script: str, env: dict[str, str], *args: str) -> None:
        self.cmd = [node, str(NODE_DIR / script), *args]
        self.env = {**os.environ, **env}
        self.events: list[dict[str, Any]] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self.stderr = b""

    async def start(self) -> NodeScript:
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, env=self.env, cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    async def event(self, name: str, timeout: float = 30) -> dict[str, Any]:
        """The first event called ``name`` (waits for it)."""
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events:
                    if e["event"] == name:
                        return e
                assert self.proc is not None
                if self.proc.returncode is not None and self._reader is not None and self._reader.done():
                    raise AssertionError(f"{self.cmd[1]} exited without {name!r}: {self.events} {self.stderr!r}")
                await asyncio.sleep(0.05)

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None and self.proc.stderr is not None and self._reader is not None
        try:
            async with asyncio.timeout(timeout):
                self.stderr = await self.proc.stderr.read()
                rc = await self.proc.wait()
                await self._reader
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise AssertionError(f"{self.cmd[1]} still running after {timeout}s: {self.events}") from None
        return rc

    def all(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == name]

    async def stop(self) -> None:
        """Kill the process if it still runs and reap it, its pipes read to their end: left to the
        garbage collector, a killed process's transports were reported (ResourceWarning) during
        whichever test ran next in this worker, and failed it (a red CI)."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 10)
        if self.proc.stderr is not None and not self.stderr:
            with contextlib.suppress(Exception):
                self.stderr = await asyncio.wait_for(self.proc.stderr.read(), 10)


async def run(node: str, script: str, env: dict[str, str], *args: str, timeout: float = 60) -> NodeScript:
    proc = await NodeScript(node, script, env, *args).start()
    rc = await proc.wait(timeout)
    assert rc == 0, f"{script} exited {rc}: {proc.events} {proc.stderr.decode(errors='replace')}"
    return proc


def env_of(servers: Servers, names: dict[str, str], user: str, **extra: str) -> dict[str, str]:
    """What a client needs to know: its broker URL and the bridge's names (this test's)."""
    return {
        "QB_AMQP_URL": servers.amqp_url(user),
        "QB_EXCHANGE": names["exchange"],
        "QB_RESULTS_EXCHANGE": names["results_exchange"],
        "QB_RESULTS_QUEUE": names["queue_prefix"] + ".results",
        **extra,
    }


async def test_node_engine_worker_and_results(bridge: Any, node: str, servers: Servers, names: dict[str, str]) -> None:
    service, process_id, count = service_id(), uuid.uuid4().hex, 4
    common = {"QB_SERVICE": service, "QB_OWNER": OWNERS[0]}
    results = await NodeScript(
        node,
        "results.js",
        env_of(servers, names, ENGINE_USER, **common, QB_EXPECT=str(count), QB_TIMEOUT_MS="45000"),
    ).start()
    # An engine whose broker user may declare queues binds one of its own by routing key (guest may;
    # the least-privilege engine user may not).
    own = await NodeScript(
        node,
        "results.js",
        env_of(servers, names, "guest", **common, QB_BIND=service, QB_EXPECT=str(count), QB_TIMEOUT_MS="45000"),
    ).start()
    # The worker long-polls before there is anything to fetch.
    worker = await NodeScript(
        node,
        "worker.js",
        env_of(servers, names, OWNERS[0], **common, QB_WAIT_MS="5000", QB_MAX_TASKS=str(count), QB_WORKER_ID="node-1"),
    ).start()
    try:
        await results.event("ready")
        await own.event("ready")
        adds = {"QB_COUNT": str(count), "QB_FAIL_EVERY": "4", "QB_PROCESS_ID": process_id}
        engine = await run(node, "engine.js", env_of(servers, names, ENGINE_USER, **common, **adds))
        assert await worker.wait() == 0, (worker.events, worker.stderr)
        assert await results.wait() == 0, (results.events, results.stderr)
        assert await own.wait() == 0, (own.events, own.stderr)
    finally:
        for proc in (results, own, worker):
            await proc.stop()

    added = {e["taskId"]: e for e in engine.all("added")}
    assert sorted(e["n"] for e in added.values()) == list(range(count))
    # The Node worker got every task of the Node engine, once, and its acks naming them completed them.
    tasks = worker.all("task")
    assert sorted(t["taskId"] for t in tasks) == sorted(added)
    assert all((t["epoch"], t["deliveries"], t["hasToken"]) == (1, 1, True) for t in tasks), tasks
    assert {a["taskId"]: a["completed"] for a in worker.all("acked")} == dict.fromkeys(added, True)
    # Each result reached the Node results consumer, with the engine's token, the owner and the service.
    for consumer in (results, own):
        got = {r["taskId"]: r for r in consumer.all("result")}
        assert set(got) == set(added)
        for task_id, r in got.items():
            n = added[task_id]["n"]
            assert r["token"] == {"processId": process_id, "n": n}
            assert (r["owner"], r["serviceId"], r["type"]) == (OWNERS[0], service, "result")
            assert r["messageId"].startswith(f"{task_id}:"), "message-id = <taskId>:<completionId>"
            assert r["completedAt"] is None or ISO_UTC.match(r["completedAt"]), r
            if n == 3:  # QB_FAIL_EVERY=4: the worker acked it with a business error
                assert r["error"] == {"message": "task 3 failed on purpose"} and "result" not in r
            else:
                assert r["result"] == {"upper": f"TASK {n} OF {process_id}".upper(), "n": n}
        # No result of this test's service was skipped (one whose x-owner header were wrong would
        # be). Another service's may be: the tests of one process share a keyspace, so this test's
        # bridge, holding the duty, also relays results an earlier test's bridge still owed when it
        # stopped, to this test's results exchange (a run in five processes did). A fleet has one
        # keyspace and one results exchange.
        skipped = consumer.all("skipped")
        assert not [s for s in skipped if s["serviceId"] == service], skipped


async def test_node_errors_come_back_as_documented(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], dead_letters: DeadLetters
) -> None:
    worker = env_of(servers, names, OWNERS[0])
    svc = service_id()
    cases: list[tuple[dict[str, str], tuple[str, ...], str, str]] = [
        # (extra env, argv, error code, message fragment)
        ({}, ("fetch", "not json"), "bad_request", "not valid JSON"),
        ({}, ("fetch", json.dumps({"serviceId": svc})), "bad_request", "workerId: Field required"),
        # user_id in the headers table is not the user-id property.
        (
            {"QB_USER_ID": "-", "QB_HEADERS": json.dumps({"user_id": OWNERS[0], "user-id": OWNERS[0]})},
            ("fetch", json.dumps({"serviceId": svc, "workerId": "w"})),
            "unauthorized",
            "no user_id property",
        ),
        # A worker may not act for another owner.
        (
            {"QB_HEADERS": json.dumps({"x-owner": OWNERS[1]})},
            ("add", json.dumps({"serviceId": svc, "value": 1})),
            "unauthorized",
            "may not act for owner",
        ),
        ({}, ("fecth", json.dumps({"serviceId": svc, "workerId": "w"})), "bad_request", "unknown method"),
    ]
    procs = await asyncio.gather(*(run(node, "request.js", {**worker, **extra}, *argv) for extra, argv, _, _ in cases))
    for proc, (_, argv, code, fragment) in zip(procs, cases, strict=True):
        (reply,) = proc.all("reply")
        assert reply["type"] == "error", (argv, reply)
        assert reply["body"]["error"]["code"] == code, (argv, reply)
        assert fragment in reply["body"]["error"]["message"], (argv, reply)
        assert reply["correlationId"], "the reply echoes the request's correlation-id (request.js matched it)"
        assert re.fullmatch(r"[0-9a-f]{32}", reply["messageId"]), "replies carry a random message-id"
    # ...and each refused request was dead-lettered, unchanged.
    dead = await dead_letters.drain(len(cases))
    assert len(dead) == len(cases)
    assert b"not json" in {m.body for m in dead}

    # The same client, used right: a lifecycle RPC answered with a result.
    ok = await run(node, "request.js", worker, "stats", json.dumps({"serviceId": svc}))
    (reply,) = ok.all("reply")
    assert reply["type"] == "result"
    assert reply["body"]["result"]["services"][0]["serviceId"] == svc


# Names a Node script's AMQP connection (client property connection_name), so that the broker can
# be told to close exactly that one; changes nothing else (bridge.js calls amqp.connect(url)).
NAME_CONNECTION = """
'use strict';
const amqp = require('amqplib');
const connect = amqp.connect;
amqp.connect = (url, opts) =>
  connect.call(amqp, url, { ...(opts || {}), clientProperties: { connection_name: process.env.QB_CONN_NAME } });
"""


async def test_node_results_with_empty_owner_and_service_keep_every_result(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], workers: Any
) -> None:
    """results.js documents QB_OWNER / QB_SERVICE "" = any. Its env() used to turn an empty value
    into the default (worker-a / demo): a consumer started to take every result of the shared queue
    acked away ("skipped") every other owner's result, gone from the queue for good."""
    from bridge.client import Engine
    from tests.conftest import wait_for

    svc = service_id()
    # Run until stopped: the shared results queue may also hold results other tests left there
    # (the first one taken need not be this test's), and every one of them must be kept too.
    extra = {"QB_OWNER": "", "QB_SERVICE": ""}
    results = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        await results.event("ready")
        async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[1], exchange=names["exchange"]) as engine:
            task_id = await engine.add(svc, {"n": 1}, token={"t": 1})
        task = await (await workers(svc, user=OWNERS[1])).fetch()
        assert task is not None and task.id == task_id
        assert await task.ack({"ok": True}) is True
        await wait_for(
            lambda: any(e.get("taskId") == task_id for e in results.events), 30, what="this test's result taken"
        )
        assert not results.all("skipped"), results.all("skipped")
        assert (task_id, OWNERS[1]) in [(r["taskId"], r["owner"]) for r in results.all("result")]
    finally:
        await results.stop()


async def test_node_worker_reconnects_when_the_broker_closes_its_connection(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str], tmp_path: Any
) -> None:
    """The broker closes the Node worker's connection (a broker restart, a failover, an operator).
    Its client used to keep the dead channel: every later fetch failed at once ('Channel closed'),
    once a second forever, and the queue's tasks were never fetched again. It connects again on its
    next request, as the Python client does."""
    from tests.conftest import wait_for
    from tests.integration.test_client_resilience import _close_connection_named, _waiters

    svc, conn_name = service_id(), f"node-worker-{uuid.uuid4().hex[:8]}"
    preload = tmp_path / "name_connection.js"
    preload.write_text(NAME_CONNECTION)
    extra = {
        "QB_SERVICE": svc,
        "QB_WAIT_MS": "2000",
        "QB_MAX_TASKS": "1",
        "QB_CONN_NAME": conn_name,
        "NODE_OPTIONS": f"--require {preload}",
        "NODE_PATH": str(NODE_DIR / "node_modules"),  # the preload's require('amqplib'), from tmp_path
    }
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await wait_for(lambda: _waiters(bridge) >= 1, 30, what="the Node worker long-polling")
        await asyncio.to_thread(_close_connection_named, conn_name)
        await worker.event("fetch_failed")
        task_id = await engine.add(svc, {"n": 1, "text": "after the reconnect"})
        assert await worker.wait(45) == 0, (worker.events, worker.stderr)
        assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}]
    finally:
        await worker.stop()


async def test_node_worker_whose_node_goes_away_works_on_through_another_of_its_hosts(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """QB_AMQP_HOSTS (as the bridge's BRIDGE_AMQP_HOSTS): two nodes (TCP proxies to the one
    broker); the one carrying the worker's connection dies. Before, the client reconnected to its
    one URL only, and no task was fetched while that node stayed down."""
    from tests.conftest import wait_for
    from tests.faults import TcpProxy
    from tests.integration.test_client_resilience import _waiters

    a = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    b = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    extra = {
        "QB_AMQP_URL": f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{a.port}/",
        "QB_AMQP_HOSTS": f"127.0.0.1:{a.port},127.0.0.1:{b.port}",
        "QB_SERVICE": svc,
        "QB_WAIT_MS": "2000",
        "QB_MAX_TASKS": "1",
    }
    worker = await NodeScript(node, "worker.js", {**env_of(servers, names, OWNERS[0]), **extra}).start()
    try:
        await wait_for(lambda: _waiters(bridge) >= 1, 30, what="the Node worker long-polling")
        [first] = [p for p in (a, b) if p._conns]
        first.cut()
        await worker.event("fetch_failed")
        task_id = await engine.add(svc, {"n": 1, "text": "through the other node"})
        assert await worker.wait(45) == 0, (worker.events, worker.stderr)
        assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}]
    finally:
        await worker.stop()
        await a.stop()
        await b.stop()


async def test_node_worker_started_before_its_bridge_works_once_the_bridge_is_up(
    make_bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """A worker started before its bridge (deploys start both at once): its first fetch is refused
    by the broker (404: the exchange is not declared yet), which closes the channel. The client used
    to reuse the closed channel forever; it opens a new one on its next request."""
    from bridge.client import Engine

    svc = service_id()
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "2000", "QB_MAX_TASKS": "1"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await worker.event("fetch_failed")
        await make_bridge()
        async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"]) as engine:
            task_id = await engine.add(svc, {"n": 1, "text": "the bridge is up"})
        assert await worker.wait(45) == 0, (worker.events, worker.stderr)
        assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}]
    finally:
        await worker.stop()


NO_REPLY_TWICE = """
const { BridgeClient } = require('./bridge');
(async () => {
  const client = await BridgeClient.open({ url: process.env.QB_AMQP_URL, exchange: process.env.QB_EXCHANGE });
  const connections = [client.connection];
  const codes = [];
  for (let i = 0; i < 3; i += 1) {
    try {
      await client.request('add', { serviceId: 'svc', value: i }, { timeoutMs: 500 });
    } catch (err) {
      codes.push(err.code);
    }
    connections.push(client.connection);
  }
  const distinct = new Set(connections.filter((c) => c !== null)).size;
  process.stdout.write(JSON.stringify({ codes, distinct }) + '\\n');
  await client.close();
})();
"""


async def test_node_client_sends_the_request_after_one_without_a_reply_on_a_new_connection(
    node: str, servers: Servers, names: dict[str, str]
) -> None:
    """As the Python client (test_client_resilience.py): a channel RabbitMQ 3.10 no longer routes
    from (a quorum queue's leader lost while the channel first published to it) loses every request
    retried on it. Nobody consumes here (the exchange exists, no bridge): three requests, three
    timeouts, and each request after a timeout on a new connection."""
    import aio_pika

    admin = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        await (await admin.channel()).declare_exchange(names["exchange"], aio_pika.ExchangeType.DIRECT, durable=True)
    finally:
        await admin.close()
    env = {**os.environ, **env_of(servers, names, ENGINE_USER)}
    done = await asyncio.to_thread(
        subprocess.run, [node, "-e", NO_REPLY_TWICE], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"codes": ["timeout"] * 3, "distinct": 3}, out


CLOCK_BEHIND = """
const { BridgeClient } = require('./bridge');
const realNow = Date.now;
Date.now = () => realNow() - 30000; // this host's clock is 30 s behind the bridge's
(async () => {
  const client = await BridgeClient.open({ url: process.env.QB_AMQP_URL, exchange: process.env.QB_EXCHANGE });
  const outcomes = [];
  for (let i = 0; i < 2; i += 1) {
    try {
      await client.request('fetch', { serviceId: process.env.QB_SERVICE, workerId: 'w' }, { timeoutMs: 5000 });
      outcomes.push('answered');
    } catch (err) {
      outcomes.push(err.code);
    }
  }
  process.stdout.write(JSON.stringify({ outcomes, offset: client.clockOffsetMs }) + '\\n');
  await client.close();
})();
"""


async def test_node_client_whose_clock_is_behind_sets_its_deadlines_on_the_bridges_clock(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """A host 30 s behind: its first request comes past its x-deadline by the bridge's clock and
    is answered unavailable with the bridge's time (x-now); its next one, with a deadline on the
    bridge's clock, is served. Before, every request was dropped unanswered (a timeout each)."""
    env = {**os.environ, **env_of(servers, names, OWNERS[0]), "QB_SERVICE": service_id()}
    done = await asyncio.to_thread(
        subprocess.run, [node, "-e", CLOCK_BEHIND], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["outcomes"] == ["unavailable", "answered"], out
    assert 29_000 < out["offset"] < 31_000, out
