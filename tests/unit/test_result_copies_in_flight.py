"""Two copies of one result in flight on the results channel (a confirm slower than the relay's
republish: a memory alarm) shared one message id, and aiormq maps a basic.return to its publish by
message id alone: the first copy's return failed the second, and the first's ack confirmed a
result no queue took (marked published, never sent again; found by review, 2026-12-06). A copy
asked for while one is under way waits for that one's outcome: one publish, one outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from bridge.config import Settings
from bridge.domain.queue import ResultMessage
from bridge.transport.results import ResultPublisher

pytestmark = pytest.mark.anyio


class HeldExchange:
    def __init__(self, fail: bool) -> None:
        self.published: list[Any] = []
        self.release = asyncio.Event()
        self.fail = fail

    async def publish(self, message: Any, routing_key: str, mandatory: bool) -> None:
        self.published.append(message)
        await self.release.wait()
        if self.fail:
            raise RuntimeError("returned: no route")


def _message() -> ResultMessage:
    return ResultMessage(
        owner="o",
        service="s",
        task_id="t",
        completion_id="c",
        kind="result",
        token_json=b'"tok"',
        value_json=b"1",
        traceparent=None,
        completed_at_ms=None,
    )


@pytest.mark.parametrize("fail", [False, True])
async def test_a_copy_asked_for_while_one_is_in_flight_shares_its_outcome(fail: bool) -> None:
    publisher = ResultPublisher(Settings(amqp_url="amqp://queue-bridge:x@localhost/", keyring="/dev/null"))
    exchange = HeldExchange(fail)
    publisher.attach(exchange)  # type: ignore[arg-type]
    first = asyncio.ensure_future(publisher.publish_result(_message()))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(publisher.publish_result(_message()))
    await asyncio.sleep(0)
    assert len(exchange.published) == 1, "a second copy of the result was published beside the first"
    exchange.release.set()
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    if fail:
        assert all(isinstance(o, RuntimeError) for o in outcomes)
    else:
        assert outcomes == [None, None]
    # Once settled, the next copy (the relay's next sweep) is published afresh.
    exchange.release.clear()
    exchange.fail = False
    third = asyncio.ensure_future(publisher.publish_result(_message()))
    await asyncio.sleep(0)
    exchange.release.set()
    await third
    assert len(exchange.published) == 2
