"""Defects of the Python client (bridge/client/rpc.py) found by a code review, each reproduced
against the real servers: the worker loop and a bad task, a request whose send RabbitMQ does not
read, requests that name no task, and a stopping worker's drain."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest

from bridge.client import Engine, InternalError, RequestTimeout, Task, UnknownOwnerError, Worker
from tests.cli import cli, no_traceback, ok
from tests.conftest import ENGINE_USER, OWNERS, service_id, wait_for
from tests.faults import TcpProxy
from tests.integration.test_security import flip_stored_value

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def _waiters(bridge: Any) -> int:
    return sum(len(x.waiters) for x in bridge.hints._waiting.values())


def lease_state(cql: Any, keyspace: str, svc: str, task_id: str) -> str:
    row = cql.execute(
        f"SELECT state FROM {keyspace}.leases WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()
    return str(row["state"])


# --- 1. the worker loop and a task it cannot open ----------------------------------------------


@pytest.mark.parametrize("loop", ["run", "async_for"])
async def test_the_worker_loop_moves_past_a_task_it_cannot_open(bridge, engine, workers, cql, servers, loop):
    """A fetch that meets a task whose stored row fails authentication (tampered here; a task
    sealed with a key since removed from the key ring is answered the same) is answered
    ``integrity_error``: the bridge dead-letters that task and clears the worker's pointer, so
    the next fetch moves on. ``Worker._poll`` caught only TransportError and UnavailableError:
    IntegrityError escaped ``run`` and ``async for``, and every worker of the queue that met the
    task died (a key removed from the ring crash-looped the whole fleet). The loop now logs it
    and fetches again at once: the next task is handled."""
    svc = service_id()
    # Larger than a hint carries: the fetch reads (and authenticates) the stored row.
    bad = await engine.add(svc, {"n": 1, "pad": "x" * 9_000})
    good = await engine.add(svc, {"n": 2})
    flip_stored_value(cql, servers.keyspace, svc, bad)
    w = await workers(svc, "looper", time_to_recover_ms=60_000)
    w.wait_ms = 1_000
    seen: list[str] = []
    try:
        if loop == "run":
            stop = asyncio.Event()

            async def handler(task: Task) -> str:
                seen.append(task.id)
                stop.set()
                return "ok"

            handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
            assert handled == 1
        else:

            async def first_served() -> None:
                async for task in w:
                    seen.append(task.id)
                    assert await task.ack("ok") is True
                    return

            await asyncio.wait_for(first_served(), 30.0)
    except Exception as exc:
        pytest.fail(f"the worker loop died on the task it could not open: {type(exc).__name__}: {exc}")
    assert seen == [good]
    assert lease_state(cql, servers.keyspace, svc, bad) == "dead"
    assert lease_state(cql, servers.keyspace, svc, good) == "done"


async def test_the_worker_loop_pauses_and_goes_on_after_an_internal_error(bridge, engine, workers, monkeypatch):
    """A fetch answered ``internal`` (a bug at the bridge, or a passing fault it did not map)
    escaped ``Worker.run`` like ``integrity_error``. Not the worker's fault, so it is retried
    after the pause of a fetch that got no answer, and the task is handled."""
    svc = service_id()
    real = bridge.queue.fetch
    calls = 0

    async def broken_once(owner, req, **kw):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug at the bridge (test)")  # answered internal
        return await real(owner, req, **kw)

    monkeypatch.setattr(bridge.queue, "fetch", broken_once)
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "w")
    w.wait_ms = 1_000
    stop = asyncio.Event()
    seen: list[str] = []

    async def handler(task: Task) -> str:
        seen.append(task.id)
        stop.set()
        return "ok"

    try:
        handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    except InternalError as exc:
        pytest.fail(f"Worker.run died on an internal error: {exc}")
    assert handled == 1 and seen == [task_id] and calls >= 2


async def test_a_worker_whose_owner_has_no_key_ends_run_with_a_clear_error(make_bridge, servers, names, tmp_path):
    """The other side of the loop's tolerance: an answer that says the worker itself is wrong
    (here ``unknown_owner``: its owner has no key) is not retried forever by a loop that would
    look alive while serving nothing. ``run`` ends with it at once."""
    from bridge.crypto import generate_keyring, write_keyring

    keyring = tmp_path / "only-a.json"
    write_keyring(keyring, generate_keyring([OWNERS[0], ENGINE_USER]))  # worker-b has no key
    await make_bridge(keyring=str(keyring))

    async def handler(task: Task) -> None:
        raise AssertionError("nothing to hand out")

    async with Worker(servers.amqp_url(OWNERS[1]), service="s", worker_id="w", exchange=names["exchange"]) as w:
        w.wait_ms = 1_000
        with pytest.raises(UnknownOwnerError):
            await asyncio.wait_for(w.run(handler, stop=asyncio.Event()), 10.0)


# --- 2. a request whose send RabbitMQ does not read --------------------------------------------


BLOCKED_ADD_BYTES = 8 * 1024 * 1024  # far more than the socket buffers on both sides hold


async def test_a_request_whose_send_is_not_read_raises_request_timeout_at_its_deadline(bridge, servers, names):
    """During a RabbitMQ memory alarm the broker stops reading publishers' sockets. The
    client's ``timeout`` started only once the request was published: a large add (or ack)
    blocked in ``exchange.publish`` for as long as the alarm lasted, whatever the caller's
    timeout. The timeout now bounds the whole call: the add raises RequestTimeout at its
    deadline, and the next call, once the broker reads again, goes on a new connection (the
    stuck one is closed) and is answered. Here the proxy in front of RabbitMQ stops reading."""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    url = f"amqp://{ENGINE_USER}:{ENGINE_USER}@127.0.0.1:{proxy.port}/"
    timeout = 2.0
    engine = Engine(url, owner=OWNERS[0], exchange=names["exchange"], timeout=timeout)
    try:
        await engine.open()
        assert await engine.add(svc, {"n": 0})  # the connection works
        first = engine.connection
        proxy.stall()  # the alarm
        started = time.monotonic()
        try:
            with pytest.raises(RequestTimeout):
                await asyncio.wait_for(engine.add(svc, "x" * BLOCKED_ADD_BYTES), timeout + 5.0)
        except TimeoutError:
            pytest.fail(
                f"the add was still blocked sending after {time.monotonic() - started:.1f}s (timeout {timeout}s)"
            )
        took = time.monotonic() - started
        assert took < timeout + 1.0, f"the add raised after {took:.1f}s (timeout {timeout}s)"

        proxy.resume()  # the alarm clears
        assert await asyncio.wait_for(engine.add(svc, {"n": 1}), timeout + 5.0)
        assert engine.connection is not first, "the next call went on the connection whose send never ended"
        await wait_for(lambda: first is not None and first.is_closed, 10.0, what="the stuck connection closed")
    finally:
        proxy.resume()
        await engine.close()
        await proxy.stop()


async def test_an_add_without_reply_is_bounded_by_the_timeout_too(bridge, servers, names):
    """``add(wait=False)`` awaits no reply but still sends: its send, too, waited for as long as
    the broker did not read; now it raises RequestTimeout after ``timeout``. (Its confirm channel
    is opened first, by an add before the stall: one that cannot open is bounded the same way,
    as ConnectionLost, nothing sent.)"""
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    url = f"amqp://{ENGINE_USER}:{ENGINE_USER}@127.0.0.1:{proxy.port}/"
    engine = Engine(url, owner=OWNERS[0], exchange=names["exchange"], timeout=2.0)
    try:
        await engine.open()
        assert await engine.add(service_id(), {"n": 0}, wait=False) is None  # its confirm channel opened
        proxy.stall()
        try:
            with pytest.raises(RequestTimeout):
                await asyncio.wait_for(engine.add(service_id(), "x" * BLOCKED_ADD_BYTES, wait=False), 7.0)
        except TimeoutError:
            pytest.fail("add(wait=False) was still blocked sending after 7s (timeout 2s)")
    finally:
        proxy.resume()
        await engine.close()
        await proxy.stop()


async def test_a_channel_that_does_not_open_is_bounded_by_the_calls_timeout(bridge, servers, names, monkeypatch):
    """A call that (re)connects opens a channel and its reply consumer after the connection's
    handshake: those steps had no timeout (only the TCP/AMQP connect had one), so a broker that
    stopped reading right then held the call for as long as it did. The call's deadline now
    covers them: it raises ConnectionLost (not sent) after ``timeout``, and a later call, once
    the broker reads again, connects afresh and is answered."""
    from bridge.client import ConnectionLost, rpc

    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    real = rpc.connect_first
    stall_next = True

    async def connect_then_stall(*args: Any, **kwargs: Any) -> Any:
        nonlocal stall_next
        made = await real(*args, **kwargs)
        if stall_next:  # the handshake is done: the broker stops reading before the channel opens
            stall_next = False
            proxy.stall()
        return made

    monkeypatch.setattr(rpc, "connect_first", connect_then_stall)
    url = f"amqp://{ENGINE_USER}:{ENGINE_USER}@127.0.0.1:{proxy.port}/"
    timeout = 2.0
    engine = Engine(url, owner=OWNERS[0], exchange=names["exchange"], timeout=timeout)
    svc = service_id()
    try:
        started = time.monotonic()
        try:
            with pytest.raises(ConnectionLost) as lost:
                await asyncio.wait_for(engine.add(svc, {"n": 1}), timeout + 5.0)
        except TimeoutError:
            pytest.fail(f"the call was still opening its channel after {time.monotonic() - started:.1f}s")
        assert lost.value.sent is False
        assert time.monotonic() - started < timeout + 1.0
        proxy.resume()
        assert await asyncio.wait_for(engine.add(svc, {"n": 2}), timeout + 5.0)
    finally:
        proxy.resume()
        await engine.close()
        await proxy.stop()


# --- 3. requests that name no task -----------------------------------------------------------


async def test_cli_ack_without_a_task_named_does_not_complete_a_live_workers_task(
    bridge, bridge_env, engine, workers, servers
):
    """``queue-bridge ack SERVICE --worker W`` built a fresh Worker (no task fetched) whose ack
    named no task: the bridge completed whatever W held at that moment (contract 1.0), here the
    task a live worker W is working on, with the operator's result; the live worker's own ack
    then answered false. The CLI now wants the task named (``--task-id``/``--epoch``, as
    ``fetch`` printed them), or ``--held`` to ask for the 1.0 form explicitly."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    live = await workers(svc, "w1", time_to_recover_ms=60_000)
    task = await live.fetch()
    assert task is not None and task.id == task_id
    worker_args = ("--worker", "w1", "--amqp-url", servers.amqp_url(OWNERS[0]))

    nameless = await cli("ack", svc, "--result", '"from the operator"', *worker_args, env=bridge_env)
    no_traceback(nameless)
    assert nameless.returncode == 2, f"the CLI acked without a task named: {nameless.stdout} {nameless.stderr}"
    assert "--task-id" in nameless.stderr and "--held" in nameless.stderr, nameless.stderr
    other = str(uuid.uuid1())  # a task W does not hold: named, it is answered false
    wrong = await cli("ack", svc, "--task-id", other, "--epoch", "1", *worker_args, env=bridge_env)
    assert ok(wrong).strip() == "false"

    assert await task.ack("from the live worker") is True, "the live worker's task was completed under it"


