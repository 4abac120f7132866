"""Races of one worker id's requests, and duplicate requests, handled at once (real servers).

In a fleet, clients retry a request on another bridge and misconfigured pods share a workerId:
these tests fire the same (or overlapping) requests through two bridges, or one bridge twice, at
the same moment (``asyncio.gather`` on the bridges' ``WorkQueue``s, or two AMQP publishes that
RabbitMQ hands to the two bridges' consumers), many rounds each. Each test that failed before its
fix says what was wrong; two name a limit that stays (``xfail``, docs/reliability.md, "Known
limits"). Other fetch races: test_fetch_races.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
import orjson
import pytest

from bridge.domain import scheduler
from bridge.domain.fetching import RequestAbandoned
from bridge.domain.models import AckRequest, ExtendRequest, FailRequest, FetchRequest
from tests.conftest import OWNERS, service_id, wait_for
from tests.history import FAST_RELAY, FAST_SECOND_PASS_MS, relay_read_past_now
from tests.integration.test_client_resilience import _waiters

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

OWNER = OWNERS[0]
CROSS_BRIDGE = (
    "a known limit: fetches of one worker id overlapping on two bridges are not ordered (ordering "
    "them would cost a statement per fetch); the second lease comes back after timeToRecover"
)


def fetch_req(svc: str, worker: str, **kw: Any) -> FetchRequest:
    return FetchRequest.model_validate({"serviceId": svc, "workerId": worker, "timeToRecover": 60_000, **kw})


def ack_req(svc: str, worker: str, task_id: str, epoch: int, **kw: Any) -> AckRequest:
    body: dict[str, Any] = {"serviceId": svc, "workerId": worker, "taskId": task_id, "epoch": epoch}
    body.update(kw or {"result": 1})
    return AckRequest.model_validate(body)


def extend_req(svc: str, worker: str, task_id: str, epoch: int, ttr: int = 60_000) -> ExtendRequest:
    return ExtendRequest.model_validate(
        {"serviceId": svc, "workerId": worker, "taskId": task_id, "epoch": epoch, "timeToRecover": ttr}
    )


def fail_req(svc: str, worker: str, task_id: str, epoch: int, retry_in_ms: int = 0) -> FailRequest:
    return FailRequest.model_validate(
        {
            "serviceId": svc,
            "workerId": worker,
            "taskId": task_id,
            "epoch": epoch,
            "retryInMs": retry_in_ms,
            "error": {"m": "x"},
        }
    )


def leases(cql: Any, ks: str, svc: str) -> dict[str, dict[str, Any]]:
    rows = cql.execute(
        f"SELECT task_id, state, worker, epoch FROM {ks}.leases WHERE owner=%s AND service=%s ALLOW FILTERING",
        (OWNER, svc),
    )
    return {str(r["task_id"]): r for r in rows}


def leased_to(cql: Any, ks: str, svc: str, worker: str) -> set[str]:
    return {t for t, r in leases(cql, ks, svc).items() if r["state"] == "leased" and r["worker"] == worker}


async def drain_queue(b: Any, svc: str, worker: str) -> list[str]:
    """Every task still ready, acked (fresh fetches of a worker of its own)."""
    got = []
    while (d := await b.queue.fetch(OWNER, fetch_req(svc, worker, fresh=True))) is not None:
        assert await b.queue.ack(OWNER, ack_req(svc, worker, d.task_id, d.epoch)) is True
        got.append(d.task_id)
    return got


async def results_of(servers: Any, names: dict[str, str], svc: str) -> list[dict[str, Any]]:
    """Every result message of service ``svc`` waiting in this test's results queue (all are taken
    off it: the bridges' relays also publish there what earlier tests left owed in the keyspace)."""
    conn = await aio_pika.connect(servers.amqp_url("guest"))
    got = []
    try:
        ch = await conn.channel()
        q = await ch.declare_queue(names["queue_prefix"] + ".results", passive=True)
        while (m := await q.get(fail=False, no_ack=True)) is not None:
            body = orjson.loads(m.body)
            if body["serviceId"] == svc:
                got.append({"message_id": m.message_id, **body})
    finally:
        await conn.close()
    return got


