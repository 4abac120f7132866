"""The Python client and the CLI when things go wrong: lost connections, cancelled callers, a
client closed while its calls are under way, a missing exchange, handlers whose exceptions or
results cannot be reported, bad arguments (real servers)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import subprocess
import traceback
import uuid
from typing import Any

import pytest

from bridge.client import ConnectionLost, Engine, TransportError, Worker
from tests.conftest import ENGINE_USER, OWNERS, service_id, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _close_connection_named(name: str) -> None:
    """The broker closes the client connection whose client-provided name is ``name``."""
    conns = _broker_connections(name)
    if not conns:
        raise AssertionError(f"no broker connection named {name}")
    subprocess.run(["rabbitmqctl", "-q", "close_connection", conns[0], "hunt"], timeout=60, check=True)


def _broker_connections(name: str) -> list[str]:
    """Pids of the broker's client connections whose client-provided name is ``name``."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return [line.split("\t", 1)[0] for line in out.splitlines() if f'"{name}"' in line]


def named_engine(servers: Any, names: dict[str, str]) -> tuple[Engine, str]:
    """An Engine (not opened) whose broker connections carry a name of their own, so that the
    broker can list and close them."""
    conn_name = f"resilience-eng-{uuid.uuid4().hex[:8]}"
    url = servers.amqp_url(ENGINE_USER) + f"?name={conn_name}"
    return Engine(url, owner=OWNERS[0], exchange=names["exchange"]), conn_name


async def named_worker(servers: Any, names: dict[str, str], svc: str) -> tuple[Worker, str]:
    """Worker ``w1`` (60 s leases) on a connection named so that the broker can close it."""
    conn_name = f"resilience-{uuid.uuid4().hex[:8]}"
    w = Worker(
        servers.amqp_url(OWNERS[0]) + f"?name={conn_name}",
        service=svc,
        worker_id="w1",
        exchange=names["exchange"],
        time_to_recover_ms=60_000,
    )
    await w.open()
    return w, conn_name


def _waiters(bridge) -> int:  # type: ignore[no-untyped-def]
    return sum(len(x.waiters) for x in bridge.hints._waiting.values())


async def test_a_long_poll_whose_connection_closed_leaves_the_next_task_to_the_new_fetch(
    bridge, engine, servers, names
):
    """A worker's long-poll is waiting at the bridge when the broker closes the worker's
    connection: the client fails it (ConnectionLost) and polls again, as ``Worker._poll`` does.
    The orphaned fetch still waits at the bridge as the queue's oldest waiter and takes the next
    task's hint first. It claimed the task for this worker once, its reply going nowhere (the
    client then fetched without ``fresh`` until the lost fetch's deadline to get it back: see
    test_fetch_races for an orphan whose connection lives). Now the bridge asks the broker whether
    the orphan's reply-to still exists before it claims: it does not, so the hint goes to the new
    fetch, which gets the task at once, and the orphan claims nothing."""
    svc = service_id()
    w, conn_name = await named_worker(servers, names, svc)
    try:
        first = asyncio.create_task(w.fetch(wait_ms=8_000))
        await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the first long-poll waiting")
        await asyncio.to_thread(_close_connection_named, conn_name)
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(first, 10.0)

        # The worker polls again (not ``fresh``: the first fetch got no answer).
        second = asyncio.create_task(w.fetch(wait_ms=4_000))
        await wait_for(lambda: _waiters(bridge) == 2, 10.0, what="the orphan and the new long-poll waiting")
        task_id = await engine.add(svc, {"n": 1})
        got = await asyncio.wait_for(second, 10.0)
        assert got is not None and got.id == task_id and got.deliveries == 1, got
        assert bridge.metrics.counter_value("long_polls_abandoned") >= 1
        assert await got.ack("done") is True
    finally:
        await w.close()


async def test_a_call_cancelled_while_its_request_is_being_published_leaves_no_reply_future(bridge, engine):
    """``RpcClient.publish`` registers the reply future in ``_pending`` before it awaits
    ``exchange.publish``. It took it out again only on AMQP/OS/Runtime errors: a caller cancelled
    there (``asyncio.wait_for`` around ``engine.add`` under load, a task group torn down) left
    its future in ``_pending`` for the life of the connection (``call_raw``'s cleanup never
    runs). Now any way out of the publish takes it out. Here 20 adds of ~900 KB are sent at once
    on one connection (they queue on the channel's publish lock) and cancelled a moment later."""
    svc = service_id()
    value = "x" * 900_000
    calls = [asyncio.create_task(engine.add(svc, value)) for _ in range(20)]
    await asyncio.sleep(0)  # let them start publishing
    await wait_for(lambda: engine._pending, 5.0, interval=0.001, what="a request being published")
    for c in calls:
        c.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    # A later request on the same connection is answered normally...
    assert await engine.add(svc, {"after": True})
    # ...and nothing is awaited any more: no future should be left behind.
    assert len(engine._pending) == 0, f"{len(engine._pending)} reply futures of cancelled calls left in _pending"


async def test_close_while_an_add_reconnects_leaves_no_connection_open_and_sends_nothing(bridge, servers, names):
    """An engine whose connection the broker dropped (a RabbitMQ restart, a failover) reconnects
    on its next call. ``close()`` (a shutdown) while that call was connecting returned at once: it
    neither took the connect lock nor waited for the connect under way, which then stored its new
    connection on the closed client, published the add and left the connection (with its reply
    consumer) open for the life of the object, nothing closing it any more. ``close()`` now waits
    for the connect under way, and the call, seeing the client closed, closes the connection it
    made and raises ConnectionLost (not sent)."""
    e, conn_name = named_engine(servers, names)
    svc = service_id()
    await e.open()
    await e.add(svc, {"n": 0})
    await asyncio.to_thread(_close_connection_named, conn_name)
    await wait_for(lambda: e.channel is None or e.channel.is_closed, 10.0, what="the client seeing the loss")
    await wait_for(lambda: not _broker_connections(conn_name), 10.0, what="the old connection gone")

    call = asyncio.create_task(e.add(svc, {"n": 1}))  # reconnects
    await wait_for(lambda: e._connecting.locked(), 5.0, interval=0.0005, what="the add reconnecting")
    await e.close()  # the engine shuts down
    outcome = (await asyncio.gather(call, return_exceptions=True))[0]

    left = await asyncio.to_thread(_broker_connections, conn_name)
    if left:  # close what the engine leaked (a second close() reaches it), then report it
        e._closed = False
        await e.close()
    assert not left, (
        f"close() returned, yet the engine still has {len(left)} connection(s) open at the broker "
        f"(the add reconnecting at the time then ran anyway: {outcome!r}; client connection object: "
        f"{e.connection!r})"
    )
    assert isinstance(outcome, ConnectionLost) and not outcome.sent, f"the add under way ended with {outcome!r}"


