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
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from typing import Any

import pytest

from tests.conftest import BRIDGE_USER, ENGINE_USER, OWNERS, ROOT, DeadLetters, Servers, service_id

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
        self.times: list[float] = []  # when each event was read (time.monotonic())
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
            self.times.append(time.monotonic())
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

    async def count(self, name: str, n: int, timeout: float = 30) -> list[dict[str, Any]]:
        """The first ``n`` events called ``name`` (waits for them)."""
        async with asyncio.timeout(timeout):
            while len(self.all(name)) < n:
                assert self.proc is not None
                if self.proc.returncode is not None and self._reader is not None and self._reader.done():
                    raise AssertionError(f"{self.cmd[1]} exited with {len(self.all(name))} {name!r}: {self.events}")
                await asyncio.sleep(0.05)
        return self.all(name)[:n]

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

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


# -- the reviewer's findings (engine retries, worker loop, signals, clock, results consumer) ---------


async def test_node_engine_retries_an_add_whose_connection_was_lost_with_the_same_message_id(
    bridge: Any, workers: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An add is at the bridge when the engine's connection goes (a broker restart, a failover),
    and RabbitMQ then refuses connections for a while. The engine used to exit 1 at once: the
    lost channel failed the add with an uncoded error, and a refused connect was no better. Both
    are ``connection_lost`` now, retried (backing off) with the same message-id, so the add that
    ran after all answers its task again: two adds, two tasks, none twice."""
    from tests.faults import TcpProxy

    svc, process_id = service_id(), uuid.uuid4().hex
    arrived, release = asyncio.Event(), asyncio.Event()
    stored: list[str] = []
    real = bridge.queue.store_add

    async def held_first(*args: Any, **kw: Any) -> str:
        first = not arrived.is_set()
        arrived.set()
        if first:
            await release.wait()
        task_id = await real(*args, **kw)
        stored.append(task_id)
        return task_id

    monkeypatch.setattr(bridge.queue, "store_add", held_first)
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    port = proxy.port
    extra = {
        "QB_AMQP_URL": f"amqp://{ENGINE_USER}:{ENGINE_USER}@127.0.0.1:{port}/",
        "QB_SERVICE": svc,
        "QB_OWNER": OWNERS[0],
        "QB_COUNT": "2",
        "QB_PROCESS_ID": process_id,
        "QB_RETRY_BASE_MS": "100",
    }
    proc = await NodeScript(node, "engine.js", {**env_of(servers, names, ENGINE_USER), **extra}).start()
    again = None
    try:
        async with asyncio.timeout(30):
            await arrived.wait()
        await proxy.stop()  # the connection is lost, and the port refuses connections
        retries = await proc.count("retry", 2)
        assert [r["code"] for r in retries] == ["connection_lost"] * 2, proc.events
        assert "ECONNREFUSED" in json.dumps(proc.events), proc.events
        assert {r["messageId"] for r in retries} == {f"{process_id}:0"}
        release.set()  # the first add completes at the bridge; its reply has nowhere to go
        from tests.conftest import wait_for

        await wait_for(lambda: len(stored) == 1, 30, what="the first add stored")
        again = await TcpProxy(servers.amqp_host, servers.amqp_port).start(port)
        assert await proc.wait(60) == 0, (proc.events, proc.stderr)
    finally:
        await proc.stop()
        if again is not None:
            await again.stop()
    added = proc.all("added")
    assert [a["n"] for a in added] == [0, 1]
    assert added[0]["taskId"] == stored[0], "the retry answered the task the lost add stored"
    # Two tasks at the bridge, not three: the retried add was stored once.
    w = await workers(svc, "check")
    fetched = []
    while (task := await w.fetch()) is not None:
        fetched.append(task.id)
        assert await task.ack("done") is True
    assert sorted(fetched) == sorted(a["taskId"] for a in added)


async def test_node_worker_goes_on_after_a_fetch_answered_internal(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fetch answered ``internal`` (a bug at the bridge, a passing fault it did not map) ended the
    Node worker: one such answer took down every Node worker of a fleet. As the Python client, it
    pauses and fetches again; only an answer that says the worker is misconfigured ends it."""
    svc = service_id()
    real = bridge.queue.fetch
    calls = 0

    async def broken_once(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug at the bridge (test)")  # answered internal
        return await real(*args, **kw)

    monkeypatch.setattr(bridge.queue, "fetch", broken_once)
    task_id = await engine.add(svc, {"n": 1, "text": "after internal"})
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "1000", "QB_MAX_TASKS": "1"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        assert await worker.wait(30) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert [f["code"] for f in worker.all("fetch_failed")] == ["internal"]
    assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}]


