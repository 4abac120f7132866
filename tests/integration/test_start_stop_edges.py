"""Edges of a bridge's start and stop against the real servers: a RabbitMQ node that accepts TCP
and never speaks AMQP (a load balancer with no backend, a stuck node), a stop (SIGTERM) that
arrives while a start attempt is under way, a duty step-up still pending when the stop hands the
duty over, and a gateway port that cannot be bound once the bridge consumes. Each test failed
before its fix (lifecycle review, 2026-12)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from bridge.app import Bridge, StartCancelled
from bridge.config import ConfigError
from bridge.gateway.keys import new_key
from bridge.transport.duty import Duty
from bridge.transport.errors import BrokerUnreachable
from tests.conftest import BRIDGE_USER, OWNERS, consumers_on, service_id, settings_from, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CONNECT_S = 2.0  # BRIDGE_AMQP_CONNECT_TIMEOUT in these tests (ignored by a bridge without the setting)


class Blackhole:
    """A node that accepts TCP connections and never sends a byte."""

    def __init__(self) -> None:
        self.port = 0
        self.conns: list[asyncio.StreamWriter] = []
        self.refusing = False
        self._server: asyncio.Server | None = None

    async def start(self) -> Blackhole:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        self.conns.append(writer)  # held open, never written to

    def drop(self) -> None:
        """Abort every connection held, and each new one from now on (what ends a hung attempt on
        a bridge without the fix, so that a failing test leaves nothing running)."""
        self.refusing = True
        for writer in self.conns:
            writer.transport.abort()
        self.conns.clear()

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
async def hole() -> AsyncIterator[Blackhole]:
    h = await Blackhole().start()
    yield h
    await h.stop()


def amqp_url(port: int) -> str:
    return f"amqp://{BRIDGE_USER}:{BRIDGE_USER}@127.0.0.1:{port}/"


async def dispose(b: Bridge) -> None:
    """What a start that failed (or never ended) may have left open."""
    with contextlib.suppress(Exception):
        await b.transport.close()
    with contextlib.suppress(Exception):
        await b.db.close()
    with contextlib.suppress(Exception):
        await b.ops.stop()


async def ends_within(task: asyncio.Task[Any], seconds: float, unstick: Any) -> tuple[bool, BaseException | None]:
    """(whether ``task`` ended within ``seconds``, its exception); one that did not is unstuck by
    ``unstick()`` and then awaited, so that a failing test leaves nothing running."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        unstick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait({task}, timeout=20)
        if not task.done():
            task.cancel()
        with contextlib.suppress(BaseException):
            await task
        return False, None
    return True, task.exception()


# -- 1. a node that accepts TCP and never speaks AMQP --------------------------------------------------


async def test_a_stop_during_an_attempt_on_a_node_that_never_answers_ends_the_start(bridge_env, hole):
    """The attempt (aio-pika's connect_robust, no timeout) waited for ever for the node's first
    frame, and the stop was looked at only between attempts: a SIGTERM was ignored."""
    b = Bridge(settings_from(bridge_env, amqp_url=amqp_url(hole.port), start_timeout=60, amqp_connect_timeout=30))
    starting = asyncio.create_task(b.start())
    try:
        await wait_for(lambda: hole.conns or starting.done(), 30, what="the attempt on the silent node")
        await asyncio.sleep(1.0)
        stopped = time.monotonic()
        b.request_stop()  # what SIGTERM does
        ended, exc = await ends_within(starting, 10, hole.drop)
        took = time.monotonic() - stopped
        assert ended, f"the start did not end within 10 s of the stop (it ended {took:.1f} s after it, unstuck)"
        assert isinstance(exc, StartCancelled), f"the start ended with {exc!r}, {took:.1f} s after the stop"
        assert took < 3, f"the start ended {took:.1f} s after the stop"
    finally:
        await dispose(b)


async def test_start_timeout_ends_a_start_on_a_node_that_never_answers(bridge_env, hole):
    """BRIDGE_START_TIMEOUT was looked at only between attempts, and the first attempt never ended."""
    b = Bridge(
        settings_from(bridge_env, amqp_url=amqp_url(hole.port), start_timeout=3.0, amqp_connect_timeout=CONNECT_S)
    )
    starting = asyncio.create_task(b.start())
    began = time.monotonic()
    try:
        ended, exc = await ends_within(starting, 15, hole.drop)
        took = time.monotonic() - began
        assert ended, f"the start (BRIDGE_START_TIMEOUT=3) had not ended after {took:.1f} s"
        assert isinstance(exc, BrokerUnreachable), repr(exc)
        assert took < 3.0 + 2 * CONNECT_S + 3, f"the start gave up {took:.1f} s after it began"
    finally:
        await dispose(b)