async def test_close_with_adds_being_published_raises_only_transport_errors(bridge, servers, names):
    """``close()`` while adds are being published: every call must end with a reply or a
    ``TransportError`` (what the client promises when no reply can come, and what callers catch
    to retry). The add whose frames were being written when the connection closed got aiormq's
    bare ``Exception()`` out of ``Engine.add``: ``publish`` mapped only AMQP, OS and runtime
    errors to ConnectionLost; it now maps any Exception. Whether aiormq fails that write with
    ``Exception()`` or ``ConnectionClosed`` is a race inside it (about one close in six here), so
    the close is repeated until a round shows it (40 at most)."""
    loop = asyncio.get_running_loop()
    # Not this test's subject (see the next test): asyncio's "Future exception was never retrieved".
    loop.set_exception_handler(lambda _loop, _ctx: None)
    foreign: list[str] = []
    try:
        e, _ = named_engine(servers, names)
        svc = service_id()
        for _ in range(40):
            await e.open()
            calls = [asyncio.create_task(e.add(svc, "x" * 900_000)) for _ in range(20)]
            await wait_for(lambda: e._pending, 5.0, interval=0.0005, what="adds being published")
            await e.close()
            for r in await asyncio.gather(*calls, return_exceptions=True):
                if isinstance(r, BaseException) and not isinstance(r, TransportError):
                    foreign.append("".join(traceback.format_exception(r)))
            del calls, r
            if foreign:
                break
        gc.collect()  # the futures those rounds dropped are collected while their errors are silenced
    finally:
        loop.set_exception_handler(None)
    assert not foreign, f"{len(foreign)} add(s) raised a non-TransportError when closed mid-publish:\n{foreign[0]}"


