"""RabbitMQ resource alarms (memory / disk) under a running bridge.

While an alarm is raised the broker sends connection.blocked to every connection that publishes
and stops reading from it until the alarm clears. These tests raise a memory alarm for 5-20 s with
``rabbitmqctl set_vm_memory_high_watermark absolute 1`` and always restore it (0.4) afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.conftest import service_id, wait_for
from tests.integration import test_gateway

pytestmark = [pytest.mark.anyio, pytest.mark.integration, pytest.mark.exclusive]


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def alarms() -> str:
    """The alarms section of ``rabbitmqctl status`` ("(none)" when there is none)."""
    out = rabbitmqctl("status")
    return out.split("Alarms", 1)[1].split("\n\n", 2)[1]


def raise_alarm() -> None:
    rabbitmqctl("set_vm_memory_high_watermark", "absolute", "1")


def clear_alarm() -> None:
    rabbitmqctl("set_vm_memory_high_watermark", "0.4")


@contextlib.asynccontextmanager
async def memory_alarm(longest_s: float = 30.0) -> AsyncIterator[None]:
    """A memory alarm for the body of the block. A detached watchdog clears it after ``longest_s``
    even if this process dies (pytest-timeout's thread method ends the run without finally)."""
    watchdog = subprocess.Popen(  # noqa: ASYNC220 (starts a detached process; never waited on while it runs)
        ["sh", "-c", f"sleep {longest_s}; rabbitmqctl -q set_vm_memory_high_watermark 0.4"],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await asyncio.to_thread(raise_alarm)
        await wait_for(lambda: asyncio.to_thread(lambda: "memory alarm" in alarms().lower()), 10, 0.2, "alarm raised")
        yield
    finally:
        c0 = time.monotonic()
        await asyncio.to_thread(clear_alarm)
        print(f"clear took {time.monotonic() - c0:.2f}s")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watchdog.pid, signal.SIGKILL)
        watchdog.wait()


@pytest.fixture(autouse=True)
def _never_leave_an_alarm() -> Any:
    yield
    clear_alarm()
    assert "alarm" not in alarms().lower(), alarms()


def bridge_blocked() -> bool:
    """A connection of the bridge's broker user is blocked (the broker stopped reading it)."""
    out = rabbitmqctl("list_connections", "user", "state")
    return any(line.split("\t") == ["queue-bridge", "blocked"] for line in out.splitlines())


async def block_the_bridge(engine: Any, workers: Any) -> None:
    """Inside an alarm: make the bridge publish (a lease of 1 s runs out: its task is re-exposed
    with a hint on the bridge's main connection), which gets that connection blocked."""
    await wait_for(lambda: asyncio.to_thread(bridge_blocked), 15, 0.3, "the bridge's connection blocked")


async def test_a_bridge_stops_within_its_grace_during_an_alarm(make_bridge, engine, workers, caplog) -> None:  # type: ignore[no-untyped-def]
    """SIGTERM during an alarm (a rollout while the broker is out of memory or disk): the bridge
    stops within its shutdown grace plus its bounded broker calls, not when the alarm ends."""
    caplog.set_level(logging.INFO)
    b = await make_bridge(shutdown_grace=2.0)
    svc = service_id()
    await engine.add(svc, {"i": 0})
    holder = await workers(svc, "holder", timeout=20.0)
    assert await holder.fetch(1_000) is not None  # runs out during the alarm: the bridge publishes
    async with memory_alarm(longest_s=45):
        await block_the_bridge(engine, workers)
        t0 = time.monotonic()
        stopping = asyncio.create_task(b.stop())
        done, _ = await asyncio.wait([stopping], timeout=20)
        took = time.monotonic() - t0
    if not done:
        await asyncio.wait_for(stopping, 20)  # the alarm is cleared: it ends now
    for r in caplog.records:
        if r.levelno >= logging.WARNING:
            print(f"{r.created - time.time() + time.monotonic() - t0:.1f}", r.name, r.levelname, r.getMessage()[:200])
    assert done, f"stop() still running {took:.0f}s into an alarm (shutdown_grace 2 s)"


# The gateway's fixtures (HTTP requests are served from Cassandra while the broker blocks the bridge).
gateway_keys = test_gateway.gateway_keys
start_gateway = test_gateway.start_gateway


async def test_an_alarm_does_not_flood_the_log_with_a_warning_per_request(
    start_gateway, engine, workers, caplog
) -> None:  # type: ignore[no-untyped-def]
    """HTTP requests keep being served during an alarm (from Cassandra), but each add logged
    "hint not published" and each fetch "hints unavailable" at WARNING, for the whole alarm, and
    neither line says that the broker blocked the connection: a log storm that hides the cause."""
    caplog.set_level(logging.INFO)
    _, gw = await start_gateway()
    svc = service_id()
    holder = await workers(svc + "-x", "holder", timeout=20.0)
    await engine.add(svc + "-x", {"i": 0})
    assert await holder.fetch(1_000) is not None  # runs out during the alarm: the bridge publishes
    served = 0
    async with memory_alarm():
        await block_the_bridge(engine, workers)
        end = time.monotonic() + 8
        n = 0
        while time.monotonic() < end:
            await gw.ok(svc, "tasks", {"value": {"during": n}})
            t = (await gw.ok(svc, "fetch", {"workerId": f"w{n}", "timeToRecover": 30_000}))["task"]
            done = await gw.ok(svc, "ack", {"workerId": f"w{n}", "taskId": t["id"], "epoch": t["epoch"], "result": 1})
            assert done["result"] is True
            served += 3
            n += 1
    hint_warnings = [r for r in caplog.records if r.name == "bridge.hints" and r.levelno >= logging.WARNING]
    print(f"{served} requests served during the alarm, {len(hint_warnings)} hint warnings")
    assert served > 100
    assert len(hint_warnings) <= 10, (
        f"{len(hint_warnings)} WARNING lines for {served} requests during one 8 s alarm, e.g. "
        f"{sorted({r.getMessage() for r in hint_warnings})}"
    )


async def test_results_of_acks_during_an_alarm_reach_the_engine_after_it(
    start_gateway, engine, workers, servers, names, caplog
) -> None:  # type: ignore[no-untyped-def]
    from bridge.client.rpc import results_consumer
    from tests.conftest import OWNERS

    caplog.set_level(logging.INFO)
    _, gw = await start_gateway()
    svc = service_id()
    # This test's own results only: a duty holder relays results earlier tests left owed onto it.
    own = {"exchange": names["results_exchange"], "routing_key": svc}
    async with results_consumer(servers.amqp_url("guest"), **own) as results:
        ids = []
        for i in range(10):
            added = await gw.ok(
                svc, "tasks", {"value": {"n": i}, "token": f"tok-{i}"}, key="engine", headers={"X-Owner": OWNERS[0]}
            )
            ids.append(added["task"]["id"])
        holder = await workers(svc + "-x", "holder", timeout=20.0)
        await engine.add(svc + "-x", {"i": 0})
        assert await holder.fetch(1_000) is not None
        acked = []
        async with memory_alarm(longest_s=40):
            await block_the_bridge(engine, workers)
            for i in range(10):
                got = await gw.ok(svc, "fetch", {"workerId": f"w{i}", "timeToRecover": 30_000})
                t = got["task"]
                done = await gw.ok(
                    svc, "ack", {"workerId": f"w{i}", "taskId": t["id"], "epoch": t["epoch"], "result": i}
                )
                assert done["result"] is True
                acked.append(t["id"])
            await asyncio.sleep(14)  # past BRIDGE_RESULT_REPUBLISH_AFTER (10 s)
        t_clear = time.monotonic()
        got_ids: list[str] = []
        while set(got_ids) != set(acked) and time.monotonic() < t_clear + 15:
            with contextlib.suppress(TimeoutError):
                msg = await asyncio.wait_for(results.get(), 1)
                got_ids.append(msg["taskId"])
        took = time.monotonic() - t_clear
        await asyncio.sleep(3)
        while not results.empty():
            got_ids.append((await results.get())["taskId"])
    print("results", len(got_ids), "distinct", len(set(got_ids)), "after", took)
    for r in caplog.records:
        if r.levelno >= logging.WARNING and "hint" not in r.getMessage():
            print(r.name, r.levelname, r.getMessage()[:200])
    assert set(got_ids) == set(acked), f"missing results: {set(acked) - set(got_ids)}"
