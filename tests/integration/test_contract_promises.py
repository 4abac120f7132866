"""Promises of the wire contract (docs/asyncapi.yaml) that the bridge did not keep, on the real servers.
Each test failed before its fix."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _held_again_at_epoch_3(make_bridge: Any, engine: Any, workers: Any) -> tuple[str, Any]:
    """A task worker ``w`` held at epoch 1, another worker at epoch 2 (w's lease ran out), and w
    again at epoch 3 (the other's ran out too): (its service, w)."""
    await make_bridge(clock_skew_margin=0.05)
    svc = service_id()
    await engine.add(svc, "the one task")
    w, other = await workers(svc, "w"), await workers(svc, "other")
    first = await w.call("fetch", {"serviceId": svc, "workerId": "w", "timeToRecover": 100})
    assert first["task"]["epoch"] == 1

    async def taken(worker: Any, name: str, epoch: int, ttr: int) -> bool:
        reply = await worker.call("fetch", {"serviceId": svc, "workerId": name, "timeToRecover": ttr})
        return "task" in reply and reply["task"]["epoch"] == epoch

    await wait_for(lambda: taken(other, "other", 2, 100), 10, what="the other worker takes the task (epoch 2)")
    await wait_for(lambda: taken(w, "w", 3, 60_000), 10, what="w holds the task again (epoch 3)")
    return svc, w


async def test_an_ack_naming_an_earlier_epoch_without_task_id_is_false(
    make_bridge: Any, engine: Any, workers: Any
) -> None:
    """docs/asyncapi.yaml, AckRequestPayload.epoch: "The task.epoch of the fetch reply: the lease this
    ack is for. With it, an ack from an earlier lease of the same task (before it was recovered and
    handed out again) is answered false." Here the ack names epoch 1 (and no taskId)."""
    svc, w = await _held_again_at_epoch_3(make_bridge, engine, workers)
    # A late ack of w's first lease: it names that lease's epoch.
    late = await w.call("ack", {"serviceId": svc, "workerId": "w", "epoch": 1, "result": "from lease 1"})
    assert late["result"] is False, "an ack naming epoch 1 completed the task at epoch 3"


@pytest.mark.parametrize("method", ["extend", "fail"])
async def test_an_extend_or_fail_naming_an_earlier_epoch_without_task_id_is_false(
    make_bridge: Any, engine: Any, workers: Any, method: str
) -> None:
    """As an ack's (above): the request names the lease it is for by its epoch. Without ``taskId``
    the epoch was ignored: a late extend renewed (a late fail failed) the worker's later lease of
    the task (found by review, 2026-12-07)."""
    svc, w = await _held_again_at_epoch_3(make_bridge, engine, workers)
    late = {"serviceId": svc, "workerId": "w", "epoch": 1}
    late.update({"timeToRecover": 120_000} if method == "extend" else {"error": "from lease 1"})
    reply = await w.call(method, late)
    assert reply["result"] is False, f"a {method} naming epoch 1 applied to the lease at epoch 3: {reply}"
    # The lease at epoch 3 is as it was: w acks it.
    done = await w.call("ack", {"serviceId": svc, "workerId": "w", "epoch": 3, "result": "from lease 3"})
    assert done["result"] is True


async def test_stats_of_a_claimed_delayed_task_hide_no_ready_one(make_bridge: Any, engine: Any, workers: Any) -> None:
    """docs/asyncapi.yaml, ServiceStats: ``ready`` "Claimable now", ``inFlight`` "Leased to a
    worker", ``delayed`` "Added with a delay that has not passed yet"; the counts "may lag by about
    a second". A delayed task comes due and is claimed, then a plain task is added."""
    await make_bridge()
    # Within one minute of the clock (the bridge keeps delayed counts per minute): started with 15 s
    # or more of it left, and run again from the start of the next minute if it ran past it.
    want = {"ready": 1, "inFlight": 1, "delayed": 0}
    for attempt, latest_s in enumerate((45, 5)):
        await wait_for(lambda s=latest_s: time.time() % 60 < s, 65, interval=0.2, what="a minute with time left")
        svc = service_id()
        delayed = await engine.call("add", {"serviceId": svc, "value": "soon", "delayMs": 300}, owner=OWNERS[0])
        minute = int(time.time() // 60)
        w = await workers(svc, f"w{attempt}")
        got: dict[str, Any] = {}

        async def claimed(w: Any = w, svc: str = svc, got: dict[str, Any] = got) -> bool:
            got.update(await w.call("fetch", {"serviceId": svc, "workerId": w.worker_id}))
            return "task" in got

        await wait_for(claimed, 10, what="the delayed task handed out once due")
        assert got["task"]["id"] == delayed["task"]["id"]
        await engine.add(svc, "plain, ready")
        last: dict[str, Any] = {}

        async def settled(svc: str = svc, last: dict[str, Any] = last) -> bool:
            stats = await engine.call("stats", {"serviceId": svc}, owner=OWNERS[0])
            [row] = stats["result"]["services"]
            last.update(row)
            return {k: row[k] for k in want} == want

        try:
            await wait_for(settled, 8, interval=0.25, what=f"stats {want}")
        except AssertionError:
            pytest.fail(f"want {want}; 8 s on, stats says {last}")
        if int(time.time() // 60) == minute:
            return
    pytest.fail("the minute ended before the counts were checked, twice")