async def test_close_with_adds_being_published_logs_no_unretrieved_future_errors(bridge, servers, names):
    """``_on_lost`` sets ConnectionLost on every registered reply future, including those of
    calls still waiting to publish (queued on the channel). Those calls raised their own
    ``ConnectionLost("request not sent")`` from ``publish`` and dropped their future without
    retrieving its exception, so asyncio logged "Future exception was never retrieved" (an
    ERROR with a traceback) once per call, for an outcome already reported to the caller.
    ``publish`` now reads the exception of (or cancels) the future of a request it did not send."""
    loop = asyncio.get_running_loop()
    seen: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: seen.append(f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    try:
        e, _ = named_engine(servers, names)
        svc = service_id()
        await e.open()
        calls = [asyncio.create_task(e.add(svc, "x" * 200_000)) for _ in range(20)]
        await wait_for(lambda: e._pending, 5.0, interval=0.0005, what="adds being published")
        await e.close()
        await asyncio.gather(*calls, return_exceptions=True)
        del calls
        gc.collect()
        await asyncio.sleep(0)
        gc.collect()
    finally:
        loop.set_exception_handler(None)
    assert not seen, f"{len(seen)} asyncio error(s) logged, e.g. {seen[0]}"


class _CountingWorker(Worker):
    """A Worker that counts the fetches its loop sends (instrumentation only)."""

    fetches = 0

    async def fetch(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.fetches += 1
        return await super().fetch(*args, **kwargs)


async def test_the_worker_loop_pauses_longer_each_time_its_fetch_gets_no_answer(servers, names):
    """When every fetch fails fast (the broker refuses the publish: here the exchange does not
    exist, so it closes the channel; or RabbitMQ is down and connecting is refused), the loop
    used to open a new connection and send a new request as fast as it could (233-373 fetches in
    2 s), burning a CPU and hammering the broker. It now pauses poll_interval, doubling each time
    in a row up to 5 s, and logs a warning."""
    w = _CountingWorker(
        servers.amqp_url(OWNERS[0]),
        service=service_id(),
        worker_id="w1",
        exchange=f"{names['exchange']}-nobody",  # no bridge declared it
        poll_interval=0.2,
        wait_ms=0,
    )
    await w.open()
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        return None

    runner = asyncio.create_task(w.run(handler, stop=stop))
    try:
        await asyncio.sleep(2.0)  # a measured interval: how many fetches the loop sends in 2 s
    finally:
        stop.set()
        await asyncio.wait_for(runner, 15.0)
        await w.close()
    # poll_interval 0.2 s: about 10 fetches in 2 s would be the loop's own pace.
    assert w.fetches <= 20, f"{w.fetches} fetches (each on a new connection) in 2 s: the loop does not pause"
    assert w.fetches >= 2, "the loop gave up instead of trying again"


async def test_a_request_without_a_reply_sends_the_next_one_on_a_new_connection(servers, names):
    """No reply in time may mean a channel RabbitMQ routes nothing from any more: on RabbitMQ 3.10
    a channel whose first publish to a quorum queue came while that queue elected a new leader
    kept sending to the lost one, and every request retried on it was lost for as long as that
    node stayed down (test_rabbitmq_cluster.py shows it on a 3-node cluster). Here nobody
    consumes the requests (the exchange exists, no bridge runs): the request after each timeout
    goes on a new connection, and the old one is closed."""
    import aio_pika

    from bridge.client import RequestTimeout

    admin = await aio_pika.connect(servers.amqp_url("guest"))
    try:
        await (await admin.channel()).declare_exchange(names["exchange"], aio_pika.ExchangeType.DIRECT, durable=True)
    finally:
        await admin.close()
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=0.5) as e:
        first = e.connection
        with pytest.raises(RequestTimeout):
            await e.add(svc, 1)
        assert e.connection is first, "replaced before a next request needed it"
        with pytest.raises(RequestTimeout):
            await e.add(svc, 2)
        second = e.connection
        assert second is not first and first is not None and first.is_closed
        with pytest.raises(RequestTimeout):
            await e.add(svc, 3)
        assert e.connection is not second and second is not None and second.is_closed


async def test_a_request_without_a_reply_keeps_the_connection_while_its_method_is_answered(bridge, servers, names):
    """A slow bridge is not a stuck channel: a request that timed out while other requests of the
    same method were answered on the connection keeps it (replacing it would fail every request in
    flight on it, and a busy engine's retries would add to the bridge's load). Here a long-poll
    outlives its client timeout while short fetches of another worker are answered."""
    from bridge.client import RequestTimeout, Worker

    svc = service_id()
    async with Worker(
        servers.amqp_url(OWNERS[0]), service=svc, worker_id="w", exchange=names["exchange"], timeout=1.0
    ) as w:
        first = w.connection
        slow = asyncio.create_task(w.call_raw("fetch", {"serviceId": svc, "workerId": "slow", "waitMs": 5_000}))
        answered = 0
        while not slow.done():
            reply, _ = await w.call_raw("fetch", {"serviceId": svc, "workerId": "quick"})
            assert reply == {"result": None}
            answered += 1
            await asyncio.sleep(0.05)
        with pytest.raises(RequestTimeout):
            await slow
        assert answered >= 3
        reply, _ = await w.call_raw("fetch", {"serviceId": svc, "workerId": "quick"})
        assert reply == {"result": None} and w.connection is first and not first.is_closed


async def test_a_slow_stats_keeps_the_connection_while_its_queue_answers_other_requests(
    make_bridge, servers, names, monkeypatch
):
    """``stats`` and ``extend``, ``cancel``... share one queue of the bridge: a ``stats`` past its
    client timeout while cancels of the same engine were answered is a slow bridge, not a lost
    route. Judged by method, it marked the connection suspect, and the next request replaced it:
    every request in flight on it (hundreds of an engine's adds) failed without its reply, and
    adds sent without an idempotency key were stored twice on their retry (found by review,
    2026-12-07)."""
    from bridge.client import RequestTimeout

    b = await make_bridge()
    real_stats = b.queue.stats

    async def slow_stats(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(2.5)
        return await real_stats(*args, **kwargs)

    monkeypatch.setattr(b.queue, "stats", slow_stats)
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[0], exchange=names["exchange"], timeout=1.0) as e:
        await e.add(svc, 0)
        first = e.connection
        slow = asyncio.create_task(e.call_raw("stats", {"serviceId": svc}, owner=OWNERS[0]))
        answered = 0
        while not slow.done():
            assert await e.cancel(svc, str(uuid.uuid1())) is False  # the lifecycle queue answers
            answered += 1
            await asyncio.sleep(0.05)
        with pytest.raises(RequestTimeout):
            await slow
        assert answered >= 3
        await e.add(svc, 1)
        assert e.connection is first and first is not None and not first.is_closed, "replaced"


async def test_answered_requests_keep_their_connection(bridge, engine):
    """Only a request without a reply replaces the connection: answered ones share one."""
    svc = service_id()
    await engine.add(svc, 1)
    first = engine.connection
    for n in range(3):
        await engine.add(svc, n)
    assert engine.connection is first and first is not None and not first.is_closed


@pytest.mark.parametrize("value", ["[" * 300 + "]" * 300, "NaN", '{"x": Infinity}'])
async def test_cli_add_of_a_value_the_wire_cannot_carry_is_a_usage_error(bridge_env, value):
    """``queue-bridge add SERVICE VALUE_JSON``: VALUE_JSON is valid JSON (json.loads reads it) but
    nested deeper than the 254 levels the client can write. ``RpcClient.publish`` raises
    ``JsonError`` (a ValueError) when it encodes the body, which ``_with_client`` does not map:
    the CLI died with a traceback (exit 1) instead of a one-line usage error (exit 2), as the
    CLI's contract says for bad arguments. ``NaN`` and ``Infinity``, which Python's reader takes,
    went as null without a word."""
    from tests.cli import cli

    proc = await cli("add", "svc", value, "--timeout", "5", env=bridge_env)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-600:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-600:])


async def test_cli_with_an_amqp_url_whose_port_is_not_a_number_is_a_usage_error(bridge_env):
    """``--amqp-url amqp://h:notaport/``: aio_pika raises ValueError while parsing it, which
    ``_with_client`` did not catch (only AMQPError, OSError, TimeoutError): a traceback, exit 1,
    instead of one line (a bad argument: exit 2)."""
    from tests.cli import cli

    proc = await cli(
        "add", "svc", "1", "--amqp-url", "amqp://guest:guest@127.0.0.1:notaport/", "--timeout", "5", env=bridge_env
    )
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-600:]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-600:])


async def test_cli_against_an_exchange_nobody_declared_names_the_exchange(bridge_env):
    """No bridge has declared ``BRIDGE_EXCHANGE`` (a typo, or no bridge ever ran): the broker
    closes the channel with 404 NOT_FOUND "no exchange ...". The client turned any channel close
    into ``ConnectionLost`` ("connection to RabbitMQ was lost before the reply; retry the
    request"), and the CLI printed "RabbitMQ connection failed", naming no exchange. It now
    raises ``BrokerRefused`` with the broker's words and the exchange's name."""
    from tests.cli import cli

    proc = await cli("add", "svc", "1", "--timeout", "5", env=bridge_env)
    assert proc.returncode == 1, proc
    assert bridge_env["BRIDGE_EXCHANGE"] in proc.stderr, f"the missing exchange is not named: {proc.stderr}"


