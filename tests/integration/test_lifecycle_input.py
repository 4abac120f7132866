"""Lifecycle requests against the real servers: what a request may say, and what the bridge does with
its delivery (each test failed before its fix, for the reason its docstring gives; the ``waitMs`` 0
cases are the controls, which passed).

- An instant (``notBefore``, ``parkedBefore``) must name a time of years 1 to 9999 in UTC: one past
  them was taken, a ``redrive all`` put tasks back with it, and the reply could not be written.
- A long-poll fetch is acknowledged early: its owner's key is checked first, so ``unknown_owner``
  is dead-lettered as the fate table says, and an ``internal`` error says it was dead-lettered only
  when it was.
- Long lifecycle requests (purge, stats, parked, discard) do not hold the lifecycle consumer's
  prefetch slots: an extend of another owner is not queued behind them.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

import bridge.domain.lifecycle as lifecycle
from bridge.client import Engine, Worker
from tests.conftest import ENGINE_USER, OWNERS, DeadLetters, Servers, service_id, wait_for
from tests.integration.test_gateway import gateway_keys, start_gateway  # noqa: F401  (fixtures)
from tests.integration.test_redrive_all import FAST_REDRIVE, park_each_once

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]
# Valid ISO 8601 times with offsets whose UTC time falls outside years 1..9999 (Python's datetime,
# and so every time the contract writes back).
OUT_OF_RANGE = ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"]


# -- 1. instants out of range ---------------------------------------------------------------------
@pytest.mark.parametrize("parked_before", OUT_OF_RANGE)
async def test_a_redrive_all_with_an_instant_out_of_range_is_refused_and_redrives_nothing(
    make_bridge, engine, workers, dead_letters, parked_before
):
    """It was taken: ``instant()`` read it as milliseconds past year 9999 (or before year 1), the
    request put back up to 1,000 parked tasks with it as its bound, and then its reply's
    ``parkedBefore`` could not be written (year out of range): the caller got ``internal`` ("the
    request was dead-lettered") for a delivery acknowledged before it started, whose work was done."""
    await make_bridge(redrive_rate=FAST_REDRIVE)
    svc = service_id()
    (parked,) = await park_each_once(engine, workers, svc, 1)
    body = {"serviceId": svc, "all": True, "parkedBefore": parked_before}
    reply, _ = await engine.call_raw("redrive", body, owner=OWNER)
    assert "error" in reply and reply["error"]["code"] == "bad_request", reply
    assert "parkedBefore" in reply["error"]["message"], reply
    assert [t.id for t in await engine.parked(svc)] == [parked], "the parked task was redriven"
    # Refused before anything ran: dead-lettered, as every bad_request is.
    (dead,) = await dead_letters.drain(1)
    assert json.loads(dead.body)["parkedBefore"] == parked_before


@pytest.mark.parametrize("not_before", OUT_OF_RANGE)
async def test_an_add_with_a_not_before_out_of_range_is_refused(make_bridge, engine, not_before):
    """``0001-01-01T00:00:00+23:59`` was taken as a time in the past (a task ready at once) though it
    names no time of the contract (its UTC date is in year 0); ``9999-12-31T23:59:59-23:59`` was
    refused only as "beyond its lifetime"."""
    await make_bridge()
    reply, _ = await engine.call_raw(
        "add", {"serviceId": service_id(), "value": 1, "notBefore": not_before}, owner=OWNER
    )
    assert "error" in reply and reply["error"]["code"] == "bad_request", reply
    assert "notBefore" in reply["error"]["message"] and "9999" in reply["error"]["message"], reply


async def test_an_instant_at_the_edges_of_the_range_is_taken(make_bridge, engine):
    """The last millisecond of year 9999 in UTC is a time the wire can write back (the float
    arithmetic of ``timestamp()`` rounded it into year 10000)."""
    await make_bridge(redrive_rate=FAST_REDRIVE)
    svc = service_id()
    for edge, written in (
        ("9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"),
        ("0001-01-01T23:59:00+23:59", "0001-01-01T00:00:00.000Z"),
    ):
        body = {"serviceId": svc, "all": True, "parkedBefore": edge}
        reply = await engine.call("redrive", body, owner=OWNER)
        assert reply["result"] == {"redriven": 0, "parkedBefore": written}, (edge, reply)


async def test_the_gateway_refuses_instants_out_of_range(start_gateway):  # noqa: F811
    """The same through the HTTP gateway, which answered 500."""
    _, gw = await start_gateway()
    svc = service_id()
    for bad in OUT_OF_RANGE:
        redrive = await gw.post(svc, "redrive", {"all": True, "parkedBefore": bad})
        assert (redrive.status, redrive.code) == (400, "bad_request"), redrive.body
        added = await gw.post(svc, "tasks", {"value": 1, "notBefore": bad})
        assert (added.status, added.code) == (400, "bad_request"), added.body


# -- 2. a long-poll's delivery is dead-lettered when the table says so -----------------------------
def _keyring_without(owner: str, tmp_path: Path) -> Path:
    from bridge.crypto import generate_keyring, write_keyring

    path = tmp_path / "keys-without.json"
    write_keyring(path, generate_keyring([o for o in (*OWNERS, ENGINE_USER) if o != owner]))
    return path


@pytest.mark.parametrize("wait_ms", [0, 1000])
async def test_a_fetch_of_an_owner_without_a_key_is_answered_and_dead_lettered(
    make_bridge, servers: Servers, names, dead_letters: DeadLetters, tmp_path, wait_ms
):
    """A long-poll fetch (``waitMs`` > 0) was acknowledged before the owner's key was looked up: it
    was answered ``unknown_owner`` but never reached the dead-letter queue, which the fate table
    promises (a fetch with ``waitMs`` 0 did)."""
    await make_bridge(keyring=str(_keyring_without(OWNERS[1], tmp_path)))
    svc = service_id()
    async with Worker(servers.amqp_url(OWNERS[1]), service=svc, worker_id="w", exchange=names["exchange"]) as w:
        reply, _ = await w.call_raw("fetch", {"serviceId": svc, "workerId": "w", "waitMs": wait_ms})
    assert "error" in reply and reply["error"]["code"] == "unknown_owner", reply
    dead = await dead_letters.drain(1)
    assert len(dead) == 1, f"the unknown_owner fetch (waitMs {wait_ms}) was not dead-lettered"
    assert json.loads(dead[0].body) == {"serviceId": svc, "workerId": "w", "waitMs": wait_ms}


@pytest.mark.parametrize("wait_ms", [0, 1000])
async def test_an_internal_error_says_it_was_dead_lettered_only_when_it_was(
    make_bridge, workers, dead_letters: DeadLetters, monkeypatch, wait_ms
):
    """The ``internal`` answer said "the request was dead-lettered" also for a long-poll fetch
    acknowledged before it failed, which nothing dead-lettered."""
    b = await make_bridge()
    svc = service_id()

    async def a_bug(*_: Any, **__: Any) -> None:
        raise RuntimeError("injected bug in fetch")

    monkeypatch.setattr(b.queue, "fetch", a_bug)
    w = await workers(svc, "w")
    reply, _ = await w.call_raw("fetch", {"serviceId": svc, "workerId": "w", "waitMs": wait_ms}, wait_s=wait_ms / 1000)
    assert "error" in reply and reply["error"]["code"] == "internal", reply
    said_dead_lettered = "dead-lettered" in reply["error"]["message"]
    # This test's own dead-letter queue: empty unless this request was dead-lettered.
    dead = await dead_letters.drain(1, timeout=5.0 if said_dead_lettered else 2.0)
    assert said_dead_lettered == bool(dead), (reply["error"]["message"], len(dead))
    assert said_dead_lettered == (wait_ms == 0), reply["error"]["message"]


# -- 3. long lifecycle requests do not hold the lifecycle consumer's slots --------------------------
PURGED_TASKS = 3000


async def _add_ready(engine: Engine, svc: str, n: int) -> None:
    for start in range(0, n, 500):
        await asyncio.gather(*(engine.add(svc, i) for i in range(start, min(n, start + 500))))


async def test_an_extend_is_answered_while_purges_of_another_owner_run(
    make_bridge, servers: Servers, names, workers, monkeypatch
):
    """Every lifecycle method but redrive ran while holding its delivery, and all of them share one
    queue and one prefetch window: with prefetch 2, two purges (seconds each; up to ~200 s for
    20,000 tasks) of owner A held both slots, and owner B's extend waited for one of them to end
    (its lease could run out meanwhile). Now the purges are acknowledged as they run, and the
    extend is answered while both are still unanswered."""
    started: list[str] = []
    real_purge = lifecycle.Lifecycle.purge

    async def purge(self: Any, owner: str, service: str) -> tuple[int, bool]:
        started.append(service)
        return await real_purge(self, owner, service)

    monkeypatch.setattr(lifecycle.Lifecycle, "purge", purge)
    # Filled by a bridge of the default prefetch (adds with prefetch 2 are slow), served by one of 2.
    filler = await make_bridge()
    svc = service_id()
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"], timeout=120) as eng_a:
        await _add_ready(eng_a, svc, PURGED_TASKS)
        await make_bridge(prefetch=2)
        await make_bridge.stop(filler)

        async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNERS[1], exchange=names["exchange"]) as eng_b:
            svc_b = service_id()
            await eng_b.add(svc_b, "b's work")
        wb = await workers(svc_b, "b", user=OWNERS[1], timeout=120)
        held = await wb.fetch(time_to_recover_ms=60_000)
        assert held is not None

        purges = [
            asyncio.create_task(eng_a.call("purge", {"serviceId": svc}, owner=OWNER, wait_s=120)) for _ in range(2)
        ]
        try:
            await wait_for(lambda: len(started) == 2 or any(p.done() for p in purges), 30, what="both purges running")
            assert not any(p.done() for p in purges), "a purge ended before the extend was sent: too few tasks"
            body = {
                "serviceId": svc_b,
                "workerId": "b",
                "taskId": held.id,
                "epoch": held.epoch,
                "timeToRecover": 60_000,
            }
            extend = asyncio.create_task(wb.call("extend", body))
            done, _ = await asyncio.wait({extend, *purges}, timeout=40, return_when=asyncio.FIRST_COMPLETED)
            answered_first = [p for p in purges if p in done]
            assert extend in done and not answered_first, (
                f"{len(answered_first)} of 2 purges of owner A were answered before owner B's extend: the "
                "purges held the lifecycle consumer's prefetch slots"
            )
            assert (await extend)["result"] is True
            results = [(await p)["result"] for p in purges]
        finally:
            for p in purges:
                p.cancel()
    # The callers see what they saw before: every ready task purged once, across the two answers.
    assert sum(r["purged"] for r in results) == PURGED_TASKS, results
    assert not any(r["more"] for r in results), results


