"""Platform engineers act on a live RabbitMQ under a running bridge (real servers).

Queue deletions, permission changes and ``rabbitmqctl close_connection``: each touches only this
test's own names (the per-test ``names`` prefix, users created here). See docs/reliability.md,
"Operators acting on the broker"."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import uuid
from typing import Any

import pytest

from tests.conftest import OWNERS, consumers_on, queue_exists, requests_counted, service_id, settings_from, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True, timeout=60).stdout


async def _delete_queue(url: str, name: str) -> None:
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        await ch.queue_delete(name)
    finally:
        await conn.close()


async def _declared_as(url: str, name: str, arguments: dict[str, Any]) -> bool:
    """The queue exists with exactly ``arguments`` (a declare with others is refused: 406)."""
    import aio_pika

    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        try:
            await ch.declare_queue(name, durable=True, arguments=arguments)
        except aio_pika.exceptions.ChannelPreconditionFailed:
            return False
        return True
    finally:
        await conn.close()


async def _try(coro: Any) -> tuple[Any, BaseException | None]:
    try:
        return await coro, None
    except Exception as exc:  # the test reports what came back
        return None, exc


async def _until_served(call: Any, seconds: float) -> tuple[Any, list[str]]:
    """``call()`` again every 0.5 s until it answers something (not an error, not None)."""
    deadline = time.monotonic() + seconds
    errors: list[str] = []
    while time.monotonic() < deadline:
        got, exc = await _try(call())
        if exc is None and got is not None:
            return got, errors
        errors.append(f"{type(exc).__name__}: {exc}" if exc else "null")
        await asyncio.sleep(0.5)
    return None, errors


# --- an operator deletes one of the bridge's request queues while it consumes it ----------------


async def test_a_deleted_fetch_queue_is_declared_again_with_its_arguments_and_fetches_are_served(
    bridge, engine, workers, servers, names
):
    """The broker cancels the bridge's consumer (basic.cancel). The bridge declares the queue
    again, with its own arguments, and consumes it: fetches are served, not answered
    ``bad_request: unknown method`` through the unrouted queue."""
    url = servers.amqp_url("guest")
    fetch_q = f"{names['queue_prefix']}.fetch"
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "w1")
    assert await consumers_on(url, fetch_q) == 1
    await _delete_queue(url, fetch_q)
    got, errors = await _until_served(w.fetch, 15)
    assert got is not None and got.id == task_id, (
        f"fetches after an operator deleted the fetch queue were never served again within 15 s "
        f"(is_ready={bridge.transport.is_ready()}, consuming={sorted(bridge.transport.consuming())}, "
        f"queue exists={await queue_exists(url, fetch_q)}); answers: {errors[:2]} ... x{len(errors)}"
    )
    assert await _declared_as(url, fetch_q, {"x-dead-letter-exchange": f"{names['exchange']}.dead"})
    await wait_for(bridge.transport.is_ready, 5.0, what="the bridge ready again")


async def test_a_deleted_add_queue_is_declared_again_and_adds_are_stored(bridge, engine, workers, servers, names):
    """An add the engine sends after an operator deleted ``<prefix>.add`` is stored, not answered
    ``bad_request`` and dead-lettered as an unknown method while the bridge says it is ready."""
    url = servers.amqp_url("guest")
    add_q = f"{names['queue_prefix']}.add"
    assert await consumers_on(url, add_q) == 1
    await _delete_queue(url, add_q)
    svc = service_id()
    added, errors = await _until_served(lambda: engine.add(svc, {"n": 1}), 15)
    assert added is not None, (
        f"adds after an operator deleted the add queue were refused for 15 s "
        f"(is_ready={bridge.transport.is_ready()}, queue exists={await queue_exists(url, add_q)}): "
        f"{errors[:1]} x{len(errors)}"
    )
    w = await workers(svc, "w1")
    task = await w.fetch()
    assert task is not None and task.id == added


async def test_an_add_sent_while_its_queue_is_declared_again_is_stored_not_refused_as_an_unknown_method(
    bridge, engine, workers, servers, names, monkeypatch
):
    """While the bridge declares ``<prefix>.add`` again (an operator deleted it), an add goes to
    ``.unrouted``: it was answered ``bad_request: unknown method 'add'`` (listing ``add`` as a
    method in the same breath), which a client does not retry, and dead-lettered, so a replay
    made it a task after its engine was told it failed (found by review, 2026-12-06). Taken as
    the add it is."""
    import bridge.transport.amqp as amqp

    url = servers.amqp_url("guest")
    add_q = f"{names['queue_prefix']}.add"
    real = amqp.declare_consumed_queue
    declaring = asyncio.Event()
    go_on = asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        if "add" in args or kwargs.get("method") == "add":
            declaring.set()
            await go_on.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(amqp, "declare_consumed_queue", held)
    await _delete_queue(url, add_q)
    await wait_for(declaring.is_set, 10.0, what="the add queue being declared again")
    svc = service_id()
    try:
        added = await asyncio.wait_for(engine.add(svc, {"n": 1}), 20)
    finally:
        go_on.set()
    w = await workers(svc, "w1")
    task = await w.fetch()
    assert task is not None and task.id == added


async def test_an_add_routed_to_unrouted_after_its_queue_is_back_is_still_taken_as_an_add(
    bridge, engine, workers, servers, names
):
    """An add that reached ``.unrouted`` while no bridge was declaring its queue (its binding
    removed; or one requeued after its retries, or redelivered, once the queue was back) was
    answered ``bad_request: unknown method 'add'`` and dead-lettered (found by the session's
    re-review, 2026-12-06). Taken as the add it is, whenever it comes."""
    import aio_pika

    def requests(method: str) -> float:
        return requests_counted(bridge, method)

    add_q = f"{names['queue_prefix']}.add"
    conn = await aio_pika.connect(servers.amqp_url("guest"))
    adds, unknown = requests("add"), requests("unknown")
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue(add_q, passive=True)
        await queue.unbind(names["exchange"], "add")  # adds now go through the alternate exchange
        try:
            svc = service_id()
            added = await asyncio.wait_for(engine.add(svc, {"n": 1}), 20)
        finally:
            await queue.bind(names["exchange"], "add")
    finally:
        await conn.close()
    w = await workers(svc, "w1")
    task = await w.fetch()
    assert task is not None and task.id == added
    # Counted as the add it is: under `unknown`, add throughput fell while the queue was restored
    # and an alert on unknown methods fired (found by review, 2026-12-07).
    assert (requests("add") - adds, requests("unknown") - unknown) == (1, 0)


async def test_a_deleted_lifecycle_queue_is_declared_again_with_every_binding(bridge, engine, servers, names):
    """``<prefix>.lifecycle`` takes eight routing keys: each is bound again (``stats`` and
    ``parked`` are served, by the bridge that declared the queue again)."""
    url = servers.amqp_url("guest")
    life_q = f"{names['queue_prefix']}.lifecycle"
    assert await consumers_on(url, life_q) == 1
    await _delete_queue(url, life_q)
    svc = service_id()
    await engine.add(svc, {"n": 1})
    stats, errors = await _until_served(lambda: engine.stats(svc), 15)
    assert stats, f"stats never served after the lifecycle queue was deleted: {errors[:1]} x{len(errors)}"
    parked, exc = await _try(engine.call("parked", {"serviceId": svc}))
    assert exc is None and parked is not None, exc


async def test_a_bridge_whose_request_queue_was_deleted_is_unready_until_it_consumes_it_again(
    bridge, servers, names, monkeypatch
):
    """While the queue cannot be declared again (here: every attempt fails), ``is_ready`` says
    unready; the bridge keeps trying, and is ready again once it consumes the queue."""
    import bridge.transport.amqp as amqp

    url = servers.amqp_url("guest")
    ack_q = f"{names['queue_prefix']}.ack"
    real = amqp.declare_consumed_queue
    attempts: list[float] = []

    async def refused(*args: Any, **kwargs: Any) -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("refused (test)")

    monkeypatch.setattr(amqp, "declare_consumed_queue", refused)
    assert await consumers_on(url, ack_q) == 1
    await _delete_queue(url, ack_q)
    await wait_for(lambda: len(attempts) >= 3, 10.0, interval=0.05, what="three attempts to declare the queue again")
    assert not bridge.transport.is_ready()
    assert "ack" not in bridge.transport.consuming()
    assert 0.4 <= attempts[2] - attempts[1] <= 3.0, "retried with backoff, not in a loop"
    monkeypatch.setattr(amqp, "declare_consumed_queue", real)
    await wait_for(lambda: consumers_on(url, ack_q), 15.0, interval=0.2, what="the ack queue consumed again")
    assert bridge.transport.is_ready()


async def test_a_pause_stops_the_redeclaration_and_a_resume_starts_it_again(bridge, servers, names, monkeypatch):
    """A queue lost while the bridge stops consuming it (the serving gate: Cassandra away) is not
    consumed behind the gate's back; resuming declares it again first."""
    import bridge.transport.amqp as amqp

    url = servers.amqp_url("guest")
    fetch_q = f"{names['queue_prefix']}.fetch"
    real = amqp.declare_consumed_queue
    attempts: list[float] = []

    async def refused(*args: Any, **kwargs: Any) -> None:
        attempts.append(time.monotonic())
        raise RuntimeError("refused (test)")

    monkeypatch.setattr(amqp, "declare_consumed_queue", refused)
    transport = bridge.transport
    await _delete_queue(url, fetch_q)
    await wait_for(lambda: attempts, 10.0, what="an attempt to declare the queue again")
    await transport.pause(frozenset({"fetch"}))
    tried = len(attempts)

    async def recorded(*args: Any, **kwargs: Any) -> None:
        attempts.append(time.monotonic())
        await real(*args, **kwargs)

    # Still recorded (it was swapped back to the bare function before, and the count below could not
    # change), and now able to succeed: an attempt while paused would declare the queue.
    monkeypatch.setattr(amqp, "declare_consumed_queue", recorded)
    await asyncio.sleep(1.5)  # longer than the next retry would have waited
    assert len(attempts) == tried, f"{len(attempts) - tried} attempts to declare the queue while paused"
    assert not await queue_exists(url, fetch_q), "declared again (and consumed) while paused"
    await transport.resume(frozenset({"fetch"}))
    await wait_for(lambda: consumers_on(url, fetch_q), 10.0, interval=0.2, what="the fetch queue consumed again")
    await wait_for(transport.is_ready, 5.0, what="the bridge ready again")