async def test_cli_ack_names_the_task_or_says_held(bridge, bridge_env, engine, servers):
    """The two forms the CLI's ack takes: the task named (as fetch printed it), and ``--held``
    for whatever the worker holds (for a worker that is not running)."""
    svc = service_id()
    first = await engine.add(svc, {"n": 1})
    second = await engine.add(svc, {"n": 2})
    worker_args = ("--worker", "w1", "--amqp-url", servers.amqp_url(OWNERS[0]))
    fetched = json.loads(ok(await cli("fetch", svc, "--ttr", "60000", *worker_args, env=bridge_env)))
    assert fetched["id"] == first
    named = ("--task-id", first, "--epoch", str(fetched["epoch"]))
    assert ok(await cli("ack", svc, *named, "--result", "1", *worker_args, env=bridge_env)).strip() == "true"
    fetched = json.loads(ok(await cli("fetch", svc, "--ttr", "60000", *worker_args, env=bridge_env)))
    assert fetched["id"] == second
    assert ok(await cli("ack", svc, "--held", "--result", "2", *worker_args, env=bridge_env)).strip() == "true"
    both = await cli("ack", svc, "--held", "--task-id", second, *worker_args, env=bridge_env)
    assert both.returncode == 2 and "not both" in both.stderr, both.stderr


