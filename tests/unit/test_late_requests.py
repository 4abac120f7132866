"""Requests that arrive past their ``x-deadline``, and the bridge's clock on every reply, through the
transport's consumers with a queue that records what it is asked (no servers).

A late request is not executed and its delivery is settled once, as the fate table says for
``expired`` (acked), but it is answered ``unavailable``, saying by how much it was late: a client
whose clock is behind the bridge's had every request dropped, unanswered, with nothing saying why.
Every reply carries ``x-now`` (the bridge's clock), from which clients set their deadlines. The same
against a real bridge: tests/integration/test_client_clock.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

import orjson
import pytest
from pamqp.commands import Basic

from bridge.config import Settings
from bridge.domain.clock import ManualClock
from bridge.transport.amqp import AmqpTransport
from bridge.transport.fate import EXPIRED, Settle, fate_of
from bridge.transport.replies import NOW_HEADER, reply_node
from tests.unit.frame_sink import FrameChannel
from tests.unit.test_error_model import _Message as ErrorModelMessage

REPLY_TO = "amq.rabbitmq.reply-to.g1h2AAlyZXh1c0BvbmUAAF0nAAAAAAAAAAA=.Z3Vlc3Q="  # as the broker rewrites it
NOW_MS = 1_800_000_000_000


class _Channel(FrameChannel):
    def __init__(self) -> None:
        super().__init__()
        self.replies: list[tuple[dict[str, Any], Basic.Properties]] = []

    async def basic_publish(self, body: bytes, *, routing_key: str, properties: Basic.Properties, **_: Any) -> None:
        assert routing_key == REPLY_TO
        self.replies.append((orjson.loads(body), properties))


class _Metrics:
    def __init__(self) -> None:
        self.counted: list[tuple[str, dict[str, str]]] = []

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        self.counted.append((name, labels))


class _Queue:
    """Answers fetch and ack, and records that it was asked: a late request must not get here."""

    def __init__(self) -> None:
        self.clock = ManualClock(NOW_MS)
        self.metrics = _Metrics()
        self.asked: list[str] = []

    async def fetch(self, *_: Any, **__: Any) -> None:
        self.asked.append("fetch")
        return None

    async def ack(self, *_: Any, **__: Any) -> bool:
        self.asked.append("ack")
        return True


class _Message(ErrorModelMessage):
    """A request as the transport hands it to the handlers (the error model's), with headers."""

    def __init__(self, method: str, headers: dict[str, Any]) -> None:
        super().__init__(method)
        self.body = orjson.dumps({"serviceId": "s", "workerId": "w", "result": 1})
        self.headers = headers
        self.message_id = None


def _handle(method: str, headers: dict[str, Any]) -> tuple[_Queue, _Message, _Channel, list[tuple[str, str]]]:
    queue = _Queue()
    observed: list[tuple[str, str]] = []
    transport = AmqpTransport(Settings(keyring=None), cast(Any, queue), lambda m, o, s: observed.append((m, o)))
    channel = _Channel()
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))
    message = _Message(method, headers)
    consumer = {"fetch": transport._on_fetch, "ack": transport._on_ack}[method]
    asyncio.run(consumer(cast(Any, message)))
    return queue, message, channel, observed


@pytest.mark.parametrize("method", ["fetch", "ack"])
def test_a_late_request_is_answered_unavailable_not_executed_and_settled_once(method: str) -> None:
    queue, message, channel, observed = _handle(method, {"x-deadline": NOW_MS - 1_500})
    assert queue.asked == [], "not executed"
    assert message.settled == [fate_of(EXPIRED, method).settle], "settled once, as an expired request is"
    assert queue.metrics.counted == [("requests_expired", {"method": method})]
    assert observed == [(method, EXPIRED)]
    ((body, properties),) = channel.replies
    assert body["error"]["code"] == "unavailable"
    assert "past its x-deadline by 1500 ms" in body["error"]["message"]
    assert "clock" in body["error"]["message"]
    assert properties.message_type == "error"
    assert properties.correlation_id == message.correlation_id
    assert (properties.headers or {})[NOW_HEADER] == NOW_MS


def test_a_request_in_time_is_executed_and_its_reply_says_the_bridges_clock() -> None:
    queue, message, channel, observed = _handle("ack", {"x-deadline": NOW_MS + 10_000})
    assert queue.asked == ["ack"]
    assert message.settled == [Settle.ACK]
    assert observed == [("ack", "ok")]
    ((body, properties),) = channel.replies
    assert body == {"result": True}
    assert properties.message_type == "result"
    assert (properties.headers or {})[NOW_HEADER] == NOW_MS


def test_a_request_without_a_deadline_is_executed() -> None:
    queue, message, channel, _ = _handle("fetch", {})
    assert queue.asked == ["fetch"]
    assert message.settled == [Settle.ACK]
    ((body, properties),) = channel.replies
    assert body == {"result": None}
    assert (properties.headers or {})[NOW_HEADER] == NOW_MS