async def test_a_queue_deleted_while_its_consumer_was_paused_is_declared_again_at_resume(
    bridge, engine, workers, servers, names
):
    """A paused method gets no basic.cancel when its queue is deleted, so nothing marked it lost:
    resume consumed the missing queue, and the 404 closed the shared consume channel, every other
    request consumer with it (their deliveries in flight redelivered and run again; found by
    review, 2026-12-06). Resume declares a paused method's queue again before consuming it."""
    url = servers.amqp_url("guest")
    fetch_q = f"{names['queue_prefix']}.fetch"
    transport = bridge.transport

    def lost() -> float:
        labels = {"channel": "consume"}
        return bridge.metrics.registry.get_sample_value("queue_bridge_amqp_channels_lost_total", labels) or 0.0

    lost_before = lost()
    await transport.pause(frozenset({"fetch"}))
    await _delete_queue(url, fetch_q)
    await transport.resume(frozenset({"fetch"}))
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})  # adds are consumed on the same channel
    w = await workers(svc, "w1")
    got = await w.fetch()
    assert got is not None and got.id == task_id
    assert lost() == lost_before, "the consume channel was closed by the resume"


async def test_a_request_whose_paused_queue_was_deleted_is_answered_unavailable_not_bad_request(
    bridge, engine, workers, servers, names
):
    """A paused method gets no basic.cancel when its queue is deleted: its requests went through
    the alternate exchange to ``.unrouted`` and were answered ``bad_request: unknown method``,
    which ends every bundled worker loop (``Worker.run``, worker.js) though the queue comes back at
    resume (found by review, 2026-12-07). A known method is ``unavailable`` while its queue is
    paused, lost or being declared again, and for a while after it is back (a request that waited
    in ``.unrouted`` meanwhile)."""
    from bridge.client import BadRequestError, UnavailableError

    url = servers.amqp_url("guest")
    transport = bridge.transport
    await transport.pause(frozenset({"fetch"}))
    await _delete_queue(url, f"{names['queue_prefix']}.fetch")
    svc = service_id()
    w = await workers(svc, "w1")
    with pytest.raises(UnavailableError, match="fetch"):
        await w.fetch()
    await transport.resume(frozenset({"fetch"}))
    assert await w.fetch() is None  # served again
    # A removed binding (the queue there, the requests unrouted for good) is still the caller's
    # mistake once the queue has been back for a while: dead-lettered, not retried for ever.
    transport._restored_at["fetch"] -= 3_600
    conn = await _guest(url)
    try:
        ch = await conn.channel()
        queue = await ch.declare_queue(f"{names['queue_prefix']}.fetch", passive=True)
        await queue.unbind(names["exchange"], "fetch")
        try:
            with pytest.raises(BadRequestError, match="unknown method"):
                await w.fetch()
        finally:
            await queue.bind(names["exchange"], "fetch")
    finally:
        await conn.close()


