"""A node of a 3-node RabbitMQ cluster killed -9 under load, the bridge's queues quorum queues.

deploy/local/rabbitmq-cluster.sh runs the cluster (nodes qbc1-3@localhost on ports 5681-5683;
`make test` starts it before the ``cluster`` tests and stops it after). The first bridge connects
to node 1 and declares the queues, so their quorum leaders are there; a second bridge connects to
node 2, the engine to node 2, the workers to node 3. Node 1 is killed -9 while tasks are added and
worked: the queues elect leaders on the other nodes and the second bridge goes on serving. With
classic queues (on node 1) every request, add and result would wait for node 1 to come back."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import pytest

from bridge.client import Engine, Worker
from bridge.client.errors import TransportError, UnavailableError
from tests.conftest import BRIDGE_USER, ENGINE_USER, OWNERS, _port_open, service_id
from tests.integration.test_quorum_queues import take_results

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]
PORTS = (5681, 5682, 5683)
TASKS = 240
KILL_AFTER = 80  # tasks added before node 1 is killed


def node_url(user: str, node: int) -> str:
    return f"amqp://{user}:{user}@127.0.0.1:{PORTS[node - 1]}/"


def cluster_cmd(*args: str) -> None:
    subprocess.run(["bash", "deploy/local/rabbitmq-cluster.sh", *args], check=True, timeout=120, capture_output=True)


@pytest.fixture
def rabbit_cluster() -> Iterator[None]:
    """The cluster, every node up; a node a test killed is started again after it (it rejoins)."""
    down = [p for p in PORTS if not _port_open("127.0.0.1", p)]
    if down:
        pytest.fail(
            f"the 3-node RabbitMQ cluster is not up (ports {down} do not answer): run "
            "`bash deploy/local/rabbitmq-cluster.sh up` first (`make test` does)",
            pytrace=False,
        )
    yield
    for node, port in enumerate(PORTS, start=1):
        if not _port_open("127.0.0.1", port):
            cluster_cmd("start", str(node))


async def results_of(url: str, queue: str, tasks: set[str], timeout: float) -> dict[str, Any]:
    """The results (by task id) taken off ``queue`` until every one of ``tasks`` has one, or timeout."""
    results: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while tasks - set(results) and time.monotonic() < deadline:
        # Each take on a new connection: a basic.get on a quorum queue whose leader's node was just
        # lost may be refused (INTERNAL_ERROR ... nodedown) while the queue's record names it.
        with contextlib.suppress(aio_pika.exceptions.AMQPError, ConnectionError):
            for r in await take_results(url, queue):
                results[r["taskId"]] = r["result"]
        await asyncio.sleep(0.2)
    return results


@dataclass
class Retrying:
    """Adds and fetch-and-acks of one service that retry what a node's loss leaves unanswered."""

    svc: str
    added: set[str] = field(default_factory=set)
    acked: set[str] = field(default_factory=set)
    missed: dict[str, int] = field(default_factory=lambda: {"add": 0, "fetch": 0, "ack": 0})

    async def add(self, engine: Engine, n: int) -> None:
        while True:  # the same message id: a retried add is the same task
            try:
                self.added.add(await engine.add(self.svc, {"n": n}, message_id=f"{self.svc}-{n}"))
                return
            except (TransportError, UnavailableError):
                self.missed["add"] += 1

    async def work(self, worker: Worker, tasks: int) -> None:
        while len(self.acked) < tasks:
            try:
                task = await worker.fetch(30_000, wait_ms=1_000)
            except (TransportError, UnavailableError):
                self.missed["fetch"] += 1
                continue
            if task is not None and await self._ack(task):
                self.acked.add(task.id)

    async def _ack(self, task: Any) -> bool:
        """An ack whose reply was lost may have applied: sent again (idempotent) until answered,
        as ``Worker.run`` does. Given up, the task was completed unseen and never fetched again."""
        while True:
            try:
                return bool(await task.ack(1))
            except (TransportError, UnavailableError):
                self.missed["ack"] += 1

    def __str__(self) -> str:
        return f"{len(self.added)} tasks added and {len(self.acked)} acked (requests without a reply: {self.missed})"