# -- the same workerId fetching concurrently ---------------------------------------------------------


async def _add_two(engine: Any, svc: str, rnd: int) -> None:
    for i in range(2):
        await engine.add(svc, {"r": rnd, "i": i})


@pytest.mark.xfail(strict=True, reason=CROSS_BRIDGE)
async def test_a_fetch_retried_on_another_bridge_never_strands_a_task_leased_to_the_worker(
    make_bridge, engine, cql, servers
):
    """docs/asyncapi.yaml: "A worker (workerId) holds at most one task per (owner, serviceId).
    Fetching again before acking returns the same task", and README: a fetch whose reply was lost
    may still claim a task, "until then the worker's fetches ask for the task it holds, so that
    task comes back at once instead of after its lease". Two fetches of one worker id running at
    once on two bridges (a retry after a timeout, two pods sharing an id) each claim a task of
    their own; the worker pointer names only one of them. When it names the task of the fetch
    whose reply was lost, that task is leased to the worker and none of its fetches return it:
    it waits out the whole lease (60 s here, up to BRIDGE_MAX_TIME_TO_RECOVER_MS = 12 h). Through
    one bridge its fetches take turns (test_two_concurrent_fetches_of_one_worker_on_one_bridge...);
    across bridges this stays, a known limit: it fails in about half the rounds."""
    b1 = await make_bridge()
    b2 = await make_bridge()
    ks = servers.keyspace
    svc = service_id()
    stranded = []
    double = 0
    for rnd in range(20):
        await _add_two(engine, svc, rnd)
        w = f"w{rnd}"
        lost, seen = await asyncio.gather(
            b1.queue.fetch(OWNER, fetch_req(svc, w)), b2.queue.fetch(OWNER, fetch_req(svc, w))
        )
        if lost is not None and seen is not None and lost.task_id != seen.task_id:
            double += 1
        if seen is not None:
            assert await b2.queue.ack(OWNER, ack_req(svc, w, seen.task_id, seen.epoch)) is True
        while (d := await b2.queue.fetch(OWNER, fetch_req(svc, w))) is not None:
            assert await b2.queue.ack(OWNER, ack_req(svc, w, d.task_id, d.epoch)) is True
        left = leased_to(cql, ks, svc, w)
        if left:
            stranded.append(sorted(left))
            for t in left:  # complete it, so the next round starts clean
                await b1.queue.ack(OWNER, ack_req(svc, w, t, leases(cql, ks, svc)[t]["epoch"]))
        await drain_queue(b1, svc, f"drain{rnd}")
    assert not stranded, (
        f"{len(stranded)} of 20 rounds left a task leased to the worker that none of its fetches hands "
        f"back (it waits out its lease); the two concurrent fetches leased it two tasks in {double} rounds"
    )


@pytest.mark.xfail(strict=True, reason=CROSS_BRIDGE)
async def test_a_contract_1_0_ack_after_a_retried_fetch_completes_the_task_the_worker_was_handed(
    make_bridge, engine, cql, servers
):
    """The same race with a contract 1.0 worker (its ack names no task: "applies to the worker's
    current task", which the docs still support). Its fetch is retried on another bridge while the
    first copy still runs; it gets the retry's reply (task B) and acks B's result. When the pointer
    names the other copy's task A, that ack completes A, a task the worker never saw, with B's
    result (A's work is lost: the engine gets B's result for A), and B stays leased to it. A known
    limit across bridges: contract >= 1.1 acks name their task, and each pod needs its own id."""
    b1 = await make_bridge()
    b2 = await make_bridge()
    ks = servers.keyspace
    svc = service_id()
    wrong = []
    for rnd in range(20):
        await _add_two(engine, svc, rnd)
        w = f"w{rnd}"
        _lost, seen = await asyncio.gather(
            b1.queue.fetch(OWNER, fetch_req(svc, w)), b2.queue.fetch(OWNER, fetch_req(svc, w))
        )
        assert seen is not None
        body = {"serviceId": svc, "workerId": w, "result": {"handled": seen.task_id}}
        done = await b2.queue.ack(OWNER, AckRequest.model_validate(body))
        state = leases(cql, ks, svc)
        if done and state[seen.task_id]["state"] != "done":
            completed = [t for t, r in state.items() if r["state"] == "done" and r["worker"] == w]
            wrong.append((rnd, "handed", seen.task_id, "completed instead", completed))
        for t in leased_to(cql, ks, svc, w):
            await b1.queue.ack(OWNER, ack_req(svc, w, t, leases(cql, ks, svc)[t]["epoch"]))
        await drain_queue(b1, svc, f"drain{rnd}")
    assert not wrong, (
        f"{len(wrong)} of 20 rounds: an ack answered true completed a task the worker was not handed: {wrong[:2]}"
    )


