"""Requests the bridge can only refuse, without servers (``Worker.call`` and ``Engine.publish``
replaced, as in test_client_r11_heartbeat). Found by review:

* ``Task.keep_alive`` beat on through refusals no retry changes (``bad_request`` for a
  ``timeToRecover`` under the contract's 100 ms, given in seconds by mistake; ``unknown_owner``):
  each beat dead-lettered at the bridge, logged, and sent again up to ten times a second, and
  :attr:`Task.lost` never set. Such a refusal (``MISCONFIGURED``, as ``Worker.run`` ends on it) now
  ends the heartbeat and marks the task lost; a ``ttr_ms`` under the minimum is refused up front.
* ``Engine.add`` sent an idempotency key the bridge refuses (over 255 characters, control
  characters): with ``wait=False`` (no reply-to) the add was dead-lettered and nobody told. Now a
  ValueError before anything is sent.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.client import (
    BadRequestError,
    BridgeClientError,
    Engine,
    InternalError,
    PayloadTooLargeError,
    Task,
    UnauthorizedError,
    UnknownOwnerError,
    Worker,
)
from tests.client_time import iso_in, until

pytestmark = pytest.mark.anyio

URL = "amqp://worker-a:worker-a@127.0.0.1:1/"  # never connected: every request goes to the fake


def _worker_refusing(
    monkeypatch: pytest.MonkeyPatch, refusal: BaseException
) -> tuple[Worker, Task, list[dict[str, Any]]]:
    worker = Worker(URL, service="svc", worker_id="w1")
    task = Task(worker, "t1", {"v": 1}, 1, iso_in(30.0), {}, 7, True)
    worker.current = task
    sent: list[dict[str, Any]] = []

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        assert method == "extend"
        sent.append(body)
        raise refusal

    monkeypatch.setattr(worker, "call", call)
    return worker, task, sent


# --- 1. keep_alive and the refusals no retry changes -------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        BadRequestError("timeToRecover: Input should be greater than or equal to 100", "bad_request"),
        UnknownOwnerError("no encryption key is configured for owner 'worker-a'", "unknown_owner"),
        UnauthorizedError("user_id does not match", "unauthorized"),
        PayloadTooLargeError("too large", "payload_too_large"),
    ],
    ids=lambda e: e.code,
)
async def test_a_beat_refused_for_good_stops_the_heartbeat_and_marks_the_task_lost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, refusal: BridgeClientError
) -> None:
    _, task, sent = _worker_refusing(monkeypatch, refusal)
    with caplog.at_level(logging.WARNING, logger="bridge.client"):
        async with task.keep_alive(every_s=0.01):
            # Time for dozens of beats (every 10 ms) had the heartbeat gone on.
            await asyncio.sleep(0.5)
    assert len(sent) == 1, f"{len(sent)} extends sent after the bridge refused the first ({refusal.code})"
    assert task.lost, "the heartbeat stopped, so the lease will run out: the handler must be told"
    logged = [r for r in caplog.records if "keep-alive of task t1" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert refusal.code in logged[0].getMessage()


async def test_a_beat_refused_for_good_after_an_ack_was_answered_is_not_a_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As for a beat answered false: the task acked meanwhile is not lost (its ack said so)."""
    _, task, sent = _worker_refusing(monkeypatch, UnknownOwnerError("no key", "unknown_owner"))
    task._settling = 1  # an ack on its way: its answer decides
    async with task.keep_alive(every_s=0.01):
        await until(lambda: sent, 3.0, "the first beat")
        await asyncio.sleep(0.2)
    assert len(sent) == 1
    assert not task.lost


async def test_a_beat_answered_another_error_is_still_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """``internal`` (or a code this client does not know) may pass: the heartbeat goes on."""
    _, task, sent = _worker_refusing(monkeypatch, InternalError("boom", "internal"))
    async with task.keep_alive(every_s=0.01):
        await until(lambda: len(sent) >= 3, 3.0, "three beats")
    assert not task.lost


@pytest.mark.parametrize("ttr_ms", [30, 99, 0, -1])
async def test_keep_alive_refuses_a_lease_under_the_contracts_minimum(
    monkeypatch: pytest.MonkeyPatch, ttr_ms: int
) -> None:
    """``ttr_ms=30`` (seconds given for milliseconds) could only be refused by the bridge, at
    every beat: refused here, before the block runs and before anything is sent."""
    _, task, sent = _worker_refusing(monkeypatch, AssertionError("nothing may be sent"))
    ran: list[bool] = []

    async def handler() -> None:
        async with task.keep_alive(every_s=0.01, ttr_ms=ttr_ms):
            ran.append(True)
            await asyncio.sleep(0.1)

    with pytest.raises(ValueError, match="ttr_ms"):
        await handler()
    assert ran == [] and sent == []