async def test_past_its_bound_a_long_request_is_answered_unavailable_and_nothing_of_it_runs(
    make_bridge, engine, workers, monkeypatch
):
    """Long requests run acknowledged, outside the prefetch window: bounded (MAX_LONG_REQUESTS, 2
    here), past it one is answered ``unavailable`` at once, not executed; the ones running are
    answered when they end, and an extend meanwhile is answered at once."""
    import bridge.transport.capacity as capacity

    monkeypatch.setattr(capacity, "MAX_LONG_REQUESTS", 2)
    monkeypatch.setattr(capacity, "OWNER_SHARE_DIVISOR", 1)  # one owner's requests reach the bridge's bound here
    gate = asyncio.Event()
    started: list[str] = []
    real_purge = lifecycle.Lifecycle.purge

    async def purge(self: Any, owner: str, service: str) -> tuple[int, bool]:
        started.append(service)
        await gate.wait()
        return await real_purge(self, owner, service)

    monkeypatch.setattr(lifecycle.Lifecycle, "purge", purge)
    await make_bridge()
    svc, other = service_id(), service_id()
    for i in range(3):
        await engine.add(svc, i)
    await engine.add(other, "held")
    w = await workers(other, "w")
    held = await w.fetch(time_to_recover_ms=60_000)
    assert held is not None

    running = [asyncio.create_task(engine.call("purge", {"serviceId": svc}, owner=OWNER)) for _ in range(2)]
    try:
        await wait_for(lambda: len(started) == 2, 10, what="two purges running")
        reply, _ = await engine.call_raw("purge", {"serviceId": svc}, owner=OWNER)
        assert reply.get("error", {}).get("code") == "unavailable", reply
        assert "at most 2 at once" in reply["error"]["message"], reply
        assert len(started) == 2, "the purge past the bound ran"
        assert await held.extend(60_000) is True
        assert not any(r.done() for r in running)
    finally:
        gate.set()
    results = [(await r)["result"] for r in running]
    assert sum(r["purged"] for r in results) == 3, results