async def test_a_method_resumed_while_its_channel_was_down_is_not_taken_for_restoring_after(bridge) -> None:
    """A blip that took the broker and Cassandra: the gate paused the methods while their channel
    was down, and resumed them while it still was (left to the channel's reopen, which consumed
    them). The pause's mark stayed, and the method's unrouted requests were answered
    "unavailable" for ever, a binding removed for good included (found by the re-review,
    2026-12-07)."""
    transport = bridge.transport
    await transport.pause(frozenset({"fetch"}))
    assert transport.queue_restoring("fetch")  # paused: a deletion would go unnoticed
    transport._orphans.add("fetch")  # its channel down at the resume: left to the reopen
    await transport.resume(frozenset({"fetch"}))
    await transport._consume_orphans(transport._channel_name_of("fetch"))  # the reopen consumes it
    assert "fetch" in transport.consuming()
    assert not transport.queue_restoring("fetch")


async def test_a_resume_that_could_not_declare_its_queue_keeps_its_requests_unavailable(bridge, monkeypatch) -> None:
    """The gate resumes a paused method whose queue may have been deleted meanwhile: declared
    first, and that declaration failed (a timeout, a refusal). The gate's mark was dropped before
    it, so the method was neither consumed nor marked, and its unrouted requests were answered
    ``bad_request`` again (found by the re-review, 2026-12-07)."""
    import bridge.transport.amqp as amqp

    transport = bridge.transport
    real = amqp.declare_consumed_queue

    async def refused(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("declaration refused (test)")

    await transport.pause(frozenset({"fetch"}))
    monkeypatch.setattr(amqp, "declare_consumed_queue", refused)
    with pytest.raises(RuntimeError, match="refused"):
        await transport.resume(frozenset({"fetch"}))
    assert "fetch" not in transport.consuming()
    assert transport.queue_restoring("fetch")
    monkeypatch.setattr(amqp, "declare_consumed_queue", real)
    await transport.resume(frozenset({"fetch"}))
    assert "fetch" in transport.consuming()
    transport._restored_at.pop("fetch", None)  # (declared just now: an hour later, as for good)
    assert not transport.queue_restoring("fetch")


async def _guest(url: str) -> Any:
    import aio_pika

    return await aio_pika.connect(url)


# --- rabbitmqctl close_connection on the bridge's main connection under fetch/ack traffic --------


async def test_closing_the_bridges_connection_under_fetch_ack_traffic_loses_nothing_and_leases_no_task_twice(
    named_bridge, engine, servers, names, cql
):
    from tests.history import History, lease_rows, run_workers
    from tests.integration.test_client_resilience import _close_connection_named

    b, conn_name = await named_bridge()
    svc = service_id()
    history = History()
    n = 120
    ids = await asyncio.gather(*(engine.add(svc, i) for i in range(n)))
    history.values.update(zip(ids, range(n), strict=True))

    async def fault() -> None:
        for at in (15, 45, 75):
            await wait_for(lambda at=at: len({a.task for a in history.acks if a.answer}) >= at, 30.0, interval=0.02)
            before = b.transport.connection.transport
            await asyncio.to_thread(_close_connection_named, conn_name)

            def back(before: Any = before) -> bool:
                conn = b.transport.connection
                return (
                    conn is not None and not conn.is_closed and b.transport.is_ready() and conn.transport is not before
                )

            await wait_for(back, 20.0, what="the bridge reconnected")

    faults = asyncio.create_task(fault())
    await run_workers(
        servers.amqp_url(OWNERS[0]), names["exchange"], svc, history, 6, n, ttr_ms=2000, deadline_s=40, rpc_timeout=3.0
    )
    await asyncio.wait_for(faults, 25)
    rows = await asyncio.to_thread(lease_rows, cql, servers.keyspace, OWNERS[0], svc, list(history.values))
    history.check(rows, None)


async def test_after_an_operator_deleted_the_dead_letter_queue_a_reconnection_restores_consuming_and_the_queue(
    named_bridge, engine, workers, servers, names, dead_letters
):
    """An operator deletes ``<prefix>.dead-letter`` (to drop what piled up there; the bridge does not
    consume it). Later the broker closes the bridge's connection (a blip). The bridge comes back
    and serves fetches, the queue is declared again with its limits, and dead letters land in it."""
    from tests.integration.test_client_resilience import _close_connection_named

    b, conn_name = await named_bridge()
    url = servers.amqp_url("guest")
    dlq = f"{names['queue_prefix']}.dead-letter"
    await _delete_queue(url, dlq)
    before = b.transport.connection.transport
    await asyncio.to_thread(_close_connection_named, conn_name)
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = await workers(svc, "w1")
    got, errors = await _until_served(w.fetch, 20)
    conn = b.transport.connection
    assert got is not None and got.id == task_id, (
        f"no fetch served within 20 s of a reconnection after the dead-letter queue was deleted "
        f"(reconnected={conn is not None and conn.transport is not before}, is_ready={b.transport.is_ready()}, "
        f"consume channel closed={b.transport._consume_channel.is_closed}); answers {errors[:2]} x{len(errors)}"
    )
    await wait_for(lambda: queue_exists(url, dlq), 10.0, interval=0.2, what="the dead-letter queue declared again")
    limits = {
        "x-max-length": b.settings.dead_letter_max_length,
        "x-max-length-bytes": b.settings.dead_letter_max_bytes,
        "x-overflow": "drop-head",
    }
    assert await _declared_as(url, dlq, limits), "declared again without its limits"
    await engine.publish("fetch", {"serviceId": svc, "workerId": "w"}, reply=False)  # no reply_to: dead-lettered
    assert len(await dead_letters.drain(1)) == 1


# --- the bridge user's permissions changed live -------------------------------------------------

OWN_SUFFIXES = ("dead", "unrouted", "results", "add", "fetch", "ack", "lifecycle", "dead-letter", "duty", "add-retry")


def _perms(prefix: str, write_suffixes: tuple[str, ...] = OWN_SUFFIXES) -> tuple[str, str, str]:
    def own(suffixes: tuple[str, ...]) -> str:
        return re.escape(prefix) + r"(\.(" + "|".join(re.escape(s) for s in suffixes) + r"|hints\.p?[0-9a-f]{24}))?"

    return f"^{own(OWN_SUFFIXES)}$", f"^({own(write_suffixes)}|amq\\.default)$", f"^{own(OWN_SUFFIXES)}$"


@pytest.fixture
async def own_user(names):  # type: ignore[no-untyped-def]
    user = f"qb-ops-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbitmqctl, "add_user", user, user)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", "/", user, *_perms(names["queue_prefix"]))
        yield user
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_user", user)