@pytest.mark.parametrize("ttr_ms", [100, 30_000])
async def test_keep_alive_takes_a_lease_at_or_over_the_minimum(monkeypatch: pytest.MonkeyPatch, ttr_ms: int) -> None:
    worker = Worker(URL, service="svc", worker_id="w1")
    task = Task(worker, "t1", {"v": 1}, 1, iso_in(30.0), {}, 7, True)
    sent: list[dict[str, Any]] = []

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        sent.append(body)
        return {"result": True, "task": {"id": "t1", "epoch": 7, "leaseExpiresAt": iso_in(30.0)}, "_headers": {}}

    monkeypatch.setattr(worker, "call", call)
    async with task.keep_alive(every_s=0.01, ttr_ms=ttr_ms):
        await until(lambda: sent, 3.0, "a beat")
    assert sent[0]["timeToRecover"] == ttr_ms and not task.lost


def test_the_clients_minimum_lease_is_the_contracts() -> None:
    from bridge.client.rpc import MIN_TIME_TO_RECOVER_MS
    from bridge.domain.models import ExtendRequest

    bounds = [getattr(m, "ge", None) for m in ExtendRequest.model_fields["time_to_recover"].metadata]
    assert MIN_TIME_TO_RECOVER_MS in bounds, bounds


# --- 2. Engine.add and the idempotency keys the bridge refuses ---------------------------------

REFUSED_KEYS = ["k" * 256, "键" * 256, "bad\nkey", "nul\x00", "del\x7f", "tab\tkey", "lone \udc80 surrogate"]


def _engine_sending(monkeypatch: pytest.MonkeyPatch) -> tuple[Engine, list[tuple[str, Any]]]:
    engine = Engine(URL, owner="tenant-a")
    sent: list[tuple[str, Any]] = []

    async def publish(method: str, body: Any, **kw: Any) -> None:
        sent.append((method, kw))

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        sent.append((method, kw))
        return {"result": True, "task": {"id": "tid"}, "_headers": {}}

    monkeypatch.setattr(engine, "publish", publish)
    monkeypatch.setattr(engine, "call", call)
    return engine, sent


@pytest.mark.parametrize("wait", [False, True], ids=["no-wait", "wait"])
@pytest.mark.parametrize("key", REFUSED_KEYS, ids=range(len(REFUSED_KEYS)))
async def test_an_add_with_a_key_the_bridge_refuses_is_refused_before_it_is_sent(
    monkeypatch: pytest.MonkeyPatch, key: str, wait: bool
) -> None:
    engine, sent = _engine_sending(monkeypatch)
    with pytest.raises(ValueError, match="message_id"):
        await engine.add("svc", {"v": 1}, message_id=key, wait=wait)
    assert sent == []


@pytest.mark.parametrize("key", [None, "", "invoice-42", "k" * 255, "键" * 255, "spaces and ünïcode ok"])
async def test_an_add_with_a_key_the_bridge_takes_is_sent(monkeypatch: pytest.MonkeyPatch, key: str | None) -> None:
    engine, sent = _engine_sending(monkeypatch)
    assert await engine.add("svc", {"v": 1}, message_id=key, wait=False) is None
    assert await engine.add("svc", {"v": 1}, message_id=key) == "tid"
    assert [m for m, _ in sent] == ["add", "add"]
    assert sent[0][1]["headers"]["x-idempotency-key"] == (key or "")


def test_the_clients_key_rule_is_the_envelopes() -> None:
    """The client keeps its own copy of the bridge's rule (bridge.transport.envelope pulls in the
    server's settings, crypto and HTTP stacks): the two must not drift apart."""
    from bridge.client.rpc import IDEMPOTENCY_KEY_PATTERN
    from bridge.transport.envelope import IDEMPOTENCY_PATTERN

    assert IDEMPOTENCY_KEY_PATTERN.pattern == IDEMPOTENCY_PATTERN.pattern
    assert IDEMPOTENCY_KEY_PATTERN.flags == IDEMPOTENCY_PATTERN.flags


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300))
def test_the_client_refuses_exactly_the_keys_the_bridge_refuses(key: str) -> None:
    """What the client lets through, the bridge takes (its ``idempotency_of`` on the header the
    client sends), and what it refuses, the bridge answers ``bad_request``."""
    from bridge.client.rpc import _checked_idempotency_key
    from bridge.domain.errors import BadRequest
    from bridge.transport.envelope import IDEMPOTENCY_HEADER, idempotency_of

    message = SimpleNamespace(headers={IDEMPOTENCY_HEADER: key}, message_id=None, redelivered=False)
    try:
        _checked_idempotency_key(key)
    except ValueError:
        with pytest.raises(BadRequest):
            idempotency_of(message)  # type: ignore[arg-type]
    else:
        assert idempotency_of(message).key == (key or None)  # type: ignore[arg-type]