async def test_node_worker_gives_back_a_task_whose_result_the_bridge_refuses(
    bridge: Any,
    engine: Any,
    workers: Any,
    node: str,
    servers: Servers,
    names: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ack the bridge refuses (``payload_too_large``: a result larger than its limit) ended the
    Node worker with the task still leased to it (back only when its lease ran out, here 60 s).
    Sending it again cannot help: the task is given back with ``fail``, and comes again at once."""
    from bridge.domain.errors import PayloadTooLarge

    svc = service_id()
    real = bridge.queue.ack
    calls = 0

    async def refused_once(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise PayloadTooLarge("the result is larger than the limit (test)")
        return await real(*args, **kw)

    monkeypatch.setattr(bridge.queue, "ack", refused_once)
    task_id = await engine.add(svc, {"n": 1, "text": "too large"})
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "1000", "QB_MAX_TASKS": "1", "QB_TTR_MS": "60000"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        assert await worker.wait(30) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert [(a["taskId"], a["code"]) for a in worker.all("ack_failed")] == [(task_id, "payload_too_large")]
    assert worker.all("given_back") == [
        {"event": "given_back", "taskId": task_id, "reason": "ResultRefused", "answered": True}
    ]
    # Given back, not left leased for its 60 s: it comes again within the bridge's backoff (1 s).
    again = await (await workers(svc, "other")).fetch(wait_ms=10_000)
    assert again is not None and (again.id, again.deliveries) == (task_id, 2)
    assert await again.ack({"ok": True}) is True


async def _gaps_between_empty_fetches(
    b: Any,
    node: str,
    servers: Servers,
    names: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    wait_ms: int,
    poll_ms: int = 500,
) -> list[float]:
    """The seconds between the fetches a Node worker of an empty queue sends (4, QB_POLL_MS 500)."""
    svc = service_id()
    real = b.queue.fetch
    seen: list[float] = []

    async def timed(owner: str, req: Any, **kw: Any) -> Any:
        if req.service_id == svc:
            seen.append(time.monotonic())
        return await real(owner, req, **kw)

    monkeypatch.setattr(b.queue, "fetch", timed)
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": str(wait_ms), "QB_POLL_MS": str(poll_ms), "QB_IDLE_EXIT": "4"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        assert await worker.wait(30) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert len(seen) == 4, seen
    return [later - earlier for earlier, later in itertools.pairwise(seen)]


async def test_node_worker_not_long_polling_pauses_between_empty_fetches(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With QB_WAIT_MS=0 an empty reply was followed by the next fetch at once: a worker of an
    empty queue sent fetches as fast as the bridge answered them. It waits QB_POLL_MS between."""
    gaps = await _gaps_between_empty_fetches(bridge, node, servers, names, monkeypatch, wait_ms=0)
    assert all(g >= 0.45 for g in gaps), gaps


async def test_node_worker_pauses_when_its_bridge_answers_a_long_poll_empty_at_once(
    make_bridge: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bridge with BRIDGE_HINTS=false does not long-poll: a fetch with waitMs answers null at
    once. The worker paused between empty fetches only with QB_WAIT_MS=0, so against such a bridge
    it fetched again at once, in a busy loop. Found by the docs review, 2026-12-05."""
    b = await make_bridge(hints=False)
    gaps = await _gaps_between_empty_fetches(b, node, servers, names, monkeypatch, wait_ms=10_000)
    assert all(g >= 0.45 for g in gaps), gaps


@pytest.mark.parametrize("poll_ms", [50, 0])
async def test_node_worker_backs_off_with_full_jitter_after_failed_fetches(
    node: str, servers: Servers, names: dict[str, str], poll_ms: int
) -> None:
    """No bridge yet (the exchange does not exist: each fetch's channel is closed by a 404). The
    worker paused a fixed second after every failure, so a fleet hammered the broker in step. Its
    pauses now grow from QB_POLL_MS, doubling, with full jitter, up to 5 s; from 100 ms at least
    (rpc.py BACKOFF_BASE_S): with QB_POLL_MS=0 every pause was 0, a refused connect retried as
    fast as the loop turned (third review)."""
    extra = {"QB_SERVICE": service_id(), "QB_WAIT_MS": "1000", "QB_POLL_MS": str(poll_ms)}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        failed = await worker.count("fetch_failed", 7, timeout=60)
        times = [worker.times[worker.events.index(f)] for f in failed]
    finally:
        await worker.stop()
    assert {f["code"] for f in failed} == {"connection_lost"}, failed
    pauses = [f["pauseMs"] for f in failed]
    ceilings = [min(5000, max(poll_ms, 100) * 2**n) for n in range(len(pauses))]
    assert all(0 <= p <= c for p, c in zip(pauses, ceilings, strict=True)), (pauses, ceilings)
    assert len(set(pauses)) > 1, f"no jitter: {pauses}"
    # Each pause was waited before the next fetch (reading the lines adds a little uncertainty).
    assert times[-1] - times[0] >= sum(pauses[:-1]) / 1000 - 0.2, (times, pauses)


async def test_node_worker_told_to_stop_gives_up_its_long_poll_at_once(
    bridge: Any, engine: Any, workers: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """SIGTERM while the worker waits in a 30 s long-poll: it used to wait it out (a pod's kill
    deadline is 30 s). It closes its connection and exits within its grace (QB_STOP_GRACE_MS, 5 s
    by default, spent asking whether the given-up fetch claimed a task); the abandoned fetch, its
    reply-to gone, claims nothing, and the asking (an extend, never a fetch) takes no new work: a
    task added meanwhile goes to another worker at once."""
    from tests.conftest import wait_for
    from tests.integration.test_client_resilience import _waiters

    svc = service_id()
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "30000", "QB_WORKER_ID": "node-idle"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await wait_for(lambda: _waiters(bridge) >= 1, 30, what="the Node worker long-polling")
        worker.signal(signal.SIGTERM)
        await worker.event("draining", 5)
        task_id = await engine.add(svc, {"n": 1})  # while the stopping worker asks what it holds
        assert await worker.wait(5 + 2) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert worker.all("stopping") == [{"event": "stopping", "signal": "SIGTERM", "phase": "fetching"}]
    assert worker.all("drained") == [{"event": "drained", "tasks": 0, "unsure": False}], worker.events
    assert not worker.all("task"), worker.events
    got = await (await workers(svc, "other")).fetch(wait_ms=10_000)
    assert got is not None and (got.id, got.deliveries) == (task_id, 1), got
    assert await got.ack("done") is True
    assert await (await workers(svc, "node-idle")).fetch() is None, "a task is leased to the stopped worker"


async def test_node_worker_told_to_stop_hands_back_a_task_its_given_up_fetch_claimed(
    bridge: Any,
    engine: Any,
    workers: Any,
    node: str,
    servers: Servers,
    names: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SIGTERM while the worker's long-poll is still queued at a busy bridge: the worker gives it up
    (closes its connection) and exited at once. The bridge ran that fetch after all; a task was
    ready, so it claimed it at once (a probe of the reply-to comes only before a claim a wait woke
    up) for a worker that was gone: the task stayed leased to it for its whole lease (here 60 s).
    As the Python client's ``Worker.run`` (test_client_stop.py), the stopping worker now asks the
    bridge whether it holds a task (an extend naming none) for QB_STOP_GRACE_MS, and fetches and
    handles the one a given-up fetch claimed. Here the fetch is held at the bridge until the worker
    has closed its connection (exited, or started asking), and released then."""
    from tests.conftest import wait_for

    svc, worker_id = service_id(), "node-stopping"
    gate = asyncio.Event()
    real = bridge.queue.fetch
    held: list[Any] = []  # what the held fetch claimed, once it ran

    async def held_up(owner: str, req: Any, **kw: Any) -> Any:
        if req.service_id != svc or gate.is_set():
            return await real(owner, req, **kw)
        held.append("arrived")
        await gate.wait()
        delivery = await real(owner, req, **kw)
        held.append(delivery)
        return delivery

    monkeypatch.setattr(bridge.queue, "fetch", held_up)
    extra = {"QB_SERVICE": svc, "QB_WORKER_ID": worker_id, "QB_WAIT_MS": "30000", "QB_TTR_MS": "60000"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await wait_for(lambda: held == ["arrived"], 30, what="the Node worker's fetch held at the bridge")
        task_id = await engine.add(svc, {"n": 1, "text": "claimed at the stop"})
        worker.signal(signal.SIGTERM)
        assert worker.proc is not None
        proc = worker.proc
        await wait_for(
            lambda: proc.returncode is not None or worker.all("draining"),
            10,
            what="the Node worker to close its connection (exit, or start asking what it holds)",
        )
        gate.set()  # the given-up fetch goes on at the bridge and claims the task for the worker
        await wait_for(lambda: len(held) == 2, 10, what="the given-up fetch to run at the bridge")
        assert held[1] is not None and held[1].task_id == task_id, f"the given-up fetch claimed {held[1]}"
        assert await worker.wait(20) == 0, (worker.events, worker.stderr)
    finally:
        gate.set()
        await worker.stop()
    assert worker.all("stopping") == [{"event": "stopping", "signal": "SIGTERM", "phase": "fetching"}]
    handled = [a["completed"] for a in worker.all("acked") if a["taskId"] == task_id]
    # Not stranded: handled by the stopping worker, or else another worker has it now (a few
    # seconds after the claim, well before the 60 s lease would run out).
    got = await (await workers(svc, "other")).fetch(wait_ms=3_000)
    if got is not None:
        assert await got.ack("done") is True
    stuck = await (await workers(svc, worker_id)).fetch()  # not `fresh`: the task it holds, if any
    assert handled == [True] or (got is not None and got.id == task_id), (
        f"task {task_id} went to nobody who works: the stopped Node worker handled {handled}, another "
        f"worker's fetch got {got and got.id}; the stopped worker's id holds {stuck and stuck.id} "
        f"(until its 60 s lease runs out). Events: {worker.events}"
    )
    assert stuck is None, f"task {stuck.id} is still leased to the stopped Node worker"


async def test_node_worker_told_to_stop_gives_back_a_task_its_handler_has_not_finished(
    bridge: Any, engine: Any, workers: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """SIGTERM while the handler works: after QB_STOP_TIMEOUT_MS the task is given back (``fail``,
    retryInMs 0) and comes again at once elsewhere, instead of staying leased to a stopped worker
    until its lease runs out (here 60 s)."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1, "text": "slow"})
    worker = await _stopped_mid_task(node, servers, names, svc)
    assert not worker.all("acked")
    assert worker.all("given_back") == [
        {"event": "given_back", "taskId": task_id, "reason": "StopTimeout", "answered": True}
    ]
    got = await (await workers(svc, "other")).fetch(wait_ms=5_000)
    assert got is not None and (got.id, got.deliveries) == (task_id, 2), got
    assert await got.ack("done") is True


async def test_node_worker_exits_at_once_on_a_second_signal(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """The first signal lets the task in hand finish (QB_STOP_TIMEOUT_MS, here a minute); a second
    one means it: the worker exits at once (128 + the signal's number)."""
    svc = service_id()
    await engine.add(svc, {"n": 1, "text": "slow"})
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "5000", "QB_WORK_MS": "60000", "QB_STOP_TIMEOUT_MS": "60000"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await worker.event("task")
        worker.signal(signal.SIGTERM)
        assert (await worker.event("stopping"))["phase"] == "working"
        worker.signal(signal.SIGTERM)
        assert await worker.wait(5) == 128 + signal.SIGTERM, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert not worker.all("acked") and not worker.all("given_back")


async def test_node_client_gives_up_connecting_to_a_node_that_never_answers(
    node: str, servers: Servers, names: dict[str, str]
) -> None:
    """A node that accepts the TCP connection and never answers (stalled, half dead, a firewall
    that drops): amqp.connect had no timeout and the script hung for good. It gives up after
    QB_CONNECT_TIMEOUT_MS with ``connection_lost``."""
    from tests.faults import TcpProxy

    silent = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    silent.mute()
    env = {
        **env_of(servers, names, OWNERS[0]),
        "QB_AMQP_URL": f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{silent.port}/",
        "QB_CONNECT_TIMEOUT_MS": "1000",
    }
    proc = await NodeScript(node, "request.js", env, "stats", "{}").start()
    try:
        assert await proc.wait(15) == 2, (proc.events, proc.stderr)
    finally:
        await proc.stop()
        await silent.stop()
    (error,) = proc.all("error")
    assert error["code"] == "connection_lost" and "ETIMEDOUT" in error["message"], error


@pytest.mark.parametrize(
    "bad", [{"QB_HEADERS": "not json"}, {"QB_HEADERS": "[1]"}, {"QB_TIMEOUT_MS": "soon"}], ids=lambda b: str(b)
)
async def test_node_request_with_a_bad_option_exits_before_connecting(
    node: str, servers: Servers, names: dict[str, str], bad: dict[str, str]
) -> None:
    """request.js parsed QB_HEADERS and QB_TIMEOUT_MS after it connected, outside its try: a bad
    value left the connection open and the process never exited. They are parsed first."""
    proc = await NodeScript(node, "request.js", env_of(servers, names, OWNERS[0], **bad), "stats", "{}").start()
    try:
        assert await proc.wait(15) == 2, (proc.events, proc.stderr)
    finally:
        await proc.stop()
    (error,) = proc.all("error")
    assert next(iter(bad)) in error["message"], error


CLOCK_STEPS = """
const { BridgeClient } = require('./bridge');
const busy = (ms) => { const end = performance.now() + ms; while (performance.now() < end); };
(async () => {
  const client = await BridgeClient.open({ url: process.env.QB_AMQP_URL, exchange: process.env.QB_EXCHANGE });
  const body = { serviceId: process.env.QB_SERVICE, workerId: 'w' };
  const fetch = () => client.request('fetch', body, { timeoutMs: 5000 });
  const out = {};
  await fetch();
  out.first = client.clockOffsetMs;
  // A reply that waits 1.5 s for this process (a busy event loop; or held in the broker) says
  // a time already 1.5 s past: its offset is 1.5 s too small.
  const late = fetch();
  for (let i = 0; i < 3; i += 1) await new Promise((resolve) => setImmediate(resolve)); // the request is out
  busy(1500);
  await late;
  out.afterLate = client.clockOffsetMs;
  // This host's wall clock steps back 30 s (NTP, an operator): the bridge's clock did not.
  const realNow = Date.now;
  Date.now = () => realNow() - 30000;
  try {
    await fetch();
    out.afterStep = 'answered';
  } catch (err) {
    out.afterStep = err.code;
  }
  out.offsetAfterStep = client.clockOffsetMs;
  process.stdout.write(JSON.stringify(out) + '\\n');
  await client.close();
})();
"""


async def test_node_client_keeps_the_bridges_clock_on_a_monotonic_clock_with_a_sliding_max(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """The offset of the bridge's clock was the last reply's, on the wall clock: a reply that came
    late (a busy client, a slow broker) made it too small, and a step of the host's wall clock
    moved every deadline with it (a step back of 30 s: every request refused as late). As
    rpc.py: the largest offset of the last minute's replies, carried by the monotonic clock."""
    env = {**os.environ, **env_of(servers, names, OWNERS[0]), "QB_SERVICE": service_id()}
    done = await asyncio.to_thread(
        subprocess.run, [node, "-e", CLOCK_STEPS], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert abs(out["first"]) < 1000, out  # one host: the bridge's clock is this host's
    assert abs(out["afterLate"] - out["first"]) < 500, out  # not 1.5 s smaller
    assert out["afterStep"] == "answered", out
    assert 29_000 < out["offsetAfterStep"] < 31_000, out  # the bridge is now 30 s ahead of this host's clock


# amqplib stubbed: every channel it opens is already closed (its publish throws), as one whose
# close came before bridge.js listened for it. Two requests: how many connections they made.
DEAD_CHANNEL = """
const amqp = require('amqplib');
let connects = 0;
const channel = () => ({
  on() {},
  async consume() {},
  publish() { throw new Error('Channel closed'); },
});
amqp.connect = async () => {
  connects += 1;
  const stream = { destroy() {} };
  return { on() {}, async createChannel() { return channel(); }, async close() {}, connection: { stream } };
};
const { BridgeClient } = require('./bridge');
(async () => {
  const client = new BridgeClient({ url: 'amqp://u:u@127.0.0.1:1/', exchange: 'x', connectTimeoutMs: 200 });
  const codes = [];
  for (let i = 0; i < 2; i += 1) {
    try {
      await client.request('fetch', {}, { timeoutMs: 500 });
    } catch (err) {
      codes.push(err.code);
    }
  }
  process.stdout.write(JSON.stringify({ connects, codes }) + '\\n');
})();
"""


async def test_node_client_drops_a_channel_that_closed_unseen(node: str) -> None:
    """A channel whose close came in the same socket read as the consume's answer (before bridge.js
    attached its listeners) stayed the client's: every publish threw "Channel closed", and every
    request failed the same way, for ever, without reconnecting. A publish that throws drops it:
    the next request connects again. Found by review, 2026-12-06 (amqplib stubbed: no broker)."""
    done = await asyncio.to_thread(
        subprocess.run, [node, "-e", DEAD_CHANNEL], cwd=NODE_DIR, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"connects": 2, "codes": ["connection_lost", "connection_lost"]}, out


# One fetch to an exchange the test serves itself; the offset of the bridge's clock it then knows.
CLOCK_FROM_REPLIES = """
const { BridgeClient } = require('./bridge');
(async () => {
  const client = await BridgeClient.open({ url: process.env.QB_AMQP_URL, exchange: process.env.QB_EXCHANGE });
  await client.request('fetch', { serviceId: 's', workerId: 'w' }, { timeoutMs: 10000 });
  process.stdout.write(JSON.stringify({ offset: client.clockOffsetMs }) + '\\n');
  await client.close();
})();
"""


async def test_node_client_takes_the_bridges_time_only_from_replies_to_its_requests(
    node: str, servers: Servers
) -> None:
    """bridge.js took the bridge's time from the ``x-now`` of ANY message on its reply channel:
    one message with a far-future ``x-now`` shifted its clock (and every deadline) for a minute.
    Only a reply to a request of its own counts, as in rpc.py. Found by review, 2026-12-06."""
    from tests.integration.test_client_clock import a_stand_in_bridge

    async with a_stand_in_bridge(servers) as (name, answer):
        env = {**os.environ, "QB_AMQP_URL": servers.amqp_url("guest"), "QB_EXCHANGE": name}
        proc = await asyncio.create_subprocess_exec(
            node, "-e", CLOCK_FROM_REPLIES, cwd=NODE_DIR, env=env, stdout=asyncio.subprocess.PIPE
        )
        await answer()
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
    offset = json.loads(out.decode().strip().splitlines()[-1])["offset"]
    assert abs(offset) < 5_000, f"a message answering nothing set the clock {offset} ms off"


async def _publish_results(
    servers: Servers, names: dict[str, str], svc: str, messages: list[tuple[str, bytes]], *, user: str = BRIDGE_USER
) -> None:
    """Publish raw result messages (message-id, body) as the bridge does: to its results exchange,
    routing key = serviceId, header x-owner, the broker-validated ``user_id`` of ``user`` (the
    bridge's broker user by default: results.js keeps no result from anyone else)."""
    import aio_pika

    conn = await aio_pika.connect(servers.amqp_url(user))
    try:
        exchange = await (await conn.channel()).get_exchange(names["results_exchange"], ensure=False)
        for message_id, body in messages:
            msg = aio_pika.Message(
                body, message_id=message_id, headers={"x-owner": OWNERS[0]}, type="result", user_id=user
            )
            await exchange.publish(msg, routing_key=svc)
    finally:
        await conn.close()


def _result(task_id: str, svc: str) -> bytes:
    return json.dumps({"taskId": task_id, "serviceId": svc, "result": {"ok": task_id}, "token": None}).encode()


async def test_node_results_acks_and_reports_a_body_that_is_not_json(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """A result whose body is not a JSON object threw inside the consumer's callback: the script
    crashed, and the message, redelivered, crashed the next one (a crash loop). It is acked and
    reported, and the results after it are kept."""
    svc = service_id()
    extra = {"QB_SERVICE": svc, "QB_OWNER": OWNERS[0], "QB_EXPECT": "1", "QB_TIMEOUT_MS": "20000"}
    results = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        await results.event("ready")
        await _publish_results(
            servers, names, svc, [("bad:1", b"not json"), ("bad:2", b"null"), ("t1:c1", _result("t1", svc))]
        )
        assert await results.wait(30) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
    assert [b["messageId"] for b in results.all("bad_result")] == ["bad:1", "bad:2"]
    assert [r["messageId"] for r in results.all("result")] == ["t1:c1"]


async def test_node_results_stops_at_a_result_not_from_the_bridge_and_leaves_it_queued(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """docs/security.md asks every engine to take a result only if its broker-validated ``user_id``
    is the bridge's user (anyone else allowed to publish to the results exchange could forge one,
    naming any owner and token), and the Python client does; results.js, the engine's consumer
    we ship, kept every message. A result from another user now stops it (exit 1) with the
    message left in the queue, not acked: dropped, a wrong ``QB_BRIDGE_USER`` would have taken
    every real result out of the queue every engine shares. The bridge's own results before it
    are kept; a consumer told to take that user's results (``QB_BRIDGE_USER``) then reads it."""
    svc = service_id()
    extra = {"QB_SERVICE": svc, "QB_OWNER": OWNERS[0], "QB_EXPECT": "2", "QB_TIMEOUT_MS": "20000"}
    results = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        await results.event("ready")
        await _publish_results(servers, names, svc, [("t1:c1", _result("t1", svc))])
        await results.event("result")
        await _publish_results(servers, names, svc, [("forged:1", _result("forged", svc))], user="guest")
        assert await results.wait(30) == 1, (results.events, results.stderr)
    finally:
        await results.stop()
    assert [r["messageId"] for r in results.all("result")] == ["t1:c1"], results.events
    [refused] = [e for e in results.all("error") if e["code"] == "not_from_bridge"]
    assert (refused["messageId"], refused["userId"]) == ("forged:1", "guest"), refused
    # Still in the queue.
    extra = {**extra, "QB_EXPECT": "1", "QB_BRIDGE_USER": "guest"}
    again = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        assert await again.wait(30) == 0, (again.events, again.stderr)
    finally:
        await again.stop()
    assert [r["messageId"] for r in again.all("result")] == ["forged:1"], again.events


async def test_node_results_remembers_a_bounded_number_of_message_ids(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """results.js kept every message-id it ever saw (run until stopped: memory without bound). It
    keeps the last QB_DEDUP_SIZE: a copy within them is dropped, an id older than them is not."""
    svc = service_id()
    extra = {"QB_SERVICE": svc, "QB_OWNER": OWNERS[0], "QB_EXPECT": "4", "QB_TIMEOUT_MS": "10000", "QB_DEDUP_SIZE": "2"}
    results = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        await results.event("ready")
        ids = ["a:1", "a:1", "b:1", "c:1", "a:1"]  # the second a:1 is a copy; the last one is forgotten
        await _publish_results(servers, names, svc, [(i, _result(i.split(":")[0], svc)) for i in ids])
        assert await results.wait(30) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
    assert [r["messageId"] for r in results.all("result")] == ["a:1", "b:1", "c:1", "a:1"]


async def test_node_results_reconnects_when_the_broker_closes_its_connection(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], tmp_path: Any
) -> None:
    """The broker closes the results consumer's connection (a restart, a failover): it used to exit
    1. It connects again (backing off) and goes on consuming."""
    from tests.integration.test_client_resilience import _close_connection_named

    svc, conn_name = service_id(), f"node-results-{uuid.uuid4().hex[:8]}"
    preload = tmp_path / "name_connection.js"
    preload.write_text(NAME_CONNECTION)
    extra = {
        "QB_SERVICE": svc,
        "QB_OWNER": OWNERS[0],
        "QB_EXPECT": "1",
        "QB_TIMEOUT_MS": "45000",
        "QB_CONN_NAME": conn_name,
        "NODE_OPTIONS": f"--require {preload}",
        "NODE_PATH": str(NODE_DIR / "node_modules"),
    }
    results = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        await results.event("ready")
        await asyncio.to_thread(_close_connection_named, conn_name)
        await results.count("ready", 2)
        await _publish_results(servers, names, svc, [("t1:c1", _result("t1", svc))])
        assert await results.wait(30) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
    assert results.all("reconnecting"), results.events
    assert [r["messageId"] for r in results.all("result")] == ["t1:c1"]


# -- the second review's findings (ack retries, stop, bounded close, connecting once, results failover)


async def _node_worker_cut_off_before_its_ack(
    engine: Any, node: str, servers: Servers, names: dict[str, str], *, wait_ms: int, work_ms: int, ttr_ms: int
) -> tuple[Any, str, NodeScript]:
    """A Node worker whose only path to RabbitMQ (a proxy) is cut while it works on the task added
    here, once its first ack failed: the proxy, the task's id, the worker (stop both after)."""
    from tests.faults import TcpProxy

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1, "text": "handled once"})
    extra = {
        "QB_AMQP_URL": f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/",
        "QB_SERVICE": svc,
        "QB_WAIT_MS": str(wait_ms),
        "QB_WORK_MS": str(work_ms),  # time to cut the proxy between the fetch and the ack
        "QB_TTR_MS": str(ttr_ms),
    }
    worker = await NodeScript(node, "worker.js", {**env_of(servers, names, OWNERS[0]), **extra}).start()
    try:
        await worker.event("task")
        proxy.cut()  # the connection drops and reconnecting is refused: the ack gets no answer
        await worker.event("ack_failed", 10)
    except BaseException:
        await worker.stop()
        await proxy.stop()
        raise
    return proxy, task_id, worker


async def test_node_worker_sends_an_unanswered_ack_again_while_the_lease_lasts(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """RabbitMQ out of reach for a few seconds as a task's work ends: the worker sent its ack 3
    times in under a second, gave up, and its next fetch (not ``fresh``) handed the same task back,
    so the handler ran a second time. As rpc.py's ``_ack_in_loop``, the ack is sent again (backing
    off) while the task's lease lasts (here 30 s): the result is in hand and an ack naming its task
    is safe to repeat. The outage: the worker's only path to RabbitMQ (a proxy) cut for ~3 s."""
    from tests.conftest import wait_for

    proxy, task_id, worker = await _node_worker_cut_off_before_its_ack(
        engine, node, servers, names, wait_ms=2000, work_ms=1500, ttr_ms=30000
    )
    try:
        first_failure = worker.times[worker.events.index(worker.all("ack_failed")[0])]
        # Out of reach past the 3 attempts the worker used to stop at (then its next fetch fails
        # too), and ~3 s in all: the worker's next move after its last retry is what is tested.
        await wait_for(
            lambda: (
                (len(worker.all("ack_failed")) > 3 or worker.all("fetch_failed"))
                and time.monotonic() - first_failure >= 3
            ),
            15,
            what="the ack unanswered for 3 s",
        )
        proxy.restore()
        await worker.event("acked", 15)
    finally:
        await worker.stop()
        await proxy.stop()
    tasks = [t for t in worker.all("task") if t["taskId"] == task_id]
    assert len(tasks) == 1, f"the handler ran {len(tasks)} times: {worker.events}"
    assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}], worker.events
    assert {f["code"] for f in worker.all("ack_failed")} == {"connection_lost"}, worker.events


async def test_node_worker_acks_the_result_in_hand_when_its_lease_is_handed_back(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """The ack of a task's result got no answer until its lease ended: the worker keeps the result
    (``resultInHand``), and its next fetch (not ``fresh``: the bridge reads its pointer) hands the
    same lease back. That task is acked with the result in hand, its handler not run again (its
    side effects would be made twice; rpc.py ``_result_in_hand``), and counted once."""
    from bridge.client import Worker
    from tests.conftest import wait_for

    # A 2 s lease: the ack's retries end with it, 1 s after the work.
    proxy, task_id, worker = await _node_worker_cut_off_before_its_ack(
        engine, node, servers, names, wait_ms=1000, work_ms=1000, ttr_ms=2000
    )
    try:
        # Past the lease the worker fetches again (and fails while cut off): the result is in hand.
        await wait_for(lambda: bool(worker.all("fetch_failed")), 20, what="a fetch after the ack gave up")
        proxy.restore()
        await worker.event("result_in_hand", 20)
        await worker.event("acked", 15)
    finally:
        await worker.stop()
        await proxy.stop()
    mine = [e for e in worker.all("task") if e["taskId"] == task_id]
    in_hand = [e for e in worker.all("result_in_hand") if e["taskId"] == task_id]
    assert len(mine) == 2 and len(in_hand) == 1, f"handed out twice, worked once: {worker.events}"
    assert worker.all("acked")[0] == {"event": "acked", "taskId": task_id, "completed": True}, worker.events
    svc = worker.env["QB_SERVICE"]
    async with Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="after", exchange=names["exchange"]) as other:
        assert await other.fetch() is None, "the task was not completed with its result"


async def test_node_worker_that_handled_a_task_exits_promptly_when_told_to_stop(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """Each task handled left a reaction on the worker's stop promise (which never settles: memory
    grew with every task), and the signal then started a QB_STOP_TIMEOUT_MS timer for each of
    them, never cleared: a worker idle in its long-poll that had handled a task lingered for
    QB_STOP_TIMEOUT_MS (here 60 s) after it was done with its stop."""
    from tests.conftest import wait_for
    from tests.integration.test_client_resilience import _waiters

    svc = service_id()
    task_id = await engine.add(svc, {"n": 1, "text": "before the stop"})
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "30000", "QB_STOP_TIMEOUT_MS": "60000", "QB_STOP_GRACE_MS": "1000"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await worker.event("acked")
        await wait_for(lambda: _waiters(bridge) >= 1, 10, what="the Node worker long-polling again")
        worker.signal(signal.SIGTERM)
        # The grace (1 s) asking what the given-up long-poll claimed, and the close: not 60 s.
        assert await worker.wait(1 + 4) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}]
    assert worker.all("stopping") == [{"event": "stopping", "signal": "SIGTERM", "phase": "fetching"}]


async def test_node_worker_told_to_stop_exits_when_its_connection_went_silent(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """The path to RabbitMQ goes silent (a black-holing firewall, a half-dead node: the socket
    stays open, nothing comes back). SIGTERM under the long-poll closed the connection and awaited
    amqplib's close(), which waits for the broker's close-ok: it never came, and the worker hung in
    its stop for good. As rpc.py's ``_close_bounded``, the close is given up after
    QB_CONNECT_TIMEOUT_MS (the socket destroyed) and the stop goes on, within its grace."""
    from tests.conftest import wait_for
    from tests.faults import TcpProxy
    from tests.integration.test_client_resilience import _waiters

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    grace_s = 2
    extra = {
        "QB_AMQP_URL": f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/",
        "QB_SERVICE": service_id(),
        "QB_WAIT_MS": "30000",
        "QB_STOP_GRACE_MS": str(grace_s * 1000),
        "QB_CONNECT_TIMEOUT_MS": "500",
    }
    worker = await NodeScript(node, "worker.js", {**env_of(servers, names, OWNERS[0]), **extra}).start()
    try:
        await wait_for(lambda: _waiters(bridge) >= 1, 30, what="the Node worker long-polling")
        proxy.mute()  # RabbitMQ's bytes (the close-ok among them) no longer reach the worker
        worker.signal(signal.SIGTERM)
        assert await worker.wait(grace_s + 2) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
        await proxy.stop()
    assert worker.all("stopping") == [{"event": "stopping", "signal": "SIGTERM", "phase": "fetching"}]
    assert worker.all("drained"), worker.events


async def test_node_results_told_to_stop_exits_when_its_connection_went_silent(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """As the worker above: results.js awaited amqplib's close(), which waits for the broker's
    close-ok; on a connection gone silent it never came, and SIGTERM left the consumer hanging
    until it was killed. The close is given up after QB_CONNECT_TIMEOUT_MS (the socket
    destroyed). Unacked results are not lost either way: the broker requeues them."""
    from tests.faults import TcpProxy

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    extra = {
        "QB_AMQP_URL": f"amqp://{ENGINE_USER}:{ENGINE_USER}@127.0.0.1:{proxy.port}/",
        "QB_SERVICE": service_id(),
        "QB_OWNER": OWNERS[0],
        "QB_CONNECT_TIMEOUT_MS": "500",
    }
    results = await NodeScript(node, "results.js", {**env_of(servers, names, ENGINE_USER), **extra}).start()
    try:
        await results.event("ready")
        proxy.mute()  # RabbitMQ's bytes (the close-ok among them) no longer reach the consumer
        results.signal(signal.SIGTERM)
        assert await results.wait(3) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
        await proxy.stop()


# An add over the broker's max_message_size, beside a long-poll fetch on the same channel: what
# each was rejected with.
OVERSIZED_ADD = """
'use strict';
const { BridgeClient } = require(process.env.QB_BRIDGE_JS);
(async () => {
  const client = new BridgeClient({ url: process.env.QB_AMQP_URL, exchange: process.env.QB_EXCHANGE });
  const headers = { 'x-owner': process.env.QB_OWNER };
  const svc = process.env.QB_SERVICE;
  const outcome = (p) => p.then(() => 'answered', (err) => err.code);
  const fetch = outcome(client.request('fetch', { serviceId: svc, workerId: 'w', waitMs: 3000 }, { headers }));
  await new Promise((resolve) => setTimeout(resolve, 200));
  const big = 'x'.repeat(16 * 1024 * 1024 + 1);
  const add = await outcome(client.request('add', { serviceId: svc, value: big }, { headers, messageId: 'big' }));
  process.stdout.write(JSON.stringify({ event: 'outcomes', add, fetch: await fetch }) + '\\n');
  await client.close();
})();
"""


async def test_node_client_rejects_a_request_over_the_brokers_bound_as_payload_too_large(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], tmp_path: Any
) -> None:
    """RabbitMQ closes the channel of a publish over its ``max_message_size`` (406). bridge.js
    took it for a lost connection (``connection_lost``, retryable): engine.js retried such an
    add until its retries ran out, worker.js sent such an ack again until the lease ended (and
    the task ran again, every lease). It is ``payload_too_large`` now, as the bridge's own
    refusal; a request beside it on the channel is failed as lost."""
    from tests.integration.test_bad_input import _broker_bounds_messages

    await _broker_bounds_messages(servers)
    script = tmp_path / "oversized_add.js"
    script.write_text(OVERSIZED_ADD)
    extra = {"QB_SERVICE": service_id(), "QB_OWNER": OWNERS[0], "QB_BRIDGE_JS": str(NODE_DIR / "bridge.js")}
    proc = await NodeScript(node, str(script), env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        assert await proc.wait(30) == 0, (proc.events, proc.stderr)
    finally:
        await proc.stop()
    (outcomes,) = proc.all("outcomes")
    assert outcomes["add"] == "payload_too_large", outcomes
    assert outcomes["fetch"] in ("connection_lost", "answered"), outcomes


# Five adds sent together on a client not connected yet, then (on SIGUSR1, once the test has
# counted the broker's connections) close(): the process must then exit by itself.
CONCURRENT_ADDS = """
'use strict';
const { BridgeClient } = require(process.env.QB_BRIDGE_JS);
(async () => {
  const client = new BridgeClient({ url: process.env.QB_AMQP_URL, exchange: process.env.QB_EXCHANGE });
  const add = (n) =>
    client.request(
      'add',
      { serviceId: process.env.QB_SERVICE, value: { n } },
      { headers: { 'x-owner': process.env.QB_OWNER }, messageId: `${process.env.QB_SERVICE}:${n}` },
    );
  const replies = await Promise.all([0, 1, 2, 3, 4].map(add));
  process.stdout.write(JSON.stringify({ event: 'added', tasks: replies.map((r) => r.body.task.id) }) + '\\n');
  await new Promise((resolve) => process.once('SIGUSR1', resolve));
  await client.close();
  process.stdout.write(JSON.stringify({ event: 'closed' }) + '\\n');
})();
"""


async def test_node_client_connects_once_for_requests_sent_together(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], tmp_path: Any
) -> None:
    """Requests sent together on a BridgeClient not connected yet (an engine's Promise.all) each
    opened a connection of their own; the client kept the last, and close() closed only that one:
    the others stayed open, and the process never exited. They share one connect now."""
    from tests.integration.test_client_resilience import _broker_connections

    svc, conn_name = service_id(), f"node-together-{uuid.uuid4().hex[:8]}"
    script, preload = tmp_path / "concurrent_adds.js", tmp_path / "name_connection.js"
    script.write_text(CONCURRENT_ADDS)
    preload.write_text(NAME_CONNECTION)
    extra = {
        "QB_SERVICE": svc,
        "QB_OWNER": OWNERS[0],
        "QB_BRIDGE_JS": str(NODE_DIR / "bridge.js"),
        "QB_CONN_NAME": conn_name,
        "NODE_OPTIONS": f"--require {preload}",
        "NODE_PATH": str(NODE_DIR / "node_modules"),
    }
    proc = await NodeScript(node, str(script), env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        added = await proc.event("added", 30)
        assert len(set(added["tasks"])) == 5, added
        connections = await asyncio.to_thread(_broker_connections, conn_name)
        assert len(connections) == 1, f"{len(connections)} connections for one client: {connections}"
        proc.signal(signal.SIGUSR1)
        assert await proc.wait(5) == 0, (proc.events, proc.stderr)
    finally:
        await proc.stop()
    assert proc.all("closed"), proc.events


async def test_node_results_whose_node_goes_away_goes_on_through_another_of_its_hosts(
    bridge: Any, node: str, servers: Servers, names: dict[str, str]
) -> None:
    """QB_AMQP_HOSTS, which the README gives as the cluster setting, was ignored by results.js: it
    reconnected to QB_AMQP_URL's one node only, and while that node stayed down no result was
    consumed. Two nodes (TCP proxies to the one broker); the one carrying its connection dies."""
    from tests.faults import TcpProxy

    a = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    b = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    extra = {
        "QB_AMQP_URL": f"amqp://{ENGINE_USER}:{ENGINE_USER}@127.0.0.1:{a.port}/",
        "QB_AMQP_HOSTS": f"127.0.0.1:{a.port},127.0.0.1:{b.port}",
        "QB_SERVICE": svc,
        "QB_OWNER": OWNERS[0],
        "QB_EXPECT": "1",
        "QB_TIMEOUT_MS": "30000",
        "QB_RETRY_BASE_MS": "100",
    }
    results = await NodeScript(node, "results.js", {**env_of(servers, names, ENGINE_USER), **extra}).start()
    try:
        await results.event("ready")
        [first] = [p for p in (a, b) if p._conns]
        first.cut()  # its connection drops, and the node refuses new ones
        await results.count("ready", 2, timeout=10)
        await _publish_results(servers, names, svc, [("t1:c1", _result("t1", svc))])
        assert await results.wait(15) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
        await a.stop()
        await b.stop()
    assert results.all("reconnecting"), results.events
    assert [r["messageId"] for r in results.all("result")] == ["t1:c1"]


# -- the third review's findings (pointer after a lost fetch, fails without an answer, QB_POLL_MS=0,
# a handler rejecting with a non-Error, results handled before they count as seen, a silent channel)


def _node_worker_via(proxy: Any, servers: Servers, names: dict[str, str], **extra: str) -> dict[str, str]:
    """A Node worker's environment, its only path to RabbitMQ through ``proxy`` (a TcpProxy)."""
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    return {**env_of(servers, names, OWNERS[0]), "QB_AMQP_URL": url, **extra}


async def _until(moment: float) -> None:
    """Wait until ``time.monotonic()`` reaches ``moment``: the scenario's own timeline (a lost
    request's deadline), not a wait for something to happen."""
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


# worker.js waits for a fetch's reply its QB_WAIT_MS plus 10 s, and a fetch that got no answer may
# claim for it until then and a second more (its deadline, judged with the hosts' clocks apart).
FETCH_DEADLINE_S = 10.0 + 1.0


async def test_node_worker_reads_its_pointer_after_a_lost_fetch_before_it_says_fresh_again(
    bridge: Any, engine: Any, workers: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: Any
) -> None:
    """A fetch (A) whose reply was lost may claim a task for the worker until its deadline; one
    still queued at a busy bridge claims a ready task at once, after the worker's next fetch (B,
    not ``fresh``) read its pointer. B, sent before A's deadline and answered after it, set
    ``fresh`` again: the fetch after it skipped the pointer naming the task A claimed, which
    waited out its whole lease (60 s here). As rpc.py's ``_pointer_unread``, ``fresh`` comes back
    only once a fetch without it, sent past the deadline, is answered (third review)."""
    from tests.conftest import wait_for
    from tests.faults import TcpProxy

    svc = service_id()
    real = bridge.queue.fetch
    a_held, a_go, b_read, b_go = asyncio.Event(), asyncio.Event(), asyncio.Event(), asyncio.Event()
    claimed: list[Any] = []
    fresh: list[bool] = []  # each fetch's ``fresh``, in order

    async def busy(owner: str, req: Any, **kw: Any) -> Any:
        if req.service_id != svc:
            return await real(owner, req, **kw)
        fresh.append(req.fresh)
        if len(fresh) == 1:  # A: queued at a busy bridge while its connection is lost
            a_held.set()
            await a_go.wait()
            claimed.append(await real(owner, req, **kw))
            return claimed[0]
        if len(fresh) == 2:  # B: reads the pointer now; its answer comes past A's deadline
            got = await real(owner, req, **kw)
            b_read.set()
            await b_go.wait()
            return got
        return await real(owner, req, **kw)

    monkeypatch.setattr(bridge.queue, "fetch", busy)
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "0", "QB_POLL_MS": "100", "QB_TTR_MS": "60000", "QB_MAX_TASKS": "1"}
    worker = await NodeScript(node, "worker.js", _node_worker_via(proxy, servers, names, **extra)).start()
    try:
        async with asyncio.timeout(30):
            await a_held.wait()
        a_at = time.monotonic()  # A was sent before this: its deadline is before a_at + 11 s
        # Lost 3 s after it was sent: B, sent then, waits for its own reply until a_at + 13 s,
        # past A's deadline.
        await _until(a_at + 3)
        proxy.cut()
        proxy.restore()
        async with asyncio.timeout(10):
            await b_read.wait()
        task_id = await engine.add(svc, {"n": 1, "text": "claimed by a lost fetch"})
        a_go.set()  # A runs now, after B read the pointer: it claims the task for the worker
        await wait_for(lambda: bool(claimed), 10, what="the lost fetch to run at the bridge")
        assert claimed[0] is not None and claimed[0].task_id == task_id, claimed
        await _until(a_at + FETCH_DEADLINE_S + 0.5)
        b_go.set()  # B answered (nothing) past A's deadline
        assert await worker.wait(15) == 0, (worker.events, fresh)
    finally:
        a_go.set()
        b_go.set()
        await worker.stop()
        await proxy.stop()
    assert fresh[:3] == [False, False, False], f"the fetch after B skipped the worker's pointer: {fresh}"
    assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}], worker.events
    assert await (await workers(svc, "other")).fetch() is None


async def test_node_worker_told_to_stop_past_a_lost_fetchs_deadline_fetches_back_what_it_claimed(
    bridge: Any, engine: Any, workers: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: Any
) -> None:
    """A fetch claimed a task and its reply was lost; RabbitMQ stayed out of reach past that
    fetch's deadline (the fetches after it never left the worker); then SIGTERM. The drain asked
    the bridge what the worker held only until that deadline: past it, it exited at once, and
    the claimed task stayed leased to the stopped worker for its whole lease (60 s here). As
    rpc.py (``_claim_unanswered``, test_client_defects.py), it asks while such a claim may be
    unread, within QB_STOP_GRACE_MS (third review)."""
    from tests.conftest import wait_for
    from tests.faults import TcpProxy

    svc, worker_id = service_id(), "node-stop-late"
    task_id = await engine.add(svc, {"n": 1, "text": "claimed, its reply lost"})
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    real = bridge.queue.fetch
    claimed: list[tuple[float, Any]] = []

    async def claim_then_cut(owner: str, req: Any, **kw: Any) -> Any:
        got = await real(owner, req, **kw)
        if req.service_id == svc and not claimed:
            claimed.append((time.monotonic(), got))
            proxy.cut()  # the reply has nowhere to go, and RabbitMQ refuses the worker from now on
        return got

    monkeypatch.setattr(bridge.queue, "fetch", claim_then_cut)
    extra = {"QB_SERVICE": svc, "QB_WORKER_ID": worker_id, "QB_WAIT_MS": "0", "QB_TTR_MS": "60000"}
    worker = await NodeScript(node, "worker.js", _node_worker_via(proxy, servers, names, **extra)).start()
    try:
        await wait_for(lambda: bool(claimed), 30, what="the worker's first fetch to claim")
        assert claimed[0][1] is not None and claimed[0][1].task_id == task_id, claimed
        await _until(claimed[0][0] + FETCH_DEADLINE_S + 0.5)
        assert worker.proc is not None and worker.proc.returncode is None, worker.events
        worker.signal(signal.SIGTERM)
        await worker.event("drain_failed", 10)  # RabbitMQ still refuses: asked again, within the grace
        proxy.restore()
        assert await worker.wait(15) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
        await proxy.stop()
    assert worker.all("acked") == [{"event": "acked", "taskId": task_id, "completed": True}], worker.events
    assert await (await workers(svc, worker_id)).fetch() is None, "a task is leased to the stopped worker"


async def test_node_worker_handed_back_a_lease_whose_fail_got_no_answer_sends_the_fail_again(
    bridge: Any, engine: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: Any
) -> None:
    """A handler threw and its task's ``fail`` got no answer (``unavailable``): the worker went on,
    its next fetch (not ``fresh``) got the same lease back, and the handler ran again at once, at
    the same epoch, skipping the fail's backoff and never counting toward parking. As rpc.py's
    ``_fail_in_hand`` (test_client_r11_fail_in_hand.py), that lease handed back has its fail sent
    again instead; the task comes back after the backoff, at a new epoch (third review)."""
    svc = service_id()
    _first_fail_unanswered(bridge, svc, monkeypatch)
    task_id = await engine.add(svc, {"n": 1, "throw": "boom"})  # its handler throws, every time
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "1000", "QB_TTR_MS": "60000", "QB_MAX_TASKS": "2"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        assert await worker.wait(30) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    leases = [(t["taskId"], t["epoch"], t["deliveries"]) for t in worker.all("task")]
    first = leases[0][1]
    assert leases == [(task_id, first, 1), (task_id, first, 1), (task_id, first + 1, 2)], (
        f"the handler ran again at the lease whose fail got no answer: {worker.events}"
    )
    assert worker.all("fail_in_hand") == [{"event": "fail_in_hand", "taskId": task_id, "epoch": first, "resent": 1}], (
        worker.events
    )
    assert [g["answered"] for g in worker.all("given_back")] == [None, True, True], worker.events


async def test_node_worker_told_to_stop_sends_a_give_back_without_an_answer_again(
    bridge: Any, engine: Any, workers: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: Any
) -> None:
    """At the stop a handler still running is given back (``fail``, retryInMs 0). That fail got no
    answer (``unavailable``): the worker exited, the task leased to it for its whole lease (60 s
    here). As rpc.py's ``_give_back`` on stop, it is sent again within QB_STOP_GRACE_MS (third
    review)."""
    svc = service_id()
    _first_fail_unanswered(bridge, svc, monkeypatch)
    task_id = await engine.add(svc, {"n": 1, "text": "slow"})
    worker = await _stopped_mid_task(node, servers, names, svc)
    assert [f["code"] for f in worker.all("give_back_failed")] == ["unavailable"], worker.events
    assert worker.all("given_back") == [
        {"event": "given_back", "taskId": task_id, "reason": "StopTimeout", "answered": True}
    ], worker.events
    got = await (await workers(svc, "other")).fetch(wait_ms=5_000)
    assert got is not None and (got.id, got.deliveries) == (task_id, 2), got
    assert await got.ack("done") is True


async def test_node_worker_with_poll_ms_0_still_pauses_between_empty_fetches(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """QB_POLL_MS=0 (a long-polling user's natural choice) turned every pause off: not long-polling,
    a worker of an empty queue sent fetches as fast as the bridge answered, each a scan of its
    ready index. As rpc.py (``max(poll_interval, BACKOFF_BASE_S)``) it pauses 100 ms at least
    (third review)."""
    gaps = await _gaps_between_empty_fetches(bridge, node, servers, names, monkeypatch, wait_ms=0, poll_ms=0)
    assert all(g >= 0.09 for g in gaps), gaps


@pytest.mark.parametrize("thrown", [None, 42], ids=["null", "a number"])
async def test_node_worker_gives_back_a_task_whose_handler_rejects_with_a_non_error(
    bridge: Any, engine: Any, workers: Any, node: str, servers: Servers, names: dict[str, str], thrown: Any
) -> None:
    """A handler that rejects with ``null`` (``reject()``, ``throw null``): reading ``err.name``
    threw in the catch, and the worker exited 1 with its task leased for the whole lease (60 s
    here). A non-Error is taken as an Error of its text: the task is given back and the worker
    goes on (third review)."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1, "throw": thrown})
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "1000", "QB_TTR_MS": "60000", "QB_MAX_TASKS": "1"}
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        assert await worker.wait(30) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    assert worker.all("given_back") == [
        {"event": "given_back", "taskId": task_id, "reason": "Error", "answered": True}
    ], worker.events
    got = await (await workers(svc, "other")).fetch(wait_ms=5_000)
    assert got is not None and (got.id, got.deliveries) == (task_id, 2), got
    assert await got.ack("done") is True


# The results consumer's handling of its first result fails (what a crash of the code handling it
# does): writing that result's line throws, once.
FIRST_RESULT_FAILS = """
'use strict';
const write = process.stdout.write.bind(process.stdout);
let failed = false;
process.stdout.write = (chunk, ...rest) => {
  if (!failed && String(chunk).includes('"event":"result"')) {
    failed = true;
    throw new Error('the handling of the result failed (test)');
  }
  return write(chunk, ...rest);
};
"""


async def test_node_results_handles_again_a_result_whose_handling_failed(
    bridge: Any, node: str, servers: Servers, names: dict[str, str], tmp_path: Any
) -> None:
    """results.js remembered a result's message-id before it handled it: a result whose handling
    threw was left unacked, holding one of the channel's prefetch slots for the connection's life,
    and when it came again (a reconnection) it was acked as a duplicate, never handled. Its id is
    remembered once it was handled; one whose handling failed is requeued (third review)."""
    svc = service_id()
    preload = tmp_path / "first_result_fails.js"
    preload.write_text(FIRST_RESULT_FAILS)
    extra = {
        "QB_SERVICE": svc,
        "QB_OWNER": OWNERS[0],
        "QB_EXPECT": "1",
        "QB_TIMEOUT_MS": "10000",
        "QB_RETRY_BASE_MS": "100",
        "NODE_OPTIONS": f"--require {preload}",
    }
    results = await NodeScript(node, "results.js", env_of(servers, names, ENGINE_USER, **extra)).start()
    try:
        await results.event("ready")
        await _publish_results(servers, names, svc, [("t1:c1", _result("t1", svc))])
        assert await results.wait(20) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
    assert [f["messageId"] for f in results.all("handling_failed")] == ["t1:c1"], results.events
    assert [r["messageId"] for r in results.all("result")] == ["t1:c1"], results.events


# The AMQP Channel.Open method frame on channel 1 (type 1, channel 1, size, class 20, method 10).
CHANNEL_OPEN = re.compile(rb"\x01\x00\x01.{4}\x00\x14\x00\x0a", re.DOTALL)


def _silent_after_the_handshake(servers: Servers) -> Any:
    """A TcpProxy to RabbitMQ that lets the AMQP handshake through, then drops everything RabbitMQ
    sends from the moment a client opens a channel: a node that took the connection and went
    silent (stalled, half dead, a black-holing firewall). ``channel_open`` is set then."""
    from tests.faults import TcpProxy

    class SilentAfterTheHandshake(TcpProxy):
        def __init__(self) -> None:
            super().__init__(servers.amqp_host, servers.amqp_port)
            self.channel_open = asyncio.Event()

        def seen(self, data: bytes, *, replies: bool) -> None:
            if not replies and CHANNEL_OPEN.search(data):
                self.mute()  # before it goes on: its Channel.OpenOk never comes back
                self.channel_open.set()

    return SilentAfterTheHandshake()


async def test_node_worker_gives_up_a_channel_a_silent_node_never_opens(
    node: str, servers: Servers, names: dict[str, str]
) -> None:
    """The connect timeout bounded the TCP connect and the AMQP handshake only: a node silent after
    the handshake held ``createChannel()`` (and the fetch waiting for it) until the heartbeats gave
    up, minutes later. Opening the channel is bounded by QB_CONNECT_TIMEOUT_MS too: the fetch
    fails (``connection_lost``) and is retried, as any (third review)."""
    proxy = await _silent_after_the_handshake(servers).start()
    extra = {"QB_SERVICE": service_id(), "QB_WAIT_MS": "1000", "QB_CONNECT_TIMEOUT_MS": "1000"}
    worker = await NodeScript(node, "worker.js", _node_worker_via(proxy, servers, names, **extra)).start()
    try:
        failed = await worker.event("fetch_failed", 10)
        assert failed["code"] == "connection_lost" and "channel" in failed["message"], failed
        worker.signal(signal.SIGTERM)
        assert await worker.wait(5) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
        await proxy.stop()


async def test_node_worker_told_to_stop_while_its_channel_opens_exits_at_once(
    node: str, servers: Servers, names: dict[str, str]
) -> None:
    """SIGTERM while the worker waits for a silent node to open its channel: close() closed the
    connection the client had (none yet) and left the connect under way alone, so the worker
    waited in it (minutes: only the heartbeats ended it). close() now cuts a connect under way
    (third review)."""
    proxy = _silent_after_the_handshake(servers)
    await proxy.start()
    extra = {"QB_SERVICE": service_id(), "QB_WAIT_MS": "1000", "QB_CONNECT_TIMEOUT_MS": "30000"}
    worker = await NodeScript(node, "worker.js", _node_worker_via(proxy, servers, names, **extra)).start()
    try:
        async with asyncio.timeout(10):
            await proxy.channel_open.wait()
        worker.signal(signal.SIGTERM)
        assert await worker.wait(5) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
        await proxy.stop()
    assert worker.all("stopping") == [{"event": "stopping", "signal": "SIGTERM", "phase": "fetching"}], worker.events


async def _stopped_mid_task(node: str, servers: Servers, names: dict[str, str], svc: str) -> NodeScript:
    """A Node worker whose handler works for a minute on its first task, SIGTERMed as it starts:
    its handler cut after QB_STOP_TIMEOUT_MS (300 ms), the task given back; exited 0."""
    extra = {"QB_SERVICE": svc, "QB_WAIT_MS": "5000", "QB_TTR_MS": "60000", "QB_WORK_MS": "60000"}
    extra["QB_STOP_TIMEOUT_MS"] = "300"
    worker = await NodeScript(node, "worker.js", env_of(servers, names, OWNERS[0], **extra)).start()
    try:
        await worker.event("task")
        worker.signal(signal.SIGTERM)
        assert await worker.wait(10) == 0, (worker.events, worker.stderr)
    finally:
        await worker.stop()
    return worker


def _first_fail_unanswered(bridge: Any, svc: str, monkeypatch: Any) -> None:
    """The service's first ``fail`` is answered ``unavailable`` (it may not have applied); the
    others go through."""
    from bridge.domain.errors import Unavailable

    real = bridge.queue.fail
    refused: list[int] = []

    async def unavailable_once(owner: str, req: Any) -> Any:
        if req.service_id == svc and not refused:
            refused.append(1)
            raise Unavailable("Cassandra timed out (test)")
        return await real(owner, req)

    monkeypatch.setattr(bridge.queue, "fail", unavailable_once)