@pytest.mark.cluster
@pytest.mark.timeout(240)
async def test_the_node_leading_the_quorum_queues_killed_under_load_loses_nothing(make_bridge, names, rabbit_cluster):
    await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 1))  # declares: leaders on node 1
    await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 2))
    svc = service_id()
    ex = names["exchange"]
    added: dict[str, int] = {}  # task id -> n
    acked: set[str] = set()
    adding_done = asyncio.Event()
    killed_at: list[float] = []
    retries = {"add": 0, "worker": 0}

    async def add_all(engine: Engine) -> None:
        for n in range(TASKS):
            if n == KILL_AFTER:
                await asyncio.to_thread(cluster_cmd, "kill", "1")
                killed_at.append(time.monotonic())
            for _attempt in range(20):  # the same message id: a retried add is the same task
                try:
                    task_id = await engine.add(svc, {"n": n}, token={"n": n}, message_id=f"{svc}-{n}")
                    break
                except (TransportError, UnavailableError):
                    retries["add"] += 1
                    await asyncio.sleep(0.5)
            else:
                raise AssertionError(f"add {n} never answered")
            added[task_id] = n
            await asyncio.sleep(0.02)
        adding_done.set()

    async def work(k: int) -> None:
        async with Worker(node_url(OWNER, 3), service=svc, worker_id=f"w{k}", exchange=ex, timeout=5.0) as w:
            while not (adding_done.is_set() and set(added) <= acked):
                try:
                    task = await w.fetch(10_000, wait_ms=1_000)
                    if task is not None and await task.ack({"n": task.value["n"]}):
                        acked.add(task.id)
                except (TransportError, UnavailableError):
                    retries["worker"] += 1  # its next fetch (not fresh) gets back a task it held
                    await asyncio.sleep(0.2)

    async with Engine(node_url(ENGINE_USER, 2), owner=OWNER, exchange=ex, timeout=5.0) as engine:
        try:
            async with asyncio.timeout(150):
                await asyncio.gather(add_all(engine), *(work(k) for k in range(4)))
        except TimeoutError:
            missing = sorted(added[t] for t in set(added) - acked)
            raise AssertionError(
                f"node 1 killed: {len(added)} of {TASKS} tasks added in time, {len(missing)} of them never acked "
                f"({missing[:20]}); retries {retries}"
            ) from None
    assert len(added) == TASKS and killed_at

    results = await results_of(node_url("guest", 2), names["queue_prefix"] + ".results", set(added), 30)
    missing = sorted(added[t] for t in set(added) - set(results))
    assert not missing, f"{len(missing)} results never reached the engine's quorum queue: {missing[:20]}"
    assert all(results[t] == {"n": n} for t, n in added.items())
    print(f"\nnode 1 killed after {KILL_AFTER} adds; {TASKS} tasks acked, results all delivered; retries {retries}")


@pytest.mark.cluster
@pytest.mark.timeout(240)
async def test_long_polls_on_a_hint_queue_lost_with_its_node_neither_spin_nor_wait_for_reconciliation(
    make_bridge, names, rabbit_cluster
):
    """Hint queues are classic (they need two priorities): the one of a service lives on the node
    of the bridge that declared it. With that node down, every use of it is refused (404): its
    hints are lost, and a waiting fetch cannot wait on it. Workers long-poll meanwhile and tasks
    keep coming: each must be handed out within seconds (its hint is lost: a scan must find it),
    and a long-poll must not come back at once to be sent again,
    a spin of the worker, its bridge and the broker for as long as the node is down. Before the
    fix each worker sent about 50 fetches a second (each answered null at once)."""
    from bridge.domain.models import FetchRequest

    b1 = await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 1))
    await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 2))
    svc = service_id()
    ex = names["exchange"]
    # The service's hint queue, declared through node 1 (its home).
    warm = FetchRequest.model_validate({"serviceId": svc, "workerId": "warm"})
    assert await b1.queue.fetch(OWNER, warm) is None

    handed: dict[int, float] = {}
    fetches = [0, 0]  # sent since node 1 was killed
    killed = asyncio.Event()
    stop, all_handed = asyncio.Event(), asyncio.Event()

    async def work(k: int) -> None:
        async with Worker(node_url(OWNER, 3), service=svc, worker_id=f"w{k}", exchange=ex, timeout=10.0) as w:
            while not stop.is_set():
                fetches[k] += killed.is_set()
                try:
                    task = await w.fetch(30_000, wait_ms=5_000)
                except (TransportError, UnavailableError):
                    await asyncio.sleep(0.2)
                    continue
                if task is not None:
                    handed[task.value["n"]] = time.monotonic()
                    if len(handed) == 12:
                        all_handed.set()
                    await task.ack(1)

    added: dict[int, float] = {}
    async with Engine(node_url(ENGINE_USER, 2), owner=OWNER, exchange=ex, timeout=10.0) as engine:
        workers = [asyncio.create_task(work(k)) for k in range(2)]
        try:
            await asyncio.sleep(2)  # load shape: the workers long-poll the empty queue
            await asyncio.to_thread(cluster_cmd, "kill", "1")
            killed.set()
            started = time.monotonic()
            await asyncio.sleep(3)  # load shape: they go on long-polling with the hint queue gone
            for n in range(12):
                await engine.add(svc, {"n": n})
                added[n] = time.monotonic()
                await asyncio.sleep(0.5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_handed.wait(), 40)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            await asyncio.gather(*workers, return_exceptions=True)
    waits = sorted(handed[n] - added[n] for n in handed)
    rate = sum(fetches) / elapsed / 2
    print(f"\nhanded {len(handed)}/12, waits {[round(x, 2) for x in waits]} s, {rate:.1f} fetches/s per worker")
    assert len(handed) == 12, f"{12 - len(handed)} of 12 tasks never handed out in 40 s ({rate:.0f} fetches/s)"
    assert waits[-1] < 5.0, f"a task waited {waits[-1]:.1f} s for a long-polling worker (reconciliation's pace)"
    assert rate < 5.0, f"each worker sent {rate:.0f} fetches a second: its long-polls came back at once"


