"""``Worker.run``: a business error is acked as one, also when its ack meets a broker blip
(real servers; the blip is one request the client fails as a lost connection would).

``run`` gave a handler no way to return a business error but ``task.ack_error`` itself; when that
ack got no answer (a broker blip) the exception left the handler, and ``run`` took it for the
handler failing: the task was given back (``fail``), ran again, and was parked "failed" after its
limit, the engine never told the business error. Caught by the handler, which then returned,
``run`` acked its return value as a success. The handler's own outcome is sent again now, as the
loop's acks are, and ``raise TaskError(error)`` returns a business error. Found by review,
2026-12-07."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from bridge.client import ConnectionLost, PayloadTooLargeError, Task, TaskError, Worker
from tests.conftest import OWNERS, service_id

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

DECLINED = {"message": "payment declined"}


class _Blipping:
    """A worker's requests, recorded; the first ``blips`` of ``method`` fail as a lost connection
    would (never sent), the rest go to the real servers."""

    def __init__(self, worker: Worker, method: str, blips: int = 1) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.method, self.blips, self._real = method, blips, worker.call
        worker.call = self.call  # type: ignore[method-assign]

    async def call(self, method: str, body: Any, **kw: Any) -> dict[str, Any]:
        self.sent.append((method, {k: v for k, v in body.items() if k != "result" or len(str(v)) < 100}))
        if method == self.method and self.blips:
            self.blips -= 1
            raise ConnectionLost("the broker went away (a blip)", sent=False)
        return await self._real(method, body, **kw)

    def methods(self) -> list[str]:
        return [m for m, _ in self.sent]


def _worker(servers: Any, names: dict[str, str], svc: str, worker_id: str, **kw: Any) -> Worker:
    w = Worker(servers.amqp_url(OWNERS[0]), service=svc, worker_id=worker_id, exchange=names["exchange"], **kw)
    w.wait_ms = 1_000
    return w


async def _run_once(w: Worker, handler: Any, stop: asyncio.Event) -> None:
    await w.open()
    try:
        await asyncio.wait_for(w.run(handler, stop=stop), 30.0)
    finally:
        await w.close()


async def _nothing_left(servers: Any, names: dict[str, str], svc: str) -> bool:
    async with _worker(servers, names, svc, f"r13-check-{svc}") as other:
        return await other.fetch(wait_ms=0) is None


@pytest.mark.parametrize("how", ["ack_error raises", "ack_error caught", "TaskError"])
async def test_a_business_error_is_acked_as_one_through_a_lost_ack(bridge, engine, servers, names, how):
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = _worker(servers, names, svc, f"r13-{how[:9]}")
    calls = _Blipping(w, "ack")
    stop = asyncio.Event()
    runs: list[str] = []

    async def handler(task: Task) -> str:
        runs.append(task.id)
        stop.set()
        if how == "TaskError":
            raise TaskError(DECLINED)  # the loop's own ack_error meets the blip
        if how == "ack_error caught":
            with contextlib.suppress(ConnectionLost):
                await task.ack_error(DECLINED)
            return "not a success"
        await task.ack_error(DECLINED)
        return "unreachable"

    await _run_once(w, handler, stop)
    assert runs == [task_id], "the handler ran once"
    assert "fail" not in calls.methods(), f"given back as a technical failure: {calls.sent}"
    acks = [body for m, body in calls.sent if m == "ack"]
    assert calls.blips == 0 and len(acks) >= 2, f"no ack lost to the blip: {calls.sent}"
    assert all(b.get("error") == DECLINED and "result" not in b for b in acks), acks
    assert await _nothing_left(servers, names, svc), "completed: nobody gets it again"


async def test_a_task_given_back_at_stop_whose_fail_got_no_answer_is_given_back_again(bridge, engine, servers, names):
    """At stop, a task whose handler failed (or ``stop_timeout`` cut it) was given back with one
    fail; lost to a blip, nothing sent it again (the loop was ending), and the task stayed leased
    for the whole lease its heartbeat last set, not back "at once" as the README says. The fail is
    sent again within ``stop_grace``, as the ack at stop is (found by review, 2026-12-07)."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = _worker(servers, names, svc, "r13-stop-fail", time_to_recover_ms=600_000)
    calls = _Blipping(w, "fail")
    stop = asyncio.Event()

    async def handler(task: Task) -> None:
        stop.set()
        raise RuntimeError("the work failed as the worker stopped")

    await _run_once(w, handler, stop)
    assert calls.methods().count("fail") == 2, calls.sent
    async with _worker(servers, names, svc, "r13-next") as other:
        again = await other.fetch(wait_ms=5_000)
    assert again is not None and again.id == task_id, "back at once, not after its 10-minute lease"


async def test_an_ack_the_bridge_refused_is_not_sent_again_in_place_of_the_handlers_fallback(
    bridge, engine, servers, names
):
    """A refusal is an answer: a handler whose ack was refused (too large) and that returned a
    smaller fallback had its refused ack sent again in place of the fallback, refused again, and
    the task given back (a re-review, 2026-12-07)."""
    svc = service_id()
    task_id = await engine.add(svc, {"n": 1})
    w = _worker(servers, names, svc, "r13-refused")
    calls = _Blipping(w, "ack", blips=0)
    stop = asyncio.Event()

    async def handler(task: Task) -> str:
        stop.set()
        with contextlib.suppress(PayloadTooLargeError):
            await task.ack("x" * (2 << 20))
        return "a summary instead"

    await _run_once(w, handler, stop)
    assert "fail" not in calls.methods(), calls.sent
    acks = [body for m, body in calls.sent if m == "ack"]
    assert len(acks) == 2 and acks[1].get("result") == "a summary instead", acks
    assert await _nothing_left(servers, names, svc), f"{task_id} came back"


async def test_a_handler_cut_at_stop_after_its_own_ack_got_no_answer_has_that_ack_sent_again(
    bridge, engine, servers, names
):
    """``stop_timeout`` cut a handler that was retrying its own ``ack_error`` through a blip: the
    task was given back (``StopTimeout``) to run again, the engine never told (a re-review,
    2026-12-07). Its outcome is sent again instead."""
    svc = service_id()
    await engine.add(svc, {"n": 1})
    w = _worker(servers, names, svc, "r13-cut", stop_timeout=0.5)
    calls = _Blipping(w, "ack")
    stop = asyncio.Event()

    async def handler(task: Task) -> None:
        stop.set()
        with contextlib.suppress(ConnectionLost):
            await task.ack_error(DECLINED)
        await asyncio.Event().wait()  # retrying, say, until stop_timeout cuts it

    await _run_once(w, handler, stop)
    assert "fail" not in calls.methods() and calls.methods().count("ack") == 2, calls.sent
    acks = [body for m, body in calls.sent if m == "ack"]
    assert all(b.get("error") == DECLINED and "result" not in b for b in acks), acks
    assert await _nothing_left(servers, names, svc), "completed with its business error, not given back"