async def test_a_result_published_while_write_on_the_results_exchange_was_revoked_arrives_once_restored(
    own_user, bridge_env, engine, workers, servers, names
):
    """The bridge's user loses write on the results exchange for a while (an operator's mistake,
    then fixed); a task with a token is acked meanwhile. The refused publish closes the results
    channel, and aio-pika's one restore is refused too: the bridge keeps reopening it, says so in
    ``queue_bridge_amqp_channel_down``, stays ready (fetch and ack work), and once the permission is
    back the result reaches the results queue."""
    import aio_pika

    from bridge.app import Bridge

    b = Bridge(settings_from(bridge_env, amqp_url=servers.amqp_url(own_user), result_republish_after=2.0))
    await b.start()

    def down() -> float | None:
        return b.metrics.registry.get_sample_value("queue_bridge_amqp_channel_down", {"channel": "results"})

    try:
        assert down() == 0
        svc = service_id()
        prefix = names["queue_prefix"]
        no_results = tuple(s for s in OWN_SUFFIXES if s != "results")
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", "/", own_user, *_perms(prefix, no_results))
        tid = await engine.add(svc, {"n": 1}, token={"t": 1})
        w = await workers(svc, "w1")
        task = await w.fetch()
        assert task is not None and task.id == tid
        assert await task.ack({"ok": 1})
        await wait_for(lambda: down() == 1, 10.0, what="the results channel reported down")
        await asyncio.sleep(1.0)  # at least one reopen refused (the first retry comes 0.5 s after the loss)
        assert down() == 1 and b.transport._publish_channel.is_closed
        assert b.transport.is_ready(), "a closed results channel does not make the bridge unready"
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", "/", own_user, *_perms(prefix))
        conn = await aio_pika.connect(servers.amqp_url("guest"))
        try:
            ch = await conn.channel()
            q = await ch.declare_queue(f"{prefix}.results", passive=True)

            async def got() -> Any:
                # Its own result: the bridge holds its duty, and its relay also publishes results an
                # earlier test left owed in the keyspace (to this test's results exchange).
                while (m := await q.get(fail=False, no_ack=True)) is not None:
                    body = json.loads(m.body)
                    if body["taskId"] == tid:
                        return body
                return None

            msg, exc = await _try(wait_for(got, 20.0, interval=0.2, what="the result"))
            assert exc is None and msg["taskId"] == tid, (
                f"the result of a task acked while write on {prefix}.results was revoked never arrived within "
                f"20 s of the permission being restored (results channel closed="
                f"{b.transport._publish_channel.is_closed}, bridge is_ready={b.transport.is_ready()})"
            )
        finally:
            await conn.close()
        assert down() == 0
        # and the bridge still serves
        tid2 = await engine.add(svc, {"n": 2})
        w2 = await workers(svc, "w2")
        t2 = await w2.fetch()
        assert t2 is not None and t2.id == tid2
        assert b.transport.is_ready()
    finally:
        await b.stop()