# -- channels opened while the quorum queues elect new leaders --------------------------------------------------
# RabbitMQ before 3.11.x/3.12.x (here 3.10): a channel whose first publish to a quorum queue comes
# while that queue elects a new leader keeps sending to the lost leader (rabbitmq-server#9208): its
# publishes are dropped (without confirms) or nacked (with) for as long as that node is down, while
# a channel opened a few seconds later is served. Measured with aio-pika alone before these tests:
# 0 of 300 publishes arrived in 60 s from channels that first published right after the kill,
# every one from channels opened 5 s after it.


@pytest.mark.cluster
@pytest.mark.timeout(180)
async def test_an_engine_and_a_worker_connecting_while_the_queues_elect_new_leaders_are_served(
    make_bridge, names, rabbit_cluster
):
    """Before the fix their retries went on the same channel: no add and no fetch was ever
    answered while node 1 stayed down. Now a request without a reply sends the client's next one
    on a new connection."""
    await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 1))  # declares: leaders on node 1
    await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 2))
    svc, ex = service_id(), names["exchange"]
    traffic = Retrying(svc)
    await asyncio.to_thread(cluster_cmd, "kill", "1")
    killed = time.monotonic()
    async with (
        Engine(node_url(ENGINE_USER, 3), owner=OWNER, exchange=ex, timeout=2.0) as engine,
        Worker(node_url(OWNER, 3), service=svc, worker_id="w", exchange=ex, timeout=2.0) as worker,
    ):
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(*(traffic.add(engine, n) for n in range(3)), traffic.work(worker, 3))
        except TimeoutError:
            raise AssertionError(f"node 1 down: {traffic} in 60 s") from None
    assert traffic.acked == traffic.added
    print(f"\nserved {time.monotonic() - killed:.1f} s after the kill; requests without a reply: {traffic.missed}")


@pytest.mark.cluster
@pytest.mark.timeout(180)
async def test_a_bridge_whose_first_result_comes_while_the_results_queue_elects_a_leader_delivers_it(
    make_bridge, names, rabbit_cluster
):
    """The bridge on node 2 publishes no result before node 1 (the results queue's leader) is
    killed: its results channel's first publish comes during the election. Before the fix every
    publish on it was nacked, and the results stayed pending for as long as node 1 was down. Now
    a nacked channel is opened afresh."""
    from bridge.domain.models import AckRequest, AddCommand, FetchRequest, parse

    await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 1))  # declares: leaders on node 1
    b2 = await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 2))
    svc = service_id()
    ids: set[str] = set()
    for n in range(3):
        add = parse(AddCommand, {"serviceId": svc, "value": {"n": n}, "token": {"n": n}})
        ids.add(await b2.queue.add(OWNER, add, message_id=None, traceparent=None))
    await asyncio.to_thread(cluster_cmd, "kill", "1")
    killed = time.monotonic()
    for _ in range(3):
        got = await b2.queue.fetch(OWNER, parse(FetchRequest, {"serviceId": svc, "workerId": "w"}))
        assert got is not None
        ack = AckRequest.model_validate(
            {"serviceId": svc, "workerId": "w", "taskId": str(got.task_id), "epoch": got.epoch, "result": 1}
        )
        assert await b2.queue.ack(OWNER, ack) is True
    results = await results_of(node_url("guest", 2), names["queue_prefix"] + ".results", ids, 40)
    missing = ids - set(results)
    assert not missing, f"{len(missing)} of 3 results never reached the results queue in 40 s with node 1 down"
    renewals = b2.transport.results_renewal.renewals
    took = time.monotonic() - killed
    print(f"\n3 results delivered {took:.1f} s after the kill; results channel renewed {renewals}x")


