"""Long-poll fetches outside the prefetch window are bounded (BRIDGE_MAX_WAITING_FETCHES).

A waiting fetch's delivery is acknowledged as it starts waiting, so that waiting workers do not
hold every prefetch slot; that also took it out of the only bound the broker gives: a flood of
long-polls (each acked at once, so the broker kept delivering) grew the bridge's memory and its
store polling without limit, for every tenant of the bridge. Past the bound a waiting fetch keeps
its delivery, and the prefetch bounds the rest. Found by a review, 2026-12-05.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import orjson
import pytest

from bridge.config import Settings
from bridge.domain.clock import ManualClock
from bridge.transport import capacity
from bridge.transport.amqp import AmqpTransport
from bridge.transport.capacity import MAX_PACED_REDRIVES
from bridge.transport.fate import Settle
from bridge.transport.replies import reply_node
from tests.unit.test_late_requests import NOW_MS, REPLY_TO, _Channel, _Metrics
from tests.unit.test_late_requests import _Message as _LateMessage

pytestmark = pytest.mark.anyio


class _WaitingQueue:
    """A queue whose fetches wait until released."""

    def __init__(self) -> None:
        self.clock = ManualClock(NOW_MS)
        self.metrics = _Metrics()
        self.release = asyncio.Event()
        self.all_waiting = asyncio.Event()
        self.waiting = 0

    async def fetch(self, *_: Any, **__: Any) -> None:
        self.waiting += 1
        if self.waiting == 3:
            self.all_waiting.set()
        await self.release.wait()
        return None


class _Fetch(_LateMessage):
    def __init__(self) -> None:
        super().__init__("fetch", {})
        self.body = orjson.dumps({"serviceId": "s", "workerId": "w", "waitMs": 5_000})


async def test_past_the_bound_a_waiting_fetch_keeps_its_delivery_until_answered() -> None:
    queue = _WaitingQueue()
    transport = AmqpTransport(Settings(keyring=None, max_waiting_fetches=2), cast(Any, queue), lambda m, o, s: None)
    channel = _Channel()
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))
    messages = [_Fetch() for _ in range(3)]
    handling = [asyncio.create_task(transport._on_fetch(cast(Any, m))) for m in messages]
    await asyncio.wait_for(queue.all_waiting.wait(), 5)
    assert [m.settled for m in messages] == [[Settle.ACK], [Settle.ACK], []], "the third kept its slot"
    assert transport.handlers.waiting_unbounded == 2
    queue.release.set()
    await asyncio.gather(*handling)
    assert [m.settled for m in messages] == [[Settle.ACK]] * 3, "each settled once"
    assert transport.handlers.waiting_unbounded == 0
    assert len(channel.replies) == 3


class _PacingQueue(_WaitingQueue):
    """A queue whose redrives are paced until released (as BRIDGE_REDRIVE_RATE paces them)."""

    def __init__(self, until_waiting: int) -> None:
        super().__init__()
        self.until_waiting = until_waiting
        self.redriven: list[list[str]] = []

    async def redrive(self, owner: str, service: str, task_ids: list[Any] | None) -> int:
        self.waiting += 1
        if self.waiting == self.until_waiting:
            self.all_waiting.set()
        await self.release.wait()
        self.redriven.append([str(t) for t in task_ids or []])
        return len(task_ids or [])


class _Redrive(_LateMessage):
    def __init__(self) -> None:
        super().__init__("fetch", {})
        self.routing_key = "redrive"
        self.body = orjson.dumps({"serviceId": "s", "taskIds": [str(uuid.uuid1())]})


async def test_redrives_acknowledged_early_are_bounded_past_it_one_is_answered_unavailable_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redrives are acknowledged as their pacing starts (as waiting fetches are), and were unbounded:
    a burst of them grew memory and waiters without limit. Past the bound one is answered
    ``unavailable`` at once, settled, and nothing of it is done. Found by a review, 2026-12-05."""
    monkeypatch.setattr(capacity, "OWNER_SHARE_DIVISOR", 1)  # one owner's redrives here, up to the bridge's bound
    queue = _PacingQueue(until_waiting=MAX_PACED_REDRIVES)
    transport = AmqpTransport(Settings(keyring=None), cast(Any, queue), lambda m, o, s: None)
    channel = _Channel()
    transport.replies.main = cast(Any, channel)
    transport.replies.proven.add(str(reply_node(REPLY_TO)))
    paced = [_Redrive() for _ in range(MAX_PACED_REDRIVES)]
    handling = [asyncio.create_task(transport._on_lifecycle(cast(Any, m))) for m in paced]
    await asyncio.wait_for(queue.all_waiting.wait(), 5)
    assert all(m.settled == [Settle.ACK] for m in paced), "acknowledged as their pacing starts"

    one_more = _Redrive()
    await asyncio.wait_for(transport._on_lifecycle(cast(Any, one_more)), 5)
    assert one_more.settled == [Settle.ACK], "answered and settled at once, not held"
    ((body, properties),) = channel.replies
    assert body["error"]["code"] == "unavailable"
    assert f"at most {MAX_PACED_REDRIVES} at once" in body["error"]["message"]
    assert properties.correlation_id == one_more.correlation_id
    assert queue.waiting == MAX_PACED_REDRIVES, "the one past the bound was not executed"

    queue.release.set()
    await asyncio.gather(*handling)
    assert len(queue.redriven) == MAX_PACED_REDRIVES
    assert transport.handlers.capacity.paced_redrives == 0
    assert [m.settled for m in paced] == [[Settle.ACK]] * MAX_PACED_REDRIVES, "each settled once"
    assert len(channel.replies) == MAX_PACED_REDRIVES + 1