async def test_run_goes_on_when_its_handlers_exception_is_too_large_to_report(make_bridge, engine, workers):
    """``Worker.run`` gives a task back with ``task.fail({"type", "message": str(exc)})`` when
    the handler raises, and catches only TransportError/UnavailableError around it. An exception
    whose message is larger than the bridge accepts for an error (``max_value_bytes``, 1 MiB by
    default; 100 bytes here), e.g. ``ValueError(f"bad input {task.value}")`` on a large value, is
    answered ``payload_too_large``: the PayloadTooLargeError escaped ``run``, the worker loop
    died, and the task stayed leased to it until its lease ran out (then the same happened to
    the next worker that got it). Now the task is given back with the exception's type alone."""
    await make_bridge(max_value_bytes=100)
    svc = service_id()
    await engine.add(svc, "x" * 80)
    w = await workers(svc, "runner")
    w.wait_ms = 1_000
    stop = asyncio.Event()
    seen: list[int] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        seen.append(task.deliveries)
        if len(seen) == 1:
            raise ValueError(f"bad input: {task.value} / {task.value}")
        stop.set()
        return "ok"

    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    except Exception as exc:
        pytest.fail(f"Worker.run died on the handler's exception: {type(exc).__name__}: {exc}")
    assert handled == 2 and seen == [1, 2]


@pytest.mark.parametrize("kind", ["too_large", "not_json"])
async def test_run_goes_on_when_its_handlers_result_is_refused(make_bridge, engine, workers, kind):
    """What ``Worker.run``'s handler returns is the task's result. A result the bridge refuses
    (larger than ``max_value_bytes``: ``payload_too_large``) or that JSON cannot carry (a set, a
    coroutine the handler forgot to await: ``JsonError``) raised out of ``_ack_then_next``, which
    caught only TransportError/UnavailableError: the worker's loop died and the task stayed leased
    to it until its lease ran out, then killed the next worker's loop the same way. As for an
    exception too large to report (above), the task is now given back, its error saying the
    result was refused, and the loop goes on to the next task."""
    await make_bridge(max_value_bytes=100)
    svc = service_id()
    first = await engine.add(svc, {"n": 1}, max_deliveries=1)  # its fail parks it: its error can be read
    second = await engine.add(svc, {"n": 2})
    w = await workers(svc, "runner", time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        seen.append(task.id)
        if task.id == first:
            return "x" * 500 if kind == "too_large" else {"tags": {"a", "b"}}
        stop.set()
        return "ok"

    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    except Exception as exc:
        pytest.fail(f"Worker.run died on the handler's result: {type(exc).__name__}: {exc}")
    assert handled == 2 and seen == [first, second]
    parked = {t.id: t for t in await engine.parked(svc)}
    assert first in parked, f"task {first} was not given back: {parked}"
    assert parked[first].last_error["type"] == "ResultRefused", parked[first].last_error


async def test_a_handlers_own_fail_without_an_answer_is_sent_again_never_acked(
    make_bridge, engine, workers, monkeypatch
):
    """A handler fails its task itself, catches its fail's TransportError (no answer in time: the
    bridge was slow) and returns. ``Worker.run`` acked the task with the handler's return value:
    the engine was told the work succeeded (found by review, 2026-12-07). It sends the fail again,
    as it sends a handler's unanswered ack again."""
    from bridge.client import TransportError

    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1}, max_deliveries=1)  # failed once: parked, its error kept
    real_fail = b.queue.fail
    slowed = 0

    async def slow_first_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal slowed
        slowed += 1
        if slowed == 1:
            await asyncio.sleep(2.0)  # past the client's timeout: no answer, then it applies
        return await real_fail(*args, **kwargs)

    monkeypatch.setattr(b.queue, "fail", slow_first_fail)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=1.0)
    w.wait_ms = 1_000
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        stop.set()
        with contextlib.suppress(TransportError):
            await task.fail({"why": "upstream down"})
        return "this is not a result"

    await asyncio.wait_for(w.run(handler, stop=stop), 30.0)

    async def parked() -> Any:
        listed = {t.id: t for t in await engine.parked(svc)}
        return listed.get(task_id)

    found = await wait_for(parked, 15, what="the task parked by its handler's fail")
    assert found.last_error == {"why": "upstream down"} and found.reason == "failed", found


async def test_an_ack_answered_internal_is_sent_again_not_the_work_given_back(
    make_bridge, engine, workers, monkeypatch
):
    """``internal`` is the bridge failing (a bug, a race), not a verdict on the result: the loop gave
    the task back at once (``ResultRefused``), so work that succeeded ran again, and a task on its
    last allowed delivery was parked "failed", the engine told delivery_limit (found by review,
    2026-12-07). The ack is sent again a few times first."""
    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1}, max_deliveries=1)
    real_ack = b.queue.ack
    calls = 0

    async def ack_failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug the bridge did not expect")  # answered ``internal``
        return await real_ack(*args, **kwargs)

    monkeypatch.setattr(b.queue, "ack", ack_failing_once)
    w = await workers(svc, "runner", time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        stop.set()
        return "ok"

    assert await asyncio.wait_for(w.run(handler, stop=stop), 30.0) == 1
    assert calls >= 2, "the ack was not sent again"
    assert await engine.parked(svc) == [], "the finished task was given back and parked"
    info = await engine.call("stats", {"serviceId": svc}, owner=OWNERS[0])
    assert info["result"]["services"][0]["parked"] == 0 and task_id


async def test_a_run_cancelled_while_its_ack_is_on_its_way_leaves_no_task_leased(
    make_bridge, engine, workers, monkeypatch
):
    """``run`` cancelled (not stopped) while the ack that also claims the next task was on its way:
    the cancellation went on at once, and the next task, claimed for the worker by that ack, waited
    out its whole lease leased to a worker that was gone (found by review, 2026-12-07; the README
    says a cancelled run gives the task in hand back first). The outcome is sent again alone, and
    what the request claimed is given back."""
    b = await make_bridge()
    svc = service_id()
    await engine.add(svc, {"n": 1})
    second = await engine.add(svc, {"n": 2})
    real_ack = b.queue.ack
    acking = asyncio.Event()

    async def slow_ack(*args, **kwargs):  # type: ignore[no-untyped-def]
        acking.set()
        await asyncio.sleep(1.5)
        return await real_ack(*args, **kwargs)

    real_fetch = b.queue.fetch
    next_fetched = asyncio.Event()  # the ack's own fetch of the next task ended, claimed or not

    async def watched_fetch(owner, req, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return await real_fetch(owner, req, *args, **kwargs)
        finally:
            if acking.is_set() and req.worker_id == "runner":
                next_fetched.set()

    monkeypatch.setattr(b.queue, "ack", slow_ack)
    monkeypatch.setattr(b.queue, "fetch", watched_fetch)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=3.0)
    w.wait_ms = 1_000

    async def handler(task):  # type: ignore[no-untyped-def]
        return "done"

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(acking.wait(), 15)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)
    # Only once the bridge is done with that ack (and its claim of the next task, if it made one):
    # a fetch before it took the second task from the queue whatever the cancelled run left.
    await asyncio.wait_for(next_fetched.wait(), 15)
    other = await workers(svc, "other", time_to_recover_ms=60_000)
    got = await wait_for(other.fetch, 10, what="the second task, not left leased to the cancelled worker")
    assert got.id == second