async def test_a_worker_loop_goes_on_while_its_fetch_queue_is_declared_again(
    bridge, engine, servers, names, monkeypatch
):
    """While a deleted request queue is being declared again, the requests sent to it go through
    the alternate exchange to ``.unrouted``, and were answered ``bad_request: unknown method``: a
    worker's mistake, which ends ``Worker.run`` (and ``async for``) for good. Every worker of the
    fleet that fetched in that window stopped serving. They are ``unavailable`` now: retried."""
    import bridge.transport.amqp as amqp
    from bridge.client import Worker

    url = servers.amqp_url("guest")
    fetch_q = f"{names['queue_prefix']}.fetch"
    real = amqp.declare_consumed_queue
    refusing = True

    async def refused_for_a_while(*args: Any, **kwargs: Any) -> Any:
        if refusing:
            raise RuntimeError("refused (test)")
        return await real(*args, **kwargs)

    def unrouted_answers() -> float:
        samples = bridge.metrics.registry.collect()
        return sum(
            s.value
            for m in samples
            if m.name == "queue_bridge_requests"
            for s in m.samples
            if s.name == "queue_bridge_requests_total" and s.labels.get("method") == "unknown"
        )

    svc = service_id()
    w = Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id="w", exchange=names["exchange"])
    w.wait_ms = 500
    w.poll_interval = 0.1
    handled: list[str] = []
    stop = asyncio.Event()

    async def handler(task: Any) -> str:
        handled.append(task.id)
        stop.set()
        return "done"

    monkeypatch.setattr(amqp, "declare_consumed_queue", refused_for_a_while)
    await _delete_queue(url, fetch_q)
    async with w:
        running = asyncio.ensure_future(w.run(handler, stop=stop))
        try:
            await wait_for(
                lambda: unrouted_answers() >= 2 or running.done(), 15, what="answers through the unrouted queue"
            )
            assert not running.done(), f"the worker's loop ended: {running.exception()!r}"
            refusing = False
            task_id = await engine.add(svc, {"n": 1})
            await asyncio.wait_for(running, 30)
        finally:
            running.cancel()
    assert handled == [task_id]