@pytest.mark.cluster
@pytest.mark.timeout(180)
async def test_the_only_bridge_whose_node_is_killed_serves_through_another_node_of_its_hosts(
    make_bridge, names, rabbit_cluster
):
    """BRIDGE_AMQP_HOSTS lists the three nodes. Before it, a bridge reconnected to its one URL only:
    the fleet's only bridge, its node killed, answered nothing until that node came back."""
    hosts = ",".join(f"127.0.0.1:{port}" for port in PORTS)
    bridge = await make_bridge(queue_type="quorum", amqp_url=node_url(BRIDGE_USER, 1), amqp_hosts=hosts)
    node = PORTS.index(bridge.transport.connection.url.port) + 1  # the node it connected to
    alive = 3 if node != 3 else 2
    svc, ex = service_id(), names["exchange"]
    traffic = Retrying(svc)
    async with Engine(node_url(ENGINE_USER, alive), owner=OWNER, exchange=ex, timeout=2.0) as engine:
        for n in range(3):
            await traffic.add(engine, n)
        await asyncio.to_thread(cluster_cmd, "kill", str(node))
        killed = time.monotonic()
        async with Worker(node_url(OWNER, alive), service=svc, worker_id="w", exchange=ex, timeout=2.0) as worker:
            try:
                async with asyncio.timeout(60):
                    await asyncio.gather(*(traffic.add(engine, n) for n in range(3, 6)), traffic.work(worker, 6))
            except TimeoutError:
                raise AssertionError(f"node {node} (the bridge's) down: {traffic} in 60 s") from None
    assert traffic.acked == traffic.added and len(traffic.added) == 6
    moved_to = PORTS.index(bridge.transport.connection.url.port) + 1
    assert moved_to != node
    print(
        f"\nthe bridge moved from node {node} to node {moved_to}; all served "
        f"{time.monotonic() - killed:.1f} s after the kill; requests without a reply: {traffic.missed}"
    )


@pytest.mark.cluster
@pytest.mark.timeout(180)
async def test_the_node_results_consumer_waits_for_its_classic_queues_home_node(rabbit_cluster):
    """``examples/node/results.js`` on a classic results queue whose home node is down: RabbitMQ
    refuses the consume with 404 ("home node ... is down or inaccessible"), which the script took
    for a misconfiguration (no such queue) and ended (exit 1): the engine's results were not read
    again until someone restarted it. It now waits for the node, as for a lost connection, and
    reads the results once the node is back."""
    import shutil
    import uuid

    import aio_pika

    from tests.integration.test_node_client import NodeScript, _result

    node_bin = shutil.which("node")
    assert node_bin is not None, "node is not installed: run `bash deploy/local/node.sh` (make test does)"
    queue = f"qb-test-results-{uuid.uuid4().hex[:8]}"
    conn = await aio_pika.connect(node_url("guest", 1))  # a classic queue's home: the node declaring it
    async with conn:
        await (await conn.channel()).declare_queue(queue, durable=True)
    await asyncio.to_thread(cluster_cmd, "kill", "1")
    env = {
        "QB_AMQP_URL": node_url("guest", 2),
        "QB_AMQP_HOSTS": "127.0.0.1:5682,127.0.0.1:5683",
        "QB_RESULTS_QUEUE": queue,
        "QB_BRIDGE_USER": "guest",  # the results below are published as guest
        "QB_OWNER": "",
        "QB_SERVICE": "",
        "QB_EXPECT": "1",
        "QB_TIMEOUT_MS": "120000",
        "QB_RETRY_BASE_MS": "200",
    }
    results = await NodeScript(node_bin, "results.js", env).start()
    try:
        refused = await results.event("reconnecting", timeout=30)
        assert "down or inaccessible" in refused["message"], results.events
        assert results.proc is not None and results.proc.returncode is None, (results.events, results.stderr)
        await asyncio.to_thread(cluster_cmd, "start", "1")
        conn = await aio_pika.connect(node_url("guest", 2))
        async with conn:
            msg = aio_pika.Message(
                _result("t1", "svc"), message_id="t1:c1", headers={"x-owner": OWNER}, type="result", user_id="guest"
            )
            await (await conn.channel()).default_exchange.publish(msg, routing_key=queue)
        assert await results.wait(60) == 0, (results.events, results.stderr)
    finally:
        await results.stop()
        with contextlib.suppress(Exception):
            conn = await aio_pika.connect(node_url("guest", 2))
            async with conn:
                await (await conn.channel()).queue_delete(queue)
    assert [r["messageId"] for r in results.all("result")] == ["t1:c1"], results.events