async def test_a_handlers_own_ack_error_answered_internal_is_sent_again(make_bridge, engine, workers, monkeypatch):
    """The handler's own ``ack_error`` answered ``internal`` (the bridge failed on it, which says
    nothing of the outcome) was forgotten as if refused: the loop gave the finished task back, and
    on its last allowed delivery it was parked "failed" instead of completed with its business
    error (found by re-review, 2026-12-07). It is sent again as an unanswered one is."""
    b = await make_bridge()
    svc = service_id()
    await engine.add(svc, {"n": 1}, max_deliveries=1)
    real_ack = b.queue.ack
    calls = 0

    async def ack_failing_once(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug the bridge did not expect")  # answered ``internal``
        return await real_ack(*args, **kwargs)

    monkeypatch.setattr(b.queue, "ack", ack_failing_once)
    w = await workers(svc, "runner", time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        stop.set()
        await task.ack_error({"code": "invalid"})  # not caught: its InternalError ends the handler

    await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    assert calls >= 2, "the handler's ack_error was not sent again"
    assert await engine.parked(svc) == [], "the task was given back and parked, not completed"


async def test_a_run_cancelled_while_its_ack_gets_no_answer_acks_the_task_handed_back(
    make_bridge, engine, workers, monkeypatch, servers, cql
):
    """``run`` cancelled while its ack is on its way, and that ack and its resend get no answer
    (and never apply: the bridge runs nothing past a request's deadline). The bridge still holds
    the task for the worker and hands it back to the settling at cancel, which gave it back
    (``Cancelled``): the finished work ran again, and on its last allowed delivery was parked
    (found by re-review, 2026-12-07). It is acked with its result, as a stop's drain does."""
    from tests.integration import test_slow_store as slow

    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1}, max_deliveries=1)
    real_ack = b.queue.ack
    calls = 0
    acking = asyncio.Event()

    async def lost_acks(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls <= 2:  # the loop's ack and the resend at cancel: no answer, nothing applied
            acking.set()
            await asyncio.sleep(3.0)
            return False
        return await real_ack(*args, **kwargs)

    monkeypatch.setattr(b.queue, "ack", lost_acks)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=2.0)
    w.wait_ms = 1_000

    async def handler(task):  # type: ignore[no-untyped-def]
        return "done"

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(acking.wait(), 15)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 40)
    assert calls >= 3, calls
    lease = slow.lease_of(cql, servers.keyspace, svc, task_id)
    assert lease["state"] == "done", f"the finished task was not acked: {lease}"


async def test_a_run_cancelled_while_it_gives_a_task_back_sends_the_fail_again(
    make_bridge, engine, workers, monkeypatch
):
    """The handler raised; the loop's fail (giving the task back) got no answer, and ``run`` was
    cancelled meanwhile: nothing was sent again, and the task stayed leased to a worker that was
    gone for its whole lease (found by re-review, 2026-12-07). The fail is sent again."""
    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1}, max_deliveries=1)  # failed once: parked, its error kept
    real_fail = b.queue.fail
    calls = 0
    failing = asyncio.Event()

    async def lost_first_fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:  # no answer, nothing applied
            failing.set()
            await asyncio.sleep(3.0)
            return None
        return await real_fail(*args, **kwargs)

    monkeypatch.setattr(b.queue, "fail", lost_first_fail)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=2.0)
    w.wait_ms = 1_000

    async def handler(task):  # type: ignore[no-untyped-def]
        raise ValueError("broken input")

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(failing.wait(), 15)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)

    async def parked() -> Any:
        return {t.id: t for t in await engine.parked(svc)}.get(task_id)

    found = await wait_for(parked, 10, what="the task given back (parked at its limit), not left leased")
    assert found.last_error["type"] == "ValueError", found


async def test_an_ack_answered_internal_as_the_stop_grace_ends_gives_the_task_back(
    make_bridge, engine, workers, monkeypatch
):
    """On stop the ack goes alone, sent again only within ``stop_grace``. Answered ``internal`` just
    before the grace ended, its retry's pause took the loop past it, which ended saying "it returns
    when its lease ends": the task stayed leased, neither acked nor given back (found by re-review,
    2026-12-07). It is given back."""
    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1}, max_deliveries=1)
    real_ack = b.queue.ack

    async def late_internal(*args, **kwargs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.45)
        raise RuntimeError("a bug the bridge did not expect")  # answered ``internal``

    monkeypatch.setattr(b.queue, "ack", late_internal)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, stop_grace=0.5)
    w.wait_ms = 1_000
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        stop.set()
        return "ok"

    await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    monkeypatch.setattr(b.queue, "ack", real_ack)

    async def parked() -> Any:
        return {t.id: t for t in await engine.parked(svc)}.get(task_id)

    found = await wait_for(parked, 10, what="the task given back (parked at its limit), not left leased")
    assert found.last_error["type"] == "ResultRefused", found


