"""The keep_alive heartbeat, without servers (``Worker.call`` replaced, as in test_client_lifecycle).

* A beat waited the client's whole ``timeout`` (10 s by default) for its reply whatever was left of
  the lease, and the next beat was sent only after that: two lost replies cost a 30 s lease, one a
  15 s lease. Each beat's wait is now bounded by what is left of the lease.
* A beat that raised anything but the bridge's answer stopped the heartbeat with only a log line:
  the handler went on working on a task whose lease would run out, ``lost`` never set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import pytest

from bridge.client import RequestTimeout, Task, Worker
from bridge.client.rpc import _seconds_until
from tests.client_time import iso_in, until

pytestmark = pytest.mark.anyio

URL = "amqp://worker-a:worker-a@127.0.0.1:1/"  # never connected: every request goes to the fake


async def test_a_beat_whose_reply_is_lost_leaves_time_for_the_next_ones_before_the_lease_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 4 s lease, a client timeout of 3 s: the first two beats get no reply (each waits as long
    as the call lets it, then RequestTimeout), the third is answered. It used to be sent after
    the lease had run out (the first beat alone waited 3 s of the 2.7 s left)."""
    worker = Worker(URL, service="svc", worker_id="w1", timeout=3.0)
    task = Task(worker, "t1", {"v": 1}, 1, iso_in(4.0), {}, 7, True, 4_000)
    worker.current = task
    sent_left: list[float] = []  # what was left of the first lease as each extend went out
    lease_end = task.lease_expires_at
    third = asyncio.Event()

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        assert method == "extend"
        left = _seconds_until(lease_end, time.time())
        assert left is not None
        sent_left.append(left)
        if len(sent_left) == 3:
            third.set()
        if len(sent_left) <= 2:
            # No reply: the call waits its whole bound (the client's timeout, or a shorter one asked).
            waited = kw.get("within") or worker.timeout
            await asyncio.sleep(min(worker.timeout, waited))
            raise RequestTimeout(f"no reply to extend within {waited}s", waited_s=waited)
        return {"result": True, "task": {"id": "t1", "epoch": 7, "leaseExpiresAt": iso_in(4.0)}, "_headers": {}}

    monkeypatch.setattr(worker, "call", call)
    async with task.keep_alive():
        ended = (_seconds_until(lease_end, time.time()) or 0.0) + 0.5
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(third.wait(), ended)  # or the lease is over (and a little more)
    assert len(sent_left) >= 3, f"only {len(sent_left)} beats went out before the lease ended: {sent_left}"
    assert sent_left[2] > 0, f"the third beat went out {-sent_left[2]:.2f}s after the lease ended: {sent_left}"
    assert not task.lost


async def test_a_beat_that_fails_otherwise_than_by_the_bridge_marks_the_task_lost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker closed under the handler (``client is closed``), or a bug: beating on would
    repeat it, so the heartbeat stops, but not in silence: the task is marked lost (its lease
    will run out), which a handler in a long job checks."""
    worker = Worker(URL, service="svc", worker_id="w1")
    task = Task(worker, "t1", {"v": 1}, 1, iso_in(30.0), {}, 7, True)
    worker.current = task
    calls = 0

    async def call(method: str, body: Any, **kw: Any) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        raise RuntimeError("client is closed")

    monkeypatch.setattr(worker, "call", call)
    with caplog.at_level(logging.WARNING, logger="bridge.client"):
        async with task.keep_alive(every_s=0.01):
            await until(lambda: task.lost, 3.0, "the task marked lost")
    assert calls == 1
    assert any("keep-alive of task t1 stopped" in r.getMessage() for r in caplog.records)


async def test_a_beat_waits_less_but_its_request_keeps_the_whole_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """A beat bounds its wait for the reply (``within``), not the request: its ``x-deadline``
    stays the client's whole ``timeout``. Cut to ``within``, a bridge 3.5 s behind dropped every
    beat of a 9 s lease as past its deadline, and the lease ran out (a re-review, 2026-12-06).
    Nor does a wait cut short mark the channel suspect (a new connection at every beat)."""
    w = Worker(URL, service="s", worker_id="w", timeout=10.0)
    deadlines: list[float] = []

    async def request(method: str, body: Any, *, deadline: float | None = None, **kw: Any) -> Any:
        assert deadline is not None
        deadlines.append(deadline - asyncio.get_running_loop().time())
        return "cid", asyncio.get_running_loop().create_future()  # never answered

    monkeypatch.setattr(w, "_request", request)
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        await w.call_raw("extend", {"serviceId": "s"}, within=0.2)
    assert time.monotonic() - started < 2.0, "the wait was not bounded by within"
    assert deadlines and deadlines[0] > 9.0, f"the request's deadline was cut to {deadlines[0]:.2f}s"
    assert w._suspect is None


async def test_a_fail_without_an_answer_is_sent_again_a_bounded_number_of_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fail without an answer is remembered, and sent again when a fetch hands its lease back;
    with fails never answered while fetches are (the lifecycle queue's consumers down), each
    fetch handed the lease back and the fail went again, for ever: the task never ran and never
    came back. After FAIL_RESENDS the lease is forgotten and the handler runs again (a re-review)."""
    from bridge.client.errors import ConnectionLost
    from bridge.client.rpc import FAIL_RESENDS

    w = Worker(URL, service="s", worker_id="w", timeout=10.0)
    task = Task(w, "t1", {"v": 1}, deliveries=1, lease_expires_at=iso_in(60), epoch=3)

    async def fail(error: Any = None, retry_in_ms: int | None = None) -> None:
        raise ConnectionLost("no answer", sent=True)

    monkeypatch.setattr(task, "fail", fail)
    await w._send_fail(task, ["e"], retry_in_ms=None)
    assert w._fail_in_hand is not None and w._fail_in_hand[:2] == ("t1", 3)
    for resent in range(1, FAIL_RESENDS + 1):
        w._fail_in_hand = None
        await w._send_fail(task, ["e"], retry_in_ms=None, resent=resent)
        assert (w._fail_in_hand is None) == (resent >= FAIL_RESENDS)


async def test_a_beats_wait_bounds_its_connect_and_write_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """``within`` bounds the whole call a beat makes, its connect and write included (a node that
    does not answer, a write a broker alarm stalls), while its ``x-deadline`` stays whole: bounded
    only in its wait for the reply, a beat stuck connecting took the whole timeout (a re-review)."""
    w = Worker(URL, service="s", worker_id="w", timeout=10.0)

    async def stuck(*args: Any, **kw: Any) -> Any:
        await asyncio.sleep(3600)

    monkeypatch.setattr(w, "_send", stuck)
    started = time.monotonic()
    from bridge.client.errors import TransportError

    with pytest.raises(TransportError):  # not sent (ConnectionLost) or no reply (RequestTimeout)
        await w.call_raw("extend", {"serviceId": "s"}, within=0.3)
    # Bounded by SEND_MIN_S (2 s: a slow reconnect still makes it), not the whole 10 s timeout.
    assert time.monotonic() - started < 3.5