async def test_a_start_moves_past_a_node_that_never_answers(make_bridge, bridge_env, servers, hole):
    """BRIDGE_AMQP_HOSTS: the first node of the order accepts TCP and never answers; the next one
    was never tried, and the bridge never started."""
    real = f"{servers.amqp_host}:{servers.amqp_port}"
    hosts = ",".join([f"127.0.0.1:{hole.port}", real])
    url = amqp_url(servers.amqp_port)
    order = settings_from(bridge_env, amqp_url=url, amqp_hosts=hosts).amqp_urls  # one order per process
    if f":{hole.port}/" not in order[0]:
        hosts = ",".join([real, f"127.0.0.1:{hole.port}"])  # (the order is the process's, not the list's)
    assert f":{hole.port}/" in settings_from(bridge_env, amqp_url=url, amqp_hosts=hosts).amqp_urls[0]
    starting = asyncio.create_task(make_bridge(amqp_url=url, amqp_hosts=hosts, amqp_connect_timeout=CONNECT_S))
    began = time.monotonic()
    ended, exc = await ends_within(starting, 15, hole.drop)
    took = time.monotonic() - began
    assert ended, f"the bridge had not started on the other node after {took:.1f} s"
    assert exc is None, repr(exc)
    bridge = starting.result()
    assert bridge.transport.connection.node == real
    assert bridge.transport._add_connection.node == real


async def test_a_running_bridge_moves_past_a_node_that_never_answers(make_bridge, bridge_env, servers, hole):
    """Reconnections used the same unlimited attempt: a bridge whose node went away, and whose
    next node accepted TCP and never answered, never reached the third node."""
    proxies = [await TcpProxy(servers.amqp_host, servers.amqp_port).start() for _ in range(3)]
    try:
        url = amqp_url(proxies[0].port)
        hosts = ",".join(f"127.0.0.1:{p.port}" for p in proxies)
        order = settings_from(bridge_env, amqp_url=url, amqp_hosts=hosts).amqp_urls
        by_port = {p.port: p for p in proxies}
        on, silent, spare = (by_port[int(u.rsplit(":", 1)[1].rstrip("/"))] for u in order)
        bridge = await make_bridge(amqp_url=url, amqp_hosts=hosts, amqp_connect_timeout=CONNECT_S)
        conns = (bridge.transport.connection, bridge.transport._add_connection)
        assert all(c.node == f"127.0.0.1:{on.port}" for c in conns)
        silent.target = ("127.0.0.1", hole.port)  # the next node of the order now accepts and never answers
        on.cut()  # the bridge's node goes away
        cut = time.monotonic()
        moved = f"127.0.0.1:{spare.port}"
        try:
            await wait_for(lambda: all(c.node == moved for c in conns), 20, what="both connections on the third node")
        except AssertionError:
            stuck = [c.node for c in conns]
            hole.drop()
            raise AssertionError(f"after {time.monotonic() - cut:.1f} s the connections were at {stuck}") from None
        print(f"\nboth connections on the third node {time.monotonic() - cut:.1f} s after the cut")
    finally:
        hole.drop()
        for p in proxies:
            await p.stop()