async def test_a_run_cancelled_after_its_handlers_ack_got_no_answer_sends_it_until_answered(
    make_bridge, engine, workers, monkeypatch, servers, cql
):
    """The handler's own ack got no answer (it caught the TransportError and went on), then ``run``
    was cancelled: the ack was sent once more, and when that got no answer either the task stayed
    leased, its finished work to run again (found by re-review, 2026-12-07). It is sent as the
    loop sends an ack at a stop: again after no answer, within ``stop_grace``."""
    from bridge.client import TransportError
    from tests.integration import test_slow_store as slow

    b = await make_bridge()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    real_ack = b.queue.ack
    calls = 0

    async def two_lost_acks(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls <= 2:  # the handler's and the first resend: no answer, nothing applied
            await asyncio.sleep(2.0)
            return False
        return await real_ack(*args, **kwargs)

    monkeypatch.setattr(b.queue, "ack", two_lost_acks)
    w = await workers(svc, "runner", time_to_recover_ms=60_000, timeout=1.0)
    w.wait_ms = 1_000
    acked_once = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        with contextlib.suppress(TransportError):
            await task.ack("done")
        acked_once.set()
        await asyncio.sleep(60)  # still cleaning up when the run is cancelled

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(acked_once.wait(), 15)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(running, 30)
    assert calls >= 3, calls
    lease = slow.lease_of(cql, servers.keyspace, svc, task_id)
    assert lease["state"] == "done", f"the finished task was not acked: {lease}"


async def test_a_run_cancelled_while_it_connects_ends_at_once() -> None:
    """``run`` cancelled while its first fetch was still connecting (a broker that accepts the TCP
    connection and never answers: nothing sent): the fetch was marked as one that may claim at a
    bridge, and the cancelled run asked that broker what it claimed, for ``stop_grace`` plus two
    ``timeout``s (found by re-review, 2026-12-07). It ends at once."""
    import socket
    import time

    from bridge.client import Worker

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts (the kernel does), never speaks AMQP
    port = silent.getsockname()[1]
    try:
        w = Worker(
            f"amqp://guest:guest@127.0.0.1:{port}/",
            service=service_id(),
            worker_id="w",
            timeout=3.0,
            connect_timeout=30.0,
        )
        running = asyncio.create_task(w.run(lambda task: asyncio.sleep(0)))
        await asyncio.sleep(0.5)  # connecting: the broker never answers
        cancelled_at = time.monotonic()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(running, 30)
        took = time.monotonic() - cancelled_at
        await w.close()
        assert took < 2.0, f"a run cancelled as it connected took {took:.1f} s to end"
    finally:
        silent.close()


async def test_run_goes_on_when_a_fetch_is_answered_unavailable(bridge, engine, workers, monkeypatch):
    """A fetch answered ``unavailable`` (Cassandra away at the bridge) escaped ``Worker.run`` and
    ended the worker's loop, though the client's own docs say to retry it. It is now retried
    after a pause, as a fetch that got no answer is."""
    from bridge.domain.errors import Unavailable

    svc = service_id()
    real = bridge.queue.fetch
    calls = 0

    async def flaky(owner, req, **kw):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Unavailable("cassandra away (test)")
        return await real(owner, req, **kw)

    monkeypatch.setattr(bridge.queue, "fetch", flaky)
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "w")
    w.wait_ms = 1_000
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        seen.append(task.id)
        stop.set()
        return "ok"

    handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    assert handled == 1 and seen == [task_id] and calls >= 2


class _BlipProxy(TcpProxy):
    """A proxy that, once cut, refuses exactly one connection attempt and then lets the next
    ones through again: a broker connection drop that lasts one reconnect attempt."""

    refused = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            self.refused += 1
            self.up = True  # the blip is over: the next attempt connects
            return
        await super()._accept(reader, writer)


async def test_stop_acks_the_task_in_hand_through_a_connection_blip(bridge, engine, servers, names):
    """``Worker.run``: on ``stop`` the task in hand is finished and acked, so stopping never
    leaves a task leased to this worker. The ack of every other task is sent again after no
    answer (up to ``ACK_ATTEMPTS``); the stop path's ``await task.ack(result)`` was sent once and
    its ConnectionLost raised out of ``run``: a SIGTERM that met a broker connection drop (here
    the first reconnect attempt is refused, the second would succeed) lost the finished result,
    ``run`` raised instead of returning, and the task stayed leased to the stopping worker until
    its lease ran out (60 s here). The stop path's ack now goes through the same retry."""
    proxy = await _BlipProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    w = Worker(url, service=svc, worker_id="runner", exchange=names["exchange"], time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    await w.open()
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        stop.set()  # SIGTERM while the task runs
        proxy.cut()  # ... and the broker connection drops
        await wait_for(lambda: w.channel is None or w.channel.is_closed, 10, what="the drop noticed")
        return "finished"

    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    except Exception as exc:
        pytest.fail(f"run raised {type(exc).__name__}: {exc} (the broker refused {proxy.refused} reconnect attempt)")
    finally:
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    assert handled == 1 and proxy.refused >= 1  # the first reconnect attempt was refused
    # Is the task still this worker's? A fetch under its id (not ``fresh``) gets its held task back.
    async with Worker(
        servers.amqp_url(OWNERS[0]), service=svc, worker_id="runner", exchange=names["exchange"]
    ) as again:
        held = await again.fetch()
    assert held is None, f"task {task_id} was not acked: still leased to the stopped worker ({held and held.id})"


async def test_stop_after_a_lost_long_poll_takes_no_new_work_and_leaves_no_task_leased(
    bridge, engine, servers, names, caplog
):
    """A fetch whose reply was lost may still claim a task for this worker until its deadline
    (``_unsure_until``): the bridge's long-poll goes on waiting and, the oldest waiter, takes the
    next task's hint and leases that task to this worker. ``Worker.run`` returned as soon as the
    failed fetch's pause ended once ``stop`` was set, without waiting out (or fetching back) what
    that orphaned long-poll could still claim: the next task added was leased to the stopped
    worker for its whole lease (60 s here) and no other worker could have it. On stop ``run``
    now closes the orphan's reply-to (a waiting fetch then claims nothing) and, until that
    deadline (``stop_grace`` at most), asks the bridge whether it holds a task.

    Here SIGTERM comes while the worker's long-poll waits, and its broker connection drops at
    that moment; a task is added while ``run`` drains, another after it returned. The drain used
    to fetch (not ``fresh``), which claimed the task added meanwhile: a stopping worker took new
    work. It now fetches only a task it holds: both tasks go to another worker, and the stopped
    worker holds none."""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    w = Worker(url, service=svc, worker_id="runner", exchange=names["exchange"], time_to_recover_ms=60_000)
    w.wait_ms = 8_000
    await w.open()
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        seen.append(task.id)
        return "handled"

    try:
        with caplog.at_level(logging.INFO, logger="bridge.client"):
            running = asyncio.create_task(w.run(handler, stop=stop))
            await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the worker's long-poll waiting")
            stop.set()  # SIGTERM ...
            proxy.cut()  # ... while the broker connection drops
            proxy.restore()
            await wait_for(
                lambda: any(r.getMessage().startswith("stopping: ") for r in caplog.records),
                10.0,
                what="the drain to start",
            )
            during = await engine.add(svc, {"n": 1})
            handled = await asyncio.wait_for(running, 40.0)
    finally:
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    assert handled == 0 and seen == [], f"the stopping worker took new work: handled {seen}; {during} was added"

    after = await engine.add(svc, {"n": 2})
    async with Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="other", exchange=names["exchange"]) as o:
        got = []
        for _ in range(2):
            got.append(task := await o.fetch(wait_ms=3_000))
            if task is not None:
                assert await task.ack("done") is True
    async with Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="runner", exchange=names["exchange"]) as r:
        held = await r.fetch()
    assert [t and t.id for t in got] == [during, after], (
        f"tasks {during} and {after} went to nobody who works: another worker's fetches got "
        f"{[t and t.id for t in got]}; the stopped worker 'runner' holds {held and held.id}"
    )
    assert held is None, f"task {held.id} is leased to the stopped worker"


