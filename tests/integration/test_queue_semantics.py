"""The seed's semantics end to end, through AMQP as a client would, on the real servers."""

from __future__ import annotations

import os

import pytest

from tests.conftest import OWNERS, own_results, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_seed_usage_example(bridge, engine, workers, servers, names):
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        task_id = await engine.add(svc, {"msg": "say hello to the world"}, token={"processId": "p-1"})
        worker = await workers(svc, "my external worker id")
        task = await worker.fetch()
        assert task is not None
        assert task.value == {"msg": "say hello to the world"}
        assert task.id == task_id
        assert task.deliveries == 1
        assert "token" not in str(task.value)
        assert await task.ack("this is the result of the service") is True
        published = await wait_for(lambda: not results.empty(), 10, what="result message")
        assert published
        msg = results.get_nowait()
        assert msg["token"] == {"processId": "p-1"}
        assert msg["taskId"] == task_id
        assert msg["serviceId"] == svc
        assert msg["result"] == "this is the result of the service"
        assert msg["_headers"]["x-owner"] == OWNERS[0]


async def test_a_value_of_the_largest_accepted_size_comes_back_whole(bridge, engine, workers, servers, names):
    """1 MiB each way. The add's rows were sent as one batch, which Cassandra refuses over 50 KiB
    (every add above that answered ``internal``); the fetch reply spans about eight AMQP frames,
    which the bridge writes as bytes (bridge.transport.frames); the result goes back whole."""
    svc = service_id()
    value = os.urandom(1_048_576 // 2 - 2).hex()  # a JSON string of exactly 1 MiB, quotes included
    result = os.urandom(1_048_576 // 2 - 16).hex()  # the limit counts the outcome, {"result": ...}
    async with own_results(servers, names, svc) as results:
        task_id = await engine.add(svc, value, token={"processId": "big"})
        w = await workers(svc)
        task = await w.fetch()
        assert task is not None
        assert task.id == task_id
        assert task.value == value
        assert await task.ack(result) is True
        await wait_for(lambda: not results.empty(), 10, what="the result message")
        published = results.get_nowait()
        assert published["taskId"] == task_id
        assert published["result"] == result


async def test_fifo_order_and_fetch_repeats_until_ack(bridge, engine, workers):
    svc = service_id()
    for i in range(5):
        await engine.add(svc, {"i": i})
    w = await workers(svc)
    seen = []
    for _ in range(5):
        first = await w.fetch()
        again = await w.fetch()
        assert first is not None and again is not None
        assert again.id == first.id, "a worker's fetch returns the same task until it acks it"
        assert again.deliveries == first.deliveries
        seen.append(first.value["i"])
        assert await first.ack({"done": first.value["i"]}) is True
    assert seen == [0, 1, 2, 3, 4]
    assert await w.fetch() is None


async def test_ack_without_a_task_is_false(bridge, workers):
    w = await workers(service_id())
    assert await w.ack(result=1, held=True) is False


async def test_two_workers_get_different_tasks(bridge, engine, workers):
    svc = service_id()
    await engine.add(svc, "a")
    await engine.add(svc, "b")
    wa, wb = await workers(svc, "A"), await workers(svc, "B")
    ta, tb = await wa.fetch(), await wb.fetch()
    assert ta is not None and tb is not None
    assert {ta.value, tb.value} == {"a", "b"}
    assert ta.id != tb.id
    assert await wb.fetch() is not None and (await wb.fetch()).id == tb.id


@pytest.mark.parametrize("falsy", [0, False, "", None, [], {}])
async def test_falsy_results_are_published(bridge, engine, workers, servers, names, falsy):
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        await engine.add(svc, "v", token={"processId": "p"})
        w = await workers(svc)
        assert await w.fetch() is not None
        assert await w.ack(result=falsy) is True
        await wait_for(lambda: not results.empty(), 10, what="result")
        msg = results.get_nowait()
        assert "result" in msg and msg["result"] == falsy
        assert "error" not in msg


async def test_error_is_published_back(bridge, engine, workers, servers, names):
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        await engine.add(svc, "v", token={"processId": "p"})
        w = await workers(svc)
        assert await w.fetch() is not None
        assert await w.ack(error={"msg": "an error has occured"}) is True
        await wait_for(lambda: not results.empty(), 10, what="result")
        msg = results.get_nowait()
        assert msg["error"] == {"msg": "an error has occured"}
        assert "result" not in msg


async def test_task_without_token_publishes_nothing(bridge, engine, workers, servers, names):
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        await engine.add(svc, "no token")
        await engine.add(svc, "with token", token={"t": 1})
        w = await workers(svc)
        t1 = await w.fetch()
        assert t1 is not None and t1.value == "no token"
        await t1.ack("r1")
        t2 = await w.fetch()
        assert t2 is not None
        await t2.ack("r2")
        await wait_for(lambda: not results.empty(), 10, what="result")
        msg = results.get_nowait()
        assert msg["result"] == "r2"
        assert results.empty()


async def test_repeated_ack_is_idempotent_and_publishes_once(bridge, engine, workers, servers, names):
    """A worker whose ack reply was lost retries the ack: same answer, one completion, one result."""
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        await engine.add(svc, "once", token={"p": 1})
        await engine.add(svc, "next")
        w = await workers(svc)
        assert (await w.fetch()).value == "once"
        assert await w.ack("r") is True
        assert await w.ack("r") is True
        await wait_for(lambda: not results.empty(), 10, what="result")
        nxt = await w.fetch()
        assert nxt.value == "next"
        assert await nxt.ack("r2") is True
        assert results.qsize() == 1


async def test_a_fresh_instance_skips_long_runs_of_consumed_tasks(make_bridge, engine, workers):
    """An instance starting behind the cursor must page past claimed tasks, not report an empty queue."""
    first = await make_bridge()
    svc = service_id()
    for i in range(300):
        await engine.add(svc, i)
    w = await workers(svc)
    for i in range(250):
        t = await w.fetch()
        assert t.value == i
        assert await t.ack(None)
    await make_bridge(instance_id="second")
    await first.stop()  # only the fresh instance serves now
    rest = []
    while (t := await w.fetch()) is not None:
        rest.append(t.value)
        assert await t.ack(None)
    assert rest == list(range(250, 300))


async def test_traceparent_travels_from_add_to_fetch_reply_and_result(bridge, engine, workers, servers, names):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent = f"00-{trace_id}-00f067aa0ba902b7-01"
    svc = service_id()
    async with own_results(servers, names, svc) as results:
        await engine.add(svc, "traced", token={"p": 1}, traceparent=parent)
        await engine.add(svc, "malformed trace", traceparent="not-a-traceparent")
        w = await workers(svc)
        task = await w.fetch()
        fetched = task.headers["traceparent"]
        assert fetched.split("-")[1] == trace_id
        assert fetched != parent  # a child span of the engine's
        await task.ack("ok")
        await wait_for(lambda: not results.empty(), 10, what="result")
        assert results.get_nowait()["_headers"]["traceparent"].split("-")[1] == trace_id
        untraced = await w.fetch()
        assert untraced.value == "malformed trace"
        assert "traceparent" not in untraced.headers