async def test_two_concurrent_fetches_of_one_worker_on_one_bridge_lease_it_one_task(bridge, engine, cql, servers):
    """The same through one bridge (a worker's two coroutines fetching at once, or a retry taken by
    the same bridge): the contract's "holds at most one task" at every moment. Each fetch read the
    pointer (nothing held) and claimed a task of its own, in every round. Now a worker's fetches
    take turns on a bridge, and the second, finding a lease granted meanwhile, resends that task:
    both replies name it."""
    ks = servers.keyspace
    svc = service_id()
    two = []
    for rnd in range(20):
        await _add_two(engine, svc, rnd)
        w = f"w{rnd}"
        first, second = await asyncio.gather(
            bridge.queue.fetch(OWNER, fetch_req(svc, w)), bridge.queue.fetch(OWNER, fetch_req(svc, w))
        )
        assert first is not None and second is not None and first.task_id == second.task_id, (first, second)
        held = leased_to(cql, ks, svc, w)
        if len(held) > 1:
            two.append(sorted(held))
        for t in held:
            await bridge.queue.ack(OWNER, ack_req(svc, w, t, leases(cql, ks, svc)[t]["epoch"]))
        await drain_queue(bridge, svc, f"drain{rnd}")
    assert not two, f"{len(two)} of 20 rounds leased one worker two tasks at once: {two[:2]}"
    assert bridge.queue._fetcher._flights == {}, "the turns of workers with no fetch in flight are kept"


async def test_two_long_polls_of_one_worker_on_one_bridge_hand_it_one_task(bridge, engine, cql, servers):
    """Two long-polls of one worker wait on one bridge (a client's retry after a timeout beside its
    first long-poll, whose reply nobody reads; or two coroutines). Both wait, as waiters of the
    queue; two tasks come: each waiter took a hint and claimed its task, leasing the worker two.
    Now only the claims take turns: the one that claims second finds the worker was granted a lease
    meanwhile, resends that task and puts its hint back, so another worker gets the other task."""
    ks = servers.keyspace
    svc = service_id()
    polls = [asyncio.create_task(bridge.queue.fetch(OWNER, fetch_req(svc, "w", waitMs=10_000))) for _ in range(2)]
    await wait_for(lambda: _waiters(bridge) == 2, 10.0, what="both long-polls waiting")
    added = {await engine.add(svc, {"i": i}) for i in range(2)}
    first, second = await asyncio.wait_for(asyncio.gather(*polls), 15.0)
    assert first is not None and second is not None
    assert first.task_id == second.task_id, "one worker's two long-polls were handed two tasks"
    assert leased_to(cql, ks, svc, "w") == {first.task_id}
    other = await wait_for(lambda: bridge.queue.fetch(OWNER, fetch_req(svc, "w2")), 10.0, what="the other task")
    assert {first.task_id, other.task_id} == added
    for w, d in (("w", first), ("w2", other)):
        assert await bridge.queue.ack(OWNER, ack_req(svc, w, d.task_id, d.epoch)) is True
    assert bridge.queue._fetcher._flights == {}