async def test_a_deleted_results_queue_is_declared_again_and_the_results_reach_it(
    bridge_env, engine, workers, servers, names
):
    """An operator deletes the results queue while the fleet runs. Results were published
    `mandatory` to an exchange bound to nothing, returned, kept owed and retried, and nothing
    declared the queue again (only a restart or a reconnection did): past the task's life they
    were dropped, and the workflows waited for ever (the engine's user may not declare it). A
    returned result now makes the bridge declare and bind the queue again (found by review,
    2026-12-07)."""
    import aio_pika

    from bridge.app import Bridge

    b = Bridge(settings_from(bridge_env, result_republish_after=1.0))
    await b.start()
    try:
        await wait_for(lambda: b.duty.held, 10, what="the duty")
        results_queue = f"{names['queue_prefix']}.results"
        await _delete_queue(servers.amqp_url("guest"), results_queue)
        svc = service_id()
        tid = await engine.add(svc, {"n": 1}, token={"t": 1})
        w = await workers(svc, "w1")
        task = await w.fetch()
        assert task is not None and task.id == tid
        assert await task.ack({"ok": 1})
        conn = await aio_pika.connect(servers.amqp_url("guest"))
        try:
            ch = await conn.channel()

            async def got() -> Any:
                try:
                    q = await ch.declare_queue(results_queue, passive=True)
                except aio_pika.exceptions.ChannelClosed:
                    return None
                while (m := await q.get(fail=False, no_ack=True)) is not None:
                    if json.loads(m.body)["taskId"] == tid:
                        return True
                return None

            async def result_arrived() -> Any:
                nonlocal ch
                if ch.is_closed:
                    ch = await conn.channel()
                return await got()

            await wait_for(result_arrived, 30.0, interval=0.3, what="the result in the results queue, declared again")
        finally:
            await conn.close()
    finally:
        await b.stop()