async def test_ack_or_fail_of_no_task_by_a_worker_that_fetched_none_is_refused_before_it_is_sent(
    bridge, engine, workers
):
    """``Worker.ack()`` / ``fail()`` / ``extend()`` with no task named, by a Worker that fetched
    none (another process under the same worker id, a script), sent a request naming no task:
    the bridge applied it to the task the live worker held. Its docstring said "the ack always
    names its task". Now it is refused (ValueError) before anything is sent; ``held=True``
    asks for the 1.0 form explicitly."""
    svc = service_id()
    await engine.add(svc, {"n": 1})
    live = await workers(svc, "w1", time_to_recover_ms=60_000)
    task = await live.fetch()
    assert task is not None
    same_id = await workers(svc, "w1")
    requests = {
        "ack": lambda: same_id.ack("not mine"),
        "fail": lambda: same_id.fail({"why": "not mine"}),
        "extend": lambda: same_id.extend(1_000),
    }
    for name, request in requests.items():
        with pytest.raises(ValueError, match=f"no task to {name}"):
            await request()
    assert await task.ack("mine") is True, "the live worker's task was acked or failed under it"


@pytest.mark.parametrize("settle", ["ack", "fail"])
async def test_a_workers_ack_or_fail_ends_the_keep_alive_of_its_task(bridge, engine, workers, settle):
    """``Worker.ack()`` / ``Worker.fail()`` (the worker's own, not ``Task.ack``) did not mark
    the task settled: inside ``task.keep_alive()`` the heartbeat went on beating, its next
    extend was answered false (the task is done), and it reported the task lost (``task.lost``,
    a warning) though this worker had just settled it. Now the heartbeat ends with the answer."""
    svc = service_id()
    await engine.add(svc, {"n": 1})
    w = await workers(svc, "w1", time_to_recover_ms=900)  # a beat every ~0.3 s
    task = await w.fetch()
    assert task is not None

    def beating() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == f"keep-alive {task.id}" and not t.done()]

    async with task.keep_alive():
        first_lease = task.lease_expires_at
        await wait_for(lambda: task.lease_expires_at != first_lease, 5.0, what="a first beat")
        if settle == "ack":
            assert await w.ack("done") is True
        else:
            assert await w.fail({"why": "test"}) is not None
        await wait_for(lambda: not beating(), 5.0, what="the heartbeat to end after the answer")
        assert not task.lost, f"the heartbeat reported the task lost after this worker's own {settle}"


