"""Requests past their deadline, or abandoned, do not write a log line each (no servers).

Each one wrote an INFO line ("request past its deadline not executed", "request abandoned"). After
a backlog of requests past their deadline (a paused bridge, a slow store, a client whose clock is
behind) that was a line per request, thousands, burying the lines that name the cause; README
says only ``BRIDGE_LOG_LEVEL=DEBUG`` adds per-request lines. They are counted in the metrics
(``requests_expired_total``) already. Found by a review.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import pytest

from bridge.domain.fetching import RequestAbandoned
from tests.unit.test_fuzz import REPLY_TO, _Message, _transport

pytestmark = pytest.mark.anyio

N = 200
FETCH = b'{"serviceId": "s", "workerId": "w"}'


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bridge.amqp" and r.levelno >= logging.INFO]


async def test_requests_past_their_deadline_write_one_line_between_them(caplog: pytest.LogCaptureFixture) -> None:
    transport, _ = _transport()
    past = transport.queue.clock.now_ms() - 5_000  # (the stand-in's clock stands still)
    with caplog.at_level(logging.DEBUG, logger="bridge.amqp"):
        for _ in range(N):
            message = _Message(FETCH, "fetch", {"x-deadline": past}, "worker-a", REPLY_TO)
            await transport._guarded(transport._on_fetch)(cast(Any, message))
            assert message.settled == ["ack"]
    lines = _lines(caplog)
    assert len(lines) <= 1, f"{len(lines)} lines for {N} late requests: {lines[:3]}"
    assert all("deadline" in line for line in lines), lines
    # Each is still there at DEBUG, as every per-request line.
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "deadline" in r.getMessage()]
    assert len(debug) == N


async def test_abandoned_requests_write_no_line_each(caplog: pytest.LogCaptureFixture) -> None:
    transport, _ = _transport()

    async def abandoned(*args: Any, **kwargs: Any) -> Any:
        raise RequestAbandoned("its worker is gone")

    transport.handlers.queue.fetch = abandoned  # type: ignore[method-assign]
    with caplog.at_level(logging.DEBUG, logger="bridge.amqp"):
        for _ in range(N):
            message = _Message(FETCH, "fetch", {}, "worker-a", REPLY_TO)
            await transport._guarded(transport._on_fetch)(cast(Any, message))
            assert message.settled == ["ack"]
    assert _lines(caplog) == []


async def test_adds_failing_in_an_outage_write_one_line_a_kind_between_them(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each add retried in place wrote a line per attempt (ten over its 30 s), and one more when
    requeued, at once again: ~27 lines a second a bridge in an outage, thousands across a fleet.
    Found by review, 2026-12-06."""
    import asyncio

    from bridge.domain.errors import Unavailable
    from bridge.transport import handlers as handlers_module

    monkeypatch.setattr(handlers_module, "ADD_RETRY_BUDGET_S", 0.5)
    transport, _ = _transport()
    transport._consumer_tags["add"] = "tag"  # consuming: adds are retried in place

    async def unavailable(*args: Any, **kwargs: Any) -> str:
        raise Unavailable("cassandra unavailable (injected)")

    transport.handlers.queue.store_add = unavailable  # type: ignore[method-assign]
    add = b'{"serviceId": "s", "value": 1}'
    messages = [_Message(add, "add", {}, "engine", REPLY_TO) for _ in range(N // 4)]
    with caplog.at_level(logging.DEBUG, logger="bridge.amqp"):
        await asyncio.gather(*(transport._guarded(transport._on_add)(cast(Any, m)) for m in messages))
    assert all(m.settled == ["requeue"] for m in messages), {tuple(m.settled) for m in messages}
    lines = _lines(caplog)
    retried = [line for line in lines if "retrying" in line]
    requeued = [line for line in lines if "requeued" in line]
    assert len(retried) <= 1 and len(requeued) <= 1, f"{len(lines)} lines for {len(messages)} adds: {lines[:4]}"