async def test_run_stopped_while_its_long_poll_waits_returns_within_its_grace(bridge, engine, servers, names):
    """SIGTERM to an idle worker pod: ``Worker.run`` let its long-poll under way finish, up to
    ``wait_ms`` (30 s by default), to handle what it might still claim. With the client's timeout
    and a second that could reach 41 s, beyond Kubernetes' 30 s before it kills the pod. The
    long-poll is now given up at once; the worker closes its reply-to, so the bridge's waiting
    fetch, probing it before a claim, claims nothing for the stopped worker, and ``run`` returns
    within ``stop_grace``. A task added after that goes to a live worker, and the stopped
    worker's id holds none."""
    svc = service_id()
    url = servers.amqp_url(OWNERS[0])
    w = Worker(url, service=svc, worker_id="idle-runner", exchange=names["exchange"], time_to_recover_ms=60_000)
    assert w.wait_ms == 30_000 and w.stop_grace == 5.0  # the defaults a pod runs with
    await w.open()
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        return "handled"

    try:
        running = asyncio.create_task(w.run(handler, stop=stop))
        await wait_for(lambda: _waiters(bridge) == 1, 10.0, what="the worker's long-poll waiting")
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        stop.set()  # SIGTERM
        handled = await asyncio.wait_for(running, 20.0)
        took = loop.time() - stopped_at
    finally:
        await w.close()
    assert handled == 0
    assert took < w.stop_grace + 2.0, f"run took {took:.1f}s to stop an idle worker (grace {w.stop_grace}s)"

    # The abandoned long-poll still waits at the bridge (until its deadline): it must not take this.
    after = await engine.add(svc, {"n": 1})
    async with Worker(url, service=svc, worker_id="other", exchange=names["exchange"]) as o:
        got = await o.fetch(wait_ms=5_000)
    async with Worker(url, service=svc, worker_id="idle-runner", exchange=names["exchange"]) as r:
        held = await r.fetch()
    assert got is not None and got.id == after, (
        f"task {after} went to nobody who works: another worker's fetch got {got and got.id}; "
        f"the stopped worker holds {held and held.id}"
    )
    assert held is None, f"task {held.id} is leased to the stopped worker"