# --- 4. a stopping worker's drain ----------------------------------------------------------------


async def test_a_stopping_workers_drain_ends_within_its_grace_and_one_timeout(bridge, servers, names, monkeypatch):
    """On stop, ``Worker.run`` fetches back what a request without an answer may still claim
    for it, for ``stop_grace`` seconds. Its ``left`` was read before each fetch, each fetch
    could take the client's timeout plus its wait when the bridge did not answer, and one more
    fetch followed after the deadline: stopping took up to ``stop_grace`` + 2 timeouts + a wait
    (7 s here for a 1 s grace and a 3 s timeout), past what a pod's kill deadline was sized
    for. Now no request of the drain starts after the grace, and it fetches only a task the
    worker holds: ``stop_grace`` + ``timeout`` at most here.

    Here the bridge takes every fetch and never answers (a stalled bridge): the worker's
    long-poll is under way when ``stop`` comes, so the drain runs and gets no answer."""
    svc = service_id()
    held_back = asyncio.Event()
    taken = 0

    async def never_answered(owner, req, **kw):  # type: ignore[no-untyped-def]
        nonlocal taken
        taken += 1
        await held_back.wait()
        return None

    monkeypatch.setattr(bridge.queue, "fetch", never_answered)
    grace, timeout = 1.0, 3.0
    w = Worker(
        servers.amqp_url(OWNERS[0]),
        service=svc,
        worker_id="stopping",
        exchange=names["exchange"],
        timeout=timeout,
        stop_grace=grace,
    )
    w.wait_ms = 8_000
    await w.open()
    stop = asyncio.Event()

    async def handler(task: Task) -> None:
        raise AssertionError("nothing is handed out")

    try:
        running = asyncio.create_task(w.run(handler, stop=stop))
        await wait_for(lambda: taken == 1, 10.0, what="the worker's long-poll at the bridge")
        stopped_at = time.monotonic()
        stop.set()
        handled = await asyncio.wait_for(running, 20.0)
        took = time.monotonic() - stopped_at
    finally:
        held_back.set()
        await w.close()
    # The drain asks the bridge whether the worker holds a task (an extend, answered: it holds
    # none) and so sends no fetch, which would claim a new task for a stopping worker.
    assert handled == 0 and taken == 1, f"handled {handled}, {taken} fetches reached the bridge"
    assert took < grace + timeout + 1.0, f"run took {took:.1f}s to stop (grace {grace}s, timeout {timeout}s)"


# --- 5. found by the review of 2026-12-06 ------------------------------------------------------


async def test_keep_alive_renews_a_lease_to_its_own_length_not_the_bridges_default(bridge, engine, workers):
    """A task fetched with a 10-minute lease (``fetch(time_to_recover_ms=600_000)``) by a worker
    with no time to recover of its own: ``keep_alive``'s first beat renewed it to now + the
    bridge's default (60 s), a tenth of what it had. A handler that held the event loop for
    longer than a minute (CPU-bound work: the reason to ask for a long lease) lost its task
    because of its heartbeat. Each beat renews it to the length it was fetched with."""
    from datetime import datetime

    svc = service_id()
    await engine.add(svc, {"n": 1})
    w = await workers(svc, "w-long")
    w.time_to_recover_ms = None
    task = await w.fetch(time_to_recover_ms=600_000)
    assert task is not None
    granted = datetime.fromisoformat(task.lease_expires_at)
    async with task.keep_alive(every_s=0.2):
        await wait_for(lambda: task.lease_expires_at != str(granted.isoformat()) and _beaten(task, granted), 5.0)
    renewed = datetime.fromisoformat(task.lease_expires_at)
    assert renewed >= granted, f"the heartbeat shortened the lease from {granted} to {renewed}"
    assert await task.ack("done") is True


