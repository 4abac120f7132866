"""Fixtures: real RabbitMQ and Cassandra endpoints, a key-ring, and bridges (in-process or processes).

Where the servers come from (the tests never change):
1. ``QB_TEST_AMQP_URL`` / ``QB_TEST_CASSANDRA_HOSTS`` if set;
2. else the local stack on 127.0.0.1 (``make stack-up``), if it answers;
3. else, if a Docker engine is available, RabbitMQ and Cassandra started with testcontainers.
Otherwise the session fails with a message saying how to get servers: integration tests are
never silently skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bridge.client import Engine, Worker
from bridge.config import Settings
from bridge.crypto import generate_keyring, write_keyring

ROOT = Path(__file__).resolve().parent.parent
ENGINE_USER = "engine"
BRIDGE_USER = "queue-bridge"  # least-privilege broker user of the bridge (deploy/local/rabbitmq.sh)
OWNERS = ("worker-a", "worker-b")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _docker_available() -> bool:
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class Servers:
    amqp_host: str
    amqp_port: int
    cassandra_hosts: list[str]
    cassandra_port: int
    keyspace: str
    stop: list[Callable[[], Any]] = field(default_factory=list)
    # RabbitMQ's management API (lists a test's leftover queues by prefix), when it has one.
    management_port: int | None = None

    def amqp_url(self, user: str = "guest", password: str | None = None) -> str:
        return f"amqp://{user}:{password or user}@{self.amqp_host}:{self.amqp_port}/"


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """The servers, and this session's keyspace, dropped when the session ends: each keyspace
    holds about twenty tables, and a local Cassandra (1 GiB heap) that kept every run's ran out
    of memory after about seventy sessions."""
    found = _servers()
    got = next(found)
    try:
        yield got
    finally:
        _drop_keyspace(got)
        with contextlib.suppress(StopIteration):
            next(found)


def _drop_keyspace(s: Servers) -> None:
    from cassandra.cluster import Cluster

    cluster = Cluster(s.cassandra_hosts, port=s.cassandra_port, protocol_version=5)
    try:
        session = cluster.connect()
        session.execute(f"DROP KEYSPACE IF EXISTS {s.keyspace}", timeout=120)
    except Exception as exc:  # a drill left Cassandra down: nothing to free, and no test to fail
        print(f"keyspace {s.keyspace} not dropped: {exc}", file=sys.stderr)
    finally:
        cluster.shutdown()


def _servers() -> Iterator[Servers]:
    keyspace = f"qb_test_{uuid.uuid4().hex[:8]}"
    url = os.environ.get("QB_TEST_AMQP_URL")
    hosts = os.environ.get("QB_TEST_CASSANDRA_HOSTS")
    if url or hosts:
        from urllib.parse import urlparse

        p = urlparse(url or "amqp://127.0.0.1:5672/")
        yield Servers(p.hostname or "127.0.0.1", p.port or 5672, (hosts or "127.0.0.1").split(","), 9042, keyspace)
        return
    if _port_open("127.0.0.1", 5672) and _port_open("127.0.0.1", 9042):
        mgmt = int(os.environ.get("QB_RABBITMQ_MGMT_PORT", "15672"))
        yield Servers("127.0.0.1", 5672, ["127.0.0.1"], 9042, keyspace, management_port=mgmt)
        return
    if _docker_available():
        yield from _testcontainers(keyspace)
        return
    pytest.fail(
        "no RabbitMQ on 127.0.0.1:5672 / Cassandra on 127.0.0.1:9042 and no Docker engine: run `make stack-up`",
        pytrace=False,
    )


def _testcontainers(keyspace: str) -> Iterator[Servers]:  # pragma: no cover - needs Docker
    from testcontainers.cassandra import CassandraContainer
    from testcontainers.rabbitmq import RabbitMqContainer

    rabbit = RabbitMqContainer("rabbitmq:3.13.7-management")
    cassandra = CassandraContainer("cassandra:5.0.8")
    rabbit.start()
    cassandra.start()
    # The same least-privilege users as the local stack (deploy/local/rabbitmq.sh).
    names = "(queue-bridge|qb-test-[0-9a-f]{8}|qb-bench-[0-9a-f]{8}(\\.echo)?)"
    own = names + r"(\.(dead|unrouted|results|add|fetch|ack|lifecycle|dead-letter|duty|hints\.p?[0-9a-f]{24}))?"
    perms = {
        BRIDGE_USER: (f"^{own}$", f"^({own}|amq\\.default)$", f"^{own}$"),
        ENGINE_USER: ("^$", f"^{names}$", f"^{names}\\.results$"),
        **{owner: ("^$", f"^{names}$", "^$") for owner in OWNERS},
    }
    for user, (configure, write, read) in perms.items():
        rabbit.exec(["rabbitmqctl", "add_user", user, user])
        rabbit.exec(["rabbitmqctl", "set_permissions", "-p", "/", user, configure, write, read])
    try:
        yield Servers(
            rabbit.get_container_host_ip(),
            int(rabbit.get_exposed_port(5672)),
            [cassandra.get_container_host_ip()],
            int(cassandra.get_exposed_port(9042)),
            keyspace,
            management_port=int(rabbit.get_exposed_port(15672)),
        )
    finally:
        rabbit.stop()
        cassandra.stop()


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keyring.json"
    write_keyring(path, generate_keyring([*OWNERS, ENGINE_USER, "guest"]))
    return path


@pytest.fixture
def names(servers: Servers) -> Iterator[dict[str, str]]:
    """Per-test exchange and queue names, so tests never see each other's messages. Deleted after
    the test: a broker with thousands of leftover durable queues restarts slowly."""
    suffix = uuid.uuid4().hex[:8]
    n = {
        "exchange": f"qb-test-{suffix}",
        "results_exchange": f"qb-test-{suffix}.results",
        "queue_prefix": f"qb-test-{suffix}",
    }
    _SERVICES_MADE.clear()
    yield n
    leftover = _queues_named(servers, n["queue_prefix"])
    asyncio.run(_delete_topology(servers.amqp_url("guest"), n, list(_SERVICES_MADE), leftover))


def _queues_named(servers: Servers, prefix: str) -> list[str]:
    """Every queue of the test's prefix, from the management API: hint queues of services not made
    by ``service_id`` (a test naming 300 services, other owners) were left behind, 7,800 of them
    after a suite, and the exclusive tests' RabbitMQ restarts took 35 s recovering them (a CI run
    timed out). Empty when the API cannot be reached (the known names are deleted all the same)."""
    import base64
    import json
    import re
    import urllib.parse
    import urllib.request

    if servers.management_port is None:
        return []
    pattern = urllib.parse.quote("^" + re.escape(prefix + "."), safe="")
    auth = base64.b64encode(b"guest:guest").decode()
    names: list[str] = []
    page, pages = 1, 1
    while page <= pages:
        url = (
            f"http://{servers.amqp_host}:{servers.management_port}/api/queues/%2F"
            f"?name={pattern}&use_regex=true&page={page}&page_size=500&columns=name"
        )
        request = urllib.request.Request(url, headers={"Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:  # nosec B310: a fixed local URL
                body = json.load(reply)
        except Exception:  # no management plugin, or the broker is down (a test stopped it)
            return names
        names += [q["name"] for q in body.get("items", [])]
        pages = int(body.get("page_count", 1))
        page += 1
    return names


async def _delete_topology(
    url: str, n: dict[str, str], services: Iterable[str] = (), leftover: Iterable[str] = ()
) -> None:
    """The test's queues and exchanges, its services' hint queues among them: each test left a
    few (durable, expiring after the 7-day TTL), thousands by the end of a suite, which every
    RabbitMQ restart of the exclusive tests then recovered (and a developer's broker kept)."""
    import aio_pika

    from bridge.domain.records import QueueKey
    from bridge.transport.hints import hint_queue_name

    try:
        conn = await aio_pika.connect(url, timeout=10)
    except Exception:  # broker down (a test stopped it): nothing to clean
        return
    try:
        prefix, exchange = n["queue_prefix"], n["exchange"]
        own = ("add", "fetch", "ack", "unrouted", "dead-letter", "results", "duty", "lifecycle", "add-retry")
        queues = [f"{prefix}.{q}" for q in own]
        queues += [hint_queue_name(prefix, QueueKey(owner, svc)) for svc in services for owner in OWNERS]
        known = set(queues)
        queues += [name for name in leftover if name not in known]
        exchanges = [exchange, f"{exchange}.dead", f"{exchange}.unrouted", n["results_exchange"]]
        ch = await conn.channel()
        for name in queues:
            try:
                await ch.queue_delete(name)
            except Exception:  # the channel is gone with the error: the next name gets a new one
                ch = await conn.channel()
        for name in exchanges:
            try:
                await ch.exchange_delete(name)
            except Exception:
                ch = await conn.channel()
    finally:
        await conn.close()


@pytest.fixture
def bridge_env(servers: Servers, keyring_path: Path, names: dict[str, str]) -> dict[str, str]:
    """The BRIDGE_* environment of a bridge for this test (used in-process and by subprocesses)."""
    return {
        "BRIDGE_AMQP_URL": servers.amqp_url(BRIDGE_USER),
        "BRIDGE_CASSANDRA_HOSTS": ",".join(servers.cassandra_hosts),
        "BRIDGE_CASSANDRA_PORT": str(servers.cassandra_port),
        "BRIDGE_CASSANDRA_KEYSPACE": servers.keyspace,
        "BRIDGE_KEYRING": str(keyring_path),
        "BRIDGE_EXCHANGE": names["exchange"],
        "BRIDGE_RESULTS_EXCHANGE": names["results_exchange"],
        "BRIDGE_QUEUE_PREFIX": names["queue_prefix"],
        "BRIDGE_RESULTS_QUEUE": names["queue_prefix"] + ".results",
        "BRIDGE_TRUSTED_USERS": ENGINE_USER,
        "BRIDGE_HTTP_PORT": "0",
        "BRIDGE_LOG_FORMAT": "json",
    }


def settings_from(env: dict[str, str], **overrides: Any) -> Settings:
    values: dict[str, Any] = {k.removeprefix("BRIDGE_").lower(): v for k, v in env.items()}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def bridge(bridge_env: dict[str, str]) -> AsyncIterator[Any]:
    from bridge.app import Bridge

    b = Bridge(settings_from(bridge_env))
    await b.start()
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def make_bridge(bridge_env: dict[str, str]) -> AsyncIterator[Callable[..., Any]]:
    """Start extra in-process bridges (same exchange, same keyspace) with setting overrides; one may
    be stopped before the test ends (``make_bridge.stop(b)``), the others are stopped after it."""
    from bridge.app import Bridge

    started: list[Bridge] = []

    async def make(**overrides: Any) -> Bridge:
        b = Bridge(settings_from(bridge_env, **overrides))
        await b.start()
        started.append(b)
        return b

    async def stop(b: Bridge) -> None:
        started.remove(b)
        await b.stop()

    make.stop = stop  # type: ignore[attr-defined]
    yield make
    for b in started:
        await b.stop()


@pytest.fixture
def named_bridge(make_bridge, monkeypatch):  # type: ignore[no-untyped-def]
    """A bridge whose main broker connection carries a unique name (so that only it is closed:
    ``rabbitmqctl close_connection``); its add connection is named after it, `` adds`` added."""

    from bridge.transport import failover

    real = failover.connect_robust
    name = f"qb-test-{uuid.uuid4().hex[:8]}"

    async def connect_robust(urls: list[str], *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        props = dict(kwargs.pop("client_properties", None) or {})
        if props.get("connection_name") == "queue-bridge":
            props["connection_name"] = name
        elif props.get("connection_name") == "queue-bridge adds":
            props["connection_name"] = name + " adds"
        return await real(urls, *args, client_properties=props, **kwargs)

    monkeypatch.setattr(failover, "connect_robust", connect_robust)

    async def make(**overrides: Any) -> tuple[Any, str]:
        return await make_bridge(**overrides), name

    return make


class BridgeProcess:
    """A bridge as a real OS process (for crash and multi-instance tests)."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.cwd = cwd  # another release's tree runs that release (``python -m`` imports from here)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            command = [sys.executable, "-m", "bridge", "run"]
            self.proc = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test that ran bridge processes shows their warnings and errors under its failure."""
    report = yield
    if report.when == "call" and report.failed:
        for path in getattr(item, "bridge_logs", []):
            report.sections.append((f"bridge log {path.name}: warnings and errors", bridge_log_digest(path)))
    return report


def bridge_log_digest(path: Path, limit: int = 40) -> str:
    """A bridge's warnings and errors, each distinct message once with its count (the tail of a
    log that CI does not keep): what a failing multi-process test prints about its bridges."""
    counts: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if '"level": "info"' in line or '"level": "debug"' in line:
                continue
            key = re.sub(r'"timestamp": "[^"]*"', "", line)[:300]
            counts[key] = counts.get(key, 0) + 1
    lines = [f"{n:>5} x {text}" for text, n in counts.items()]
    return "\n".join(lines[-limit:]) or "(no warnings)"


@pytest.fixture
def bridge_processes(
    bridge_env: dict[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BridgeProcess]]:
    procs: list[BridgeProcess] = []
    if not hasattr(request.node, "bridge_logs"):
        request.node.bridge_logs = []  # read by pytest_runtest_makereport when the test fails

    def spawn(*, cwd: Path = ROOT, log_name: str = "bridge", **extra_env: str) -> BridgeProcess:
        p = BridgeProcess({**bridge_env, **extra_env}, tmp_path / f"{log_name}-{len(procs)}.log", cwd)
        p.start()
        procs.append(p)
        request.node.bridge_logs.append(p.log_path)
        return p

    yield spawn
    for p in procs:
        if p.alive():
            p.kill()


@pytest.fixture
async def engine(servers: Servers, names: dict[str, str]) -> AsyncIterator[Engine]:
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"]) as e:
        yield e


@pytest.fixture
def worker_factory(servers: Servers, names: dict[str, str]) -> Callable[..., Any]:
    opened: list[Worker] = []

    async def make(service: str, worker_id: str | None = None, *, user: str = OWNERS[0], **kw: Any) -> Worker:
        w = Worker(
            servers.amqp_url(user),
            service=service,
            worker_id=worker_id or uuid.uuid4().hex[:8],
            exchange=names["exchange"],
            **kw,
        )
        await w.open()
        opened.append(w)
        return w

    make.opened = opened  # type: ignore[attr-defined]
    return make


@pytest.fixture
async def workers(worker_factory: Any) -> AsyncIterator[Callable[..., Any]]:
    """Async wrapper that closes the workers opened by ``worker_factory`` in the test's loop."""
    yield worker_factory
    for w in worker_factory.opened:
        await w.close()


async def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll an (async or sync) condition until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(interval)


async def re_exposed(bridge: Any, owner: str, service: str, task_id: str) -> bool:
    """Whether the recovery scheduler has re-exposed this task (an unclaimed entry of it in the
    recovered lane). ``scheduler.state.recovered`` counts every re-exposure of the keyspace,
    earlier tests' leftovers included, so it cannot tell that this task's came."""
    import uuid as _uuid

    from bridge.domain.records import LANE_RECOVERED, QueueKey
    from bridge.domain.stats import walk_lane

    entries, _ = await walk_lane(bridge.queue.ctx.store, QueueKey(owner, service), LANE_RECOVERED, 100)
    return any(e.task_id == _uuid.UUID(str(task_id)) and not e.claimed for e in entries)


def fail_parked_reads_of(monkeypatch: Any, store: Any, service: str) -> None:
    """Make ``store``'s reads of one service's parked index fail (a partition full of tombstones,
    a read timing out): that queue's stats cannot be read, the others can."""
    from bridge.domain.errors import Unavailable

    real = store.parked

    async def parked(q: Any, limit: int, after: Any = None, **kwargs: Any) -> Any:
        if q.service == service:
            raise Unavailable("cassandra: read timeout (injected)")
        return await real(q, limit, after, **kwargs)

    monkeypatch.setattr(store, "parked", parked)


def own_results(servers: Servers, names: dict[str, str], service: str, **kwargs: Any) -> Any:
    """``results_consumer`` of this test's results exchange, bound to ``service`` only (a result's
    routing key is its service id). Bound with '#', a test also got results of EARLIER tests: every
    test's bridge takes the scheduler duty of the session's shared keyspace and, on its first
    sweep, relays what the others left owed (``outbox``) onto this test's exchange, with their
    own service as routing key; a test reading its first result got another test's (a CI run)."""
    from bridge.client.results import results_consumer

    return results_consumer(
        servers.amqp_url("guest"), exchange=names["results_exchange"], routing_key=service, **kwargs
    )


async def next_result(results: asyncio.Queue[Any], timeout: float, what: str) -> Any:
    """The next result message an engine's consumer (``results_consumer``) receives."""
    return await wait_for(lambda: None if results.empty() else results.get_nowait(), timeout, interval=0.1, what=what)


async def _queue_counts(url: str, queue: str) -> tuple[int, int]:
    """(consumers, messages ready) of a queue, (0, 0) if it does not exist."""
    import aio_pika

    conn = await aio_pika.connect_robust(url)
    try:
        ch = await conn.channel()
        try:
            q = await ch.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0, 0
        return int(q.declaration_result.consumer_count), int(q.declaration_result.message_count)
    finally:
        await conn.close()


async def consumers_on(url: str, queue: str) -> int:
    return (await _queue_counts(url, queue))[0]


async def queue_exists(url: str, name: str) -> bool:
    """Whether the queue exists (a passive declare on a connection of its own)."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        try:
            await ch.declare_queue(name, passive=True)
            return True
        except aio_pika.exceptions.ChannelClosed:
            return False
    finally:
        await conn.close()


async def messages_ready(url: str, queue: str) -> int:
    """Messages waiting in a queue (0 if it does not exist)."""
    return (await _queue_counts(url, queue))[1]


async def wait_bridges(servers: Servers, names: dict[str, str], n: int, timeout: float = 60) -> None:
    """Wait until ``n`` bridges consume this test's fetch queue."""

    async def ready() -> bool:
        return await consumers_on(servers.amqp_url("guest"), f"{names['queue_prefix']}.fetch") >= n

    await wait_for(ready, timeout, interval=0.3, what=f"{n} bridges consuming")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def metric(port: int, name: str) -> float:
    """Sum of the samples of a metric (``name`` may include labels) on a bridge's /metrics."""
    import aiohttp

    async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# The service ids this test process made since the current test's ``names`` were set up: their hint
# queues (durable, expiring only after the task TTL) are deleted with the test's other queues.
_SERVICES_MADE: list[str] = []


def service_id() -> str:
    svc = f"svc-{uuid.uuid4().hex[:10]}"
    _SERVICES_MADE.append(svc)
    return svc


def settle_owed_results(cql: Any, keyspace: str, services: Iterable[str]) -> None:
    """Mark the results these services still owe as published: a test that leaves some owed (no
    queue bound, or sealed with a key only its own key ring had) would have every later duty holder
    of the session retry them, and the idle budgets of later tests count those retries."""
    key = "bucket = %s AND shard = %s AND owner = %s AND service = %s AND task_id = %s AND completion_id = %s"
    for svc in services:
        owed = cql.execute(
            f"SELECT bucket, shard, owner, service, task_id, completion_id FROM {keyspace}.outbox_shards "
            "WHERE service = %s ALLOW FILTERING",
            (svc,),
        )
        for row in list(owed):
            cql.execute(f"UPDATE {keyspace}.outbox_shards SET published = true WHERE {key}", tuple(row.values()))


@pytest.fixture(scope="session")
def cql(servers: Servers) -> Iterator[Any]:
    """A plain synchronous driver session, to look at (or tamper with) the raw rows."""
    from cassandra.cluster import Cluster
    from cassandra.policies import ConstantReconnectionPolicy
    from cassandra.query import dict_factory

    # Fault drills restart Cassandra: reconnect at once, not after the driver's default backoff.
    # Schema events are ignored: this session reads rows, never metadata, and the driver schedules
    # each event (other test processes create and drop keyspaces) with the global `random` on its
    # own thread, which Hypothesis, drawing in the main thread, takes for a strategy using it.
    cluster = Cluster(
        servers.cassandra_hosts,
        port=servers.cassandra_port,
        protocol_version=5,
        reconnection_policy=ConstantReconnectionPolicy(0.5, max_attempts=None),
        schema_event_refresh_window=-1,
    )
    session = cluster.connect()
    session.row_factory = dict_factory
    yield session
    cluster.shutdown()


class DeadLetters:
    """Reads what RabbitMQ dead-lettered for this test's bridge."""

    def __init__(self, url: str, queue: str) -> None:
        self.url = url
        self.queue = queue

    async def drain(self, expect: int, timeout: float = 10.0) -> list[Any]:
        import aio_pika

        got: list[Any] = []
        conn = await aio_pika.connect_robust(self.url)
        try:
            ch = await conn.channel()
            q = await ch.declare_queue(self.queue, passive=True)  # the bridge declared it, bounded
            deadline = time.monotonic() + timeout
            while len(got) < expect and time.monotonic() < deadline:
                msg = await q.get(fail=False, no_ack=True)
                if msg is None:
                    await asyncio.sleep(0.05)
                    continue
                got.append(msg)
        finally:
            await conn.close()
        return got


@pytest.fixture
def dead_letters(servers: Servers, names: dict[str, str]) -> DeadLetters:
    return DeadLetters(servers.amqp_url("guest"), f"{names['queue_prefix']}.dead-letter")


def fail_next_write_ahead(bridge: Any, monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """The bridge's next claim write-ahead fails as an unreachable Cassandra would make it fail
    (``StorageUnavailable``; the real store serves every other call). Set once it has failed."""
    from bridge.storage.errors import StorageUnavailable

    store = bridge.queue.ctx.store
    real = store.write_ahead
    failed = asyncio.Event()

    async def write_ahead(*args: Any, **kwargs: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise StorageUnavailable("cassandra unavailable (injected)")
        await real(*args, **kwargs)

    monkeypatch.setattr(store, "write_ahead", write_ahead)
    return failed


@pytest.fixture(scope="session")
def cassandra_settings(servers: Any) -> Any:
    """The run's keyspace, its schema created once; the driver is the configured one
    (``BRIDGE_CASSANDRA_DRIVER``), as a bridge's."""
    settings = Settings(
        cassandra_hosts=servers.cassandra_hosts,
        cassandra_port=servers.cassandra_port,
        cassandra_keyspace=servers.keyspace,
        keyring=None,
        key_server_url=None,
    )
    create_schema_now(settings)
    return settings


def create_schema_now(settings: Settings, *, driver: str | None = None) -> None:
    """Create the schema of ``settings`` from a fixture, sync code that may run inside a test's
    loop: on a thread with a loop of its own. ``driver``: "datastax" for cassandra-driver, else
    the configured one (``BRIDGE_CASSANDRA_DRIVER``)."""
    from bridge.storage.cassandra import CassandraSession
    from bridge.storage.schema import create_schema
    from bridge.storage.session import open_session

    async def setup() -> None:
        db = CassandraSession(settings) if driver == "datastax" else open_session(settings)
        await db.connect()
        try:
            await create_schema(db, settings)
        finally:
            await db.close()

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, setup()).result()


def requests_counted(bridge: Any, method: str) -> float:
    """``queue_bridge_requests_total`` of one method, all outcomes, on an in-process bridge."""
    return sum(
        s.value
        for m in bridge.metrics.registry.collect()
        if m.name == "queue_bridge_requests"
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("method") == method
    )
