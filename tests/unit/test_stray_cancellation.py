"""A ``CancelledError`` nobody asked for, met on a request's path, still settles the delivery.

aiormq ends a connection it finds stuck (no frame from the broker for a few heartbeats) with
``close(CancelledError)``: every call still pending on it (a publisher confirm, a queue declare)
then raises ``CancelledError`` in a task that nobody cancelled (``bridge.domain.cancellation``).
A request handler waits on other connections than its delivery's own: the probation reply
connection's confirm, the add retry lane's confirm on the main connection, a hint queue's
declaration. The handlers caught ``Exception`` only, so such a ``CancelledError`` ended the
handler's task: its delivery was never acknowledged (a prefetch slot lost until the channel
closed, up to RabbitMQ's consumer timeout) and nothing was logged. Found by a review.

A real cancellation (the bridge's stop) still goes through: the tests below check both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import orjson
import pytest

from bridge.domain.errors import OwnerKeyUnusable
from bridge.transport.amqp import AmqpTransport
from bridge.transport.handlers import DEFERRED
from tests.unit.test_fuzz import REPLY_TO, _Message, _transport

pytestmark = pytest.mark.anyio

ADD = orjson.dumps({"serviceId": "svc", "value": {"x": 1}})
FETCH = orjson.dumps({"serviceId": "svc", "workerId": "w-1"})
ACK = orjson.dumps(
    {"serviceId": "svc", "workerId": "w-1", "taskId": "00000000-0000-1000-8000-000000000000", "result": 1}
)
BODIES = {"add": ADD, "fetch": FETCH, "ack": ACK}


async def _cut_by_its_connection() -> None:
    """What a call pending on a connection aiormq closed as stuck meets: the future it waits on is
    cancelled by the connection (``close(CancelledError)``), not its own task."""
    pending = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(pending.cancel)
    await pending


class _Confirming:
    """The probation channel's aiormq channel: its confirm is cut, or never comes (``hang``)."""

    def __init__(self, hang: asyncio.Event | None = None) -> None:
        self.hang = hang
        self.waiting = asyncio.Event()

    async def basic_publish(self, *args: Any, **kwargs: Any) -> None:
        self.waiting.set()
        if self.hang is not None:
            await self.hang.wait()
        await _cut_by_its_connection()


class _ProbationChannel:
    is_closed = False

    def __init__(self, confirming: _Confirming) -> None:
        self.confirming = confirming

    async def get_underlay_channel(self) -> _Confirming:
        return self.confirming


class _ProbationConnection:
    is_closed = False

    def __init__(self, confirming: _Confirming) -> None:
        self.confirming = confirming

    async def channel(self, **kwargs: Any) -> _ProbationChannel:
        return _ProbationChannel(self.confirming)

    async def close(self) -> None:
        self.is_closed = True


def _unproven_replies(transport: AmqpTransport, confirming: _Confirming) -> None:
    """Replies to REPLY_TO go through a probation connection (its node not proven yet)."""
    transport.replies.proven.clear()

    async def connect() -> Any:
        return _ProbationConnection(confirming)

    transport.replies._connect = connect


async def _run(handler: Any, message: _Message) -> Any:
    """``handler(message)`` in a task of its own, as the transport runs each delivery."""
    task = asyncio.create_task(handler(cast(Any, message)))
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done, "the handler did not end"
    assert not task.cancelled(), f"the handler's task ended on a CancelledError, its delivery {message.settled}"
    return task.result()


def _handler(transport: AmqpTransport, method: str) -> Any:
    handler = {"add": transport._on_add, "fetch": transport._on_fetch, "ack": transport._on_ack}[method]
    return transport._guarded(handler)