async def test_a_fetch_behind_another_of_its_worker_gives_up_at_its_callers_deadline(bridge, engine, monkeypatch):
    """A fetch waits for the turn of its worker's fetch in flight on the bridge no longer than its
    caller listens (x-deadline): past it, it claims nothing and is not answered. The one ahead is
    held in its write-ahead here; once it lands, it gets the task, and the worker holds only it."""
    svc = service_id()
    await engine.add(svc, {"n": 1})
    store = bridge.queue.ctx.store
    real = store.write_ahead
    held, release = asyncio.Event(), asyncio.Event()

    async def write_ahead(*args: Any, **kwargs: Any) -> Any:
        if not held.is_set():
            held.set()
            await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "write_ahead", write_ahead)
    ahead = asyncio.create_task(wait_for(lambda: bridge.queue.fetch(OWNER, fetch_req(svc, "w")), 10.0, what="a task"))
    await asyncio.wait_for(held.wait(), 10.0)
    deadline = bridge.queue.clock.now_ms() + 300
    with pytest.raises(RequestAbandoned):
        await asyncio.wait_for(bridge.queue.fetch(OWNER, fetch_req(svc, "w"), deadline_ms=deadline), 5.0)
    assert bridge.queue.clock.now_ms() >= deadline
    release.set()
    d = await ahead
    assert await bridge.queue.ack(OWNER, ack_req(svc, "w", d.task_id, d.epoch)) is True


# -- the same add, twice, at once ------------------------------------------------------------------