@pytest.mark.parametrize("waiting_for", ["RabbitMQ", "Cassandra"])
async def test_sigterm_during_a_start_attempt_exits_0(bridge_processes, hole, waiting_for):
    """SIGTERM while a start attempt is under way (its node accepted TCP and has not answered):
    README promises that a stop ends a waiting start with exit 0. The RabbitMQ attempt never ended
    (SIGTERM was ignored: killed by the orchestrator's SIGKILL); the Cassandra one (bounded by the
    driver's timeout) ended with the attempt's own error and exit 1."""
    env = {"BRIDGE_START_TIMEOUT": "60", "BRIDGE_AMQP_CONNECT_TIMEOUT": "30", "BRIDGE_CASSANDRA_TIMEOUT": "3"}
    if waiting_for == "RabbitMQ":
        env["BRIDGE_AMQP_URL"] = amqp_url(hole.port)
    else:
        env["BRIDGE_CASSANDRA_PORT"] = str(hole.port)
    p = bridge_processes(**env)
    await wait_for(lambda: hole.conns or not p.alive(), 30, what=f"the attempt on the silent {waiting_for} node")
    await asyncio.sleep(1.0)
    sent = time.monotonic()
    try:
        code = await asyncio.to_thread(p.terminate, 10)
    except Exception as exc:  # subprocess.TimeoutExpired
        p.kill()
        raise AssertionError(f"still running 10 s after SIGTERM ({type(exc).__name__})") from None
    took = time.monotonic() - sent
    log = p.log_path.read_text()
    assert code == 0, f"exit {code} {took:.1f} s after SIGTERM\n{log[-1500:]}"
    assert took < 5, f"exited {took:.1f} s after SIGTERM"
    assert "bridge started" not in log


# -- 2. an attempt that succeeds after the stop was requested -------------------------------------------


async def test_a_start_attempt_that_succeeds_after_a_stop_goes_no_further(bridge_env, servers, names):
    """A stop during the Cassandra attempt, which then succeeded: the start went on, connected to
    RabbitMQ, consumed every request queue and competed for the duty, all for a bridge that was
    asked to stop (and run_forever then stopped it, through a shutdown grace)."""
    proxy = await TcpProxy(servers.cassandra_hosts[0], servers.cassandra_port).start()
    b = Bridge(settings_from(bridge_env, cassandra_port=proxy.port, cassandra_timeout=5.0, start_timeout=30))
    try:
        proxy.stall()  # the connection is open, its requests unread: the attempt waits
        starting = asyncio.create_task(b.start())
        await wait_for(lambda: proxy._conns or starting.done(), 15, what="the Cassandra attempt")
        await asyncio.sleep(0.5)
        b.request_stop()
        proxy.resume()  # the attempt now succeeds
        ended, exc = await ends_within(starting, 15, lambda: None)
        assert ended
        guest = servers.amqp_url("guest")
        consuming = {q: await consumers_on(guest, f"{names['queue_prefix']}.{q}") for q in ("fetch", "add", "duty")}
        assert isinstance(exc, StartCancelled), f"the start ended with {exc!r}; consumers: {consuming}"
        assert consuming == {"fetch": 0, "add": 0, "duty": 0}, consuming
        assert b.transport.connection is None
    finally:
        await dispose(b)
        await proxy.stop()


async def test_an_attempt_cut_by_its_connections_close_is_tried_again_not_taken_for_a_stop(bridge_env, monkeypatch):
    """aiormq ends a connection it finds stuck (the handshake done, then nothing) by cancelling the
    calls pending on it: a start attempt so cut was taken for a stop, and the process exited 0
    ("stopped while waiting"), which a `restart: on-failure` policy leaves down. Found by review,
    2026-12-06."""
    b = Bridge(settings_from(bridge_env, start_timeout=30))
    real_start = b.transport.start
    cut: list[int] = []

    async def cut_once() -> None:
        if not cut:
            cut.append(1)
            raise asyncio.CancelledError()  # as aiormq's close(CancelledError) raises it in a pending call
        await real_start()

    monkeypatch.setattr(b.transport, "start", cut_once)
    try:
        await asyncio.wait_for(b.start(), 60)
        assert cut == [1] and not b.stop_requested
    finally:
        await b.stop()


# -- 3. the duty's step-up after the stop's release ----------------------------------------------------