@pytest.mark.parametrize("method", ["add", "fetch", "ack"])
async def test_a_probation_confirm_cut_by_its_connection_still_settles_the_request(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport, _ = _transport()
    _unproven_replies(transport, _Confirming())
    message = _Message(BODIES[method], method, {}, "engine" if method == "add" else "worker-a", REPLY_TO)
    with caplog.at_level(logging.WARNING, logger="bridge.amqp"):
        await _run(_handler(transport, method), message)
    # Executed, its reply lost with the probation connection (best effort: the requester retries).
    assert message.settled == ["ack"], message.settled
    assert "reply to" in caplog.text and "not delivered" in caplog.text


@pytest.mark.parametrize("method", ["add", "fetch", "ack"])
async def test_a_real_cancellation_of_a_request_waiting_for_its_reply_still_goes_through(method: str) -> None:
    hang = asyncio.Event()
    confirming = _Confirming(hang)
    transport, _ = _transport()
    _unproven_replies(transport, confirming)
    message = _Message(BODIES[method], method, {}, "engine" if method == "add" else "worker-a", REPLY_TO)
    task = asyncio.create_task(_handler(transport, method)(cast(Any, message)))
    await asyncio.wait_for(confirming.waiting.wait(), 5)
    task.cancel()  # the bridge's stop
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert message.settled == [], "a request cut by the bridge's stop is left to the broker, as before"


class _FailingQueue:
    """The domain's fetch and ack met a broker call cut by its connection (a hint queue's declare)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    async def fetch(self, *args: Any, **kwargs: Any) -> Any:
        await _cut_by_its_connection()

    async def ack(self, *args: Any, **kwargs: Any) -> Any:
        await _cut_by_its_connection()


class KeyUnusableOnce(_FailingQueue):
    """The owner's key-server entry unusable at the add's first preparation (so it goes to the
    retry lane, or is retried in place), fine after; the adds' writes recorded (their arguments)."""

    def __init__(self, queue: Any) -> None:
        super().__init__(queue)
        self.prepared = 0
        self.writes: list[dict[str, Any]] = []

    async def prepare_add(self, *args: Any, **kwargs: Any) -> Any:
        self.prepared += 1
        if self.prepared == 1:
            raise OwnerKeyUnusable("the owner's key-server entry is unusable")
        return await self._queue.prepare_add(*args, **kwargs)

    async def store_add(self, pending: Any, **kwargs: Any) -> Any:
        self.writes.append(kwargs)
        return await self._queue.store_add(pending, **kwargs)


@pytest.mark.parametrize("method", ["fetch", "ack"])
async def test_a_domain_call_cut_by_a_connection_answers_unavailable_and_settles(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    transport, channel = _transport()
    transport.handlers.queue = cast(Any, _FailingQueue(transport.handlers.queue))
    message = _Message(BODIES[method], method, {}, "worker-a", REPLY_TO)
    with caplog.at_level(logging.WARNING, logger="bridge.amqp"):
        await _run(_handler(transport, method), message)
    # Retryable (a broker connection went away under it): answered and acked, as any ``unavailable``.
    assert message.settled == ["ack"], message.settled
    (reply,) = channel.default_exchange.published
    assert orjson.loads(reply)["error"]["code"] == "unavailable"


async def test_an_add_whose_store_is_cut_by_a_connection_is_requeued() -> None:
    transport, _ = _transport()

    class _Cut(_FailingQueue):
        async def store_add(self, *args: Any, **kwargs: Any) -> Any:
            await _cut_by_its_connection()

    transport.handlers.queue = cast(Any, _Cut(transport.handlers.queue))
    message = _Message(ADD, "add", {}, "engine", REPLY_TO)
    await _run(_handler(transport, "add"), message)
    # ``unavailable`` for an add: handed back to RabbitMQ (never dead-lettered, never lost).
    assert message.settled == ["requeue"], message.settled


async def test_a_stray_cancellation_past_a_handler_is_settled_by_the_last_resort() -> None:
    transport, _ = _transport()

    async def consumer(message: Any) -> None:
        await _cut_by_its_connection()

    message = _Message(FETCH, "fetch", {}, "worker-a", REPLY_TO)
    await _run(transport._guarded(consumer), message)
    assert message.settled == ["reject"], message.settled


async def test_a_retry_lane_confirm_cut_by_its_connection_leaves_the_add_retried_in_place() -> None:
    transport, _ = _transport()
    handlers = transport.handlers

    class _Exchange:
        async def publish(self, *args: Any, **kwargs: Any) -> None:
            await _cut_by_its_connection()  # the main connection closed as stuck under the confirm

    handlers.lane.attach(cast(Any, _Exchange()))
    handlers.lane.in_place_limit = 0  # the owner holds its share: its next add goes to the lane
    failures: list[BaseException] = []
    handlers.lane.on_failure = failures.append
    message = _Message(ADD, "add", {}, "engine", REPLY_TO)
    transport.replies.proven.add("whatever")  # (replies are irrelevant here)
    outcome = await _run(handlers.add, message)
    assert outcome != DEFERRED
    assert message.settled == ["ack"], "the lane did not take it: retried in place (stored), as before"
    assert failures, "the channel's renewal is told of the failed publish"


async def test_an_add_of_an_owner_whose_key_is_unusable_is_retried_in_place_when_the_lane_confirm_is_cut() -> None:
    transport, _ = _transport()
    handlers = transport.handlers
    handlers._consuming = lambda: True  # the bridge is not stopping: unavailable adds are retried
    handlers.queue = cast(Any, KeyUnusableOnce(handlers.queue))
    published = 0

    class _Exchange:
        async def publish(self, *args: Any, **kwargs: Any) -> None:
            nonlocal published
            published += 1
            await _cut_by_its_connection()

    handlers.lane.attach(cast(Any, _Exchange()))
    handlers.lane.in_place_limit = 0
    message = _Message(ADD, "add", {}, "engine", REPLY_TO)
    await _run(handlers.add, message)
    assert message.settled == ["ack"], message.settled
    assert published == 1, "a lane that failed this add once is not asked again for it"


def _hints_whose_declaration_is_cut() -> Any:
    """Hints whose hint-queue declaration, on the main connection, is cut by its close."""
    from bridge.config import Settings
    from bridge.transport.hints import AmqpHints

    hints = AmqpHints(Settings(keyring=None))

    class _Channel:
        async def get_queue(self, name: str, ensure: bool = False) -> Any:
            raise AssertionError("not reached: the declaration comes first")

    async def declare(name: str) -> None:
        await _cut_by_its_connection()

    hints._channel = cast(Any, _Channel())
    hints._declare = declare  # type: ignore[method-assign]
    return hints


async def test_an_adds_hint_whose_queue_declaration_is_cut_is_a_hint_lost() -> None:
    import uuid

    from bridge.domain.hints import Hint
    from bridge.domain.records import LANE_FRESH, QueueKey

    hints = _hints_whose_declaration_is_cut()
    task_id = uuid.uuid1()
    # Inside the add's store (its delivery not settled yet): lost, found by reconciliation.
    await _run(
        lambda _: hints.offer(QueueKey("o", "s"), Hint(task_id, LANE_FRESH, task_id, None, False)),
        _Message(b"", "add", {}, None, None),
    )
    assert hints.lost == 1


async def test_a_fetchs_hint_queue_declaration_cut_makes_hints_unavailable() -> None:
    from bridge.domain.hints import HintsUnavailable
    from bridge.domain.records import QueueKey

    hints = _hints_whose_declaration_is_cut()

    async def take(_: Any) -> Any:
        with pytest.raises(HintsUnavailable):  # the fetch scans the store instead, as for any such failure
            await hints.take(QueueKey("o", "s"), 0)

    await _run(take, _Message(b"", "fetch", {}, None, None))
