"""How the client paces itself while RabbitMQ or the bridge does not answer (real broker).

* ``keep_alive``: after an extend without an answer the next beat was a third of what was left of
  the lease; once the lease had run out that was the floor, 0.1 s, for as long as the outage
  lasted (ten connection attempts a second per task held). Now it backs off, 1 s at least, and
  ``Task.lease_expired`` says the lease is believed over.
* ``Worker.run``: the pauses between fetches without an answer doubled exactly, so a fleet that
  lost its broker at one moment came back in lockstep. Now full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest

from bridge.client import Worker
from tests.conftest import OWNERS, service_id, wait_for
from tests.faults import TcpProxy

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def test_keep_alive_backs_off_once_the_lease_ran_out_without_an_answer(bridge, engine, servers, names, caplog):
    proxy = await TcpProxy(servers.amqp_host, servers.amqp_port).start()
    svc = service_id()
    await engine.add(svc, {"n": 1})
    url = f"amqp://{OWNERS[0]}:{OWNERS[0]}@127.0.0.1:{proxy.port}/"
    w = Worker(url, service=svc, worker_id="beating", exchange=names["exchange"], time_to_recover_ms=1_000)
    try:
        await w.open()
        task = await w.fetch()
        assert task is not None
        with caplog.at_level(logging.WARNING, logger="bridge.client"):
            async with task.keep_alive():
                proxy.cut()  # RabbitMQ out of reach: every extend fails (connection refused)
                # Waited for as the client judges it (its lease's end on the bridge's clock as it
                # knows it): a fixed half second past the end read at the cut failed a CI run when
                # an extend answered just after the cut moved the end on, or the clock estimate lagged.
                await wait_for(lambda: task.lease_expired, 10.0, what="the lease to be believed over")
                caplog.clear()
                await asyncio.sleep(3.0)  # a measured interval: how many extends it sends in 3 s
                beats = [r for r in caplog.records if "extend not answered" in r.getMessage()]
        assert 1 <= len(beats) <= 4, f"{len(beats)} extends in 3 s after the lease ran out (0.1 s apart before)"
        assert all("the lease has run out" in r.getMessage() for r in beats)
    finally:
        with contextlib.suppress(Exception):
            await w.close()
        await proxy.stop()


class _PauseRecorder(Worker):
    """A Worker that records the pauses its loop takes (instrumentation only)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pauses: list[float] = []

    async def _pause(self, seconds: float, stop: asyncio.Event | None) -> None:  # type: ignore[override]
        self.pauses.append(seconds)
        await super()._pause(seconds, stop)


async def test_the_worker_loops_pauses_after_failures_are_jittered(servers, names):
    """Two workers whose fetches all fail at once (the exchange does not exist: the broker
    refuses every publish): their pauses used to be the same 0.2, 0.4, 0.8, 1.6 s."""
    made = [
        _PauseRecorder(
            servers.amqp_url(OWNERS[0]),
            service=service_id(),
            worker_id=f"w{i}",
            exchange=f"{names['exchange']}-nobody",
            poll_interval=0.2,
            wait_ms=0,
        )
        for i in range(2)
    ]
    stop = asyncio.Event()

    async def handler(task: Any) -> None:
        return None

    for w in made:
        await w.open()
    runners = [asyncio.create_task(w.run(handler, stop=stop)) for w in made]
    try:
        await wait_for(lambda: all(len(w.pauses) >= 4 for w in made), 20.0, what="four pauses each")
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*runners), 15.0)
        for w in made:
            await w.close()
    caps = [0.2, 0.4, 0.8, 1.6]
    first, second = (w.pauses[:4] for w in made)
    for pauses in (first, second):
        assert all(0 <= p <= cap for p, cap in zip(pauses, caps, strict=True)), pauses
    assert first != second, f"both workers paused {first}: in lockstep"
    assert any(p < 0.99 * cap for p, cap in zip(first + second, caps + caps, strict=True)), (first, second)


async def test_a_long_polling_worker_pauses_when_its_bridge_answers_an_empty_fetch_at_once(make_bridge, servers, names):
    """A bridge with BRIDGE_HINTS=false does not long-poll: a fetch with ``waitMs`` answers null at
    once. The Worker (long-polling by default) paused between empty fetches only when not
    long-polling, so against such a bridge it fetched again at once, in a busy loop, each fetch a
    scan of the store. Found by the docs review, 2026-12-05."""
    await make_bridge(hints=False)
    w = _PauseRecorder(
        servers.amqp_url(OWNERS[0]), service=service_id(), worker_id="w", exchange=names["exchange"], poll_interval=0.2
    )
    assert w.wait_ms > 0, "long-polls by default"
    await w.open()
    try:
        for _ in range(3):
            assert await w._poll() is None  # the loop's one fetch, on an empty queue
    finally:
        await w.close()
    assert w.pauses == [0.2, 0.2, 0.2], "a pause after each empty fetch answered at once"
