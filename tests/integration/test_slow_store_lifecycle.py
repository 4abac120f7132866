"""The lifecycle's compare-and-sets (extend, release, park, cancel) under a coordinator that stalls
on one statement: the LWT times out at the bridge (BRIDGE_CASSANDRA_TIMEOUT 1 s), is held 2.5 s by
the proxy and then applies. A SERIAL read alone, run before it lands, takes it for refused: the
bridge answered "not yours" for a lease its own request had just extended, released or parked.
Settled as a claim's or a completion's is (``test_slow_store.py``): the same statement once more,
then the read."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from bridge.client import UnavailableError
from bridge.client.errors import TransportError
from bridge.domain.records import QueueKey
from bridge.storage.rows import to_ms
from tests.conftest import OWNERS, service_id, wait_for
from tests.integration import test_slow_store as slow

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

# The proxy and a bridge that talks to Cassandra through it (``test_slow_store.py``'s fixtures).
slow_proxy = slow.slow_proxy
slow_bridge = slow.slow_bridge

STORE_TIMEOUT_S = 1.0  # the bridge's request timeout: the held statement's outcome is unknown then
HOLD_S = 2.5  # how long its coordinator "stalls" on it: it applies after the bridge's read


def hold_call(b: Any, proxy: slow.SlowProxy, method: str, mark: Callable[[dict[str, Any]], bytes]) -> list[Any]:
    """The first LWT of the bridge's next ``method`` call (``extend``, ``release`` ...) is held
    ``HOLD_S`` on its way to Cassandra, found by bytes only its frame carries (``mark`` of the
    call's arguments: a timestamp it writes); the bridge's other statements are not. Returns the
    call's arguments, once made."""
    store = b.store
    real = getattr(store, method)
    calls: list[Any] = []

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            arguments = inspect.signature(real).bind(*args, **kwargs).arguments
            calls.append(arguments)
            proxy.holds[mark(arguments)] = HOLD_S
        return await real(*args, **kwargs)

    setattr(store, method, wrapped)
    return calls


def timestamp_of(arg: str) -> Callable[[dict[str, Any]], bytes]:
    """A CQL ``timestamp`` parameter as it travels: milliseconds, 8 bytes big-endian."""
    return lambda arguments: int(arguments[arg]).to_bytes(8, "big", signed=True)


def lease_row(cql: Any, ks: str, svc: str, task_id: str) -> Any:
    return cql.execute(
        f"SELECT state, epoch, worker, lease_until, completion_id, park_id FROM {ks}.leases "
        "WHERE owner = %s AND service = %s AND task_id = %s",
        (OWNERS[0], svc, uuid.UUID(task_id)),
    ).one()


async def a_held_task(slow_bridge: Any, engine: Any, workers: Any, **add: Any) -> tuple[Any, str, str, Any]:
    """A bridge whose statements can be held, and a task its worker "w" holds: (bridge, service,
    task id, the worker's task)."""
    b = await slow_bridge(cassandra_timeout=STORE_TIMEOUT_S)
    svc = service_id()
    task_id = await engine.add(svc, "v", **add)
    w = await workers(svc, "w", timeout=15)
    t = await w.fetch(time_to_recover_ms=60_000)
    assert t is not None and t.id == task_id
    return b, svc, task_id, t


async def answer_of(coro: Any, what: str) -> Any:
    try:
        return await slow.bounded(coro, 20, what)
    except (UnavailableError, TransportError) as exc:
        return exc


async def test_an_extend_that_lands_after_the_read_is_answered_true(
    slow_bridge, slow_proxy, servers, engine, workers, cql
):
    """The extend lands (the lease runs to the new deadline) after the read that settled its
    unknown outcome: the worker must not be told it lost a lease its own extend renewed."""
    b, svc, task_id, t = await a_held_task(slow_bridge, engine, workers)
    calls = hold_call(b, slow_proxy, "extend", timestamp_of("until_ms"))
    answer = await answer_of(t.extend(120_000), "extend")
    assert calls and slow_proxy.held_frames == 1
    until = calls[0]["until_ms"]

    def extended() -> bool:
        row = lease_row(cql, servers.keyspace, svc, task_id)
        return row["lease_until"] is not None and to_ms(row["lease_until"]) == until

    await wait_for(extended, 10, what="the held extend applied")
    row = lease_row(cql, servers.keyspace, svc, task_id)
    assert (row["state"], row["epoch"], row["worker"]) == ("leased", t.epoch, "w")
    assert answer is True, f"the extend that renewed the lease to its new deadline was answered {answer!r}"


async def test_a_fail_whose_release_lands_after_the_read_is_answered_with_its_retry(
    slow_bridge, slow_proxy, servers, engine, workers, cql
):
    """The release (the task given back, to come again in 30 s) lands after the read: the worker
    must be told its fail took effect, not that the task was no longer its own."""
    b, svc, task_id, t = await a_held_task(slow_bridge, engine, workers)
    calls = hold_call(b, slow_proxy, "release", timestamp_of("until_ms"))
    answer = await answer_of(t.fail({"why": "boom"}, retry_in_ms=30_000), "fail")
    assert calls and slow_proxy.held_frames == 1
    until = calls[0]["until_ms"]

    def released() -> bool:
        row = lease_row(cql, servers.keyspace, svc, task_id)
        return row["worker"] == "" and row["lease_until"] is not None and to_ms(row["lease_until"]) == until

    await wait_for(released, 10, what="the held release applied")
    assert not isinstance(answer, Exception) and answer is not None and not answer.parked, (
        f"the fail whose release gave the task back was answered {answer!r}"
    )


async def test_a_fail_whose_park_lands_after_the_read_is_answered_parked_and_listed(
    slow_bridge, slow_proxy, servers, engine, workers, cql
):
    """At its delivery limit the fail parks the task; the park lands after the read. Taken for
    refused, the fail was answered ``None`` and the parked row written ahead was taken back: the
    task ended parked yet missing from the parked listing (nothing an operator could redrive)."""
    b, svc, task_id, t = await a_held_task(slow_bridge, engine, workers, max_deliveries=1)
    held = slow.hold_statement(b, slow_proxy, "park", "park_id", HOLD_S)
    answer = await answer_of(t.fail({"why": "boom"}), "fail")
    assert held and slow_proxy.held_frames == 1
    await wait_for(
        lambda: lease_row(cql, servers.keyspace, svc, task_id)["state"] == "parked", 10, what="the held park applied"
    )
    assert lease_row(cql, servers.keyspace, svc, task_id)["park_id"] == held[0], "parked by this very fail"
    listed = [p.id for p in await engine.parked(svc)]
    problems = []
    if isinstance(answer, Exception) or answer is None or not answer.parked:
        problems.append(f"the fail that parked the task was answered {answer!r}")
    if task_id not in listed:
        problems.append(f"the parked task is not listed (parked: {listed})")
    assert not problems, "; ".join(problems)


async def test_a_cancel_of_a_waiting_task_that_lands_after_the_read_is_ours(
    slow_bridge, slow_proxy, servers, engine, cql
):
    """The store's cancel of a task never claimed (``IF NOT EXISTS``) lands after the read, which
    found no lease: it must report the cancel applied (it is this call's), not refused."""
    b = await slow_bridge(cassandra_timeout=STORE_TIMEOUT_S)
    svc = service_id()
    task_id = await engine.add(svc, "v")
    calls = hold_call(b, slow_proxy, "cancel", lambda arguments: arguments["task_id"].bytes)
    res = await slow.bounded(b.store.cancel(QueueKey(OWNERS[0], svc), uuid.UUID(task_id), None, 0), 20, "cancel")
    assert calls and slow_proxy.held_frames == 1
    await wait_for(
        lambda: lease_row(cql, servers.keyspace, svc, task_id) is not None, 10, what="the held cancel applied"
    )
    assert lease_row(cql, servers.keyspace, svc, task_id)["state"] == "cancelled"
    assert res.applied, f"the cancel that cancelled the task was answered {res!r}"