async def test_a_duty_step_up_under_way_does_not_take_the_duty_back_after_release(servers, names):
    """A bridge standing down (Cassandra out of reach) steps up again when it is back: a task
    consumes the duty queue again. Still waiting for its channel when the stop's release() ran,
    it went on after it, consumed the duty queue and took the token: the stopping bridge held the
    duty while its scheduler was already cancelled (no recovery in the fleet until its transport
    closed)."""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    connection = await aio_pika.connect_robust(amqp_url(proxy.port))
    queue = f"{names['queue_prefix']}.duty"
    duty = Duty(queue)
    guest = servers.amqp_url("guest")
    try:
        await duty.attach(connection)
        await wait_for(lambda: duty.held, 10, what="the duty taken")
        duty.follow_storage(up=False)  # Cassandra out of reach: hands the duty over, stops competing
        await wait_for(lambda: not duty.held and duty._channel is not None and duty._channel.is_closed, 10)
        assert await consumers_on(guest, queue) == 0
        proxy.stall()  # the broker is slow: the step-up waits for its channel
        amqp = connection.transport.connection
        channels = len(amqp.channels)
        duty.follow_storage(up=True)  # Cassandra back: the step-up starts
        stepping = duty._standing
        assert stepping is not None
        # Its channel asked for (numbered as it is sent), and no answer through the stalled proxy.
        await wait_for(lambda: len(amqp.channels) > channels, 10, what="the step-up waiting for its channel")
        resumed = asyncio.Event()
        asyncio.get_running_loop().call_later(0.5, lambda: (proxy.resume(), resumed.set()))
        await duty.release()  # the stop hands the duty over (Bridge.stop)
        # The step-up ended (cancelled, or on to its consume once the broker answered): what it
        # left is all there will be.
        await wait_for(lambda: resumed.is_set() and stepping.done(), 15, what="the step-up ended")
        consumers = await consumers_on(guest, queue)
        assert (duty.held, consumers) == (False, 0), f"after release: held={duty.held}, consumers={consumers}"
    finally:
        proxy.resume()
        await connection.close()
        await proxy.stop()


async def test_a_duty_step_up_whose_consume_was_answered_too_late_leaves_no_consumer_behind(
    servers, names, monkeypatch
):
    """A step-up's consume is bounded (3 s). When the broker had registered it and only its
    consume-ok came late, the retry opened another channel and left the first consuming: the
    orphan could become the active consumer and take the token, which nothing on this bridge
    knew of, acked, or released (the next stand-down closed only the newer channel), and no bridge
    held the duty until the broker's consumer timeout, 30 minutes. Found by review. A failed
    attempt's channel is closed now."""
    import aio_pika.queue

    from bridge.transport import duty as duty_module

    connection = await aio_pika.connect_robust(servers.amqp_url("guest"))
    queue = f"{names['queue_prefix']}.duty"
    duty = Duty(queue)
    guest = servers.amqp_url("guest")
    real_consume = aio_pika.queue.Queue.consume
    late = {"left": 0}

    async def consume(self: Any, *args: Any, **kwargs: Any) -> Any:
        tag = await real_consume(self, *args, **kwargs)  # registered by the broker
        if late["left"]:
            late["left"] -= 1
            await asyncio.sleep(duty_module.BROKER_CALL_S + 1)  # its consume-ok "comes" too late
        return tag

    monkeypatch.setattr(aio_pika.queue.Queue, "consume", consume)
    try:
        await duty.attach(connection)
        await wait_for(lambda: duty.held, 10, what="the duty taken")
        duty.follow_storage(up=False)
        await wait_for(lambda: not duty.held and duty._channel is not None and duty._channel.is_closed, 10)
        late["left"] = 1
        duty.follow_storage(up=True)  # the first attempt times out after its consume was registered
        stepping = duty._standing
        assert stepping is not None
        await asyncio.wait_for(stepping, 20)  # the retry consumed and offered a token
        assert late["left"] == 0, "the late consume-ok was played"
        await wait_for(lambda: duty.held, 10, what="the duty taken again")

        async def one_consumer() -> bool:
            return await consumers_on(guest, queue) == 1

        await wait_for(one_consumer, 10, what="one consumer of the duty queue (no orphan)")
        await duty.release()

        async def no_consumer() -> bool:
            return await consumers_on(guest, queue) == 0

        await wait_for(no_consumer, 10, what="no consumer after the release")
    finally:
        await duty.release()
        await connection.close()


# -- 4. the gateway port cannot be bound ------------------------------------------------------------------


async def test_a_gateway_port_that_cannot_be_bound_leaves_nothing_consuming(bridge_env, servers, names, tmp_path: Path):
    """BRIDGE_GATEWAY_PORT was bound after the bridge consumed its request queues and joined the
    duty election; its ConfigError (exit 2) left the transport and the Cassandra session open: in
    process they stayed for ever, and a crash-looping pod took requests at every restart."""
    _, entry = new_key(OWNERS[0], key_id="edge")
    keys = tmp_path / "gateway-keys.json"
    keys.write_text(json.dumps([entry]))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    b = Bridge(settings_from(bridge_env, gateway_port=taken.getsockname()[1], gateway_keys_file=keys))
    try:
        with pytest.raises(ConfigError, match="BRIDGE_GATEWAY_PORT"):
            await b.start()
        guest = servers.amqp_url("guest")
        consuming = {q: await consumers_on(guest, f"{names['queue_prefix']}.{q}") for q in ("fetch", "add", "duty")}
        assert consuming == {"fetch": 0, "add": 0, "duty": 0}, consuming
        assert b.transport.connection is None
        assert not b.db.any_host_up()
    finally:
        taken.close()
        await dispose(b)