def _beaten(task: Task, granted: Any) -> bool:
    from datetime import datetime

    return datetime.fromisoformat(task.lease_expires_at) != granted


async def test_a_handler_whose_await_was_cancelled_gives_its_task_back_and_the_loop_goes_on(bridge, engine, workers):
    """A handler awaited a future that another part of the program cancelled: the
    ``CancelledError`` went through ``Worker.run``'s handler guard (it catches ``Exception``) and
    ended ``run`` although nobody cancelled ``run``, the task left leased to a worker that no
    longer served. It is the handler's failure now: the task is given back and the loop goes on."""
    _, task_id, w = await _one_task_and_its_worker(engine, workers, "w-cancel", 60_000)
    stop = asyncio.Event()
    seen: list[tuple[str, int]] = []

    async def handler(task: Task) -> Any:
        seen.append((task.id, task.deliveries))
        if len(seen) == 1:
            cancelled = asyncio.get_running_loop().create_future()
            cancelled.cancel()
            await cancelled
        stop.set()
        return "done"

    handled = await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    assert seen == [(task_id, 1), (task_id, 2)], f"the task was not given back and fetched again: {seen}"
    assert handled == 2


async def _one_task_and_its_worker(engine: Any, workers: Any, name: str, ttr_ms: int) -> tuple[str, str, Worker]:
    """A new queue holding one task, and a worker of it long-polling 1 s with leases of ``ttr_ms``."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, name)
    w.wait_ms = 1_000
    w.time_to_recover_ms = ttr_ms
    return svc, task_id, w


async def test_a_cancelled_run_gives_the_task_in_hand_back(bridge, engine, workers):
    """``run`` cancelled (a task group torn down, a timeout around it) while its handler works:
    the task stayed leased to a worker that was gone, for its whole lease. It is given back first."""
    svc, task_id, w = await _one_task_and_its_worker(engine, workers, "w-torn", 600_000)
    started = asyncio.Event()

    async def handler(task: Task) -> Any:
        started.set()
        await asyncio.sleep(3600)

    running = asyncio.create_task(w.run(handler))
    await asyncio.wait_for(started.wait(), 15)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    other = await workers(svc, "w-other")
    again = await other.fetch(wait_ms=5_000)
    assert again is not None and (again.id, again.deliveries) == (task_id, 2), again
    assert await again.ack("done") is True


async def test_a_stopping_worker_fetches_back_what_an_unanswered_fetch_claimed_past_its_deadline(
    bridge, engine, servers, names, monkeypatch
):
    """A fetch claimed a task and its reply was lost; RabbitMQ stayed away past that fetch's
    deadline; then the worker was told to stop. Its drain asked the bridge what it held only
    until the deadline of the last request without an answer: past it, it returned at once, and
    the claimed task stayed leased to the stopped worker for its whole lease (10 minutes here).
    It now asks once all the same whenever a claiming request went unanswered. Found by review."""
    from bridge.client import TransportError

    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    url = servers.amqp_url(OWNERS[0])
    async with Worker(url, service=svc, worker_id="w-late", exchange=names["exchange"], timeout=1.0) as w:
        w.time_to_recover_ms = 600_000
        real = bridge.queue.fetch

        async def claim_then_lose_the_reply(owner: str, req: Any, **kw: Any) -> Any:
            got = await real(owner, req, **kw)
            if req.worker_id == "w-late" and w.connection is not None:
                await w.connection.close()  # its reply has nowhere to go
            return got

        monkeypatch.setattr(bridge.queue, "fetch", claim_then_lose_the_reply)
        with pytest.raises(TransportError):
            await w.fetch()
        monkeypatch.setattr(bridge.queue, "fetch", real)
        await wait_for(lambda: time.monotonic() > w._unsure_until, 10, what="the lost fetch's deadline")
        handled: list[str] = []

        async def handler(task: Task) -> Any:
            handled.append(task.id)
            return "ok"

        stop = asyncio.Event()
        stop.set()
        assert await asyncio.wait_for(w.run(handler, stop=stop), 30) == 1
    assert handled == [task_id]