async def test_a_finished_task_whose_ack_meets_a_broker_outage_is_not_run_again(bridge, engine, servers, names):
    """``Worker.run`` sent an ack that got no answer 3 times, about 1.4 s in all, then fetched (not
    ``fresh``) and the bridge handed the same task back: its handler ran twice (a charge made
    twice) whenever RabbitMQ was away for more than a second or two as a task finished (a broker
    restart takes 7-11 s). The result is in hand and an ack is idempotent: it is sent again until
    it is answered, for as long as the lease lasts."""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    task_id = await engine.add(svc, {"charge": 1})
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    w = Worker(url, service=svc, worker_id="payer", exchange=names["exchange"], time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    await w.open()
    stop = asyncio.Event()
    runs: list[str] = []

    async def handler(task):  # type: ignore[no-untyped-def]
        runs.append(task.id)
        if len(runs) == 1:
            proxy.cut()  # the broker goes away as the task finishes, for 5 s
            asyncio.get_running_loop().call_later(5.0, proxy.restore)
        else:
            stop.set()
        return "charged"

    running = asyncio.ensure_future(w.run(handler, stop=stop))
    try:
        # Served again by the loop once the broker is back: a second task, or the first again.
        second = await engine.add(svc, {"charge": 2})
        await wait_for(lambda: len(runs) >= 2, 40, what="the loop serving after the outage")
        stop.set()
        await asyncio.wait_for(running, 30)
    finally:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    assert runs[0] == task_id
    assert runs.count(task_id) == 1, f"the handler ran task {task_id} {runs.count(task_id)} times: {runs}"
    assert runs[1] == second


async def test_an_ack_with_next_says_not_fresh_while_a_cancelled_long_poll_may_still_claim(bridge, engine, workers):
    """A long-poll its caller cancelled may still be waiting at a bridge and claim the next task
    for this worker there. ``fetch`` says ``fresh`` only once that request's deadline has passed;
    ``ack_and_fetch`` looked only at its own retries and said ``fresh``: the bridge skipped the
    pointer naming the task the orphan claimed, which waited out its whole lease unseen."""
    svc = service_id()
    w = await workers(svc, "w")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(w.fetch(wait_ms=20_000), 0.5)  # given up by its caller: still at the bridge
    first = await engine.add(svc, {"n": 1})
    task = await w.fetch()  # the orphan may hand it, or this fetch claims it
    assert task is not None and task.id == first
    sent: list[dict[str, Any]] = []
    real_call = w.call

    async def recorded(method: str, body: dict[str, Any], **kw: Any) -> Any:
        sent.append(body)
        return await real_call(method, body, **kw)

    w.call = recorded  # type: ignore[method-assign]
    acked, _following = await w.ack_and_fetch("done")
    assert acked is True
    assert sent[0]["next"]["fresh"] is False, sent[0]


async def test_a_stop_during_an_ack_sent_again_ends_within_the_stop_grace(bridge, engine, servers, names):
    """An ack is sent again while the task's lease lasts (a broker outage as the task finished).
    A stop set meanwhile was not looked at: the worker kept retrying until the lease's end (up to
    12 h), and the pod ran until it was killed. Stop now caps the retries at ``stop_grace``."""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    await engine.add(svc, {"n": 1})
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    w = Worker(url, service=svc, worker_id="stopper", exchange=names["exchange"], time_to_recover_ms=120_000)
    w.wait_ms = 1_000
    w.stop_grace = 2.0
    await w.open()
    stop = asyncio.Event()

    async def handler(task):  # type: ignore[no-untyped-def]
        proxy.cut()  # the broker goes away as the task finishes, and stays away
        asyncio.get_running_loop().call_later(1.0, stop.set)  # SIGTERM while the ack is retried
        return "done"

    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(w.run(handler, stop=stop))
    try:
        await wait_for(stop.is_set, 30, what="the stop set while the ack is retried")
        stopped_at = loop.time()
        done, _ = await asyncio.wait({running}, timeout=20)
        took = loop.time() - stopped_at
        assert done, "run still sending its ack again 20 s after stop (stop_grace 2 s): it goes on to the lease's end"
    finally:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    assert took < 15, f"run returned {took:.1f} s after stop (stop_grace 2 s)"


async def _worker_behind(proxy: TcpProxy, svc: str, worker_id: str, names: Any, *, stop_grace: float) -> Worker:
    """An open Worker whose RabbitMQ link goes through ``proxy``: a 2 s timeout, a 120 s lease."""
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    w = Worker(url, service=svc, worker_id=worker_id, exchange=names["exchange"], time_to_recover_ms=120_000, timeout=2)
    w.wait_ms = 1_000
    w.stop_grace = stop_grace
    await w.open()
    return w


async def test_a_stopping_worker_acks_the_result_in_hand_and_never_runs_its_handler_again(
    bridge, engine, servers, names, monkeypatch
):
    """The handler of T returned R; its ack (which also claims the next task) got no answer
    (RabbitMQ cut off), so the worker may hold a task it was never told of; stop came, the ack
    alone kept failing until stop_grace. Then the drain asked the bridge what the worker holds:
    T itself, still leased to it, which it fetched and handed to the handler a second time, a side
    effect made twice (found by review, 2026-12-06). The result in hand is acked instead."""
    from bridge.client import rpc

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await _worker_behind(proxy, svc, "once", names, stop_grace=3.0)
    stop = asyncio.Event()
    calls: list[str] = []
    real_ack = rpc.Task.ack
    real_drain = w._claimed_after_stop
    draining = False
    cut = False

    def drain() -> Any:
        nonlocal draining
        draining = True
        return real_drain()

    async def ack(self: Any, result: Any = None) -> bool:
        nonlocal cut
        if not draining:  # the outage outlasts the ack's tries until the drain
            if not cut:
                # The link works again for the drain's requests (the ack that claims the next
                # task was swallowed: never delivered).
                cut = True
                proxy.cut()
                proxy.restore()
            raise TransportError("no answer (injected)")
        return await real_ack(self, result)

    async def handler(task: Any) -> str:
        calls.append(task.id)
        if len(calls) == 1:
            proxy.swallowing = True  # the ack and the claim it carries never reach the broker
            asyncio.get_running_loop().call_later(0.5, stop.set)  # SIGTERM while it is on its way
        return "R"

    monkeypatch.setattr(rpc.Task, "ack", ack)
    monkeypatch.setattr(w, "_claimed_after_stop", drain)
    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 60)
    finally:
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    assert draining and cut
    assert calls == [task_id], f"the handler ran {len(calls)} times on one task"
    assert handled == 1
    async with Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="after", exchange=names["exchange"]) as other:
        assert await other.fetch() is None, "the task was not completed with its result"


async def test_a_stop_while_the_ack_gets_no_answer_ends_after_one_try_past_the_stop_grace(
    bridge, engine, servers, names
):
    """On stop the ack was still tried at least three times, each waiting its whole ``timeout``
    for no answer: with the defaults (10 s) about 31 s, past Kubernetes' 30 s grace, though the
    docs bound it by ``stop_grace`` (found by review, 2026-12-06). Past the grace, no new try."""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    await engine.add(svc, {"n": 1})
    w = await _worker_behind(proxy, svc, "brief", names, stop_grace=1.0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    stopped_at: list[float] = []

    async def handler(task: Any) -> str:
        proxy.swallowing = True  # every request from now on is sent and never arrives
        stop.set()
        stopped_at.append(loop.time())
        return "done"

    try:
        await asyncio.wait_for(w.run(handler, stop=stop), 60)
        took = loop.time() - stopped_at[0]
    finally:
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()
    # One try (its 2 s timeout) outlasts the 1 s grace: nothing more. Three took 6 s and more.
    assert took < 4.5, f"run returned {took:.1f} s after stop (timeout 2 s, stop_grace 1 s)"