async def _publish_add_copies(
    servers: Any, names: dict[str, str], body: dict[str, Any], headers: dict[str, Any], message_id: str, copies: int = 2
) -> list[dict[str, Any]]:
    """Publish ``copies`` identical adds back to back (RabbitMQ hands them round-robin to the
    bridges' consumers) as the engine; their replies."""
    conn = await aio_pika.connect(servers.amqp_url("engine"))
    try:
        ch = await conn.channel()
        replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            await replies.put(orjson.loads(m.body))

        await reply_q.consume(on_reply, no_ack=True)
        ex = await ch.get_exchange(names["exchange"], ensure=False)
        for _ in range(copies):
            await ex.publish(
                aio_pika.Message(
                    orjson.dumps(body),
                    reply_to="amq.rabbitmq.reply-to",
                    correlation_id=uuid.uuid4().hex,
                    user_id="engine",
                    content_type="application/json",
                    message_id=message_id,
                    headers={"x-owner": OWNER, **headers},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key="add",
            )
        return [await asyncio.wait_for(replies.get(), 40) for _ in range(copies)]
    finally:
        await conn.close()


@pytest.mark.parametrize("keyed_by", ["header", "message_id"])
async def test_two_copies_of_one_add_taken_by_two_bridges_at_once_store_one_task(make_bridge, servers, names, keyed_by):
    """An add with an idempotency key is stored once per key (asyncapi, Idempotent add): two
    copies of it (a re-publish after a lost confirm) taken by two bridges at the same moment must
    answer one task id and store one task."""
    b1 = await make_bridge()
    await make_bridge()
    svc = service_id()
    wrong = []
    for rnd in range(12):
        key = f"k-{uuid.uuid4().hex}"
        headers = {"x-idempotency-key": key} if keyed_by == "header" else {}
        replies = await _publish_add_copies(servers, names, {"serviceId": svc, "value": {"r": rnd}}, headers, key)
        ids = {
            r.get("result", {}).get("taskId") if isinstance(r.get("result"), dict) else r.get("result") for r in replies
        }
        if len(ids) != 1 or any("error" in r for r in replies):
            wrong.append(replies)
    stored = await drain_queue(b1, svc, "drain")
    assert not wrong, f"copies of one add answered differently: {wrong[:2]}"
    assert len(stored) == 12, f"12 keyed adds (two copies each) stored {len(stored)} tasks"


# -- one task acked through two bridges at once ------------------------------------------------------


async def _stats(b: Any, svc: str) -> tuple[int, int]:
    [s] = await b.queue.stats(OWNER, svc)
    return s.ready, s.in_flight


@pytest.mark.parametrize("second", ["error", "other_result", "same_result"])
async def test_an_ack_sent_to_two_bridges_at_once_completes_once_and_sends_one_result(
    make_bridge, engine, servers, names, cql, second, monkeypatch
):
    """The same delivery acked through two bridges at the same moment (a retry on another bridge,
    or two pods sharing a worker id), with the same result, a different one, or an error: one
    completion, one result message to the engine, both requests answered (true for the first,
    and a repeat of a completed ack answers true as well), and the queue's counts back at zero.
    The relay re-publishes a result unmarked 2 s after its bucket (FAST_RELAY), so a second copy
    shows up within the wait on the relay's position (``relay_read_past_now``)."""
    monkeypatch.setattr(scheduler, "RELAY_SECOND_PASS_MS", FAST_SECOND_PASS_MS)
    b1 = await make_bridge(**FAST_RELAY)
    b2 = await make_bridge(**FAST_RELAY)
    svc = service_id()
    rounds = 20
    outcomes = {"error": {"error": {"e": 2}}, "other_result": {"result": {"r": 2}}, "same_result": {"result": {"r": 1}}}
    answers = []
    for rnd in range(rounds):
        await engine.add(svc, {"r": rnd}, token={"p": rnd})
        d = await wait_for(lambda: b1.queue.fetch(OWNER, fetch_req(svc, "w", fresh=True)), 10.0, what="a task")
        a1, a2 = await asyncio.gather(
            b1.queue.ack(OWNER, ack_req(svc, "w", d.task_id, d.epoch, result={"r": 1})),
            b2.queue.ack(OWNER, ack_req(svc, "w", d.task_id, d.epoch, **outcomes[second])),
        )
        answers.append((a1, a2))
    # Both true (as the docstring says): ``a1 or a2`` passed with the repeat refused.
    assert all(a1 is True and a2 is True for a1, a2 in answers), f"an ack answered other than true: {answers}"
    got = await _results_once_settled(servers, names, svc, rounds, [b1, b2])
    per_task: dict[str, int] = {}
    for r in got:
        per_task[r["taskId"]] = per_task.get(r["taskId"], 0) + 1
    assert all(n == 1 for n in per_task.values()), f"results per task: {sorted(per_task.values())}"
    assert await drain_queue(b1, svc, "drain") == []
    await wait_for(lambda: _counts_zero(b1, svc), 10.0, what="counts back to 0")


async def _counts_zero(b: Any, svc: str) -> bool:
    return await _stats(b, svc) == (0, 0)


async def _results_once_settled(
    servers: Any, names: Any, svc: str, rounds: int, bridges: list[Any]
) -> list[dict[str, Any]]:
    """Every result the engine got: once each of ``rounds`` tasks has one, and once the relay has
    read every result's outbox bucket twice (a second publication of any of them is in the queue
    by then). It waited 1 s, where a re-published copy comes 10-20 s after the result by default."""
    got: list[dict[str, Any]] = []

    async def all_results() -> bool:
        got.extend(await results_of(servers, names, svc))
        return len({r["taskId"] for r in got}) >= rounds

    await wait_for(all_results, 20.0, interval=0.2, what="a result for every task")
    await relay_read_past_now(bridges)
    got.extend(await results_of(servers, names, svc))
    return got


# -- an ack racing the lease's expiry and the task's redelivery -------------------------------------


async def test_an_ack_racing_the_leases_expiry_and_redelivery_completes_or_is_refused_never_both(
    make_bridge, engine, servers, names, monkeypatch
):
    """w1's lease (300 ms) runs out; its ack goes to b2 just as the task is taken back and a
    fetch of w2 on b1 polls for it. Either the ack completes the task (true) and nobody is handed
    it again, or it is refused (false) and w2 gets it: never both, never neither. One result."""
    monkeypatch.setattr(scheduler, "RELAY_SECOND_PASS_MS", FAST_SECOND_PASS_MS)  # "one result": see below
    b1 = await make_bridge(**FAST_RELAY)
    b2 = await make_bridge(**FAST_RELAY)
    svc = service_id()
    rounds = 24
    bad = []
    stats = {"ack_won": 0, "redelivered": 0}
    for rnd in range(rounds):
        await engine.add(svc, {"r": rnd}, token={"p": rnd})
        d = await wait_for(
            lambda: b1.queue.fetch(OWNER, fetch_req(svc, "w1", fresh=True, timeToRecover=300)), 10.0, what="a task"
        )
        offset_ms = 25 + (rnd % 8) * 8 - 16  # from 16 ms before to 40 ms after deadline + margin
        at = d.lease_expires_at_ms + offset_ms

        async def late_ack(at: int = at, d: Any = d, rnd: int = rnd) -> bool:
            await asyncio.sleep(max(0, at - b2.queue.clock.now_ms()) / 1000)
            return await b2.queue.ack(OWNER, ack_req(svc, "w1", d.task_id, d.epoch, result={"late": rnd}))

        async def poll() -> Any:
            until = time.monotonic() + 1.5
            while time.monotonic() < until:
                got = await b1.queue.fetch(OWNER, fetch_req(svc, "w2"))
                if got is not None:
                    return got
                await asyncio.sleep(0.01)  # a worker's polling pace; when the ack won, a window that stays empty
            return None

        acked, other = await asyncio.gather(late_ack(), poll())
        if other is not None:
            assert other.task_id == d.task_id
            done = await b1.queue.ack(OWNER, ack_req(svc, "w2", other.task_id, other.epoch, result={"w2": rnd}))
            stats["redelivered"] += 1
            if acked or not done:
                bad.append((rnd, offset_ms, "ack true" if acked else "ack false", "redelivered", done))
        else:
            stats["ack_won"] += 1
            if not acked:
                bad.append((rnd, offset_ms, "ack false and nobody got the task"))
        # A copy of w1's ack, later still: refused if w2 completed it, true again if w1 did.
        again = await b2.queue.ack(OWNER, ack_req(svc, "w1", d.task_id, d.epoch, result={"late": rnd}))
        if again != acked:
            bad.append((rnd, offset_ms, "repeat of w1's ack answered", again, "first", acked))
    assert not bad, f"{bad} ({stats})"
    got = await _results_once_settled(servers, names, svc, rounds, [b1, b2])
    assert len(got) == rounds, f"{len(got)} results for {rounds} tasks ({stats})"
    await wait_for(lambda: _counts_zero(b1, svc), 10.0, what="counts back to 0")
    print("STATS", stats)


# -- lifecycle calls racing an ack on another bridge -------------------------------------------------


async def _poll(b: Any, svc: str, worker: str, seconds: float) -> Any:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        got = await b.queue.fetch(OWNER, fetch_req(svc, worker, fresh=True, timeToRecover=60_000))
        if got is not None:
            return got
        await asyncio.sleep(0.02)  # a worker's polling pace; a task that must not come back: a window
    return None


async def test_a_fail_and_an_ack_of_one_task_on_two_bridges_at_once_exactly_one_wins(
    make_bridge, engine, servers, names, monkeypatch
):
    """``fail`` (retry at once) through b1 and ``ack`` through b2 of the same delivery: exactly
    one applies. Failed: the ack is false and the task comes back; acked: the fail is refused and
    the task never comes back. One result per task, counts back to zero."""
    monkeypatch.setattr(scheduler, "RELAY_SECOND_PASS_MS", FAST_SECOND_PASS_MS)  # "one result": see below
    b1 = await make_bridge(**FAST_RELAY)
    b2 = await make_bridge(**FAST_RELAY)
    svc = service_id()
    rounds = 20
    bad = []
    tally = {"fail": 0, "ack": 0}
    for rnd in range(rounds):
        await engine.add(svc, {"r": rnd}, token={"p": rnd})
        d = await wait_for(lambda: b1.queue.fetch(OWNER, fetch_req(svc, "w1", fresh=True)), 10.0, what="a task")
        failed, acked = await asyncio.gather(
            b1.queue.fail(OWNER, fail_req(svc, "w1", d.task_id, d.epoch)),
            b2.queue.ack(OWNER, ack_req(svc, "w1", d.task_id, d.epoch, result={"r": rnd})),
        )
        back = await _poll(b1, svc, "w2", 1.5 if failed is not None else 0.6)
        if back is not None:
            assert await b1.queue.ack(OWNER, ack_req(svc, "w2", back.task_id, back.epoch)) is True
        if (failed is not None) == acked:
            bad.append((rnd, "fail", failed, "ack", acked))
        elif acked and back is not None:
            bad.append((rnd, "acked, then handed out again"))
        elif failed is not None and back is None:
            bad.append((rnd, "failed, never came back"))
        tally["fail" if failed is not None else "ack"] += 1
    assert not bad, f"{bad} {tally}"
    got = await _results_once_settled(servers, names, svc, rounds, [b1, b2])
    assert len(got) == rounds, f"{len(got)} results for {rounds} tasks {tally}"
    await wait_for(lambda: _counts_zero(b1, svc), 10.0, what="counts back to 0")
    print("TALLY", tally)


async def test_an_extend_racing_an_ack_on_another_bridge_never_brings_the_task_back(make_bridge, engine):
    """``extend`` through b1 and ``ack`` through b2 of the same short lease (300 ms): the ack
    completes it; the extend may apply before it, never after; the task is never handed out again."""
    b1 = await make_bridge()
    b2 = await make_bridge()
    svc = service_id()
    bad = []
    for rnd in range(20):
        await engine.add(svc, {"r": rnd})
        d = await wait_for(
            lambda: b1.queue.fetch(OWNER, fetch_req(svc, "w1", fresh=True, timeToRecover=300)), 10.0, what="a task"
        )
        extended, acked = await asyncio.gather(
            b1.queue.extend(OWNER, extend_req(svc, "w1", d.task_id, d.epoch, ttr=300)),
            b2.queue.ack(OWNER, ack_req(svc, "w1", d.task_id, d.epoch)),
        )
        back = await _poll(b1, svc, "w2", 0.8)
        if not acked or back is not None:
            bad.append((rnd, extended, acked, back))
            if back is not None:
                await b1.queue.ack(OWNER, ack_req(svc, "w2", back.task_id, back.epoch))
    assert not bad, bad
    await wait_for(lambda: _counts_zero(b1, svc), 10.0, what="counts back to 0")


async def test_a_fetch_racing_the_workers_fail_on_another_bridge_keeps_the_new_tasks_pointer(
    make_bridge, engine, cql, servers
):
    """w fails its task through b1 (the client gave up waiting for that reply and moved on) while
    its next fetch runs on b2 and claims the next task. ``fail`` then forgets the worker's task
    by re-reading its pointer and clearing it (``Lifecycle._forget``). Both read the same pointer
    (stamped 25 ms ahead by the fresh fetch that wrote it) and both write at its stamp + 1
    (``next_stamp``): on equal write timestamps Cassandra keeps the null (a tombstone wins), so the
    clear wipes the new task's pointer; and when the fail's read already sees the fetch's pointer,
    its clear at the present wipes it too. The contract: "Fetching again before acking returns the
    same task" (a fetch is a heartbeat); instead the worker's next fetch claims yet another task and the one it holds
    stays leased to it, un-handed, until its lease ends (and a lost reply of that fetch strands it)."""
    b1 = await make_bridge()
    b2 = await make_bridge()
    ks = servers.keyspace
    svc = service_id()
    wrong = []
    for rnd in range(40):
        w = f"w{rnd}"
        await engine.add(svc, {"r": rnd, "i": 0})
        first = await wait_for(lambda w=w: b1.queue.fetch(OWNER, fetch_req(svc, w, fresh=True)), 10.0, what="a task")
        for i in (1, 2):
            await engine.add(svc, {"r": rnd, "i": i})

        async def fetch_after(ms: float, w: str = w) -> Any:
            await asyncio.sleep(ms / 1000)
            return await b2.queue.fetch(OWNER, fetch_req(svc, w))

        failed, nxt = await asyncio.gather(
            b1.queue.fail(OWNER, fail_req(svc, w, first.task_id, first.epoch, retry_in_ms=30_000)),
            fetch_after(rnd % 8),  # the fetch starts 0 to 7 ms after the fail
        )
        if failed is not None and nxt is not None and nxt.task_id != first.task_id:
            again = await b2.queue.fetch(OWNER, fetch_req(svc, w))  # a heartbeat: the same task
            if again is None or again.task_id != nxt.task_id:
                wrong.append((rnd, nxt.task_id, again and again.task_id, sorted(leased_to(cql, ks, svc, w))))
        for t in leased_to(cql, ks, svc, w):
            await b1.queue.ack(OWNER, ack_req(svc, w, t, leases(cql, ks, svc)[t]["epoch"]))
        await drain_queue(b1, svc, f"drain{rnd}")
    assert not wrong, (
        f"{len(wrong)} of 40 rounds: the worker's next fetch did not return the task it holds (fail's "
        f"clear wiped its pointer) and leased it another: {wrong[:2]}"
    )


@pytest.mark.parametrize("held", ["the fails read", "the fails clear"])
async def test_a_fail_whose_forget_overlaps_the_workers_next_fetch_keeps_the_new_pointer(
    make_bridge, engine, cql, servers, monkeypatch, held
):
    """The race above, made to happen every time: ``fail`` on b1 has given task 1 back, and its
    forgetting of the worker's pointer is held (before its read, or between its read and its
    clear) while the worker's next fetch on b2 claims task 2 and writes its pointer. Read after
    that write, the fail cleared it at the present; read before it, the fail's clear and the
    write-ahead were stamped alike (the first fetch, fresh, stamped the row ahead: 5 s here, the
    margin of b1) and the clear won the tie. Now it clears only a pointer naming the task it
    failed, just after that pointer's stamp, and a write-ahead is stamped 2 past what it read."""
    b1 = await make_bridge(clock_skew_margin=5.0)
    b2 = await make_bridge()
    ks = servers.keyspace
    svc = service_id()
    await engine.add(svc, {"i": 1})
    first = await wait_for(lambda: b1.queue.fetch(OWNER, fetch_req(svc, "w", fresh=True)), 10.0, what="task 1")
    await engine.add(svc, {"i": 2})
    store = b1.queue.ctx.store
    assert store is not b2.queue.ctx.store
    name = "worker" if held == "the fails read" else "clear_worker"
    real = getattr(store, name)
    reached, release = asyncio.Event(), asyncio.Event()

    async def hold(*args: Any, **kwargs: Any) -> Any:
        reached.set()
        await release.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, name, hold)
    failing = asyncio.create_task(b1.queue.fail(OWNER, fail_req(svc, "w", first.task_id, first.epoch, 30_000)))
    await asyncio.wait_for(reached.wait(), 10.0)  # task 1 given back (its lease released), pointer not forgotten yet
    nxt = await wait_for(lambda: b2.queue.fetch(OWNER, fetch_req(svc, "w")), 10.0, what="task 2")
    assert nxt.task_id != first.task_id
    release.set()
    assert await failing is not None
    again = await b2.queue.fetch(OWNER, fetch_req(svc, "w"))  # a heartbeat: the same task
    assert again is not None and again.task_id == nxt.task_id, "the fail's clear wiped the next task's pointer"
    assert leased_to(cql, ks, svc, "w") == {nxt.task_id}
    assert await b2.queue.ack(OWNER, ack_req(svc, "w", nxt.task_id, nxt.epoch)) is True
