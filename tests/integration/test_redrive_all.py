"""``redrive all`` against the real servers: it ends while workers still park what comes back.

It puts back the tasks parked when it started (``parkedBefore``: the first reply's bound, sent back
by the client), all of them, 1000 a request, past rows parked after it; tasks parked again after it
started stay parked. Old-style requests (no ``parkedBefore``) still work; a malformed one is
``bad_request``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from bridge.client import Engine
from tests.conftest import ENGINE_USER, OWNERS, Servers, service_id, wait_for
from tests.integration.test_lifecycle import call, fetch_until

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]
FAST_REDRIVE = 2000.0  # parked tasks put back per second: the tests are about which, not how fast
PACED_REDRIVE = 50.0  # BRIDGE_REDRIVE_RATE's default


async def park_each_once(engine: Engine, workers: Any, svc: str, n: int) -> list[str]:
    """``n`` tasks (maxDeliveries 1) fetched and failed once each: parked, one delivery. Their ids."""
    ids = [str(await engine.add(svc, {"n": i}, max_deliveries=1)) for i in range(n)]
    w = await workers(svc, "w-park")
    for _ in range(n):
        got = await fetch_until(w, 10)
        reply = await call(w, "fail", {"serviceId": svc, "workerId": "w-park", "taskId": got["task"]["id"]})
        assert reply["task"]["parked"] is True, reply
    return ids


@pytest.mark.timeout(120)
async def test_redrive_all_ends_while_a_worker_parks_what_comes_back(make_bridge, engine, workers):
    """Defect: the client sent ``redrive all`` again until a request answered 0. A worker that
    still fails every task parks each redriven one again (maxDeliveries 1) before the next request
    reads the parked list, which then puts it back again: the loop (and the CLI's ``redrive --all``)
    never ended during an incident, tasks cycling between parked and failing."""
    # Paced (as bridges are, 50 a second by default): a worker re-parks tasks while a request runs.
    await make_bridge(redrive_rate=PACED_REDRIVE)
    svc = service_id()
    n = 30
    ids = await park_each_once(engine, workers, svc, n)
    listed = await engine.parked(svc, 1000)
    assert sorted(t.id for t in listed) == sorted(ids) and {t.deliveries for t in listed} == {1}

    stop = asyncio.Event()

    async def fail_everything(worker_id: str) -> None:
        poison = await workers(svc, worker_id)
        while not stop.is_set():
            task = await poison.fetch(60_000, wait_ms=200)
            if task is not None:
                await task.fail({"why": "still broken"})

    redriven: int | None = None
    async with anyio.create_task_group() as tg:
        for k in range(2):
            tg.start_soon(fail_everything, f"w-poison-{k}")
        try:
            with anyio.move_on_after(30):
                redriven = await engine.redrive(svc, all=True, redrive_rate=PACED_REDRIVE)
            if redriven is not None:  # every redriven task comes back to a worker, which parks it again
                await wait_for(lambda: _all_parked_twice(engine, svc, n), 30, interval=0.2, what="parked again")
        finally:
            stop.set()
    assert redriven is not None, "redrive all did not end within 30 s while workers parked every task again"
    assert redriven == n, "each task parked when it started was put back once"
    # Put back exactly once (one delivery more each), and parked again after it started: left parked.
    again = await engine.parked(svc, 1000)
    assert sorted(t.id for t in again) == sorted(ids)
    assert {t.deliveries for t in again} == {2}, sorted(t.deliveries for t in again)


async def _all_parked_twice(engine: Engine, svc: str, n: int) -> bool:
    listed = await engine.parked(svc, 1000)
    return len(listed) == n and all(t.deliveries >= 2 for t in listed)


def _fake_parked(cql: Any, ks: str, svc: str, rows: list[tuple[uuid.UUID, datetime]]) -> None:
    """Parked tasks written straight to Cassandra (a lease parked at epoch 1 and its index row):
    what thousands of fetch-and-fail round trips would leave, in a second."""
    from cassandra.concurrent import execute_concurrent_with_args  # type: ignore[import-untyped]

    lease = cql.prepare(
        f"INSERT INTO {ks}.leases (owner, service, task_id, state, epoch, worker, parked_at, park_reason, "
        "has_token, base_epoch) VALUES (?, ?, ?, 'parked', 1, 'w-fake', ?, 'failed', false, 0) USING TTL 900"
    )
    index = cql.prepare(
        f"INSERT INTO {ks}.parked (owner, service, task_id, epoch, parked_at, reason, has_token) "
        "VALUES (?, ?, ?, 1, ?, 'failed', false) USING TTL 900"
    )
    args = [(OWNER, svc, task_id, at.replace(tzinfo=None)) for task_id, at in rows]
    execute_concurrent_with_args(cql, lease, args, concurrency=64, raise_on_first_error=True)
    execute_concurrent_with_args(cql, index, args, concurrency=64, raise_on_first_error=True)


@pytest.mark.timeout(240)  # about 1,000 redrives (an LWT and a few writes each) on a loaded machine
async def test_more_than_1000_parked_before_are_all_put_back_past_newer_ones(
    make_bridge, cql, servers: Servers, names: dict[str, str], monkeypatch
):
    """1,020 tasks parked an hour ago, with 1,340 parked after the redrive started (as a worker
    that still fails them would have done) ahead of and between them in the index: every old one
    is put back, over several requests of up to 1,000, and none of the newer ones. The first
    request meets only newer rows before its scan cap and answers 0: the client goes on (the reply
    says where to), it does not take 0 for "none left"."""
    from cassandra.util import uuid_from_time  # type: ignore[import-untyped]

    import bridge.domain.lifecycle as lifecycle

    scan_cap = 1300  # (10,000 in production): one request's scan meets only the newer rows ahead
    monkeypatch.setattr(lifecycle, "PARKED_SCAN_ROWS", scan_cap)
    rounds: list[lifecycle.RedriveRound] = []
    real_round = lifecycle.Lifecycle.redrive_all

    async def redrive_all(self: Any, *args: Any) -> lifecycle.RedriveRound:
        done = await real_round(self, *args)
        rounds.append(done)
        return done

    monkeypatch.setattr(lifecycle.Lifecycle, "redrive_all", redrive_all)
    await make_bridge(redrive_rate=FAST_REDRIVE)
    svc = service_id()
    ks = servers.keyspace
    now = datetime.now(UTC)
    hour_ago = datetime.fromtimestamp(now.timestamp() - 3600, UTC)
    later = datetime.fromtimestamp(now.timestamp() + 3600, UTC)  # parked "after" the redrive started

    newer: list[uuid.UUID] = []
    old: list[uuid.UUID] = []
    start = time.time() - 600
    newer += [uuid_from_time(start + i / 1000) for i in range(scan_cap)]  # ahead of every old one
    # 60 s: a request puts back 1,000 tasks (a few writes each) before it answers.
    async with Engine(servers.amqp_url(ENGINE_USER), owner=OWNER, exchange=names["exchange"], timeout=60) as engine:
        for block in range(3):
            # Real tasks (their values exist: a redriven one can be handed out), then newer rows after them.
            added = await asyncio.gather(*(engine.add(svc, {"b": block, "n": i}) for i in range(340)))
            old += [uuid.UUID(str(t)) for t in added]
            if block < 2:
                mark = time.time()
                newer += [uuid_from_time(mark + i / 100_000) for i in range(20)]
        assert len(old) == 1020 and len(newer) == scan_cap + 40
        _fake_parked(cql, ks, svc, [(t, hour_ago) for t in old] + [(t, later) for t in newer])

        with anyio.fail_after(200):
            redriven = await engine.redrive(svc, all=True, redrive_rate=FAST_REDRIVE)
    assert redriven == len(old)
    assert rounds[0].redriven == 0 and rounds[0].after is not None, "the scan cap met only newer rows"
    assert max(r.redriven for r in rounds) == 1000, "a request puts back 1000 at most"
    assert len({r.parked_before_ms for r in rounds}) == 1, "one bound: the first reply's"
    states = _lease_states(cql, ks, svc, old + newer)
    assert {states[t] for t in old} == {("leased", 1)}, "every old one put back, its count starting again"
    assert {states[t] for t in newer} == {("parked", 0)}, "the newer ones stay parked"


def _lease_states(cql: Any, ks: str, svc: str, task_ids: list[uuid.UUID]) -> dict[uuid.UUID, tuple[str, int]]:
    read = cql.prepare(f"SELECT state, base_epoch FROM {ks}.leases WHERE owner = ? AND service = ? AND task_id = ?")
    from cassandra.concurrent import execute_concurrent_with_args

    found = execute_concurrent_with_args(cql, read, [(OWNER, svc, t) for t in task_ids], concurrency=64)
    states = {}
    for task_id, (ok, rows) in zip(task_ids, found, strict=True):
        assert ok, rows
        row = rows.one()
        states[task_id] = (row["state"], row["base_epoch"] or 0)
    return states


async def test_an_old_style_redrive_all_still_works(make_bridge, engine, workers):
    """A client before ``parkedBefore`` sends ``{"all": true}`` until it answers 0: the bridge
    takes its own now as the bound, and the reply's new field is one an old client ignores."""
    await make_bridge(redrive_rate=FAST_REDRIVE)
    svc = service_id()
    ids = await park_each_once(engine, workers, svc, 3)
    before = time.time()
    first = (await call(engine, "redrive", {"serviceId": svc, "all": True}))["result"]
    assert first["redriven"] == 3
    bound = datetime.fromisoformat(first["parkedBefore"].replace("Z", "+00:00")).timestamp()
    assert before - 5 < bound < time.time() + 5, first  # the bridge's clock, on this host
    assert (await call(engine, "redrive", {"serviceId": svc, "all": True}))["result"]["redriven"] == 0
    assert await engine.parked(svc) == []
    # And by id, as before: nothing about the bound in its reply.
    other = service_id()  # (the three put back are ready again in ``svc``)
    ids = await park_each_once(engine, workers, other, 1)
    assert (await call(engine, "redrive", {"serviceId": other, "taskIds": ids}))["result"] == {"redriven": 1}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"all": True, "parkedBefore": "yesterday"}, "parkedBefore"),
        ({"all": True, "parkedBefore": "2026-12-02T10:00:00"}, "parkedBefore"),  # no UTC offset
        ({"all": True, "parkedBefore": 1764669600000}, "parkedBefore"),  # a number, not a time
        ({"all": True, "after": "not-a-task-id"}, "after"),
        ({"taskIds": [], "parkedBefore": "2026-12-02T10:00:00Z"}, "all"),  # only for all: true
    ],
)
async def test_a_malformed_parked_before_is_a_bad_request(make_bridge, engine, extra, field):
    await make_bridge(redrive_rate=FAST_REDRIVE)
    reply, _ = await engine.call_raw("redrive", {"serviceId": service_id(), **extra}, owner=OWNER)
    assert "error" in reply, reply
    assert reply["error"]["code"] == "bad_request", reply
    assert field in reply["error"]["message"], reply
