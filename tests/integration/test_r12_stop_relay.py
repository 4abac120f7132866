"""A duty holder stopped while its relay publishes an owed result (found by review, 2026-12-07).

``Bridge.stop`` cancelled the scheduler first: the relay's sweep was cut mid-publish, the broker
confirmed the result after that (the AMQP publish is shielded), nobody marked it, and the next duty
holder sent it again. Now the stop waits (bounded) for the sweep under way before the duty goes."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from tests.conftest import service_id, wait_for

pytestmark = pytest.mark.anyio


async def test_a_stopping_duty_holder_marks_the_result_its_relay_is_publishing(
    make_bridge: Any, engine: Any, workers: Any, cql: Any, servers: Any
) -> None:
    b = await make_bridge(result_republish_after=1.0)
    await wait_for(lambda: b.duty.held, 10, what="the duty")
    sink = b.queue.relay.sink
    real = sink.publish_result
    calls: list[Any] = []
    gate, relaying = asyncio.Event(), asyncio.Event()

    async def confirmed_later(message: Any) -> None:
        await gate.wait()
        await real(message)

    async def publish_result(message: Any) -> None:
        calls.append(message)
        if len(calls) == 1:
            raise ConnectionError("the publish beside the ack fails: the result is the relay's")
        relaying.set()
        await asyncio.shield(confirmed_later(message))  # as the AMQP sink's: a stop does not cut it

    sink.publish_result = publish_result
    svc = service_id()
    w = await workers(svc)
    await engine.add(svc, "v", token={"t": 1})
    task = await w.fetch()
    assert task is not None and await task.ack("ok")
    await wait_for(relaying.is_set, 40, what="the relay publishing the owed result")
    stopping = asyncio.create_task(make_bridge.stop(b))
    ended_early, _ = await asyncio.wait({stopping}, timeout=0.5)
    gate.set()
    await asyncio.wait_for(stopping, 30)
    assert not ended_early, "the stop did not wait for the relay's publish"
    rows = list(
        cql.execute(
            f"SELECT published FROM {servers.keyspace}.outbox_shards WHERE task_id = %s ALLOW FILTERING",
            (uuid.UUID(task.id),),
        )
    )
    assert [r["published"] for r in rows] == [True], (
        "the confirmed result left unmarked: the next holder sends it again"
    )
