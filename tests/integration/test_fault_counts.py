"""Cassandra faults in the middle of a request: what the queue counts keep (real servers).

Faults are injected by wrapping the in-process bridge's CQL session (``Bridge.db``): the servers
themselves are never stopped or paused.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bridge.client import UnavailableError
from bridge.storage.errors import StorageUnavailable
from tests.conftest import OWNERS, service_id, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


async def _stats(engine: Any, svc: str) -> dict[str, Any]:
    reply = await engine.call("stats", {"serviceId": svc}, owner=OWNERS[0])
    [row] = reply["result"]["services"]
    return {k: row[k] for k in ("ready", "inFlight", "delayed", "parked")}


async def test_a_read_failing_beside_a_claim_that_applied_leaves_the_counts_right(
    make_bridge, engine, workers, cql, servers
):
    """fetch of a task with a token reads its payload side by side with the claim
    (``asyncio.gather`` in ``Fetcher._try_claim``). When that read failed (one read timing out:
    a single fault) while the claim applied, the exception left ``_try_claim`` before the count
    line (ready -1, in flight +1). The worker's retried fetch got the task back through its
    pointer (``_resend``, which counts nothing) and acked it (in flight -1): the counts said one
    task was ready for the rest of the TTL. The claim's outcome is now counted first."""
    b = await make_bridge()
    svc = service_id()
    real = b.db.execute
    armed = {"ready.payload": 0}

    async def execute(name: str, params: Any = (), **kw: Any) -> list[dict[str, Any]]:
        if armed.get(name):
            armed[name] -= 1
            raise StorageUnavailable("cassandra error: simulated read timeout beside the claim")
        return await real(name, params, **kw)

    b.db.execute = execute  # type: ignore[method-assign]

    task_id = await engine.add(svc, "work", token={"step": 1})
    await wait_for(lambda: _ready_is(engine, svc, 1), 10, what="the add counted ready")
    w = await workers(svc, "w")
    armed["ready.payload"] = 1
    with pytest.raises(UnavailableError):
        await w.fetch()
    # No claim beside a failed read since 2026-12-07 (it recorded this bridge's own TTL as the
    # task's end): the task is not leased; the pointer written ahead announces it.
    ks = servers.keyspace
    rows = list(
        cql.execute(
            f"SELECT state FROM {ks}.leases WHERE owner = %s AND service = %s AND task_id = %s",
            (OWNERS[0], svc, uuid.UUID(task_id)),
        )
    )
    assert rows == [], rows
    task = await w.fetch()  # not ``fresh`` after a failed request: the pointer names it, and it is claimed
    assert task is not None and task.id == task_id
    assert await task.ack("done") is True

    # One more task, held by a worker: the queue now holds nothing ready and one task in flight.
    await engine.add(svc, "held")
    assert (await w.fetch()) is not None
    want = {"ready": 0, "inFlight": 1, "delayed": 0, "parked": 0}

    async def settled() -> bool:
        return await _stats(engine, svc) == want

    try:
        await wait_for(settled, 8, interval=0.5, what="stats: nothing ready, one in flight")
    except AssertionError:
        got = await _stats(engine, svc)
        raise AssertionError(f"want {want}, stats say {got}") from None


async def _ready_is(engine: Any, svc: str, n: int) -> bool:
    return (await _stats(engine, svc))["ready"] == n