async def test_a_second_sigterm_ends_a_stop_that_waits(bridge_processes, hole):
    """The first SIGTERM stops gracefully; here the stop waits on a Cassandra attempt the driver
    only ends at its timeout (10 s). A second SIGTERM set the same flag again: only SIGKILL ended a
    stop that hung. It now exits at once, saying so. Found by the lifecycle review, 2026-12-05."""
    import os
    import signal

    p = bridge_processes(BRIDGE_CASSANDRA_PORT=str(hole.port), BRIDGE_CASSANDRA_TIMEOUT="10", BRIDGE_START_TIMEOUT="60")
    await wait_for(lambda: hole.conns or not p.alive(), 30, what="the attempt on the silent Cassandra node")
    assert p.proc is not None
    os.kill(p.proc.pid, signal.SIGTERM)
    # Two SIGTERMs pending at once are one to the kernel: the second goes once the first is taken
    # (its handler only sets a flag; nothing to wait on from outside), half a second later.
    await asyncio.sleep(0.5)
    sent = time.monotonic()
    os.kill(p.proc.pid, signal.SIGTERM)
    try:
        code = await asyncio.to_thread(p.proc.wait, 15)
    finally:
        hole.drop()
    took = time.monotonic() - sent
    log = p.log_path.read_text()
    assert took < 3, f"exited {took:.1f} s after the second SIGTERM (exit {code})\n{log[-800:]}"
    assert code == 128 + signal.SIGTERM, f"exit {code}"
    assert "second SIGTERM" in log


async def test_the_results_consumer_gives_up_a_node_that_never_answers(hole):
    """The bundled results consumer connected with no timeout: a node that accepts TCP and never
    speaks AMQP held it for ever. Found by the lifecycle fix's review, 2026-12-05."""
    from bridge.client.rpc import results_consumer

    async def consume() -> None:
        async with results_consumer(amqp_url(hole.port)):  # as called: its default timeout (10 s)
            pass

    task = asyncio.create_task(consume())
    ended, exc = await ends_within(task, 15, hole.drop)
    assert ended, "still connecting to a node that never answers"
    assert isinstance(exc, TimeoutError | ConnectionError | aio_pika.exceptions.AMQPConnectionError), repr(exc)


@pytest.mark.parametrize("stuck", ["pause", "release", "close"])
async def test_a_stop_whose_broker_step_never_ends_still_ends(make_bridge, engine, stuck):
    """A broker step of the stop (the consumers' pause, the duty's release, the connections'
    close) whose cancellation itself waits: aiormq's cancelled RPC queues a Channel.Close on its
    connection's writer without a bound, and a connection that cannot write (an alarm, a dead link,
    its writer queue full) never takes it. `wait_for` waited for that cancellation: the stop never
    ended, the duty stayed held and the consumers were not paused (found by review, 2026-12-07).
    The step is left behind; the stop goes on, and the counts are flushed before it."""
    b = await make_bridge(shutdown_grace=2.0)
    target = {"pause": b.transport, "release": b.duty, "close": b.transport}[stuck]
    real = getattr(target, stuck)
    unblock = asyncio.Event()

    async def never_ends(*args: Any, **kwargs: Any) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await unblock.wait()  # as aiormq's put on a full writer queue
            raise

    setattr(target, stuck, never_ends)
    await engine.add(service_id(), "counted")
    began = time.monotonic()
    try:
        done, _ = await asyncio.wait([asyncio.ensure_future(b.stop())], timeout=2.0 + 8.0)
        assert done, f"stop() still running {time.monotonic() - began:.1f}s after it began ({stuck} stuck)"
        assert not b.counts.pending, "queue-count deltas left unwritten"
    finally:
        unblock.set()
        setattr(target, stuck, real)
        if stuck == "close":
            await b.transport.close()
